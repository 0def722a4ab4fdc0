"""Compile policy, in one place: how ldmprobe calls torch.compile and where inductor caches.

Every compiled thing of the library goes through here, so a change of policy (freezing, the
recompile limit, the cache folder) is one edit:

- The capturing U-Net: `torch.compile(fullgraph=True, dynamic=False)`. On CPU the weights are
  frozen into the graph (inductor `freezing`: constant folding and prepacked weights). Measured
  on the tiny U-Net here: 2.0× faster than eager in one run on a loaded machine, 1.45× in
  bench/capture.py on a quiet one (1.38× before freezing). It assumes inference (no_grad) with
  weights that do not change after the first call, which holds for generation; on CUDA
  inductor's defaults are kept.
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
    options = {"freezing": True} if torch.device(device).type == "cpu" else None
    return torch.compile(capturing, fullgraph=True, dynamic=False, options=options)


def compile_function(fn: Callable) -> Callable:
    """torch.compile of a small tensor function: one static graph per input shape."""
    allow_recompiles()
    return torch.compile(fn, dynamic=False, fullgraph=True)
