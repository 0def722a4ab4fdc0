"""Compile policy, in one place: how ldmprobe calls torch.compile and where inductor caches.

Every compiled thing of the library goes through here, so a change of policy (freezing, the
recompile limit, the cache folder) is one edit:

- The capturing U-Net: `torch.compile(fullgraph=True, dynamic=False)`, inductor's defaults.
  Inductor `freezing` (weights folded into the graph) is off: a frozen graph embeds the
  weights, so the FX graph cache cannot serve it to the next process and every worker start
  recompiles. Measured on the scenes probe service (2 CPU cores, quiet machine): warm-up from a
  warm cache 12.9 s without freezing vs 36.7 s with it, cold 100 s vs 120 s, a 15-step request
  1.26-1.55 s vs 1.38-1.42 s (no measurable gain from freezing at these sizes).
- Compile once, start many: `save_cache_artifacts` writes the portable compile cache of
  everything this process compiled (inductor + AOT autograd + dynamo artifacts) to one file,
  `load_cache_artifacts` seeds a fresh process (or machine) with it before it compiles, so a
  TorchServe worker starts from an archive without compiling (scripts/build_archives.sh packs
  one per archive; ldmprobe.serve.precompile writes it).
- Small numeric kernels (the intervention's Adam step): fullgraph, static shapes.
- Recompiles: dynamo keeps one graph per input shape, guidance on/off and capture selection;
  a service padding batches to buckets needs a handful per (bucket, image size). Keep them all
  compiled rather than falling back to eager after dynamo's default limit of 8.
- The cache: inductor reads TORCHINDUCTOR_CACHE_DIR when it compiles; `use_cache_dir` sets it
  (the Makefile, serve.sh and the tests point it at the clone's `.cache/inductor`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

RECOMPILE_LIMIT = 64
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_cache_dir(path: str | Path | None) -> None:
    """Compile with (and reuse) the inductor cache in `path`; None keeps the environment's."""
    if path is not None and str(path):
        os.environ[CACHE_ENV] = str(Path(path).resolve())


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-function graph limit to at least `limit` (never lower it)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def compile_unet(capturing: torch.nn.Module, device: torch.device | str):
    """torch.compile of the capturing U-Net, as the samplers, services and benches run it."""
    allow_recompiles()
    return torch.compile(capturing, fullgraph=True, dynamic=False)


def compile_function(fn: Callable) -> Callable:
    """torch.compile of a small tensor function: one static graph per input shape."""
    allow_recompiles()
    return torch.compile(fn, dynamic=False, fullgraph=True)


def save_cache_artifacts(path: str | Path) -> dict[str, int]:
    """Write the portable compile cache of what this process compiled so far to `path`
    (atomically: temp file + rename); returns {"bytes": …, "<cache kind>": entries, …}."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("nothing was compiled in this process: no compile cache to save")
    blob, info = saved
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return {"bytes": len(blob), **_entries(info)}


def load_cache_artifacts(path: str | Path) -> dict[str, int]:
    """Seed this process's compile caches from a file `save_cache_artifacts` wrote, before
    anything compiles; returns {"bytes": …, "<cache kind>": entries, …}."""
    blob = Path(path).read_bytes()
    info = torch.compiler.load_cache_artifacts(blob)
    return {"bytes": len(blob), **_entries(info)}


def _entries(info) -> dict[str, int]:
    """CacheInfo → {kind: number of artifacts} (`artifacts` maps a kind to its keys)."""
    return {str(kind): len(keys) for kind, keys in dict(getattr(info, "artifacts", None) or {}).items()}
