"""Streaming closed-form ridge probes: sufficient statistics in float64, every λ from one eigh.

A probe maps a layer's C channels per pixel to K targets, ``y = x @ weight + bias``. Activations
never fit in memory at once, so we accumulate sufficient statistics chunk by chunk
(`RidgeStats`: n, Σx, Σy, XᵀX, XᵀY, YᵀY), sum them across machines (`merge`, `all_reduce`) and
solve in closed form (`fit`).

Conventions
-----------
* The bias is not penalised: the fit uses statistics centred on the training means (derived
  from the raw sums), ``w = (XcᵀXc + λ·n·s·I)⁺ XcᵀYc`` and ``b = ȳ − x̄ᵀw``. This is the minimiser
  of ``mean‖y − xw − b‖² + λ·s·‖w‖²``.
* λ is *relative*: the penalty is scaled by n (so λ means the same for 10³ or 10⁹ rows, and a
  fit on area-averaged labels equals the full-resolution fit for every λ, see `area_average`)
  and by ``s = tr(XcᵀXc) / (n·C)``, the mean per-channel variance of the training activations
  (so the same grid suits every layer and step, whose activation scales differ by orders of
  magnitude). ``relative=False`` drops s (plain λ·n).
* `DEFAULT_GRID`: 19 values, 1e-6 … 1e3, half a decade apart. λ = 1e-6 is ordinary least
  squares for practical purposes; λ = 1e3 shrinks w to nearly 0.
* λ is chosen per target column on held-out images, from *their* statistics alone (the
  validation error of any (w, b) is a quadratic form in them). Columns share XᵀX, so fitting
  several properties at once (K columns) costs one eigendecomposition.
* Without validation statistics a single λ must be given. Generalised cross-validation from the
  training statistics is deliberately not offered: pixels of one image are strongly correlated,
  so GCV (which assumes independent rows) would pick almost no shrinkage.
* Eigenvalues below the round-off scale of the raw sums count as 0 and a zero denominator gives
  a zero inverse, so λ = 0 is a pseudo-inverse fit (finite with duplicate or constant channels).

Precision: the centring subtracts n·x̄x̄ᵀ from XᵀX in float64, which loses about
2·log10(|mean|/std) of the 16 digits, harmless for attention activations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_GRID", "RidgeFit", "RidgeStats", "area_average", "fit", "fit_at", "sse", "to_tokens"]

DEFAULT_GRID: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-12, 7))
# Rows converted to float64 at a time: bounds the temporary copy (~32 MB) whatever the chunk size.
_BLOCK_ELEMENTS = 1 << 22
_EPS = torch.finfo(torch.float64).eps
_FIELDS = ("n", "sum_x", "sum_y", "xtx", "xty", "yty")


class RidgeStats:
    """Sufficient statistics of (X [n, C], Y [n, K]) for ridge with a bias, float64 on ``device``."""

    def __init__(self, C: int, K: int, device: torch.device | str = "cpu"):
        if C < 1 or K < 1:
            raise ValueError(f"C and K must be positive, got C={C}, K={K}")
        self.C, self.K, self.device = int(C), int(K), torch.device(device)
        self.n = 0
        z = dict(dtype=torch.float64, device=self.device)
        self.sum_x = torch.zeros(C, **z)
        self.sum_y = torch.zeros(K, **z)
        self.xtx = torch.zeros(C, C, **z)
        self.xty = torch.zeros(C, K, **z)
        self.yty = torch.zeros(K, K, **z)

    def __repr__(self) -> str:
        return f"RidgeStats(C={self.C}, K={self.K}, n={self.n}, device={self.device})"

    def add(self, X: torch.Tensor, Y: torch.Tensor) -> RidgeStats:
        """Accumulate one chunk: X [n, C] activations (any float dtype), Y [n, K] labels."""
        if X.ndim != 2 or X.shape[1] != self.C:
            raise ValueError(f"X must have shape [n, {self.C}] (n rows of C={self.C} channels), got {tuple(X.shape)}")
        if Y.ndim != 2 or Y.shape[1] != self.K:
            raise ValueError(f"Y must have shape [n, {self.K}] (n rows of K={self.K} targets), got {tuple(Y.shape)}")
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"X and Y must have the same number of rows, got {X.shape[0]} and {Y.shape[0]}")
        if not X.is_floating_point():
            raise ValueError(f"X must be a floating-point tensor, got {X.dtype}")
        # Checked before accumulating anything: one NaN would silently poison every statistic.
        if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
            raise ValueError("X or Y contains non-finite values; nothing from this chunk was added")
        step = max(1, _BLOCK_ELEMENTS // self.C)
        for i in range(0, X.shape[0], step):
            x = X[i : i + step].to(self.device, torch.float64)
            y = Y[i : i + step].to(self.device, torch.float64)
            self.n += x.shape[0]
            self.sum_x += x.sum(0)
            self.sum_y += y.sum(0)
            self.xtx.addmm_(x.T, x)
            self.xty.addmm_(x.T, y)
            self.yty.addmm_(y.T, y)
        return self

    def merge(self, other: RidgeStats) -> RidgeStats:
        """Add another set's statistics in place (same C, K): statistics of the union of rows."""
        if not isinstance(other, RidgeStats) or (other.C, other.K) != (self.C, self.K):
            got = (other.C, other.K) if isinstance(other, RidgeStats) else type(other).__name__
            raise ValueError(f"can only merge RidgeStats with (C, K) = {(self.C, self.K)}, got {got}")
        self.n += other.n
        for name in _FIELDS[1:]:
            getattr(self, name).add_(getattr(other, name).to(self.device))
        return self

    def __iadd__(self, other: RidgeStats) -> RidgeStats:
        return self.merge(other)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (n as a 0-d int64), ready for safetensors; contiguous CPU copies."""
        out = {"n": torch.tensor(self.n, dtype=torch.int64)}
        out.update({name: getattr(self, name).detach().cpu().contiguous().clone() for name in _FIELDS[1:]})
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> RidgeStats:
        missing = [name for name in _FIELDS if name not in state]
        if missing:
            raise ValueError(f"RidgeStats state is missing {missing}")
        C, K = state["sum_x"].numel(), state["sum_y"].numel()
        stats = cls(C, K, device)
        for name in _FIELDS[1:]:
            have, want = tuple(state[name].shape), tuple(getattr(stats, name).shape)
            if have != want:
                raise ValueError(f"RidgeStats state {name!r} must have shape {list(want)}, got {list(have)}")
            getattr(stats, name).copy_(state[name].to(torch.float64))
        stats.n = int(state["n"])
        if stats.n < 0:
            raise ValueError(f"RidgeStats state has n={stats.n} < 0")
        return stats

    def all_reduce(self, group=None) -> RidgeStats:
        """Sum the statistics over the ranks of ``group`` in place: one flat buffer, one all_reduce.

        NCCL needs CUDA tensors, so the buffer goes to this rank's current GPU for it; gloo uses CPU.
        """
        import torch.distributed as dist

        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        parts = [torch.tensor([float(self.n)], dtype=torch.float64, device=self.device)]
        parts += [getattr(self, name).reshape(-1) for name in _FIELDS[1:]]
        buf = torch.cat(parts).to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        buf = buf.to(self.device)
        self.n = int(round(buf[0].item()))  # float64 counts are exact below 2**53
        offset = 1
        for name in _FIELDS[1:]:
            t = getattr(self, name)
            t.copy_(buf[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return self

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x̄ [C], ȳ [K], XcᵀXc [C, C], XcᵀYc [C, K], diag YcᵀYc [K]) about this set's own means."""
        if self.n == 0:
            raise ValueError("RidgeStats has no rows")
        mx, my = self.sum_x / self.n, self.sum_y / self.n
        xx = self.xtx - self.n * torch.outer(mx, mx)
        xx = (xx + xx.T) / 2
        xy = self.xty - self.n * torch.outer(mx, my)
        yy = self.yty.diagonal() - self.n * my * my
        return mx, my, xx, xy, yy


def sse(stats: RidgeStats, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Σ over the rows of ``stats`` of (y − xw − b)² per column, from the statistics alone.

    weight [..., C, K], bias [..., K] → [..., K]. Expanded about the set's own means
    (SSE = centred part + n·(ȳ − x̄ᵀw − b)²) to keep the cancellation small.
    """
    mx, my, xx, xy, yy = stats.centred()
    W = weight.to(stats.device, torch.float64)
    b = bias.to(stats.device, torch.float64)
    quad = ((xx @ W) * W).sum(-2)
    cross = (xy * W).sum(-2)
    offset = my - (mx.unsqueeze(-1) * W).sum(-2) - b
    return (yy - 2 * cross + quad + stats.n * offset**2).clamp_min(0)


@dataclass
class RidgeFit:
    """A fitted probe (float64) and how λ was chosen.

    weight [C, K], bias [K]; lam [K]: the relative λ chosen per column; scale: s, the variance
    unit λ is measured in (penalty on the diagonal = lam·n·scale); lambdas [L]: the grid;
    val_mse [L, K] (None without validation data); train_mse [K] for the chosen λ.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    lam: torch.Tensor
    scale: float
    lambdas: torch.Tensor
    val_mse: torch.Tensor | None
    train_mse: torch.Tensor
    n_train: int
    n_val: int

    def info(self) -> dict:
        """JSON-ready summary for a probe bank's ``fit`` field."""
        out = {
            "method": "ridge",
            "lambda": [float(v) for v in self.lam],
            "lambda_scale": self.scale,
            "penalty": "lambda * n * scale * ||w||^2, bias unpenalised",
            "train_mse": [float(v) for v in self.train_mse],
            "n_train": self.n_train,
            "n_val": self.n_val,
        }
        if self.val_mse is not None:
            out["val_mse"] = [float(v) for v in self.val_mse.min(0).values]
            out["grid"] = [float(v) for v in self.lambdas]
        return out


def _solve_grid(train: RidgeStats, grid: torch.Tensor, relative: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Weights [L, C, K] and biases [L, K] for every λ of ``grid`` from one eigendecomposition."""
    n = train.n
    mx, my, xx, xy, _ = train.centred()
    trace = float(xx.diagonal().sum())
    scale = trace / (n * train.C) if relative and trace > 0 else 1.0

    evals, Q = torch.linalg.eigh(xx)
    # Round-off scale of entries of XcᵀXc, which come from raw sums of size diag(XᵀX).
    tol = 100 * train.C * _EPS * float(train.xtx.diagonal().max().clamp_min(0))
    evals = torch.where(evals > tol, evals, torch.zeros_like(evals))
    denom = evals + (grid * n * scale).unsqueeze(-1)  # [L, C]
    inv = torch.where(denom > tol, 1 / denom, torch.zeros_like(denom))
    W = Q @ (inv.unsqueeze(-1) * (Q.T @ xy))  # [L, C, K]
    B = my - (mx.unsqueeze(-1) * W).sum(-2)  # [L, K]
    return W, B, scale


def fit_at(stats: RidgeStats, lam: Sequence[float], *, relative: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [C, K] and bias [K] with a given λ per column (e.g. the λ chosen on held-out
    images, refitted on all images), from one eigendecomposition."""
    lam = [float(v) for v in lam]
    if len(lam) != stats.K:
        raise ValueError(f"need one lambda per column (K={stats.K}), got {len(lam)}")
    grid = sorted(set(lam))
    W, B, _ = _solve_grid(stats, torch.tensor(grid, dtype=torch.float64, device=stats.device), relative)
    idx = torch.tensor([grid.index(v) for v in lam], device=stats.device)
    cols = torch.arange(stats.K, device=stats.device)
    return W[idx, :, cols].T.contiguous(), B[idx, cols]


def fit(
    train: RidgeStats,
    val: RidgeStats | None = None,
    lambdas: float | Sequence[float] = DEFAULT_GRID,
    *,
    relative: bool = True,
) -> RidgeFit:
    """Closed-form ridge for every λ from one eigendecomposition; λ picked per column on ``val``.

    Without ``val``, ``lambdas`` must be a single value. ``relative=False`` uses the penalty λ·n
    instead of λ·n·s (see the module docstring).
    """
    grid = torch.tensor([lambdas] if isinstance(lambdas, int | float) else list(lambdas), dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() == 0 or not torch.isfinite(grid).all() or (grid < 0).any():
        raise ValueError(f"lambdas must be finite, non-negative and non-empty, got {grid.tolist()}")
    if val is None and grid.numel() != 1:
        raise ValueError("without validation statistics give a single lambda (held-out images choose among several)")
    if val is not None and (val.C, val.K) != (train.C, train.K):
        raise ValueError(f"val statistics must have (C, K) = {(train.C, train.K)}, got {(val.C, val.K)}")
    if val is not None and val.n == 0:
        raise ValueError("val statistics have no rows")

    n = train.n
    W, B, scale = _solve_grid(train, grid.to(train.device), relative)
    grid = grid.to(train.device)
    cols = torch.arange(train.K, device=train.device)
    if val is None:
        val_mse, idx = None, torch.zeros(train.K, dtype=torch.long, device=train.device)
    else:
        val_mse = sse(val, W, B) / val.n
        idx = val_mse.argmin(0).to(train.device)
    weight = W[idx, :, cols].T.contiguous()
    bias = B[idx, cols]
    return RidgeFit(
        weight=weight,
        bias=bias,
        lam=grid[idx],
        scale=scale,
        lambdas=grid,
        val_mse=val_mse,
        train_mse=sse(train, weight, bias) / n,
        n_train=n,
        n_val=0 if val is None else val.n,
    )


def area_average(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool labels [N, H, W] or [N, K, H, W] to a layer's resolution: [N, K, h, w].

    Why this is exact: a probe's map at layer resolution is nearest-upsampled by s = H/h to the
    image, so each layer pixel covers an s×s block, and over a block with mean ȳ
        Σ_block (y − ŷ)² = s²·(ȳ − ŷ)² + Σ_block (y − ȳ)².
    The second term does not depend on the probe and the weight s² is the same for every layer
    pixel, so least squares (and ridge with the λ·n penalty, since n scales by s² too) against the
    area-averaged labels has the same optimum as the fit on all H×W pixels, at 1/s² of the cost.
    When H, W are not multiples of h, w, adaptive average pooling is used; the fit is then only
    approximately the full-resolution one.
    """
    if labels.ndim == 3:
        labels = labels.unsqueeze(1)
    if labels.ndim != 4:
        raise ValueError(f"labels must have shape [N, H, W] or [N, K, H, W], got {tuple(labels.shape)}")
    if not labels.is_floating_point():
        labels = labels.float()
    return F.adaptive_avg_pool2d(labels, tuple(size))


def to_tokens(maps: torch.Tensor) -> torch.Tensor:
    """[N, K, h, w] → [N·h·w, K] rows in activation token order.

    Captured activations are [N, h·w, C] with token i = pixel (i // w, i % w) (row-major), so
    ``to_tokens(labels)`` lines up row for row with ``activations.reshape(-1, C)``.
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape [N, K, h, w], got {tuple(maps.shape)}")
    N, K, h, w = maps.shape
    return maps.permute(0, 2, 3, 1).reshape(N * h * w, K)
