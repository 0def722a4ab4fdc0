"""Shared fixtures: the built-in tiny model (built once per session) and offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ci_guard import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401  (hooks: CI=true fails skips)

ROOT = Path(__file__).resolve().parents[1]
# Hubs are unreachable here: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One inductor cache inside the clone, shared by every compiled test (cold compiles are slow).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))


@pytest.fixture(autouse=True)
def _server_logs_on_failure(request):
    """Print the TorchServe logs under a failing test that used a `server` fixture (they stay in
    the module's tmp dir)."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed and "server" in request.fixturenames:
        print(request.getfixturevalue("server").logs())


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


@pytest.fixture(scope="session")
def dpt_dir(tmp_path_factory):
    """A random-init DPT depth model saved in transformers' format (real loading code path)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    path = tmp_path_factory.mktemp("dpt")
    config = DPTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4,
                       backbone_out_indices=[0, 1, 2, 3], num_attention_heads=4, intermediate_size=37,
                       neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
    import torch

    torch.manual_seed(0)
    DPTForDepthEstimation(config).save_pretrained(path)
    DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(path)
    return path


SCENE_BANK_STEPS = 6  # the scene bank's schedule: LMS, 6 steps (short, so the fit takes ~30 s)


@pytest.fixture(scope="session")
def scene_bank(tmp_path_factory):
    """A probe bank of the tiny model fitted by the training job on rendered scenes (noised mode),
    foreground + depth on all 16 layers, LMS with SCENE_BANK_STEPS steps."""
    from training.fit import main

    out = tmp_path_factory.mktemp("scene_bank") / "run"
    assert main(["--scenes", "12", "--test-scenes", "4", "--properties", "foreground,depth",
                 "--steps", str(SCENE_BANK_STEPS), "--out", str(out), "--no-progress"]) == 0
    return out / "bank.safetensors"


@pytest.fixture(scope="session")
def leading_folder(tiny, tmp_path_factory):
    """The tiny model saved as a diffusers folder whose scheduler config says
    `timestep_spacing: "leading"`, as SD v1.4 re-saved by current diffusers does."""
    import json

    from ldmprobe.models import save_model

    path = save_model(tiny, tmp_path_factory.mktemp("leading") / "model")
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update({"timestep_spacing": "leading", "_diffusers_version": "0.30.0"})
    config_file.write_text(json.dumps(config, indent=2))
    return path
