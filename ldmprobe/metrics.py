"""Per-image probe metrics, batched in torch.

Every metric takes ``pred`` and ``target`` of the same shape ``[N, ...]``
(N images, any trailing spatial shape), flattens each image to its pixels and
returns a float64 tensor ``[N]`` of per-image values. Averaging is left to
:func:`summarize`, so callers can say "mean over N images, M undefined".

Conventions
-----------
* Work is done in float64 whatever the input dtype (float16/bfloat16
  activations would otherwise lose precision in sums and ranks).
* An image whose value is undefined gets NaN, never an exception:
  a constant map (either side) has no Pearson/Spearman correlation, as in
  ``scipy.stats.pearsonr``/``spearmanr``; an image containing NaN pixels is
  NaN for every metric (NaN propagates, it is never silently thresholded).
* Dice of two empty masks is 1.0 (both agree there is nothing), so an image
  with no object and no prediction is not penalised.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "compute_all",
    "dice",
    "pearson",
    "rankdata",
    "rmse",
    "spearman",
    "spearman_ceiling",
    "summarize",
]


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_real(x: Tensor, name: str, *, floating: bool) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {x.dtype}")
    if floating and not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype} "
            "(pass the raw probe output, not an already-binarised map)"
        )


def _flatten(x: Tensor, name: str) -> Tensor:
    """[N, ...] -> float64 [N, P]; rejects empty batches and images."""
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have shape [N, ...] with at least one spatial dim, "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no images (N=0)")
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] == 0:
        raise ValueError(f"{name} has no pixels per image, shape {tuple(x.shape)}")
    return flat.to(torch.float64)


def _pair(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a (pred, target) pair; pred must be float, target any real dtype."""
    _check_real(pred, "pred", floating=True)
    _check_real(target, "target", floating=False)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    return _flatten(pred, "pred"), _flatten(target.to(torch.float64), "target")


def _any_nan(*xs: Tensor) -> Tensor:
    out = torch.zeros(xs[0].shape[0], dtype=torch.bool, device=xs[0].device)
    for x in xs:
        out |= torch.isnan(x).any(dim=-1)
    return out


# --------------------------------------------------------------------------- #
# metrics
# --------------------------------------------------------------------------- #
def rankdata(x: Tensor) -> Tensor:
    """Average ranks (1-based) along the last dim, ties as scipy ``method="average"``.

    Batched over all leading dims. A row containing NaN is all-NaN, matching
    ``scipy.stats.rankdata`` (``nan_policy="propagate"``). Returns float64.
    """
    _check_real(x, "x", floating=False)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    x = x.to(torch.float64)
    m = x.shape[-1]
    if m == 0:
        return x.clone()
    v, idx = torch.sort(x, dim=-1, stable=True)
    pos = torch.arange(m, device=x.device).expand_as(v)
    diff = v[..., 1:] != v[..., :-1]
    ones = torch.ones_like(v[..., :1], dtype=torch.bool)
    is_start = torch.cat([ones, diff], dim=-1)  # first element of a tie group
    is_end = torch.cat([diff, ones], dim=-1)  # last element of a tie group
    # Spread each group's first/last position over the whole group.
    start = torch.where(is_start, pos, 0).cummax(dim=-1).values
    end = torch.where(is_end, pos, m - 1).flip(-1).cummin(dim=-1).values.flip(-1)
    avg = (start + end).to(torch.float64) / 2.0 + 1.0
    ranks = torch.empty_like(avg).scatter_(-1, idx, avg)
    return ranks.masked_fill(torch.isnan(x).any(dim=-1, keepdim=True), math.nan)


def _pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise Pearson on float64 [N, P]; NaN for constant rows (like scipy)."""
    constant = (x == x[:, :1]).all(dim=-1) | (y == y[:, :1]).all(dim=-1)
    xc = x - x.mean(dim=-1, keepdim=True)
    yc = y - y.mean(dim=-1, keepdim=True)
    # Normalise first so huge/tiny values do not overflow/underflow the products.
    xn = xc / torch.linalg.vector_norm(xc, dim=-1, keepdim=True)
    yn = yc / torch.linalg.vector_norm(yc, dim=-1, keepdim=True)
    r = (xn * yn).sum(dim=-1).clamp(-1.0, 1.0)
    return r.masked_fill(constant | _any_nan(x, y), math.nan)


def pearson(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image Pearson r over pixels, [N] float64; NaN if either map is constant."""
    p, t = _pair(pred, target)
    return _pearson_rows(p, t)


def spearman(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image Spearman rho = Pearson of average ranks (scipy ``spearmanr`` with ties).

    NaN if either map is constant or contains NaN.
    """
    p, t = _pair(pred, target)
    return _pearson_rows(rankdata(p), rankdata(t))


def spearman_ceiling(target: Tensor) -> Tensor:
    """Per-image best Spearman rho that a map without ties can reach against ``target``, [N] float64.

    Exact labels tie: a flat floor under one directional light has one shading value, every shadow
    0, the sky 1. A prediction's order inside a tie group does not change rho (the group's target
    rank is one number), but its distinct values spread the group over several ranks, so any
    tie-free map, the exact label with its ties broken included, stays below 1. This is the
    target's own ordinal ranks (ties broken by position) against its average ranks; 1 where the
    target has no ties, NaN where it is constant or has NaN (as :func:`spearman`).
    """
    _check_real(target, "target", floating=False)
    t = _flatten(target, "target")
    order = torch.sort(t, dim=-1, stable=True).indices
    positions = torch.arange(1, t.shape[-1] + 1, dtype=torch.float64, device=t.device).expand_as(t)
    ordinal = torch.empty_like(t).scatter_(-1, order, positions)
    return _pearson_rows(ordinal, rankdata(t)).masked_fill(_any_nan(t), math.nan)


def rmse(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image root-mean-square error over pixels, [N] float64."""
    p, t = _pair(pred, target)
    return (p - t).square().mean(dim=-1).sqrt()


def dice(pred: Tensor, target: Tensor, threshold: float = 0.5) -> Tensor:
    """Per-image Dice 2|A∩B|/(|A|+|B|) of ``pred > threshold`` vs ``target > 0.5``.

    ``target`` may be bool/int/float (0/1 masks binarise unchanged). Both masks
    empty -> 1.0 by convention; a NaN pixel on either side -> NaN for that image.
    """
    p, t = _pair(pred, target)
    a = p > threshold
    b = t > 0.5
    inter = (a & b).sum(dim=-1).to(torch.float64)
    total = (a.sum(dim=-1) + b.sum(dim=-1)).to(torch.float64)
    d = torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), 1.0)
    return d.masked_fill(_any_nan(p, t), math.nan)


# --------------------------------------------------------------------------- #
# aggregation
# --------------------------------------------------------------------------- #
def summarize(per_image: Tensor) -> dict[str, float | int]:
    """NaN-ignoring mean of per-image values, with counts for honest reporting.

    Returns ``{"mean", "n_images", "n_nan"}``; ``mean`` is NaN if every image is NaN.
    """
    if not isinstance(per_image, Tensor) or per_image.dim() != 1:
        raise ValueError("per_image must be a 1-D tensor of per-image values")
    if per_image.numel() == 0:
        raise ValueError("per_image is empty (N=0)")
    v = per_image.to(torch.float64)
    nan = torch.isnan(v)
    n_nan = int(nan.sum())
    mean = math.nan if n_nan == v.numel() else float(v[~nan].mean())
    return {"mean": mean, "n_images": int(v.numel()), "n_nan": n_nan}


def compute_all(
    pred: Tensor,
    target: Tensor,
    kind: Literal["mask", "continuous"],
    threshold: float = 0.5,
) -> dict[str, float | int]:
    """All metrics for one probe kind, averaged over images (NaN images skipped).

    ``"mask"`` -> dice, pearson; ``"continuous"`` -> spearman, pearson, rmse.
    Result: ``{"n_images": N, <metric>: mean, "<metric>_n_nan": count, ...}``.
    """
    if kind == "mask":
        per = {"dice": dice(pred, target, threshold), "pearson": pearson(pred, target)}
    elif kind == "continuous":
        per = {
            "spearman": spearman(pred, target),
            "pearson": pearson(pred, target),
            "rmse": rmse(pred, target),
        }
    else:
        raise ValueError(f"kind must be 'mask' or 'continuous', got {kind!r}")
    out: dict[str, float | int] = {"n_images": int(pred.shape[0])}
    for name, values in per.items():
        s = summarize(values)
        out[name] = s["mean"]
        out[f"{name}_n_nan"] = s["n_nan"]
    return out
