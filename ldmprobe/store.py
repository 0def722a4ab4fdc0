"""Activation store: captured activations as safetensors shards + a JSON manifest.

One shard per denoising step (`step_000.safetensors`, one tensor per layer, [rows, H·W, C],
fp16 by default), written atomically as the steps stream by; `manifest.json` is written last
and is the commit point. Reads are memory-mapped per (layer, step): a read touches one tensor
of one shard, not the rest of the store (the reference study keeps one pickle per image and
layer and must load each whole).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_path, write_json
from .layers import LayerSpec

FORMAT = "ldmprobe.activations"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class StoreError(ValueError):
    """A store that is missing, incomplete or inconsistent."""


def shard_name(step: int) -> str:
    return f"step_{step:03d}.safetensors"


class ActivationWriter:
    """Streams steps into a store folder; `close()` writes the manifest."""

    def __init__(self, path: str | Path, layers: Iterable[LayerSpec], metadata: Mapping[str, Any],
                 dtype: str = "float16"):
        if dtype not in DTYPES:
            raise ValueError(f"unknown store dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.layers = list(layers)
        self.metadata = dict(metadata)
        self.dtype = dtype
        self.shards: dict[str, dict[str, Any]] = {}
        self.rows: int | None = None

    def add(self, step: int, timestep: float, activations: Mapping[str, torch.Tensor]) -> Path:
        """Write one step's activations ({layer name: [rows, H·W, C]}) as one shard."""
        missing = [s.name for s in self.layers if s.name not in activations]
        if missing:
            raise StoreError(f"step {step} lacks activations for layers {', '.join(missing)}")
        tensors = {}
        for spec in self.layers:
            value = activations[spec.name]
            if value.shape[1:] != (spec.tokens, spec.channels):
                raise StoreError(f"layer {spec.name}: expected [rows, {spec.tokens}, {spec.channels}], "
                                 f"got {list(value.shape)}")
            tensors[spec.name] = value.detach().to("cpu", DTYPES[self.dtype]).contiguous()
            self.rows = value.shape[0]
        target = self.path / shard_name(step)
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "step": str(step), "timestep": str(timestep)})
        self.shards[str(step)] = {"file": target.name, "timestep": float(timestep)}
        return target

    def close(self) -> Path:
        """Write the manifest. Its `timesteps` are those of the shards written, in step order,
        exactly as the scheduler gave them: a bank or job can compare schedules, not just names."""
        timesteps = [self.shards[k]["timestep"] for k in sorted(self.shards, key=int)]
        manifest = {
            "format": FORMAT, "version": VERSION, **self.metadata, "timesteps": timesteps, "dtype": self.dtype,
            "rows": self.rows,
            "layers": {s.name: {"module": s.module, "height": s.height, "width": s.width, "channels": s.channels}
                       for s in self.layers},
            "shards": self.shards,
        }
        return write_json(self.path / MANIFEST, manifest)


class ActivationStore:
    """Read-only, memory-mapped access to a store written by ActivationWriter."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(f"{str(self.path)!r} is not an activation store: {MANIFEST} is missing")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{manifest_path}: corrupt manifest ({exc})") from exc
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{manifest_path}: not an {FORMAT} manifest")
        if self.manifest.get("version") != VERSION:
            raise StoreError(f"{manifest_path}: version {self.manifest.get('version')} unsupported (expected {VERSION})")

    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def timesteps(self) -> list[float]:
        """The scheduler timestep of each stored step, in step order."""
        return [float(self.manifest["shards"][str(s)]["timestep"]) for s in self.steps]

    @property
    def steps(self) -> list[int]:
        return sorted(int(s) for s in self.manifest["shards"])

    def shape(self, layer: str) -> tuple[int, int, int]:
        info = self._layer(layer)
        return (self.manifest["rows"], info["height"] * info["width"], info["channels"])

    def _layer(self, layer: str) -> dict[str, Any]:
        if layer not in self.manifest["layers"]:
            raise StoreError(f"layer {layer!r} not in this store; it holds {', '.join(self.layers)}")
        return self.manifest["layers"][layer]

    def _shard(self, step: int) -> Path:
        shard = self.manifest["shards"].get(str(step))
        if shard is None:
            raise StoreError(f"step {step} not in this store; it holds steps {self.steps}")
        path = self.path / shard["file"]
        if not path.is_file():
            raise StoreError(f"shard {path} listed in the manifest is missing")
        return path

    def get(self, layer: str, step: int, pixels: slice | None = None) -> torch.Tensor:
        """[rows, H·W, C] of one layer at one step; `pixels` reads only a range of tokens."""
        self._layer(layer)
        with safe_open(str(self._shard(step)), framework="pt") as f:
            if pixels is None:
                return f.get_tensor(layer)
            return f.get_slice(layer)[:, pixels, :]

    def get_map(self, layer: str, step: int) -> torch.Tensor:
        """[rows, C, H, W]: the same values laid out as feature maps."""
        info = self._layer(layer)
        x = self.get(layer, step)
        return x.transpose(1, 2).reshape(x.shape[0], info["channels"], info["height"], info["width"])
