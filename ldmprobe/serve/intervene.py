"""The intervene service: a validated request → one intervention → images, masks, success numbers.

The library side of POST /predictions/intervene, shaped like the probe and classify services:
raw bodies in, `Outcome(status, JSON body)` out, never raises, nothing of TorchServe.

An intervention is an optimisation loop inside a generation, so the work is bounded before
anything runs: steps ≤ max_steps, sides ≤ max_side, and iterations × edited layers × edited
steps ≤ max_work (the study's defaults are 128 × 9 × 5 = 5760). Requests of one TorchServe
batch run one after the other: each already runs its own unedited twin in the same batch, and
two interventions would not share their optimisation anyway.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from .generate import to_pil
from .intervene import Intervention, InterventionError, InterventionResult, InterventionSpec
from .intervene_schema import InterveneRequest
from .models import SDModel, load_model
from .probes import ProbeBank
from .schemas import MAX_SERVE_STEPS, ImagePayload, PngScale
from .serving import (
    Outcome,
    RequestError,
    check_generation,
    internal_error,
    make_sampler,
    parse_body,
    png_b64,
    warm_up,
    worker_info,
)

DEFAULT_MAX_WORK = 16384


class MaskImage(ImagePayload):
    """A map as a grey PNG; png_scale says how grey levels map back to values."""

    png_scale: PngScale


class InterveneResponse(BaseModel):
    """original / edited images, original / target / achieved maps, the success numbers (see
    `ldmprobe.intervene.measure`), per-step losses, timings and metadata."""

    images: dict[str, ImagePayload]
    masks: dict[str, MaskImage]
    success: dict[str, Any]
    layers: list[str]
    edit_steps: list[int]
    losses: dict[str, dict[str, dict[str, float]]]
    metadata: dict[str, Any]


def _map_png(values: torch.Tensor, prop: str) -> MaskImage:
    y = values.detach().float().cpu()
    if prop == "foreground":
        scale, grey = PngScale(mode="probability", lo=0.0, hi=1.0), y.clamp(0, 1)
    else:
        lo, hi = float(y.min()), float(y.max())
        scale = PngScale(mode="minmax", lo=lo, hi=hi)
        grey = (y - lo) / (hi - lo) if hi > lo else torch.zeros_like(y)
    png = png_b64((grey * 255).round().to(torch.uint8).numpy())
    return MaskImage(png=png, height=y.shape[0], width=y.shape[1], png_scale=scale)


class InterveneService:
    """Serves interventions for one model and one probe bank."""

    def __init__(self, model: SDModel, bank: ProbeBank, *, bank_path: str | Path | None = None, compile: bool = False,
                 cache_dir: str | Path | None = None, max_side: int | None = None, max_steps: int = MAX_SERVE_STEPS,
                 max_work: int = DEFAULT_MAX_WORK):
        started = time.perf_counter()
        self.model, self.bank = model, bank
        self.sampler = make_sampler(model, compile, cache_dir)
        self.runner = Intervention(self.sampler, bank)
        self.compiled = bool(compile)
        self.max_side = int(max_side or 2 * model.default_size)
        self.max_steps = int(max_steps)
        self.max_work = int(max_work)
        self.bank_info = {"path": str(bank_path) if bank_path else None, "model_identity": bank.identity,
                          "scheduler": bank.scheduler, "num_steps": bank.num_steps, "contents": bank.describe()}
        self.worker = worker_info(started)

    @classmethod
    def load(cls, model: str = "tiny", bank: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
             attention: str = "sdpa", **kwargs) -> InterveneService:
        """Load the model and its probe bank (validated against the model). A bank is required:
        random probes would "move" nothing real, so there is no demo fallback."""
        if not bank:
            raise ValueError("the intervene service needs a probe bank fitted for this model (handler setting 'bank')")
        sd = load_model(model, device=device, dtype=dtype, attention=attention)
        return cls(sd, ProbeBank.load(bank, sd), bank_path=bank, **kwargs)

    # --- validation ---------------------------------------------------------------------------
    def parse(self, raw: Any, decoded: bool = False) -> tuple[InterveneRequest, InterventionSpec]:
        req = parse_body(raw, InterveneRequest, decoded)
        return req, self.check(req)

    def check(self, req: InterveneRequest) -> InterventionSpec:
        """The request against this model, bank and limits → the spec to run (mask decoded once)."""
        height, width = check_generation(req, self.model, self.max_steps, self.max_side)
        spec = req.spec()
        if spec.target_mask is not None and tuple(spec.target_mask.shape) != (height, width):
            raise RequestError("invalid_request", "target_mask",
                               f"must be {width}×{height} pixels (the image), got "
                               f"{spec.target_mask.shape[1]}×{spec.target_mask.shape[0]}")
        try:
            layers, steps, _, _ = self.runner.resolve(spec, req.settings())
        except InterventionError as exc:
            raise RequestError("invalid_request", exc.field, str(exc)) from None
        work = spec.work(len(layers), len(steps))
        if work > self.max_work:
            raise RequestError("too_much_work", "iterations",
                               f"iterations × layers × edit steps = {spec.iterations} × {len(layers)} × {len(steps)} = "
                               f"{work}; this server allows at most {self.max_work}")
        return spec

    # --- running ------------------------------------------------------------------------------
    def handle(self, bodies: Sequence[Any], decoded: Sequence[bool] | None = None) -> list[Outcome]:
        """Answer a batch of raw bodies, one intervention after the other. Never raises."""
        outcomes = []
        for i, raw in enumerate(bodies):
            started = time.perf_counter()
            try:
                req, spec = self.parse(raw, decoded=bool(decoded and decoded[i]))
            except RequestError as exc:
                outcomes.append(Outcome(exc.status, exc.body()))
                continue
            except Exception as exc:  # a validator bug must not take the batch down
                outcomes.append(internal_error(f"{type(exc).__name__}: {exc}"))
                continue
            validate_s = time.perf_counter() - started
            try:
                result = self.runner.run(req.prompt, req.seed, spec, req.settings())
                outcomes.append(Outcome(200, self.response(req, result, validate_s, len(bodies), i)))
            except Exception as exc:
                outcomes.append(internal_error(f"intervention failed: {type(exc).__name__}: {exc}"))
        return outcomes

    def response(self, req: InterveneRequest, result: InterventionResult, validate_s: float, batch: int,
                 row: int) -> dict[str, Any]:
        encode_started = time.perf_counter()
        original, edited = to_pil(torch.stack([result.original, result.edited]))
        h, w = result.original.shape[-2:]
        images = {"original": ImagePayload(png=png_b64(original), height=h, width=w),
                  "edited": ImagePayload(png=png_b64(edited), height=h, width=w)}
        prop = req.property
        masks = {"original": _map_png(result.original_map, prop), "target": _map_png(result.target_map, prop),
                 "achieved": _map_png(result.edited_map, prop)}
        encode_s = time.perf_counter() - encode_started
        timings = {k: round(v * 1e3, 2) for k, v in result.timings_s.items()}
        timings |= {"validate": round(validate_s * 1e3, 2), "encode": round(encode_s * 1e3, 2)}
        meta = {**self.model.metadata(), **result.metadata, "bank": self.bank_info, "compiled": self.compiled,
                "batch": {"requests": batch, "row": row}, "worker": self.worker, "timings_ms": timings,
                "limits": {"max_work": self.max_work, "work": req.iterations * len(result.layers)
                           * len(result.edit_steps)}}
        return InterveneResponse(images=images, masks=masks, success=result.success, layers=result.layers,
                                 edit_steps=result.edit_steps,
                                 losses={str(k): v for k, v in result.losses.items()},
                                 metadata=meta).model_dump(mode="json")

    # --- start-up -----------------------------------------------------------------------------
    def warm(self, batch_sizes: Sequence[int] = (1,), settings: Mapping[str, Any] | None = None) -> float:
        """One short intervention, so the first request does not pay for compiling."""
        body = {"prompt": "warm-up", "steps": min(2, self.max_steps), "dx": 8, "edit_steps": [0], "iterations": 2,
                **(settings or {})}
        return warm_up(self, (1,), body)
