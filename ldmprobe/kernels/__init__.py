"""Grouped probe linear: ``Y_g = X_g @ W_g + b_g`` (sigmoid on flagged columns) for many layers.

At one denoising step every probed layer g gives pixels ``X_g [P_g, C_g]``; its probes' stacked
columns give ``W_g [C_g, K_g]``. :func:`grouped_linear` evaluates all groups at once, with one
Triton launch where Triton can run and one ``addmm`` per group otherwise, and says which ran.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .grouped_linear_torch import grouped_linear_torch

__all__ = ["GroupedLinearResult", "MAX_K", "grouped_linear", "triton_available"]

MAX_K = 16  # the kernel's output block; every group needs 1 <= K_g <= MAX_K
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "torch")

_triton_import_error: str | None = None
_failed_devices: dict[str, str] = {}  # device -> why a compiled launch failed (auto then uses torch)


@dataclass(frozen=True)
class GroupedLinearResult:
    """fp32 ``[P_g, K_g]`` outputs per group, and the backend that produced them
    ("triton", "triton-interpret" or "torch") so callers can record it."""

    outputs: list[torch.Tensor]
    backend: str


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _triton_module():
    """The launcher module, or None when Triton cannot be imported (reason kept for errors)."""
    global _triton_import_error
    if _triton_import_error is not None:
        return None
    try:
        from . import grouped_linear_triton
    except Exception as e:  # ImportError, or a broken install failing on import
        _triton_import_error = f"{type(e).__name__}: {e}"
        return None
    return grouped_linear_triton


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _why_not_triton(device: torch.device) -> str | None:
    """None when the Triton kernel can run on tensors on ``device``, else the reason."""
    if _triton_module() is None:
        return f"triton cannot be imported ({_triton_import_error})"
    if _interpreting():
        return None if device.type in ("cpu", "cuda") else f"the Triton interpreter cannot read {device.type} tensors"
    if device.type == "cpu":
        return "tensors are on CPU and TRITON_INTERPRET=1 is not set (the compiled kernel needs CUDA)"
    if device.type != "cuda":
        return f"tensors are on {device.type}; the Triton kernel needs CUDA tensors"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if _device_key(device) in _failed_devices:
        return f"an earlier launch on {_device_key(device)} failed: {_failed_devices[_device_key(device)]}"
    return None


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernel can run for tensors on ``device`` (compiled on CUDA, or under
    ``TRITON_INTERPRET=1`` on CPU/CUDA)."""
    return _why_not_triton(torch.device(device)) is None


def _validate(xs, weights, biases, sigmoid_masks):
    """Check shapes/dtypes; return (xs, weights, biases, sigmoid column indices) as lists."""
    xs, weights = list(xs), list(weights)
    n = len(xs)
    if n == 0:
        raise ValueError("grouped_linear needs at least one group")
    if len(weights) != n:
        raise ValueError(f"got {n} inputs but {len(weights)} weights")
    biases = [None] * n if biases is None else list(biases)
    masks = [None] * n if sigmoid_masks is None else list(sigmoid_masks)
    if len(biases) != n:
        raise ValueError(f"got {n} inputs but {len(biases)} biases")
    if len(masks) != n:
        raise ValueError(f"got {n} inputs but {len(masks)} sigmoid masks")
    sigmoid_cols = []
    for g, (x, w, b, m) in enumerate(zip(xs, weights, biases, masks, strict=True)):
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ValueError(f"group {g}: X must be a 2-D [P, C] tensor, got {getattr(x, 'shape', type(x))}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"group {g}: X dtype {x.dtype} is not supported (float16, bfloat16 or float32)")
        if x.dtype != xs[0].dtype or x.device != xs[0].device:
            raise ValueError(
                f"group {g}: all X must share one dtype and device, got {x.dtype} on {x.device} "
                f"vs {xs[0].dtype} on {xs[0].device}"
            )
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or not w.is_floating_point():
            raise ValueError(f"group {g}: W must be a floating 2-D [C, K] tensor")
        C, K = w.shape
        if x.shape[1] != C:
            raise ValueError(f"group {g}: X has C={x.shape[1]} channels but W has {C} rows")
        if not 1 <= K <= MAX_K:
            raise ValueError(f"group {g}: W has K={K} output columns; supported is 1..{MAX_K}")
        if b is not None and (not isinstance(b, torch.Tensor) or b.shape != (K,) or not b.is_floating_point()):
            raise ValueError(f"group {g}: bias must be a floating [{K}] tensor or None")
        cols: tuple[int, ...] = ()
        if m is not None:
            mt = torch.as_tensor(m)
            if mt.is_floating_point() or mt.is_complex() or mt.shape != (K,):
                raise ValueError(f"group {g}: sigmoid mask must be a bool/int sequence of length K={K}")
            cols = tuple(int(c) for c in mt.nonzero().flatten().tolist())  # host-side: syncs if on GPU
        sigmoid_cols.append(cols)
    return xs, weights, biases, sigmoid_cols


def grouped_linear(
    xs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
    sigmoid_masks: Sequence[Sequence[bool] | torch.Tensor | None] | None = None,
    backend: str = "auto",
    *,
    block_sizes: tuple[int, int] | None = None,
) -> GroupedLinearResult:
    """Evaluate ``Y_g = X_g @ W_g + b_g`` for every group, sigmoid on columns flagged in
    ``sigmoid_masks[g]``; outputs are fp32 and accumulation is fp32 whatever the input dtype.

    ``xs[g]``: ``[P_g, C_g]`` float16/bfloat16/float32 (one dtype and device for all groups).
    Passing views into one shared buffer avoids the packing copy of the Triton path.
    ``weights[g]``: ``[C_g, K_g]`` any float dtype, ``1 <= K_g <= MAX_K``. ``biases[g]``: ``[K_g]`` or
    None. ``sigmoid_masks[g]``: ``K_g`` bools/ints (keep them on the host to avoid a GPU sync).

    ``backend``: "triton" (raises RuntimeError where it cannot run), "torch", or "auto": Triton for
    CUDA tensors, or for CPU tensors when ``TRITON_INTERPRET=1``; torch otherwise. ``block_sizes``
    overrides the kernel's ``(BLOCK_P, BLOCK_C)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    xs, weights, biases, sigmoid_cols = _validate(xs, weights, biases, sigmoid_masks)
    if backend == "torch":
        return GroupedLinearResult(grouped_linear_torch(xs, weights, biases, sigmoid_cols), "torch")

    device = xs[0].device
    reason = _why_not_triton(device)
    if reason is not None:
        if backend == "triton":
            raise RuntimeError(f"backend='triton' cannot run here: {reason}")
        return GroupedLinearResult(grouped_linear_torch(xs, weights, biases, sigmoid_cols), "torch")

    interpret = _interpreting()
    launch = _triton_module().grouped_linear_triton
    try:
        outputs = launch(xs, weights, biases, sigmoid_cols, interpret=interpret, block_sizes=block_sizes)
    except Exception as e:
        if backend == "triton" or interpret or block_sizes is not None:
            raise
        # "auto" means "Triton when it works": remember the failure, say so once, and fall back.
        _failed_devices[_device_key(device)] = f"{type(e).__name__}: {e}"
        warnings.warn(f"Triton grouped_linear failed on {device}, using torch from now on: {e}", stacklevel=2)
        return GroupedLinearResult(grouped_linear_torch(xs, weights, biases, sigmoid_cols), "torch")
    return GroupedLinearResult(outputs, "triton-interpret" if interpret else "triton")
