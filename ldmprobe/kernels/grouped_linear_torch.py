"""Torch fallback (and reference) for the grouped probe linear: one fp32 ``addmm`` per group.

Used wherever the Triton kernel cannot run (CPU without ``TRITON_INTERPRET=1``, no Triton at all).
Inputs are assumed validated by :func:`ldmprobe.kernels.grouped_linear`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def grouped_linear_torch(
    xs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    sigmoid_cols: Sequence[Sequence[int]],
) -> list[torch.Tensor]:
    """Return ``sigmoid?(X_g @ W_g + b_g)`` per group as fp32 ``[P_g, K_g]`` tensors."""
    outputs = []
    for x, w, b, cols in zip(xs, weights, biases, sigmoid_cols, strict=True):
        w32 = w.to(device=x.device, dtype=torch.float32)
        if b is None:
            b32 = torch.zeros(w32.shape[1], device=x.device, dtype=torch.float32)
        else:
            b32 = b.to(device=x.device, dtype=torch.float32)
        y = torch.addmm(b32, x.to(torch.float32), w32)
        for c in cols:  # K <= 16, so a loop over flagged columns is cheap
            y[:, c].sigmoid_()
        outputs.append(y)
    return outputs
