"""The intervention request: one pydantic model for the CLI and the endpoint, so both refuse the
same mistakes with the same field name. Limits that need the model and the bank (layer names,
edit steps against the bank, the work bound) are checked by `Intervention.resolve` and the service."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Literal

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator

from .intervene import DEFAULT_ITERATIONS, DEFAULT_LR, InterventionSpec
from .schemas import MAX_PROMPT_CHARS, MAX_SEED, MAX_SERVE_STEPS, GenerationSettings

MAX_ITERATIONS = 1024
MAX_MASK_BYTES = 8 * 2**20
MAX_SHIFT = 4096.0


def decode_mask(data: str) -> torch.Tensor:
    """Base64 PNG (any mode: grey, RGB(A) → luminance) → [H, W] float32 in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None
    if len(raw) > MAX_MASK_BYTES:
        raise ValueError(f"is larger than {MAX_MASK_BYTES // 2**20} MiB")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "PNG":
                raise ValueError(f"must be a PNG image, got {img.format}")
            if img.width * img.height > 4096 * 4096:
                raise ValueError("is too large (at most 4096×4096 pixels)")
            grey = img.convert("L")
            grey.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ValueError("is not a readable PNG image") from None
    import numpy as np

    return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)


class InterveneRequest(GenerationSettings):
    """Move the foreground (or reshape depth) of one generation by editing activations through
    the probes. Shift by dx, dy pixels (right, down), or give `affine` (2×3 in pixels, source →
    destination), or a `target_mask` (PNG, the image's size; foreground only)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    steps: int = Field(15, ge=1, le=MAX_SERVE_STEPS)
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    property: Literal["foreground", "depth"] = "foreground"
    dx: float = Field(0.0, ge=-MAX_SHIFT, le=MAX_SHIFT)
    dy: float = Field(0.0, ge=-MAX_SHIFT, le=MAX_SHIFT)
    affine: list[list[float]] | None = None
    target_mask: str | None = Field(None, min_length=1, max_length=MAX_MASK_BYTES * 4 // 3 + 4)
    layers: list[str] | str | None = None
    edit_steps: list[int] | None = Field(None, min_length=1, max_length=200)
    lr: float = Field(DEFAULT_LR, gt=0.0, le=1.0)
    iterations: int = Field(DEFAULT_ITERATIONS, ge=0, le=MAX_ITERATIONS)
    loss: Literal["auto", "bce", "mse", "huber"] = "auto"
    eval_layer: str | None = None

    @field_validator("affine")
    @classmethod
    def _two_by_three(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        if v is not None:
            if len(v) != 2 or any(len(row) != 3 for row in v):
                raise ValueError("must be a 2×3 matrix [[a, b, tx], [c, d, ty]] in pixels")
            if any(abs(x) > 1e6 or x != x for row in v for x in row):
                raise ValueError("entries must be finite numbers of at most 1e6")
        return v

    @field_validator("target_mask")
    @classmethod
    def _readable_mask(cls, v: str | None) -> str | None:
        if v is not None:
            decode_mask(v)
        return v

    @field_validator("edit_steps")
    @classmethod
    def _distinct_steps(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(s < 0 for s in v):
            raise ValueError("steps are 0-based indices (>= 0)")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> InterveneRequest:
        given = [name for name, on in (("affine", self.affine is not None), ("target_mask", self.target_mask is not None))
                 if on]
        if len(given) > 1:
            raise ValueError("give at most one of affine and target_mask (dx/dy are ignored with either)")
        if given and (self.dx or self.dy):
            raise ValueError(f"dx/dy and {given[0]} both given: choose one way to say where the object goes")
        if self.target_mask is not None and self.property != "foreground":
            raise ValueError("target_mask is for the foreground property only")
        return self

    def settings(self) -> GenerationSettings:
        return GenerationSettings(**self.model_dump(include=set(GenerationSettings.model_fields)))

    def spec(self) -> InterventionSpec:
        mask = decode_mask(self.target_mask) if self.target_mask is not None else None
        return InterventionSpec(property=self.property, dx=self.dx, dy=self.dy, affine=self.affine, target_mask=mask,
                                layers=self.layers, edit_steps=self.edit_steps, lr=self.lr, iterations=self.iterations,
                                loss=self.loss, eval_layer=self.eval_layer)
