"""The probe bank's file format: one safetensors file, its metadata and its checksum.

Version 1
---------
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
`ProbeBank.load` checks all of that (and, given a model, its identity and channels) and raises
`ProbeBankError` with a message naming what is wrong. The methods live in `BankFile`, which
`ProbeBank` inherits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch

from ..atomic import atomic_path
from ..layers import LayerRegistry

FORMAT = "ldmprobe.probebank"
VERSION = 1
METADATA_KEY = "ldmprobe.probebank"
CAPTURE_POINT = "attn1.to_out (before residual)"


class ProbeBankError(ValueError):
    """A probe bank that is unreadable, inconsistent, for another model, or asked for a probe it lacks."""


class LayerShape(NamedTuple):
    channels: int
    height: int
    width: int


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


B = TypeVar("B", bound="BankFile")


class BankFile:
    """Save and load, for `ProbeBank`."""

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
    def load(cls: type[B], path: str | Path, model=None, *, identity: str | None = None,
             registry: LayerRegistry | None = None) -> B:
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
                       extra=meta.get("extra"), upsample=meta.get("upsample", "nearest"))
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
        bank.path, bank.checksum = path, expected
        return bank
