"""Did the edit do what was asked, and what else did it change? Image-level measures on the
evaluation probe's maps (`measure`) and representation-level ones on the edited layers' own
probes (`representation_success`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..metrics import dice, pearson, rmse
from ..probes import Probe
from .optimisation import LayerTarget, raw_output, to_units
from .spec import MASK_THRESHOLD
from .target import resize_mask


def centroid(mask: torch.Tensor) -> tuple[float, float] | None:
    """(x, y) pixel centroid of a binary [H, W] mask (pixel centres at i + 0.5); None when empty."""
    m = mask.float()
    total = float(m.sum())
    if total <= 0:
        return None
    ys = torch.arange(m.shape[0], dtype=torch.float32) + 0.5
    xs = torch.arange(m.shape[1], dtype=torch.float32) + 0.5
    return float((m.sum(0) * xs).sum() / total), float((m.sum(1) * ys).sum() / total)


def _r(v: float | None, digits: int = 4) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), digits)


def measure(prop: str, original_map: torch.Tensor, edited_map: torch.Tensor, target_map: torch.Tensor,
            original_image: torch.Tensor, edited_image: torch.Tensor, original_latent: torch.Tensor,
            edited_latent: torch.Tensor, affine: Sequence[Sequence[float]], probe: Probe | None = None,
            label_maps: Mapping[str, torch.Tensor] | None = None, target_is_mask: bool = False,
            threshold: float = MASK_THRESHOLD) -> dict[str, Any]:
    """Did the edit do what was asked, and what else did it change?

    foreground: Dice(edited mask, target) vs Dice(unedited mask, target) (the baseline), the
    centroid shift achieved (edited − unedited) vs requested (target − unedited), and its
    projection on the requested direction. depth: RMSE and Pearson to the target map for both.
    Both: mean absolute pixel change outside the union of the unedited and target masks (the
    "rest of the image") and inside it, and the relative latent distance."""
    out: dict[str, Any] = {"property": prop}
    if prop == "foreground":
        orig_m, edit_m, tgt_m = original_map > threshold, edited_map > threshold, target_map > threshold
        out["dice_to_target"] = _r(float(dice(edited_map[None], tgt_m.float()[None], threshold)[0]))
        out["dice_baseline"] = _r(float(dice(original_map[None], tgt_m.float()[None], threshold)[0]))
        out["mask_fraction"] = {"original": _r(float(orig_m.float().mean())), "edited": _r(float(edit_m.float().mean())),
                                "target": _r(float(tgt_m.float().mean()))}
        c0, c1, ct = centroid(orig_m), centroid(edit_m), centroid(tgt_m)
        requested = None if c0 is None or ct is None else (ct[0] - c0[0], ct[1] - c0[1])
        if requested is None and not target_is_mask and affine is not None:
            requested = (float(affine[0][2]), float(affine[1][2])) if is_translation(affine) else None
        achieved = None if c0 is None or c1 is None else (c1[0] - c0[0], c1[1] - c0[1])
        out["centroid"] = {"original": _pair(c0), "edited": _pair(c1), "target": _pair(ct)}
        out["shift_requested_px"] = _pair(requested)
        out["shift_achieved_px"] = _pair(achieved)
        out["shift_fraction"] = _r(_projection(achieved, requested))
        region = orig_m | tgt_m
    else:
        out["rmse_to_target"] = _r(float(rmse(edited_map[None], target_map[None])[0]))
        out["rmse_baseline"] = _r(float(rmse(original_map[None], target_map[None])[0]))
        out["pearson_to_target"] = _r(float(pearson(edited_map[None], target_map[None])[0]))
        out["pearson_baseline"] = _r(float(pearson(original_map[None], target_map[None])[0]))
        region = torch.zeros_like(original_map, dtype=torch.bool)
    diff = (edited_image.float() - original_image.float()).abs().mean(0)  # [H, W]
    outside = ~region
    out["pixel_change"] = {
        "outside": _r(float(diff[outside].mean())) if outside.any() else None,
        "inside": _r(float(diff[region].mean())) if region.any() else None,
        "all": _r(float(diff.mean())),
        "outside_fraction_of_image": _r(float(outside.float().mean())),
    }
    out["latent_change"] = _r(float((edited_latent - original_latent).norm() / original_latent.norm().clamp_min(1e-12)))
    if label_maps is not None:
        lo, le = label_maps["original"], label_maps["edited"]
        tgt = resize_mask(target_map, *lo.shape[-2:])
        if prop == "foreground":
            out["label_model"] = {"dice_to_target": _r(float(dice(le[None], (tgt > threshold).float()[None])[0])),
                                  "dice_baseline": _r(float(dice(lo[None], (tgt > threshold).float()[None])[0])),
                                  **_shift(lo > threshold, le > threshold, out.get("shift_requested_px"),
                                           lo.shape[-1] / original_map.shape[-1])}
        else:
            out["label_model"] = {"pearson_to_target": _r(float(pearson(le[None], tgt[None])[0])),
                                  "pearson_baseline": _r(float(pearson(lo[None], tgt[None])[0]))}
    if probe is not None:
        out["eval_probe"] = f"{probe.property}/{probe.layer}/{probe.step}"
    return out


def representation_success(prop: str, step: int, targets: Sequence[LayerTarget], unedited: Mapping[str, torch.Tensor],
                           patched: Mapping[str, torch.Tensor], threshold: float = MASK_THRESHOLD) -> dict[str, Any]:
    """What the edited layers' own probes read from one forward's activations (`patched`: the
    edited row's) vs from the unedited row's: the probe's own mask vs the target (mean over
    layers; per layer too). At the last edited step the forward is the patched one (what the
    optimiser wrote: where an edit must show first); at the step after it, a forward no patch
    touched (what the network made of the edit). Whether it carries on to the image depends on
    the model (`measure`)."""
    per_layer: dict[str, dict[str, float | None]] = {}
    for tgt in targets:
        goal = tgt.units_map().float().cpu()
        edited = to_units(tgt.probe, raw_output(tgt.probe, patched[tgt.layer].float())).cpu()
        before = to_units(tgt.probe, raw_output(tgt.probe, unedited[tgt.layer].float())).cpu()
        if prop == "foreground":
            mask = (goal > threshold).float()[None]
            per_layer[tgt.layer] = {"dice_to_target": _r(float(dice(edited[None], mask, threshold)[0])),
                                    "dice_baseline": _r(float(dice(before[None], mask, threshold)[0])),
                                    # soft: also informative when a weak probe's mask is all or nothing
                                    "rmse_to_target": _r(float(rmse(edited[None], goal[None])[0])),
                                    "rmse_baseline": _r(float(rmse(before[None], goal[None])[0]))}
        else:
            per_layer[tgt.layer] = {"rmse_to_target": _r(float(rmse(edited[None], goal[None])[0])),
                                    "rmse_baseline": _r(float(rmse(before[None], goal[None])[0]))}
    keys = next(iter(per_layer.values())).keys() if per_layer else ()
    mean = {k: _r(sum(v[k] for v in per_layer.values() if v[k] is not None)
                  / max(1, sum(v[k] is not None for v in per_layer.values()))) for k in keys}
    return {"step": step, **mean, "layers": per_layer}


def _shift(before: torch.Tensor, after: torch.Tensor, requested: Sequence[float] | None,
           scale: float) -> dict[str, Any]:
    """The centroid shift between two masks (in image pixels; `scale` = mask px per image px) and
    its projection on the requested shift: the label model's own reading of the move."""
    c0, c1 = centroid(before), centroid(after)
    if c0 is None or c1 is None:
        return {"shift_achieved_px": None, "shift_fraction": None}
    achieved = ((c1[0] - c0[0]) / scale, (c1[1] - c0[1]) / scale)
    return {"shift_achieved_px": _pair(achieved), "shift_fraction": _r(_projection(achieved, requested))}


def _projection(achieved: Sequence[float] | None, requested: Sequence[float] | None) -> float | None:
    """The achieved shift projected on the requested one, as a fraction of it (None if either is missing)."""
    norm2 = None if requested is None else requested[0] ** 2 + requested[1] ** 2
    if achieved is None or not norm2:
        return None
    return (achieved[0] * requested[0] + achieved[1] * requested[1]) / norm2


def is_translation(affine: Sequence[Sequence[float]]) -> bool:
    return all(abs(float(affine[i][j]) - (1.0 if i == j else 0.0)) < 1e-12 for i in range(2) for j in range(2))


def _pair(p: tuple[float, float] | None) -> list[float] | None:
    return None if p is None else [round(p[0], 3), round(p[1], 3)]
