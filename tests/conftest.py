"""Shared fixtures: the built-in tiny model (built once per session) and offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Hubs are unreachable here: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One inductor cache inside the clone, shared by every compiled test (cold compiles are slow).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))


@pytest.fixture(scope="session")
def tiny():
    from ldmprobe.models import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def sampler(tiny):
    from ldmprobe.generate import Sampler

    return Sampler(tiny)


@pytest.fixture(scope="session")
def sd14_meta_unet():
    """The real SD v1.4 U-Net built from its config on the meta device (no weights, no memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    from ldmprobe.models import sd_v1_4_config

    config = {k: v for k, v in sd_v1_4_config("unet").items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**config)
