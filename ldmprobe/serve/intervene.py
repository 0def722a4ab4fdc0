"""The intervene service: a validated request → one intervention → images, masks, success numbers.

An intervention is an optimisation loop inside a generation, so the work is bounded before
anything runs: steps ≤ max_steps, sides ≤ max_side, and iterations × edited layers × edited
steps ≤ max_work (the study's defaults are 128 × 9 × 5 = 5760, ldmprobe's 128 × 16 × 5 = 10240). Requests of one TorchServe
batch run one after the other (`batches = False`): each already runs its own unedited twin in
the same batch, and two interventions would not share their optimisation anyway.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from ..generate import to_pil
from ..intervene import Intervention, InterventionError, InterventionResult, InterventionSpec
from ..models import SDModel, load_model
from ..probes import ProbeBank
from .base import PATH, Batch, RequestError, Service, ServiceConfig, check_generation, map_png, png_b64
from .schemas import ImagePayload, InterveneRequest, InterveneResponse, MaskImage


class InterveneConfig(ServiceConfig):
    """The intervene model's settings (handlers/intervene-config.yaml, `handler:`)."""

    bank: str = Field("bank.safetensors", json_schema_extra=PATH,
                      description="probe bank fitted for this model (packed into the archive); required")
    max_work: int = Field(16384, ge=1, description="iterations × edited layers × edited steps per request "
                                                    "(the study's defaults: 128 × 9 × 5 = 5760)")
    label_models: str = Field("", json_schema_extra=PATH,
                              description='label models that also score each result (foreground / depth maps of both '
                                          'images): "scenes" (the shipped scenes label models), a label-model folder, '
                                          'or "" = the probe only')


@dataclass
class _Job:
    index: int
    request: InterveneRequest
    spec: InterventionSpec


class InterveneService(Service):
    """Serves interventions for one model and one probe bank."""

    Config = InterveneConfig
    Request = InterveneRequest
    work = "intervention"
    batches = False

    def __init__(self, model: SDModel, bank: ProbeBank, config: InterveneConfig | None = None, **settings: Any):
        self.bank = bank
        super().__init__(model, config, **settings)

    def _label_models(self) -> dict[str, Any] | None:
        source = self.config.label_models
        if not source:
            return None
        from ..label_models import load_label_models

        lm = load_label_models(None if source == "scenes" else source, device=self.model.device)
        return {"foreground": lm.foreground, "depth": lm.depth}

    def setup(self) -> None:
        bank = self.bank
        self.runner = Intervention(self.sampler, bank, label_model=self._label_models())
        self.max_work = int(self.config.max_work)
        self.bank_info = {"path": str(bank.path) if bank.path else None, "model_identity": bank.identity,
                          "scheduler": bank.scheduler, "num_steps": bank.num_steps, "contents": bank.describe()}

    @classmethod
    def from_config(cls, config: InterveneConfig, **kwargs: Any) -> InterveneService:
        """Load the model and its probe bank (validated against the model). A bank is required:
        random probes would "move" nothing real, so there is no demo fallback."""
        if not config.bank:
            raise ValueError("the intervene service needs a probe bank fitted for this model (handler setting 'bank')")
        sd = load_model(config.model, device=config.device, dtype=config.dtype, attention=config.attention)
        return cls(sd, ProbeBank.load(config.bank, sd), config, **kwargs)

    @classmethod
    def load(cls, model: str = "scenes", bank: str | None = None, **settings: Any) -> InterveneService:
        """`from_config` with the settings as keywords."""
        extra = {k: settings.pop(k) for k in ("max_batch", "pad_batches") if k in settings}
        return cls.from_config(cls.Config(model=str(model), bank=str(bank or ""), **settings), **extra)

    # --- validation ---------------------------------------------------------------------------
    def check(self, req: InterveneRequest, index: int = 0) -> _Job:
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
        return _Job(index, req, spec)

    # --- running ------------------------------------------------------------------------------
    def run_group(self, group: list[_Job], batch: Batch) -> list[InterventionResult]:
        return [self.runner.run(job.request.prompt, job.request.seed, job.spec, job.request.settings())
                for job in group]

    def answer(self, job: _Job, result: InterventionResult, batch: Batch) -> dict[str, Any]:
        req = job.request
        encode_started = time.perf_counter()
        original, edited = to_pil(torch.stack([result.original, result.edited]))
        h, w = result.original.shape[-2:]
        images = {"original": ImagePayload(png=png_b64(original), height=h, width=w),
                  "edited": ImagePayload(png=png_b64(edited), height=h, width=w)}
        kind = "mask" if req.property == "foreground" else "continuous"
        masks = {}
        for name, values in (("original", result.original_map), ("target", result.target_map),
                             ("achieved", result.edited_map)):
            png, scale = map_png(values, kind)
            masks[name] = MaskImage(png=png, height=values.shape[0], width=values.shape[1], png_scale=scale)
        encode_s = time.perf_counter() - encode_started
        timings = {k: round(v * 1e3, 2) for k, v in result.timings_s.items()}
        timings |= {"validate": round(batch.validate_s * 1e3, 2), "encode": round(encode_s * 1e3, 2)}
        meta = {**self.model.metadata(), **result.metadata, "bank": self.bank_info, "compiled": self.compiled,
                "batch": {"requests": batch.requests, "row": job.index}, "worker": self.worker, "timings_ms": timings,
                "limits": {"max_work": self.max_work, "work": req.iterations * len(result.layers)
                           * len(result.edit_steps)}}
        return InterveneResponse(images=images, masks=masks, success=result.success, layers=result.layers,
                                 edit_steps=result.edit_steps,
                                 losses={str(k): v for k, v in result.losses.items()},
                                 metadata=meta).model_dump(mode="json")

    # --- start-up -----------------------------------------------------------------------------
    def warm_request(self) -> dict[str, Any]:
        """One short intervention, so the first request does not pay for compiling."""
        return {"prompt": "warm-up", "steps": min(2, self.max_steps), "dx": 8, "edit_steps": [0], "iterations": 2}
