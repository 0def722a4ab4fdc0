"""The one decode path: latents in the diffusion model's space → images in [0, 1].

`Sampler.decode` (the final image, previews) and the classifier's per-step decoding (the VAE or
a tiny decoder) both run `LatentDecoder.decode`, so the latent scaling and the pixel mapping
are written once.
"""

from __future__ import annotations

from typing import Any

import torch


class LatentDecoder:
    """Latents in the diffusion model's space → images [N, 3, H, W] in [0, 1] (float32, on the
    decoder's device). Each decoder undoes its own latent scaling from its config: SD's VAE was
    trained on unscaled latents (divide by 0.18215), TAESD on the diffusion latents themselves
    (its scaling_factor is 1.0), so dividing by the VAE's factor would feed TAESD latents 5.5×
    too large. AutoencoderTiny's latent_magnitude/latent_shift only pack latents into uint8
    images and play no part in decoding."""

    error: type[Exception] = ValueError  # what a latent of the wrong shape raises (classify: ClassifyError)

    def __init__(self, kind: str, module: torch.nn.Module, source: str, random_weights: bool):
        self.kind, self.module, self.source, self.random_weights = kind, module, source, random_weights
        cfg = module.config
        self.scaling_factor = float(cfg.get("scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(cfg.get("shift_factor", 0.0) or 0.0)
        self.latent_channels = int(cfg.get("latent_channels", 4))
        param = next(module.parameters())
        self.device, self.dtype = param.device, param.dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.shape[1] != self.latent_channels:
            raise self.error(f"the {self.kind} decoder takes {self.latent_channels}-channel latents, "
                             f"got {latents.shape[1]}")
        z = latents.to(self.device, self.dtype) / self.scaling_factor
        if self.shift_factor:
            z = z + self.shift_factor
        images = self.module.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def metadata(self) -> dict[str, Any]:
        meta = {"kind": self.kind, "class": type(self.module).__name__, "weights": self.source,
                "random_weights": self.random_weights, "scaling_factor": self.scaling_factor}
        if self.random_weights:
            meta["warning"] = "random-init decoder: previews are meaningless (tests and benchmarks only)"
        return meta


def vae_decoder(model, cls: type[LatentDecoder] = LatentDecoder) -> LatentDecoder:
    """The model's own VAE as a decoder."""
    return cls("vae", model.vae, str(getattr(model, "source", "vae")), False)
