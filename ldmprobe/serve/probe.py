"""The probe service: validated requests → one batched generation → probe maps, image, metadata.

Why the batching looks the way it does:
- Requests with the same shape settings (steps, guidance, height, width, scheduler) share one
  `Sampler.generate` call; each keeps its own prompt and seed, and the initial noise of every
  row is drawn from its own seed, so a batched request gets its unbatched result (up to float
  rounding). Stochastic schedulers (euler_a, ddpm) draw step noise from one generator per
  call, so their requests run alone to keep that promise (`base.Service.groups`).
- batch_invariant (the default): every call runs at the largest bucket, the U-Net, the probe
  heads (on the padding rows too) and the VAE, so a request's bytes never depend on what else
  is in flight. Off: the compiled U-Net has one graph per input shape; with `pad_batches` a call
  is padded to the next bucket size (1, 2, 4, …) and every call captures the same layer set,
  so a handful of graphs serve every batch; they are compiled once (warm-up or first use).
- The probe heads run once per step: every row × requested layer × property of a step in ONE
  `ProbeBank.apply` (one grouped-kernel launch), maps sliced per request afterwards (and
  upsampled per request when it asked for image-size maps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..generate import StepOutput, to_pil
from ..models import SDModel, load_model
from ..probes import Probe, ProbeBank, ProbeMaps, schedule_timesteps
from ..probes.heads import upsample
from .base import PATH, Batch, RequestError, Service, ServiceConfig, b64, check_generation, map_png, png_b64
from .schemas import ArrayPayload, ImagePayload, ProbeMap, ProbeRequest, ProbeResponse, StepResult

__all__ = ["ProbeConfig", "ProbeService"]


class ProbeConfig(ServiceConfig):
    """The probe model's settings (handlers/probe-config.yaml, `handler:`)."""

    bank: str = Field("bank.safetensors", json_schema_extra=PATH,
                      description='probe bank file (in the archive, or absolute); "" = random demo probes')
    capture: Literal["all", "requested"] = Field(
        "all", description="capture every layer at every call (one graph per bucket) or only those asked for "
                           "(requested: only with batch_invariant false, the graph would change with the company)")

    @model_validator(mode="after")
    def _capture_keeps_invariance(self) -> ProbeConfig:
        if self.capture == "requested" and self.batch_invariant:
            raise ValueError("capture 'requested' changes the compiled graph with the batch's layers: "
                             "set batch_invariant false to use it")
        return self


@dataclass
class _Plan:
    """A validated request and what it resolved to: layers per property, bank step per step."""

    index: int
    request: ProbeRequest
    layers: dict[str, list[str]]
    choice: dict[str, str]
    bank_steps: dict[int, int]  # request step index → bank step
    height: int
    width: int
    steps: list[StepResult] = field(default_factory=list)
    probe_s: float = 0.0
    step_mapping: dict[str, Any] = field(default_factory=dict)  # request timesteps against the bank's


@dataclass
class _Generated:
    """What a group's run leaves for each answer."""

    png: str
    row: int
    rows: int
    padded: int
    timesteps: list[float] | None
    timings: dict[str, float]
    backends: set[str]


class ProbeService(Service):
    """Serves probe maps for one model and one probe bank."""

    Config = ProbeConfig
    Request = ProbeRequest

    def __init__(self, model: SDModel, bank: ProbeBank, config: ProbeConfig | None = None, **settings: Any):
        self.bank = bank
        super().__init__(model, config, **settings)

    def setup(self) -> None:
        self.layer_names = self.model.registry().names
        self.defaults = self.bank.best_layers()
        bank = self.bank
        self.bank_info = {
            "path": str(bank.path) if bank.path else None,
            "file_sha256": bank.file_sha256(),
            "checksum": bank.checksum,
            "model_identity": bank.identity, "scheduler": bank.scheduler, "num_steps": bank.num_steps,
            "image_size": list(bank.image_size) if bank.image_size else None, "contents": bank.describe(),
            "default_layers": {p: layer for p, (layer, _) in self.defaults.items()},
            "upsample": bank.upsample,  # how map_size "image" maps are drawn
        }

    @classmethod
    def from_config(cls, config: ProbeConfig, **kwargs: Any) -> ProbeService:
        """Load the model and the bank (validated against the model); without a bank file, a
        random demo bank (its maps mean nothing: metadata says so)."""
        sd = load_model(config.model, device=config.device, dtype=config.dtype, attention=config.attention)
        if config.bank:
            probes = ProbeBank.load(config.bank, sd)
        else:
            probes = ProbeBank.random(sd, steps=range(15), scheduler="lms", num_steps=15,
                                      extra={"demo": "random probes: the maps mean nothing"})
        return cls(sd, probes, config, **kwargs)

    @classmethod
    def load(cls, model: str = "scenes", bank: str | None = None, **settings: Any) -> ProbeService:
        """`from_config` with the settings as keywords (max_batch, pad_batches too)."""
        extra = {k: settings.pop(k) for k in ("max_batch", "pad_batches") if k in settings}
        return cls.from_config(cls.Config(model=str(model), bank=str(bank or ""), **settings), **extra)

    # --- validation ---------------------------------------------------------------------------
    def check(self, req: ProbeRequest, index: int = 0) -> _Plan:
        """Check a schema-valid request against this model and bank; resolve layers and steps."""
        height, width = check_generation(req, self.model, self.max_steps, self.max_side)
        bank = self.bank
        props = req.properties or bank.properties
        for prop in props:
            if prop not in bank.properties:
                raise RequestError("unknown_property", "properties",
                                   f"unknown property {prop!r}; this bank has {', '.join(bank.properties)}")
        if req.layers is not None:
            for layer in req.layers:
                if layer not in self.layer_names:
                    raise RequestError("unknown_layer", "layers",
                                       f"unknown layer {layer!r}; this model's layers: {', '.join(self.layer_names)}")
            layers = {p: list(req.layers) for p in props}
            choice = dict.fromkeys(props, "request")
        else:
            layers = {p: [self.defaults[p][0]] for p in props}
            choice = {p: self.defaults[p][1] for p in props}
        mapping = self.step_mapping(req.scheduler, req.steps)
        if mapping["exact"] is False and req.protocol == "study":
            field_ = "scheduler" if bank.scheduler and req.scheduler != bank.scheduler else "steps"
            raise RequestError("invalid_request", field_,
                               f"the request's {req.steps} {req.scheduler} timesteps differ from those the probe bank "
                               f"was fitted at ({bank.num_steps} {bank.scheduler}); the study protocol does not map "
                               "steps (protocol 'ldmprobe' maps each step to the bank's nearest timestep)")
        bank_steps = mapping["bank_steps"]
        for step in req.step_indices():
            j = bank_steps[step]
            for prop, lays in layers.items():
                for layer in lays:
                    if not bank.has(prop, layer, j):
                        where = "layers" if not any(bank.has(prop, layer, s) for s in bank.steps) else "return_steps"
                        raise RequestError("probe_unavailable", where,
                                           f"the probe bank has no probe for property {prop!r} on layer {layer!r} at "
                                           f"bank step {j} (request step {step}); it holds {bank.describe()}")
        return _Plan(index, req, layers, choice, {s: bank_steps[s] for s in req.step_indices()}, height, width,
                     step_mapping={k: mapping[k] for k in ("exact", "bank_timesteps", "bank_steps")})

    def step_mapping(self, scheduler: str, steps: int) -> dict[str, Any]:
        """The request's exact timesteps against the bank's (`ProbeBank.timestep_mapping`): the same
        step when they agree, else the bank's step of the nearest timestep."""
        return self.bank.timestep_mapping(schedule_timesteps(self.sampler, scheduler, steps), self.model)

    def map_steps(self, scheduler: str, steps: int) -> list[int]:
        """Bank step for each step of the request's schedule (see `step_mapping`)."""
        return self.step_mapping(scheduler, steps)["bank_steps"]

    def group_key(self, plan: _Plan) -> tuple:
        return plan.request.shape_key()

    # --- running ------------------------------------------------------------------------------
    def run_group(self, group: list[_Plan], batch: Batch) -> list[_Generated]:
        """One batched generation for requests with equal shape settings; the probe heads of
        each step in one grouped call for all of them."""
        started = time.perf_counter()
        first = group[0]
        rows = len(group)
        padded = self.bucket(rows)
        if self.config.capture == "all":
            capture: list[str] | str = "all"
        else:
            capture = list(dict.fromkeys(la for p in group for lays in p.layers.values() for la in lays))
        registry = self.model.registry(first.height, first.width)
        backends: set[str] = set()
        probe_total = 0.0

        def on_output(step: StepOutput) -> None:
            nonlocal probe_total
            active = [(row, plan) for row, plan in enumerate(group) if step.index in plan.bank_steps]
            if not active:
                return
            t0 = time.perf_counter()
            j = active[0][1].bank_steps[step.index]  # one schedule per group: one bank step
            pairs = list(dict.fromkeys((prop, layer) for _, plan in active for prop, lays in plan.layers.items()
                                       for layer in lays))
            layers = dict.fromkeys(layer for _, layer in pairs)
            maps = self.bank.apply({la: step.activations[la] for la in layers}, j, pairs=pairs, registry=registry)
            backends.add(maps.backend)
            shared = time.perf_counter() - t0
            for row, plan in active:
                t1 = time.perf_counter()
                result = self.step_result(plan, row, step, maps)
                plan.steps.append(result)
                plan.probe_s += shared + time.perf_counter() - t1
                if batch.on_step is not None and plan.request.stream:
                    batch.on_step(plan.index, {"event": "step", **result.model_dump(exclude_none=True)})
            probe_total += time.perf_counter() - t0

        gen = self.sampler.generate([p.request.prompt for p in group], [p.request.seed for p in group],
                                    first.request.settings(), layers=capture, callback=on_output, keep_steps=False,
                                    pad_to=padded, keep_padding=self.batch_invariant)
        encode_started = time.perf_counter()
        encoded = [png_b64(img) for img in to_pil(gen.images)]
        encode_s = time.perf_counter() - encode_started
        timings = {"denoise": gen.metadata["timings_s"]["denoise"] - probe_total, "probes_batch": probe_total,
                   "decode": gen.metadata["timings_s"]["decode"], "encode_image": encode_s,
                   "run": time.perf_counter() - started}
        return [_Generated(png, row, rows, padded, gen.metadata.get("timesteps"), timings, backends)
                for row, png in enumerate(encoded)]

    def step_result(self, plan: _Plan, row: int, step: StepOutput, maps: ProbeMaps) -> StepResult:
        """Probe maps of one request at one step: its row of the step's maps."""
        req = plan.request
        j = plan.bank_steps[step.index]
        entries, summary = [], {}
        for prop, lays in plan.layers.items():
            for layer in lays:
                probe = self.bank.probe(prop, layer, j)
                y = maps[(prop, layer)][row:row + 1]
                if req.map_size == "image":
                    y = upsample(y, (plan.height, plan.width), self.bank.upsample)
                entry = self.map_entry(prop, layer, probe, y[0], req.format)
                entries.append(entry)
                key = f"{prop}_fraction" if probe.kind == "mask" else f"{prop}_mean"
                summary.setdefault(key, entry.stats["fraction" if probe.kind == "mask" else "mean"])
        return StepResult(step=step.index, timestep=step.timestep, summary=summary, maps=entries)

    @staticmethod
    def map_entry(prop: str, layer: str, probe: Probe, y: torch.Tensor, fmt: str) -> ProbeMap:
        """One map [H, W] as stats, PNG (grey levels) and/or float16 array."""
        y = y.detach().float().cpu()
        stats = {"mean": float(y.mean()), "min": float(y.min()), "max": float(y.max())}
        if probe.kind == "mask":
            stats["fraction"] = float((y > 0.5).float().mean())
        entry = ProbeMap(property=prop, layer=layer, kind=probe.kind, probe=f"{prop}/{layer}/{probe.step}",
                         probe_step=probe.step, shape=list(y.shape), stats=stats,
                         probe_metrics={k: float(v) for k, v in probe.metrics.items()
                                        if isinstance(v, (int, float)) and v == v})
        if fmt in ("png", "both"):
            entry.png, entry.png_scale = map_png(y, probe.kind)
        if fmt in ("array", "both"):
            data = y.to(torch.float16).contiguous().numpy().astype("<f2").tobytes()
            entry.array = ArrayPayload(shape=list(y.shape), data=b64(data))
        return entry

    def answer(self, plan: _Plan, gen: _Generated, batch: Batch) -> dict[str, Any]:
        req = plan.request
        ms = {k: round(v * 1e3, 2) for k, v in gen.timings.items()}
        metadata = {
            **self.model.metadata(),
            "bank": self.bank_info,
            "backend": {"torch": torch.__version__, "device": str(self.model.device), "compiled": self.compiled,
                        "attention": self.model.attention, "probe_backend": ",".join(sorted(gen.backends)) or None,
                        "capture": self.config.capture},
            "compiled": self.compiled,
            "protocol": req.protocol,
            "step_mapping": plan.step_mapping,
            "settings": {"prompt": req.prompt, "seed": req.seed, "steps": req.steps, "guidance": req.guidance,
                         "height": plan.height, "width": plan.width, "scheduler": req.scheduler,
                         "timesteps": gen.timesteps},
            "batch": {"requests": batch.requests, "generate_rows": gen.rows, "padded_to": gen.padded, "row": gen.row},
            "worker": self.worker,
            "timings_ms": {
                "validate": round(batch.validate_s * 1e3, 2),
                "denoise": ms["denoise"],
                "probes": round(plan.probe_s * 1e3, 2),
                "probes_batch": ms["probes_batch"],
                "decode": ms["decode"],
                "encode_image": ms["encode_image"],
                "total": round((gen.timings["run"] + batch.validate_s) * 1e3, 2),
            },
        }
        response = ProbeResponse(image=ImagePayload(png=gen.png, height=plan.height, width=plan.width),
                                 layers=plan.layers, layer_choice=plan.choice,
                                 steps=[] if req.stream else plan.steps, metadata=metadata)
        body = response.model_dump(exclude_none=True)
        return {"event": "done", **body} if req.stream else body
