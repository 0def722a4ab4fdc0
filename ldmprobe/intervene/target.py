"""The target of an edit: a pixel affine as a grid_sample warp (one matrix for every layer's
resolution), the warp of probe maps, and a user mask resized to a layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .spec import InterventionError


def affine_theta(affine: Sequence[Sequence[float]], height: int, width: int) -> torch.Tensor:
    """A 2×3 affine in image pixels (source → destination, pixel centres at i + 0.5) as the
    2×3 `grid_sample` matrix (destination → source, normalised coordinates). Normalised
    coordinates do not depend on resolution, so one matrix serves every layer."""
    m = torch.eye(3, dtype=torch.float64)
    m[:2] = torch.tensor(affine, dtype=torch.float64)
    if abs(float(torch.linalg.det(m))) < 1e-9:
        raise InterventionError("the affine is singular (it collapses the image)", "affine")
    to_norm = torch.tensor([[2.0 / width, 0, -1], [0, 2.0 / height, -1], [0, 0, 1]], dtype=torch.float64)
    theta = to_norm @ torch.linalg.inv(m) @ torch.linalg.inv(to_norm)
    return theta[:2].float()


def is_identity(affine: Sequence[Sequence[float]]) -> bool:
    return all(abs(float(affine[i][j]) - (1.0 if i == j else 0.0)) < 1e-12 for i in range(2) for j in range(3))


def transform_maps(maps: torch.Tensor, theta: torch.Tensor, fill: float | None) -> torch.Tensor:
    """Warp [N, H, W] maps by a grid_sample theta. Uncovered pixels get `fill` (the background
    value: 0 for masks) or, with fill=None, the nearest border value (depth)."""
    x = maps.unsqueeze(1).float()
    grid = F.affine_grid(theta.to(x.device).expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    if fill is None:
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:
        out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return out.squeeze(1)


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[H, W] mask → [height, width], area-averaged when shrinking (the fraction of each cell
    the mask covers), bilinear when growing."""
    x = mask.float()[None, None]
    if height <= mask.shape[0] and width <= mask.shape[1]:
        return F.interpolate(x, size=(height, width), mode="area")[0, 0]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def minmax_scale(values: torch.Tensor, half_range: float) -> torch.Tensor:
    """Min-max scale to [-half_range, half_range] (the study's depth target: half_range 9, in the
    probe's normalised units). A constant map goes to 0 (the study would divide by zero)."""
    lo, hi = values.min(), values.max()
    span = hi - lo
    if float(span) <= 0:
        return torch.zeros_like(values)
    return (values - lo) / span * (2 * half_range) - half_range
