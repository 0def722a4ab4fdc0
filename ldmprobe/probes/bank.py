"""Probe banks: fitted linear probes keyed by (property, layer, step), one file, applied in one call.

A probe maps a layer's attn1 output per pixel, C → K: ``y = x @ weight + bias``; the map in
target units is ``y * std + mean`` (the target's normalisation, e.g. a depth z-score), and a
probe flagged ``sigmoid`` turns that into a probability (the reference trains the foreground
probe with cross-entropy on logits). ``kind`` says how to score it: "mask" (binary; Dice) or
"continuous" (Spearman, …). A closed-form fit that regresses {0, 1} masks is kind "mask" with
``sigmoid=False`` and is thresholded at 0.5 like the rest.

File format (one safetensors file, version 1)
---------------------------------------------
* tensors, float32: ``{property}/{layer}/{step}/weight`` [C, K] and ``…/bias`` [K];
* header metadata: one key, ``"ldmprobe.probebank"``, whose value is a JSON object with
  ``format`` ("ldmprobe.probebank"), ``version``, ``model_identity`` (hash of the U-Net config,
  = ``SDModel.identity``), ``capture_point``, ``half``, ``scheduler``, ``num_steps``,
  ``image_size`` [H, W] px, ``layers`` {name: {channels, height, width}} at that size,
  ``label_sources``, ``split``, ``fit`` (method, λ…), ``extra``, ``probes`` (a list of
  {property, layer, step, k, kind, sigmoid, mean, std, metrics, fit, weight, bias}, the last two
  naming the probe's tensors) and ``checksum``: "sha256:" over the canonical JSON of every
  other field and each tensor's name, dtype, shape and bytes in name order, so a flipped byte
  anywhere in the file is detected.

`ProbeBank.load` checks all of that (and, given a model, its identity and channels) and raises
`ProbeBankError` with a message naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .atomic import atomic_path
from .kernels import MAX_K, grouped_linear
from .layers import LayerRegistry

FORMAT = "ldmprobe.probebank"
VERSION = 1
METADATA_KEY = "ldmprobe.probebank"
CAPTURE_POINT = "attn1.to_out (before residual)"
KINDS = ("mask", "continuous")
MODES = ("nearest", "bilinear")
# The study's three properties: how `random` (and callers that want defaults) set them up.
STANDARD_PROPERTIES: dict[str, dict[str, Any]] = {
    "foreground": {"kind": "mask", "sigmoid": True, "mean": 0.0, "std": 1.0},
    "depth": {"kind": "continuous", "sigmoid": False, "mean": 0.5, "std": 0.25},
    "shading": {"kind": "continuous", "sigmoid": False, "mean": 0.4, "std": 0.15},
}


class ProbeBankError(ValueError):
    """A probe bank that is unreadable, inconsistent, for another model, or asked for a probe it lacks."""


class LayerShape(NamedTuple):
    channels: int
    height: int
    width: int


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


@dataclass
class ProbeMaps:
    """Probe outputs of one step: ``maps[(property, layer)]`` is fp32 [rows, H, W] ([rows, K, H, W]
    when K > 1), at the layer's resolution or at ``size``; ``backend`` is what computed them."""

    maps: dict[tuple[str, str], torch.Tensor]
    backend: str
    step: int
    size: tuple[int, int] | None
    mode: str

    def __getitem__(self, key: tuple[str, str]) -> torch.Tensor:
        return self.maps[key]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)

    def items(self):
        return self.maps.items()

    @property
    def properties(self) -> list[str]:
        return list(dict.fromkeys(p for p, _ in self.maps))

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(layer for _, layer in self.maps))

    def metadata(self) -> dict[str, Any]:
        """What an output file or response should record about how the maps were made."""
        return {"probe_backend": self.backend, "probe_step": self.step,
                "probe_size": list(self.size) if self.size else None,
                "probe_upsample": self.mode if self.size else None}


# --- small helpers ----------------------------------------------------------------------------
def _per_column(value: float | Sequence[float], k: int, what: str) -> tuple[float, ...]:
    vals = [float(value)] * k if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) != k:
        raise ProbeBankError(f"{what} needs 1 or K={k} values, got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise ProbeBankError(f"{what} must be finite, got {vals}")
    return tuple(vals)


def _names(value: str | Iterable[str]) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _checksum(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the metadata (minus the checksum) and every tensor's name, dtype, shape, bytes."""
    h = hashlib.sha256(_canonical({k: v for k, v in meta.items() if k != "checksum"}))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def _fmt_steps(steps: Sequence[int]) -> str:
    if len(steps) > 2 and list(steps) == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}–{steps[-1]}"
    return ", ".join(map(str, steps)) or "none"


def _upsample(y: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """[rows, K, H, W] → [rows, K, *size]. Nearest by whole factors is a broadcast copy: the same
    values as F.interpolate's nearest, several times faster on CPU; any other case interpolates."""
    rows, k, h, w = y.shape
    if mode == "nearest" and size[0] % h == 0 and size[1] % w == 0:
        fh, fw = size[0] // h, size[1] // w
        return y[:, :, :, None, :, None].expand(rows, k, h, fh, w, fw).reshape(rows, k, *size)
    return F.interpolate(y.contiguous(), size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors header, after checking the file holds every byte it describes."""
    size = path.stat().st_size
    bad = f"probe bank {str(path)!r} is truncated or corrupt"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ProbeBankError(f"{bad}: {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ProbeBankError(f"{bad}: header says {n} header bytes but the file has {size} bytes")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ProbeBankError(f"{bad}: unreadable safetensors header ({exc})") from exc
    if 8 + n + end != size:
        raise ProbeBankError(f"{bad}: the header describes {8 + n + end} bytes but the file has {size}")
    return header


# --- the bank ---------------------------------------------------------------------------------
class ProbeBank:
    """Probes of one model, keyed by (property, layer, step), plus how they were made."""

    def __init__(self, identity: str, layers: LayerRegistry | Mapping[str, Any], *,
                 image_size: tuple[int, int] | None = None, scheduler: str | None = None,
                 num_steps: int | None = None, capture_point: str = CAPTURE_POINT, half: str = "cond",
                 label_sources: Mapping[str, Any] | None = None, split: Any = None,
                 fit: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None):
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
        }

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

    # --- save / load --------------------------------------------------------------------------
    def _tensors_and_metadata(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        entries = []
        for p in self._probes.values():
            wname, bname = p.tensor_name("weight"), p.tensor_name("bias")
            tensors[wname], tensors[bname] = p.weight, p.bias
            entries.append({"property": p.property, "layer": p.layer, "step": p.step, "k": p.k, "kind": p.kind,
                            "sigmoid": p.sigmoid, "mean": list(p.mean), "std": list(p.std), "metrics": p.metrics,
                            "fit": p.fit, "weight": wname, "bias": bname})
        meta = self.metadata() | {"probes": entries}
        meta["checksum"] = _checksum(meta, tensors)
        return tensors, meta

    def save(self, path: str | Path) -> Path:
        """Write the bank as one safetensors file, atomically (temp file + rename)."""
        from safetensors.torch import save_file

        tensors, meta = self._tensors_and_metadata()
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path, model=None, *, identity: str | None = None,
             registry: LayerRegistry | None = None) -> ProbeBank:
        """Read and validate a bank file; with a model (or identity/registry), also check it fits."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ProbeBankError(f"probe bank {str(path)!r} does not exist")
        header = _read_header(path)
        where = f"probe bank {str(path)!r}"
        raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
        if raw is None:
            raise ProbeBankError(f"{where} has no {METADATA_KEY!r} metadata: not a probe bank")
        try:
            meta = json.loads(raw)
        except ValueError as exc:
            raise ProbeBankError(f"{where} is truncated or corrupt: metadata is not JSON ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise ProbeBankError(f"{where}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise ProbeBankError(f"{where}: format version {meta.get('version')!r} is not supported "
                                 f"(this ldmprobe reads version {VERSION})")
        try:
            entries = meta["probes"]
            listed = [e[part] for e in entries for part in ("weight", "bias")]
            bank = cls(meta["model_identity"], meta["layers"], image_size=meta.get("image_size"),
                       scheduler=meta.get("scheduler"), num_steps=meta.get("num_steps"),
                       capture_point=meta.get("capture_point", CAPTURE_POINT), half=meta.get("half", "cond"),
                       label_sources=meta.get("label_sources"), split=meta.get("split"), fit=meta.get("fit"),
                       extra=meta.get("extra"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProbeBankError(f"{where}: incomplete metadata ({type(exc).__name__}: {exc})") from exc
        stored = [k for k in header if k != "__metadata__"]
        missing = [n for n in listed if n not in header]
        if missing:
            raise ProbeBankError(f"{where} is incomplete: missing tensor(s) {', '.join(missing[:8])}"
                                 + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
        unlisted = sorted(set(stored) - set(listed))
        if unlisted:
            raise ProbeBankError(f"{where}: tensors not listed in its metadata: {', '.join(unlisted[:8])}")
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in listed}
        except Exception as exc:  # safetensors raises its own error types
            raise ProbeBankError(f"{where} is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
        for e in entries:
            w, b = tensors[e["weight"]], tensors[e["bias"]]
            shape = bank.layer_shapes.get(e["layer"])
            if shape is None:
                raise ProbeBankError(f"{where}: probe {e['weight']} is on layer {e['layer']!r}, absent from its layer table")
            if w.shape != (shape.channels, e["k"]) or b.shape != (e["k"],):
                raise ProbeBankError(f"{where}: {e['weight']} is {list(w.shape)} and {e['bias']} is {list(b.shape)}; "
                                     f"expected [{shape.channels}, {e['k']}] and [{e['k']}] (layer {e['layer']} "
                                     f"has {shape.channels} channels)")
            if w.dtype != torch.float32 or b.dtype != torch.float32:
                raise ProbeBankError(f"{where}: {e['weight']} must be float32, got {w.dtype}")
        expected = meta.get("checksum")
        actual = _checksum(meta, tensors)
        if expected != actual:
            raise ProbeBankError(f"{where} is corrupt: checksum mismatch (stored {expected}, computed {actual})")
        for e in entries:
            try:
                bank.add(e["property"], e["layer"], e["step"], tensors[e["weight"]], tensors[e["bias"]], e["kind"],
                         sigmoid=e["sigmoid"], mean=e["mean"], std=e["std"], metrics=e.get("metrics"),
                         fit=e.get("fit"))
            except ProbeBankError as exc:
                raise ProbeBankError(f"{where}: {exc}") from exc
        if model is not None or identity is not None or registry is not None:
            bank.check_model(model, identity=identity, registry=registry)
        return bank

    # --- apply --------------------------------------------------------------------------------
    def _select(self, activations: Mapping[str, torch.Tensor], step: int, properties, layers) -> list[tuple[str, str]]:
        """(property, layer) pairs to evaluate, in layer order; errors list what the bank holds."""
        if step not in self.steps:
            raise ProbeBankError(f"no probes for step {step}; this bank holds {self.describe()}")
        props = self.properties if properties is None else _names(properties)
        unknown = [p for p in props if p not in self.properties]
        if unknown:
            raise ProbeBankError(f"unknown property {', '.join(map(repr, unknown))}; this bank holds {self.describe()}")
        if layers is None:
            lays = [name for name in self.layers if name in activations]
            if not lays:
                raise ProbeBankError(f"the activations hold none of the bank's layers (got {', '.join(activations)}); "
                                     f"this bank holds {self.describe()}")
        else:
            lays = _names(layers)
            unknown = [name for name in lays if name not in self.layers]
            if unknown:
                raise ProbeBankError(f"unknown layer {', '.join(map(repr, unknown))}; this bank holds {self.describe()}")
            absent = [name for name in lays if name not in activations]
            if absent:
                raise ProbeBankError(f"no activations given for layer(s) {', '.join(absent)} "
                                     f"(got {', '.join(activations) or 'none'})")
            lays = [name for name in self.layer_shapes if name in set(lays)]
        pairs = []
        for layer in lays:
            for prop in props:
                if self.has(prop, layer, step):
                    pairs.append((prop, layer))
                elif properties is not None and layers is not None:
                    self.probe(prop, layer, step)  # raises, listing what the bank holds
        found = {p for p, _ in pairs}
        lacking = [p for p in props if p not in found] if properties is not None else []
        if lacking or not pairs:
            raise ProbeBankError(f"no probe for {', '.join(lacking) or 'any property'} at step {step} on layers "
                                 f"{', '.join(lays)}; this bank holds {self.describe()}")
        return pairs

    def _plan(self, step: int, pairs: list[tuple[str, str]], device: torch.device) -> list:
        """Per layer: the probes' columns stacked with the normalisation folded in
        (W·std, b·std + mean), split into ≤ MAX_K-column chunks. Cached per selection and device."""
        key = (step, tuple(pairs), str(device))
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        plan = []
        for layer in dict.fromkeys(layer for _, layer in pairs):
            probes = [self._probes[(p, layer, step)] for p, lay in pairs if lay == layer]
            std = torch.tensor([s for p in probes for s in p.std])
            mean = torch.tensor([m for p in probes for m in p.mean])
            w = torch.cat([p.weight for p in probes], 1) * std
            b = torch.cat([p.bias for p in probes]) * std + mean
            sig = [p.sigmoid for p in probes for _ in range(p.k)]
            columns, start = [], 0
            for p in probes:
                columns.append((p.property, start, p.k))
                start += p.k
            # W column-major (a transposed view of a contiguous [K, C]): on CPU, MKL's addmm with a
            # skinny row-major [C, K] takes a slow path, 3-6× slower for 2 <= K < 16 (measured).
            chunks = [(w[:, a:a + MAX_K].T.contiguous().T.to(device), b[a:a + MAX_K].to(device), sig[a:a + MAX_K])
                      for a in range(0, w.shape[1], MAX_K)]
            plan.append((layer, columns, chunks))
        self._plans[key] = plan
        return plan

    def _shape(self, layer: str, registry: LayerRegistry | None) -> LayerShape:
        if registry is None:
            return self.layer_shapes[layer]
        spec = registry[layer]
        if spec.channels != self.layer_shapes[layer].channels:
            raise ProbeBankError(f"registry layer {layer} has {spec.channels} channels but the bank's probes "
                                 f"take {self.layer_shapes[layer].channels}")
        return LayerShape(spec.channels, spec.height, spec.width)

    @torch.no_grad()
    def apply(self, activations: Mapping[str, torch.Tensor], step: int, properties: str | Iterable[str] | None = None,
              layers: str | Iterable[str] | None = None, size: int | tuple[int, int] | None = None,
              mode: str = "nearest", backend: str = "auto", registry: LayerRegistry | None = None) -> ProbeMaps:
        """Evaluate the bank's probes of one step on captured activations ({layer: [rows, H·W, C]})
        in ONE grouped_linear call (a group per layer); maps come back at layer resolution, or
        upsampled to ``size`` (pixels) with ``mode``. properties/layers select a subset (default:
        every probe of the step on the layers present); ``registry`` gives the layers' H×W for
        images of another size than the bank's."""
        if mode not in MODES:
            raise ProbeBankError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        step = int(step)
        if not activations:
            raise ProbeBankError(f"no activations given; this bank holds {self.describe()}")
        device = next(iter(activations.values())).device
        # The selection depends only on these; remembering it keeps per-step overhead small.
        key = ("apply", step, None if properties is None else tuple(_names(properties)),
               None if layers is None else tuple(_names(layers)), tuple(activations), str(device))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(step, self._select(activations, step, properties, layers), device)
        xs, ws, bs, masks, shapes = [], [], [], [], []
        for layer, _, chunks in plan:
            x = activations[layer]
            shape = self._shape(layer, registry)
            if x.ndim != 3 or x.shape[2] != shape.channels:
                raise ProbeBankError(f"activations of {layer} must be [rows, H·W, {shape.channels}], got {list(x.shape)}")
            if x.shape[1] != shape.height * shape.width:
                raise ProbeBankError(
                    f"activations of {layer} have {x.shape[1]} tokens but the layer is {shape.height}×{shape.width} "
                    f"(= {shape.height * shape.width}) at the bank's image size; for other image sizes pass "
                    "registry=model.registry(height, width)")
            shapes.append(shape)
            flat = x.reshape(-1, shape.channels)
            for w, b, sig in chunks:
                xs.append(flat)
                ws.append(w)
                bs.append(b)
                masks.append(sig)
        result = grouped_linear(xs, ws, bs, masks, backend=backend)
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(v) for v in size) if size else None
        maps: dict[tuple[str, str], torch.Tensor] = {}
        i = 0
        for (layer, columns, chunks), shape, in zip(plan, shapes, strict=True):
            outs = result.outputs[i:i + len(chunks)]
            i += len(chunks)
            y = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
            rows = activations[layer].shape[0]
            y = y.reshape(rows, shape.height, shape.width, -1).permute(0, 3, 1, 2)  # [rows, K, H, W]
            if size is not None:
                y = _upsample(y, size, mode)
            for prop, start, k in columns:
                maps[(prop, layer)] = y.select(1, start) if k == 1 else y.narrow(1, start, k)
        return ProbeMaps(maps, result.backend, step, size, mode)
