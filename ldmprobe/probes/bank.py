"""Probe banks: fitted linear probes keyed by (property, layer, step), and the bank's policy.

A probe maps a layer's attn1 output per pixel, C → K: ``y = x @ weight + bias``; the map in
target units is ``y * std + mean`` (the target's normalisation, e.g. a depth z-score), and a
probe flagged ``sigmoid`` turns that into a probability (the reference trains the foreground
probe with cross-entropy on logits). ``kind`` says how to score it: "mask" (binary; Dice) or
"continuous" (Spearman, …). A closed-form fit that regresses {0, 1} masks is kind "mask" with
``sigmoid=False`` and is thresholded at 0.5 like the rest.

The policy every user of a bank shares lives here too: the primary metric per kind
(`PRIMARY_METRIC`), the best layer per property (`best_layers`), a request's steps mapped to the
bank's (`step_map`) and where a loaded bank came from (`path`, `checksum`, `file_sha256`).
The file format is `format.py`, applying the probes `heads.py`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..layers import LayerRegistry
from .format import CAPTURE_POINT, FORMAT, VERSION, BankFile, LayerShape, ProbeBankError
from .heads import MODES, ProbeHeads

KINDS = ("mask", "continuous")
# The study's three properties: how `random` (and callers that want defaults) set them up.
STANDARD_PROPERTIES: dict[str, dict[str, Any]] = {
    "foreground": {"kind": "mask", "sigmoid": True, "mean": 0.0, "std": 1.0},
    "depth": {"kind": "continuous", "sigmoid": False, "mean": 0.5, "std": 0.25},
    "shading": {"kind": "continuous", "sigmoid": False, "mean": 0.4, "std": 0.15},
}

# The metric that ranks probes of each kind (test split): what "best layer" means everywhere.
PRIMARY_METRIC = {"mask": "dice", "continuous": "spearman"}
DEFAULT_LAYER = "dec4.0"  # the study's reference layer: the fallback when a bank has no test metrics


@dataclass
class Probe:
    """One fitted probe. ``mean``/``std`` hold one value per output column."""

    property: str
    layer: str
    step: int
    weight: torch.Tensor  # [C, K] float32
    bias: torch.Tensor  # [K] float32
    kind: str
    sigmoid: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)  # per-probe fit details, e.g. the chosen λ

    @property
    def k(self) -> int:
        return self.weight.shape[1]

    def tensor_name(self, part: str) -> str:
        return tensor_name(self.property, self.layer, self.step, part)


def tensor_name(prop: str, layer: str, step: int, part: str) -> str:
    return f"{prop}/{layer}/{step}/{part}"


# --- small helpers ----------------------------------------------------------------------------
def _per_column(value: float | Sequence[float], k: int, what: str) -> tuple[float, ...]:
    vals = [float(value)] * k if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) != k:
        raise ProbeBankError(f"{what} needs 1 or K={k} values, got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise ProbeBankError(f"{what} must be finite, got {vals}")
    return tuple(vals)


def _fmt_steps(steps: Sequence[int]) -> str:
    if len(steps) > 2 and list(steps) == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}–{steps[-1]}"
    return ", ".join(map(str, steps)) or "none"


def schedule_timesteps(sampler, scheduler: str, steps: int) -> list[float]:
    """The exact timesteps a `steps`-step `scheduler` run of `sampler` (a Sampler) uses, with the
    sampler's timestep spacing when it has one."""
    from ..generate import make_scheduler

    spacing = getattr(sampler, "timestep_spacing", None)
    sched = make_scheduler(sampler.model, scheduler, spacing) if spacing else make_scheduler(sampler.model, scheduler)
    sched.set_timesteps(steps)
    return [float(t) for t in sched.timesteps]


# --- the bank ---------------------------------------------------------------------------------
class ProbeBank(BankFile, ProbeHeads):
    """Probes of one model, keyed by (property, layer, step), plus how they were made."""

    def __init__(self, identity: str, layers: LayerRegistry | Mapping[str, Any], *,
                 image_size: tuple[int, int] | None = None, scheduler: str | None = None,
                 num_steps: int | None = None, capture_point: str = CAPTURE_POINT, half: str = "cond",
                 label_sources: Mapping[str, Any] | None = None, split: Any = None,
                 fit: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                 upsample: str = "nearest"):
        """upsample: how `apply(size=…)` brings maps to image size unless told otherwise ("nearest"
        or "bilinear"): the fitting job's protocol sets it and the bank file records it, so the
        service draws maps the way they were scored."""
        if upsample not in MODES:
            raise ProbeBankError(f"upsample must be one of {', '.join(MODES)}, got {upsample!r}")
        self.upsample = upsample
        self.identity = str(identity)
        if isinstance(layers, LayerRegistry):
            self.layer_shapes = {s.name: LayerShape(s.channels, s.height, s.width) for s in layers}
        else:
            self.layer_shapes = {}
            for name, shape in layers.items():
                if isinstance(shape, Mapping):
                    shape = (shape["channels"], shape["height"], shape["width"])
                self.layer_shapes[str(name)] = LayerShape(*(int(v) for v in shape))
        self.image_size = tuple(int(v) for v in image_size) if image_size else None
        self.scheduler = scheduler
        self.num_steps = None if num_steps is None else int(num_steps)
        self.capture_point = capture_point
        self.half = half
        self.label_sources = dict(label_sources or {})
        self.split = split
        self.fit = dict(fit or {})
        self.extra = dict(extra or {})
        self._probes: dict[tuple[str, str, int], Probe] = {}
        self._plans: dict[Any, list] = {}  # apply() plans: folded weights per selection and device
        self._held: tuple[list[str], list[str], list[int]] | None = None  # properties, layers, steps
        self._step_maps: dict[tuple[str, int], list[int]] = {}
        self.path: Path | None = None  # the file it was loaded from, and the checksum that file records
        self.checksum: str | None = None

    @classmethod
    def for_model(cls, model, height: int | None = None, width: int | None = None, **kwargs) -> ProbeBank:
        """An empty bank for an SDModel at an image size (pixels; the model's default if omitted)."""
        h, w = height or model.default_size, width or model.default_size
        return cls(model.identity, model.registry(h, w), image_size=(h, w), **kwargs)

    # --- building -----------------------------------------------------------------------------
    def add(self, property: str, layer: str, step: int, weight, bias=None, kind: str = "continuous", *,
            sigmoid: bool = False, mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0,
            metrics: Mapping[str, float] | None = None, fit: Mapping[str, Any] | None = None,
            replace: bool = False) -> Probe:
        """Add a fitted probe: weight [C] or [C, K], bias [K] (zeros when None)."""
        prop = str(property)
        if not prop or "/" in prop:
            raise ProbeBankError(f"property name must be non-empty and contain no '/', got {prop!r}")
        if layer not in self.layer_shapes:
            raise ProbeBankError(f"layer {layer!r} is not in this bank's layer table: {', '.join(self.layer_shapes)}")
        step = int(step)
        if step < 0:
            raise ProbeBankError(f"step must be >= 0, got {step}")
        if kind not in KINDS:
            raise ProbeBankError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        key = (prop, layer, step)
        if key in self._probes and not replace:
            raise ProbeBankError(f"the bank already holds a probe for {key}; pass replace=True to overwrite")
        w = torch.as_tensor(weight).detach().to("cpu", torch.float32, copy=True)  # the bank owns its tensors
        w = w[:, None] if w.ndim == 1 else w
        channels = self.layer_shapes[layer].channels
        if w.ndim != 2 or w.shape[0] != channels or w.shape[1] < 1:
            raise ProbeBankError(f"{prop}/{layer}/{step}: weight must be [{channels}, K], got {list(w.shape)}")
        k = w.shape[1]
        b = torch.zeros(k) if bias is None else torch.as_tensor(bias).detach().to("cpu", torch.float32, copy=True)
        b = b.reshape(-1)
        if b.shape != (k,):
            raise ProbeBankError(f"{prop}/{layer}/{step}: bias must be [{k}], got {list(b.shape)}")
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise ProbeBankError(f"{prop}/{layer}/{step}: weight and bias must be finite")
        stds = _per_column(std, k, f"{prop}/{layer}/{step}: std")
        if any(s == 0 for s in stds):
            raise ProbeBankError(f"{prop}/{layer}/{step}: std must be non-zero")
        probe = Probe(prop, layer, step, w.contiguous(), b.contiguous(), kind, bool(sigmoid),
                      _per_column(mean, k, f"{prop}/{layer}/{step}: mean"), stds,
                      {str(n): (v if isinstance(v, int) else float(v)) for n, v in (metrics or {}).items()},
                      dict(fit or {}))
        self._probes[key] = probe
        self._plans.clear()
        self._held = None
        return probe

    @classmethod
    def random(cls, source, properties: Iterable[str] = tuple(STANDARD_PROPERTIES), layers=None,
               steps: Iterable[int] = (0,), seed: int = 0, *, identity: str | None = None,
               image_size: tuple[int, int] | None = None, **kwargs) -> ProbeBank:
        """A bank of random probes (K=1) for tests, benches and demos. ``source`` is an SDModel
        (its default image size) or a LayerRegistry (then ``identity`` is required); ``layers``
        is a registry selection (None = all). Standard properties get their usual kind/sigmoid/
        normalisation (see STANDARD_PROPERTIES); others are continuous."""
        if isinstance(source, LayerRegistry):
            if identity is None:
                raise ProbeBankError("ProbeBank.random(registry, ...) needs identity= (the model's config hash)")
            bank = cls(identity, source, image_size=image_size, **kwargs)
            registry = source
        else:
            bank = cls.for_model(source, **kwargs)
            registry = source.registry(*bank.image_size)
        gen = torch.Generator().manual_seed(int(seed))
        specs = registry.select("all" if layers is None else layers)
        for step in steps:
            for spec in specs:
                for prop in properties:
                    conf = STANDARD_PROPERTIES.get(prop, {"kind": "continuous", "sigmoid": False})
                    w = torch.randn(spec.channels, 1, generator=gen) / math.sqrt(spec.channels)
                    b = torch.randn(1, generator=gen) * 0.1
                    bank.add(prop, spec.name, step, w, b, conf["kind"], sigmoid=conf["sigmoid"],
                             mean=conf.get("mean", 0.0), std=conf.get("std", 1.0), metrics={"random": 1.0})
        return bank

    # --- lookup -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._probes)

    def __iter__(self) -> Iterator[Probe]:
        return iter(self._probes.values())

    def _summary(self) -> tuple[list[str], list[str], list[int]]:
        if self._held is None:
            held = {layer for _, layer, _ in self._probes}
            self._held = (list(dict.fromkeys(p for p, _, _ in self._probes)),
                          [name for name in self.layer_shapes if name in held],
                          sorted({s for _, _, s in self._probes}))
        return self._held

    @property
    def properties(self) -> list[str]:
        """Properties in the order they were first added."""
        return list(self._summary()[0])

    @property
    def layers(self) -> list[str]:
        """Layers with at least one probe, in the layer table's (execution) order."""
        return list(self._summary()[1])

    @property
    def steps(self) -> list[int]:
        return list(self._summary()[2])

    def has(self, property: str, layer: str, step: int) -> bool:
        return (property, layer, int(step)) in self._probes

    def describe(self) -> str:
        return (f"{len(self)} probes; properties: {', '.join(self.properties) or 'none'}; "
                f"layers: {', '.join(self.layers) or 'none'}; steps: {_fmt_steps(self.steps)}")

    def probe(self, property: str, layer: str, step: int) -> Probe:
        found = self._probes.get((property, layer, int(step)))
        if found is None:
            raise ProbeBankError(f"no probe for property {property!r}, layer {layer!r}, step {step}; "
                                 f"this bank holds {self.describe()}")
        return found

    def metadata(self) -> dict[str, Any]:
        """The bank-level metadata (everything but the probes), JSON-ready."""
        return {
            "format": FORMAT, "version": VERSION, "model_identity": self.identity,
            "capture_point": self.capture_point, "half": self.half, "scheduler": self.scheduler,
            "num_steps": self.num_steps, "image_size": list(self.image_size) if self.image_size else None,
            "layers": {n: s._asdict() for n, s in self.layer_shapes.items()},
            "label_sources": self.label_sources, "split": self.split, "fit": self.fit, "extra": self.extra,
            "upsample": self.upsample,
        }

    # --- policy -------------------------------------------------------------------------------
    PRIMARY_METRIC = PRIMARY_METRIC

    def best_layers(self) -> dict[str, tuple[str, str]]:
        """Per property: (layer, how chosen). The layer with the best primary test metric (Dice for
        masks, Spearman for continuous maps) at the bank's last step; without metrics, dec4.0 when
        the bank has it there, else the first layer that has the property."""
        last = max(self.steps)
        out = {}
        for prop in self.properties:
            probes = [p for p in self if p.property == prop and p.step == last]
            scored = [(p.metrics[PRIMARY_METRIC[p.kind]], p.layer) for p in probes
                      if isinstance(p.metrics.get(PRIMARY_METRIC[p.kind]), (int, float))
                      and p.metrics[PRIMARY_METRIC[p.kind]] == p.metrics[PRIMARY_METRIC[p.kind]]]  # not NaN
            if scored:
                out[prop] = (max(scored)[1], "bank_best")
            elif any(p.layer == DEFAULT_LAYER for p in probes):
                out[prop] = (DEFAULT_LAYER, "default")
            else:
                held = [p.layer for p in self if p.property == prop]
                out[prop] = (held[0], "default")
        return out

    def step_map(self, model, scheduler: str, steps: int) -> list[int]:
        """Bank step for each step of a `steps`-step `scheduler` schedule of `model`: the bank's
        step with the nearest timestep (the same index when both schedules agree; the index
        itself when the bank does not record its schedule). Remembered per schedule."""
        if not self.scheduler or not self.num_steps or (scheduler, steps) == (self.scheduler, self.num_steps):
            return list(range(steps))
        key = (scheduler, int(steps))
        if key not in self._step_maps:
            from ..generate import make_scheduler

            def times(name: str, n: int) -> list[float]:
                sched = make_scheduler(model, name)
                sched.set_timesteps(n)
                return [float(t) for t in sched.timesteps]

            ours, theirs = times(scheduler, steps), times(self.scheduler, self.num_steps)
            self._step_maps[key] = [min(range(len(theirs)), key=lambda j: (abs(theirs[j] - t), j)) for t in ours]
        return list(self._step_maps[key])

    def recorded_timesteps(self, model=None) -> list[float] | None:
        """The exact timesteps the bank was fitted at: recorded by the fit job (`extra.timesteps`),
        else those of its scheduler and step count on `model` (None when it records neither)."""
        recorded = self.extra.get("timesteps")
        if recorded:
            return [float(t) for t in recorded]
        if not self.scheduler or not self.num_steps or model is None:
            return None
        from ..generate import make_scheduler

        sched = make_scheduler(model, self.scheduler)
        sched.set_timesteps(self.num_steps)
        return [float(t) for t in sched.timesteps]

    def timestep_mapping(self, request_timesteps: Sequence[float], model=None) -> dict[str, Any]:
        """How a request's exact timesteps meet the bank's: `exact` (equal, to 1e-3: bank step i
        for request step i), else each request step mapped to the bank step of the nearest
        timestep. `exact` is None when the bank records no schedule (then step i for step i).
        A caller that must not map (the study protocol) refuses when `exact` is False."""
        ours = [float(t) for t in request_timesteps]
        theirs = self.recorded_timesteps(model)
        if theirs is None:
            return {"exact": None, "request_timesteps": ours, "bank_timesteps": None,
                    "bank_steps": list(range(len(ours)))}
        exact = len(ours) == len(theirs) and all(abs(a - b) <= 1e-3 for a, b in zip(ours, theirs, strict=True))
        steps = (list(range(len(ours))) if exact else
                 [min(range(len(theirs)), key=lambda j: (abs(theirs[j] - t), j)) for t in ours])
        return {"exact": exact, "request_timesteps": ours, "bank_timesteps": theirs, "bank_steps": steps}

    def file_sha256(self) -> str | None:
        """sha256 of the file the bank was loaded from (None for a bank built in memory)."""
        if self.path is None:
            return None
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return "sha256:" + h.hexdigest()

    # --- compatibility ------------------------------------------------------------------------
    def check_model(self, model=None, *, identity: str | None = None, registry: LayerRegistry | None = None) -> None:
        """Raise ProbeBankError unless the model (or identity + registry) is the one the bank was
        fitted for: same U-Net config hash and the same channels on every layer the bank probes."""
        if model is not None:
            identity, registry = model.identity, model.registry()
        problems = []
        if registry is not None:
            missing = [n for n in self.layers if n not in registry]
            if missing:
                problems.append(f"layers {', '.join(missing)} do not exist in this model")
            diff = [n for n in self.layers if n in registry and registry[n].channels != self.layer_shapes[n].channels]
        else:
            diff = []
        if (identity is not None and identity != self.identity) or problems or diff:
            shown = diff[:4] or self.layers[:1]
            ours = ", ".join(f"{n}={self.layer_shapes[n].channels}" for n in shown)
            theirs = ", ".join(f"{n}={registry[n].channels}" for n in shown if registry is not None and n in registry)
            if diff:
                problems.insert(0, f"channels differ on {len(diff)} layer(s)")
            elif not problems:
                problems.append("same channels, different U-Net config")
            raise ProbeBankError(
                f"probe bank was fitted for model {self.identity} (channels {ours}) but this model is "
                f"{identity or 'of unknown identity'}" + (f" ({theirs})" if theirs else "") + f": {'; '.join(problems)}")
