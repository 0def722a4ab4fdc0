"""The study's probe recipe (Adam on a bias-free linear layer), with its loss computed as the study did.

The study's probe maps each token C → outputs, lays them out on the layer's grid, upsamples them
(nearest) to the image and takes the loss there against the full-resolution label. For squared
error and cross-entropy that equals the loss at layer resolution against area-averaged labels
(both are linear in the target); for Huber it does not (at w = 0 the gradients differ by
4–11 % on the tiny model's z-scored scene depth, more where labels vary more inside a layer
pixel), so the loss is taken on the upsampled output, exactly as the study.

Mask heads: "logit" (one logit, BCE, ours) or "two-class" (two outputs, cross-entropy, the
study's `nn.Linear(C, 2, bias=False)`); a two-class probe is returned as the single logit
w₁ − w₀, whose sigmoid is the study's softmax probability of foreground, exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INITS = ("zeros", "linear-default")
MASK_HEADS = ("logit", "two-class")


def initial_weight(channels: int, outputs: int, init: str, seed: int) -> torch.Tensor:
    """[C, outputs]: zeros, or `nn.Linear(C, outputs, bias=False)`'s own initialisation drawn
    after torch.manual_seed(seed) (the global RNG is left as it was)."""
    if init == "zeros":
        return torch.zeros(channels, outputs)
    if init != "linear-default":
        raise ValueError(f"unknown probe init {init!r}; use one of {', '.join(INITS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Linear(channels, outputs, bias=False).weight.detach().T.contiguous()


def head_columns(kinds: list[str], mask_head: str) -> list[list[int]]:
    """The output columns of each property: two for a two-class mask head, else one."""
    if mask_head not in MASK_HEADS:
        raise ValueError(f"unknown mask head {mask_head!r}; use one of {', '.join(MASK_HEADS)}")
    cols, n = [], 0
    for kind in kinds:
        width = 2 if kind == "mask" and mask_head == "two-class" else 1
        cols.append(list(range(n, n + width)))
        n += width
    return cols


def reference_loss(pred: torch.Tensor, labels: torch.Tensor, kinds: list[str], columns: list[list[int]]) -> torch.Tensor:
    """Sum over properties of each one's mean loss at image resolution. pred [B, outputs, h, w]
    (layer resolution), labels [B, K, H, W] (image resolution, continuous ones normalised)."""
    up = F.interpolate(pred, size=labels.shape[-2:], mode="nearest")
    loss = pred.new_zeros(())
    for k, (kind, cols) in enumerate(zip(kinds, columns, strict=True)):
        y = labels[:, k]
        if kind != "mask":
            loss = loss + F.huber_loss(up[:, cols[0]], y)
        elif len(cols) == 2:  # soft-target CE: the study's CE on {0, 1} labels, defined for soft ones
            loss = loss + F.cross_entropy(up[:, cols], torch.stack([1 - y, y], dim=1))
        else:
            loss = loss + F.binary_cross_entropy_with_logits(up[:, cols[0]], y)
    return loss


def fit_reference(X: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int], kinds: list[str], *,
                  epochs: int = 30, lr: float = 1e-3, batch_images: int = 4, seed: int = 0, init: str = "zeros",
                  mask_head: str = "logit") -> torch.Tensor:
    """Train the probes of one (layer, step): X [N, h·w, C] activations (token i = pixel
    (i // w, i % w)), labels [N, K, H, W] at image resolution. Each property has its own
    weights (initialised with seed + k) and loss; Adam is elementwise, so training them in one
    parameter equals training each alone. Images are shuffled each epoch with a generator
    seeded by `seed`. Returns the weight [C, K] (a two-class head as its foreground logit)."""
    h, w = grid
    if X.shape[1] != h * w:
        raise ValueError(f"activations have {X.shape[1]} tokens, not {h}×{w}")
    columns = head_columns(kinds, mask_head)
    weight = torch.nn.Parameter(torch.cat([initial_weight(X.shape[-1], len(cols), init, seed + k)
                                           for k, cols in enumerate(columns)], dim=1))
    opt = torch.optim.Adam([weight], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(X.shape[0], generator=gen)
        for start in range(0, X.shape[0], batch_images):
            idx = order[start:start + batch_images]
            pred = (X[idx].float() @ weight).reshape(len(idx), h, w, -1).permute(0, 3, 1, 2)
            loss = reference_loss(pred, labels[idx].float(), kinds, columns)
            opt.zero_grad()
            loss.backward()
            opt.step()
    final = weight.detach()
    return torch.stack([final[:, c[1]] - final[:, c[0]] if len(c) == 2 else final[:, c[0]] for c in columns], dim=1)
