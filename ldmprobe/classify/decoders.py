"""Decoders for per-step images: the model's VAE or diffusers' AutoencoderTiny (TAESD weights),
both the core's `LatentDecoder` (one decode path with `Sampler.decode`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..decode import LatentDecoder as _CoreDecoder
from ..decode import vae_decoder
from .imagenet import ClassifyError
from .weights import RANDOM, WeightsSourceError, _first_line, _looks_like_hub_id

DEFAULT_TINY_DECODER = "madebyollin/taesd"  # TAESD for SD v1/v2 latents


class LatentDecoder(_CoreDecoder):
    """The core decoder (`ldmprobe.decode.LatentDecoder`); a latent of the wrong shape is a
    ClassifyError (CLI: one line, exit 2; HTTP: 400)."""

    error = ClassifyError


def load_tiny_decoder(source: str | Path = DEFAULT_TINY_DECODER, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> LatentDecoder:
    """diffusers' AutoencoderTiny from a diffusers-format folder (config.json + weights), a hub
    id such as madebyollin/taesd, or ``random`` (its default config, seeded random init)."""
    from diffusers import AutoencoderTiny

    source = str(source)
    if source == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = AutoencoderTiny()
    else:
        path = Path(source).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise WeightsSourceError(f"tiny decoder {source!r} is not a diffusers AutoencoderTiny folder "
                                     "(needs config.json + diffusion_pytorch_model.safetensors)")
        if not path.exists() and not _looks_like_hub_id(source):
            raise WeightsSourceError(f"tiny decoder {source!r} does not exist (a folder, a hub id, or '{RANDOM}')")
        try:
            with warnings.catch_warnings():  # the hub client's deprecation noise would break one-line errors
                warnings.simplefilter("ignore", UserWarning)
                module = AutoencoderTiny.from_pretrained(path if path.exists() else source)
        except Exception as exc:
            raise WeightsSourceError(f"could not load the tiny decoder {source!r} ({_first_line(exc)}); pass a "
                                     f"local AutoencoderTiny folder, or '{RANDOM}' (tests only)") from None
    if (next(module.parameters()).device, module.dtype) != (torch.device(device), dtype):
        module = module.to(device=device, dtype=dtype)  # diffusers warns on any .to(dtype)
    return LatentDecoder("tiny", module.eval().requires_grad_(False), source, source == RANDOM)


def make_decoder(model, kind: str = "vae", tiny_source: str | Path | None = DEFAULT_TINY_DECODER) -> LatentDecoder:
    """The model's own VAE, or a tiny decoder on the model's device and dtype (same latents in,
    same image size out)."""
    if kind == "vae":
        return vae_decoder(model, LatentDecoder)
    if kind != "tiny":
        raise ClassifyError(f"unknown decoder {kind!r}; use vae or tiny")
    decoder = load_tiny_decoder(tiny_source or DEFAULT_TINY_DECODER, model.device, model.dtype)
    want = int(model.vae.config.latent_channels)
    if decoder.latent_channels != want:
        raise WeightsSourceError(f"tiny decoder {tiny_source!r} takes {decoder.latent_channels}-channel latents; "
                                 f"the model's are {want}-channel")
    return decoder
