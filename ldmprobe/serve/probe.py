"""The probe service: validated requests → one batched generation → probe maps, image, metadata.

Everything an HTTP front end needs that is not HTTP plumbing lives here, so it is tested
without a server and the TorchServe handler stays a thin adapter. The library knows nothing
of TorchServe: a front end passes raw request bodies in and gets (status, JSON body) out, plus
an optional per-step callback for streaming.

Why the batching looks the way it does:
- Requests with the same shape settings (steps, guidance, height, width, scheduler) share one
  `Sampler.generate` call; each keeps its own prompt and seed, and the initial noise of every
  row is drawn from its own seed, so a batched request gets its unbatched result (up to float
  rounding). Stochastic schedulers (euler_a, ddpm) draw step noise from one generator per
  call, so their requests run alone to keep that promise.
- The compiled U-Net has one graph per input shape. With `pad_batches` a call is padded to the
  next bucket size (1, 2, 4, …) and every call captures the same layer set, so a handful of
  graphs serve every batch; they are compiled once (warm-up or first use) and kept.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generate import StepOutput, make_scheduler, to_pil
from .models import SDModel, load_model
from .probes import METADATA_KEY, ProbeBank
from .schemas import (
    MAX_SERVE_STEPS,
    ArrayPayload,
    GenerationSettings,
    ImagePayload,
    PngScale,
    ProbeMap,
    ProbeRequest,
    ProbeResponse,
    StepResult,
)
from .serving import (  # RequestError, Outcome, buckets_for: re-exported, they lived here first
    STOCHASTIC_SCHEDULERS,
    Outcome,
    RequestError,
    b64,
    bucket,
    buckets_for,
    check_generation,
    internal_error,
    make_sampler,
    parse_body,
    png_b64,
    warm_up,
    worker_info,
)

__all__ = ["Outcome", "ProbeService", "RequestError", "best_layers", "buckets_for"]

DEFAULT_LAYER = "dec4.0"  # the study's reference layer: the fallback when a bank has no test metrics
PRIMARY_METRIC = {"mask": "dice", "continuous": "spearman"}
StepCallback = Callable[[int, dict[str, Any]], None]


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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _stored_checksum(path: Path) -> str | None:
    """The checksum a bank file records in its metadata (verified by ProbeBank.load)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}")).get("checksum")


def best_layers(bank: ProbeBank) -> dict[str, tuple[str, str]]:
    """Per property: (layer, how chosen). The layer with the best primary test metric (Dice for
    masks, Spearman for continuous maps) at the bank's last step; without metrics, dec4.0 when
    the bank has it there, else the first layer that has the property."""
    last = max(bank.steps)
    out = {}
    for prop in bank.properties:
        probes = [p for p in bank if p.property == prop and p.step == last]
        scored = [(p.metrics[PRIMARY_METRIC[p.kind]], p.layer) for p in probes
                  if isinstance(p.metrics.get(PRIMARY_METRIC[p.kind]), (int, float))
                  and p.metrics[PRIMARY_METRIC[p.kind]] == p.metrics[PRIMARY_METRIC[p.kind]]]  # not NaN
        if scored:
            out[prop] = (max(scored)[1], "bank_best")
        elif any(p.layer == DEFAULT_LAYER for p in probes):
            out[prop] = (DEFAULT_LAYER, "default")
        else:
            held = [p.layer for p in bank if p.property == prop]
            out[prop] = (held[0], "default")
    return out


class ProbeService:
    """Serves probe maps for one model and one probe bank."""

    def __init__(self, model: SDModel, bank: ProbeBank, *, bank_path: str | Path | None = None, compile: bool = False,
                 cache_dir: str | Path | None = None, max_batch: int = 8, pad_batches: bool | None = None,
                 capture_all: bool = True, max_side: int | None = None, max_steps: int = MAX_SERVE_STEPS):
        started = time.perf_counter()
        self.model, self.bank = model, bank
        self.sampler = make_sampler(model, compile, cache_dir)
        self.compiled = bool(compile)
        self.pad_batches = self.compiled if pad_batches is None else bool(pad_batches)
        self.buckets = buckets_for(max_batch)
        self.capture_all = capture_all
        self.max_side = int(max_side or 2 * model.default_size)
        self.max_steps = int(max_steps)
        self.layer_names = model.registry().names
        self.defaults = best_layers(bank)
        self._schedules: dict[tuple[str, int], list[float]] = {}
        path = Path(bank_path) if bank_path else None
        self.bank_info = {
            "path": str(path) if path else None,
            "file_sha256": _file_sha256(path) if path else None,
            "checksum": _stored_checksum(path) if path else None,
            "model_identity": bank.identity, "scheduler": bank.scheduler, "num_steps": bank.num_steps,
            "image_size": list(bank.image_size) if bank.image_size else None, "contents": bank.describe(),
            "default_layers": {p: layer for p, (layer, _) in self.defaults.items()},
        }
        self.worker = worker_info(started)

    @classmethod
    def load(cls, model: str = "tiny", bank: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
             attention: str = "sdpa", random_bank_steps: int = 15, **kwargs) -> ProbeService:
        """Load the model and the bank (validated against the model); without a bank file, a
        random demo bank (its maps mean nothing: metadata says so)."""
        sd = load_model(model, device=device, dtype=dtype, attention=attention)
        if bank:
            probes = ProbeBank.load(bank, sd)
        else:
            probes = ProbeBank.random(sd, steps=range(random_bank_steps), scheduler="lms", num_steps=random_bank_steps,
                                      extra={"demo": "random probes: the maps mean nothing"})
        return cls(sd, probes, bank_path=bank, **kwargs)

    # --- validation ---------------------------------------------------------------------------
    def parse(self, raw: Any, decoded: bool = False) -> _Plan:
        """A raw body (bytes or text; or, with decoded=True, a JSON value a front end already
        parsed) → a validated plan, or RequestError."""
        return self.plan(parse_body(raw, ProbeRequest, decoded))

    def plan(self, req: ProbeRequest, index: int = 0) -> _Plan:
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
        bank_steps = self.map_steps(req.scheduler, req.steps)
        for step in req.step_indices():
            j = bank_steps[step]
            for prop, lays in layers.items():
                for layer in lays:
                    if not bank.has(prop, layer, j):
                        where = "layers" if not any(bank.has(prop, layer, s) for s in bank.steps) else "return_steps"
                        raise RequestError("probe_unavailable", where,
                                           f"the probe bank has no probe for property {prop!r} on layer {layer!r} at "
                                           f"bank step {j} (request step {step}); it holds {bank.describe()}")
        return _Plan(index, req, layers, choice, {s: bank_steps[s] for s in req.step_indices()},
                     height, width)

    def _timesteps(self, scheduler: str, steps: int) -> list[float]:
        key = (scheduler, steps)
        if key not in self._schedules:
            sched = make_scheduler(self.model, scheduler)
            sched.set_timesteps(steps)
            self._schedules[key] = [float(t) for t in sched.timesteps]
        return self._schedules[key]

    def map_steps(self, scheduler: str, steps: int) -> list[int]:
        """Bank step for each step of the request's schedule: the bank's step with the nearest
        timestep (the same index when both schedules agree; the index itself when the bank
        does not record its schedule)."""
        bank = self.bank
        if not bank.scheduler or not bank.num_steps:
            return list(range(steps))
        if (scheduler, steps) == (bank.scheduler, bank.num_steps):
            return list(range(steps))
        ours, theirs = self._timesteps(scheduler, steps), self._timesteps(bank.scheduler, bank.num_steps)
        return [min(range(len(theirs)), key=lambda j: (abs(theirs[j] - t), j)) for t in ours]

    # --- running ------------------------------------------------------------------------------
    def handle(self, bodies: Sequence[Any], on_step: StepCallback | None = None,
               decoded: Sequence[bool] | None = None) -> list[Outcome]:
        """Answer a batch of raw bodies (decoded[i]: body i is an already-parsed JSON value).
        on_step(i, chunk) gets each step of request i as it is computed when that request asked
        for streaming. Never raises: bad input is a 400 for that request only, an internal
        failure a 500 for the requests it touched."""
        started = time.perf_counter()
        outcomes: list[Outcome | None] = [None] * len(bodies)
        plans: list[_Plan] = []
        for i, raw in enumerate(bodies):
            try:
                plan = self.parse(raw, decoded=bool(decoded and decoded[i]))
                plan.index = i
                plans.append(plan)
            except RequestError as exc:
                outcomes[i] = Outcome(exc.status, exc.body())
            except Exception as exc:  # a validator bug must not take the batch down
                outcomes[i] = internal_error(f"{type(exc).__name__}: {exc}")
        validate_s = time.perf_counter() - started
        for group in self.groups(plans):
            try:
                for plan, body in zip(group, self.run_group(group, len(bodies), validate_s, on_step), strict=True):
                    outcomes[plan.index] = Outcome(200, body)
            except Exception as exc:
                for plan in group:
                    outcomes[plan.index] = internal_error(f"generation failed: {type(exc).__name__}: {exc}")
        return [o if o is not None else internal_error("no answer") for o in outcomes]

    def groups(self, plans: Sequence[_Plan]) -> list[list[_Plan]]:
        """Plans that can share one generate call, at most the largest bucket each."""
        by_key: dict[tuple, list[_Plan]] = {}
        for plan in plans:
            key = plan.request.shape_key() + ((plan.index,) if plan.request.scheduler in STOCHASTIC_SCHEDULERS else ())
            by_key.setdefault(key, []).append(plan)
        limit = self.buckets[-1]
        return [members[i:i + limit] for members in by_key.values() for i in range(0, len(members), limit)]

    def run_group(self, group: list[_Plan], batch_size: int, validate_s: float,
                  on_step: StepCallback | None = None) -> list[dict[str, Any]]:
        """One batched generation for requests with equal shape settings → response bodies."""
        started = time.perf_counter()
        first = group[0].request
        settings = GenerationSettings(steps=first.steps, guidance=first.guidance, height=first.height,
                                      width=first.width, scheduler=first.scheduler)
        prompts = [p.request.prompt for p in group]
        seeds = [p.request.seed for p in group]
        rows = len(group)
        padded = bucket(rows, self.buckets, self.pad_batches)
        prompts += [prompts[-1]] * (padded - rows)
        seeds += [seeds[-1]] * (padded - rows)
        if self.capture_all:
            capture: list[str] | str = "all"
        else:
            capture = list(dict.fromkeys(la for p in group for lays in p.layers.values() for la in lays))
        registry = self.model.registry(group[0].height, group[0].width)
        backends: set[str] = set()

        def on_output(step: StepOutput) -> None:
            for row, plan in enumerate(group):
                if step.index not in plan.bank_steps:
                    continue
                t0 = time.perf_counter()
                result = self.step_result(plan, row, step, registry, backends)
                plan.steps.append(result)
                plan.probe_s += time.perf_counter() - t0
                if on_step is not None and plan.request.stream:
                    on_step(plan.index, {"event": "step", **result.model_dump(exclude_none=True)})

        gen = self.sampler.generate(prompts, seeds, settings, layers=capture, callback=on_output, keep_steps=False)
        encode_started = time.perf_counter()
        encoded = [png_b64(img) for img in to_pil(gen.images[:rows])]
        encode_s = time.perf_counter() - encode_started
        total_s = time.perf_counter() - started
        probe_s = sum(p.probe_s for p in group)
        meta_common = self.sampler.model.metadata()
        bodies = []
        for row, (plan, png) in enumerate(zip(group, encoded, strict=True)):
            req = plan.request
            metadata = {
                **meta_common,
                "bank": self.bank_info,
                "backend": {"torch": torch.__version__, "device": str(self.model.device), "compiled": self.compiled,
                            "attention": self.model.attention, "probe_backend": ",".join(sorted(backends)) or None,
                            "capture": "all" if self.capture_all else "requested"},
                "compiled": self.compiled,
                "settings": {"prompt": req.prompt, "seed": req.seed, "steps": req.steps, "guidance": req.guidance,
                             "height": plan.height, "width": plan.width, "scheduler": req.scheduler,
                             "timesteps": gen.metadata.get("timesteps")},
                "batch": {"requests": batch_size, "generate_rows": rows, "padded_to": padded, "row": row},
                "worker": self.worker,
                "timings_ms": {
                    "validate": round(validate_s * 1e3, 2),
                    "denoise": round((gen.metadata["timings_s"]["denoise"] - probe_s) * 1e3, 2),
                    "probes": round(plan.probe_s * 1e3, 2),
                    "probes_batch": round(probe_s * 1e3, 2),
                    "decode": round(gen.metadata["timings_s"]["decode"] * 1e3, 2),
                    "encode_image": round(encode_s * 1e3, 2),
                    "total": round((total_s + validate_s) * 1e3, 2),
                },
            }
            response = ProbeResponse(image=ImagePayload(png=png, height=plan.height, width=plan.width),
                                     layers=plan.layers, layer_choice=plan.choice,
                                     steps=[] if req.stream else plan.steps, metadata=metadata)
            body = response.model_dump(exclude_none=True)
            if req.stream:
                body = {"event": "done", **body}
            bodies.append(body)
        return bodies

    def step_result(self, plan: _Plan, row: int, step: StepOutput, registry, backends: set[str]) -> StepResult:
        """Probe maps of one request at one step (its row of the batch's activations)."""
        req = plan.request
        j = plan.bank_steps[step.index]
        size = (plan.height, plan.width) if req.map_size == "image" else None
        by_layer: dict[str, list[str]] = {}
        for prop, lays in plan.layers.items():
            for layer in lays:
                by_layer.setdefault(layer, []).append(prop)
        maps: dict[tuple[str, str], torch.Tensor] = {}
        for layer, props in by_layer.items():
            acts = {layer: step.activations[layer][row:row + 1]}
            out = self.bank.apply(acts, j, properties=props, layers=[layer], size=size, registry=registry)
            backends.add(out.backend)
            maps.update({k: v[0] for k, v in out.items()})
        entries, summary = [], {}
        for prop, lays in plan.layers.items():
            for layer in lays:
                probe = self.bank.probe(prop, layer, j)
                entry = self.map_entry(prop, layer, probe, maps[(prop, layer)], req.format)
                entries.append(entry)
                key = f"{prop}_fraction" if probe.kind == "mask" else f"{prop}_mean"
                summary.setdefault(key, entry.stats["fraction" if probe.kind == "mask" else "mean"])
        return StepResult(step=step.index, timestep=step.timestep, summary=summary, maps=entries)

    @staticmethod
    def map_entry(prop: str, layer: str, probe, y: torch.Tensor, fmt: str) -> ProbeMap:
        """One map [H, W] as stats, PNG (grey levels) and/or float16 array."""
        y = y.detach().float().cpu()
        lo, hi = float(y.min()), float(y.max())
        stats = {"mean": float(y.mean()), "min": lo, "max": hi}
        if probe.kind == "mask":
            stats["fraction"] = float((y > 0.5).float().mean())
        entry = ProbeMap(property=prop, layer=layer, kind=probe.kind, probe=f"{prop}/{layer}/{probe.step}",
                         probe_step=probe.step, shape=list(y.shape), stats=stats,
                         probe_metrics={k: float(v) for k, v in probe.metrics.items()
                                        if isinstance(v, (int, float)) and v == v})
        if fmt in ("png", "both"):
            if probe.kind == "mask":
                scale = PngScale(mode="probability", lo=0.0, hi=1.0)
                grey = y.clamp(0, 1)
            else:
                scale = PngScale(mode="minmax", lo=lo, hi=hi)
                grey = (y - lo) / (hi - lo) if hi > lo else torch.zeros_like(y)
            entry.png = png_b64((grey * 255).round().to(torch.uint8).numpy())
            entry.png_scale = scale
        if fmt in ("array", "both"):
            data = y.to(torch.float16).contiguous().numpy().astype("<f2").tobytes()
            entry.array = ArrayPayload(shape=list(y.shape), data=b64(data))
        return entry

    # --- start-up -----------------------------------------------------------------------------
    def warm(self, batch_sizes: Sequence[int] = (1,), settings: Mapping[str, Any] | None = None) -> float:
        """Compile (or load from the inductor cache) the graphs of these batch sizes with one
        short request each, so the first real request does not pay for it."""
        return warm_up(self, batch_sizes, {"prompt": "warm-up", "steps": 2, **(settings or {})})
