"""Probe heads: every probe of one step evaluated on captured activations in one grouped call.

`ProbeBank.apply` (the `ProbeHeads` methods it inherits) folds each layer's probes into one
weight matrix (normalisation included), hands all layers to `ldmprobe.kernels.grouped_linear`
(ONE Triton launch where Triton runs) and returns `ProbeMaps`, at layer resolution or upsampled.
`grey_map` is how a map becomes grey levels for viewing (PNGs of the CLI and the endpoints).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels import MAX_K, grouped_linear
from ..layers import LayerRegistry
from .format import LayerShape, ProbeBankError

MODES = ("nearest", "bilinear")


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


def _names(value: str | Iterable[str]) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _upsample(y: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """[rows, K, H, W] → [rows, K, *size]. Nearest by whole factors is a broadcast copy: the same
    values as F.interpolate's nearest, several times faster on CPU; any other case interpolates."""
    rows, k, h, w = y.shape
    if mode == "nearest" and size[0] % h == 0 and size[1] % w == 0:
        fh, fw = size[0] // h, size[1] // w
        return y[:, :, :, None, :, None].expand(rows, k, h, fh, w, fw).reshape(rows, k, *size)
    return F.interpolate(y.contiguous(), size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """[rows, H, W] maps at layer resolution → [rows, *size], exactly as `apply(size=…)` upsamples."""
    return _upsample(maps[:, None], (int(size[0]), int(size[1])), mode)[:, 0]


def grey_map(values: torch.Tensor, kind: str) -> tuple[Any, str, float, float]:
    """A map [H, W] as grey levels for viewing → (uint8 numpy [H, W], mode, lo, hi), where
    value = lo + grey / 255 · (hi − lo). Masks ("mask": a probability) map [0, 1] to 0–255
    ("probability"); continuous maps are stretched over their own min–max ("minmax")."""
    y = values.detach().float().cpu()
    if kind == "mask":
        mode, lo, hi, grey = "probability", 0.0, 1.0, y.clamp(0, 1)
    else:
        lo, hi = float(y.min()), float(y.max())
        mode, grey = "minmax", (y - lo) / (hi - lo) if hi > lo else torch.zeros_like(y)
    return (grey * 255).round().to(torch.uint8).numpy(), mode, lo, hi


class ProbeHeads:
    """Applying the probes, for `ProbeBank`."""

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

    def _select_pairs(self, activations: Mapping[str, torch.Tensor], step: int,
                      pairs: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        """Exactly these (property, layer) pairs, in layer order; errors name the missing one."""
        if not pairs:
            raise ProbeBankError(f"no probes asked for at step {step}; this bank holds {self.describe()}")
        for prop, layer in pairs:
            self.probe(prop, layer, step)  # raises, listing what the bank holds
            if layer not in activations:
                raise ProbeBankError(f"no activations given for layer {layer} (got {', '.join(activations) or 'none'})")
        order = {name: i for i, name in enumerate(self.layer_shapes)}
        return sorted(pairs, key=lambda pair: order[pair[1]])

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
              mode: str | None = None, backend: str = "auto", registry: LayerRegistry | None = None,
              pairs: Iterable[tuple[str, str]] | None = None) -> ProbeMaps:
        """Evaluate the bank's probes of one step on captured activations ({layer: [rows, H·W, C]})
        in ONE grouped_linear call (a group per layer); maps come back at layer resolution, or
        upsampled to ``size`` (pixels) with ``mode`` (default: the bank's `upsample`).
        properties/layers select a subset (default: every probe of the step on the layers present),
        or ``pairs`` names exactly the (property, layer) probes to run; ``registry`` gives the
        layers' H×W for images of another size than the bank's."""
        mode = self.upsample if mode is None else mode
        if mode not in MODES:
            raise ProbeBankError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        step = int(step)
        if not activations:
            raise ProbeBankError(f"no activations given; this bank holds {self.describe()}")
        device = next(iter(activations.values())).device
        # The selection depends only on these; remembering it keeps per-step overhead small.
        pairs = None if pairs is None else tuple(dict.fromkeys((str(p), str(la)) for p, la in pairs))
        key = ("apply", step, None if properties is None else tuple(_names(properties)),
               None if layers is None else tuple(_names(layers)), pairs, tuple(activations), str(device))
        plan = self._plans.get(key)
        if plan is None:
            chosen = (self._select(activations, step, properties, layers) if pairs is None
                      else self._select_pairs(activations, step, pairs))
            plan = self._plans[key] = self._plan(step, chosen, device)
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
