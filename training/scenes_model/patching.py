"""The ceiling of any edit of the attn1 outputs: activation patching with a perfectly shifted copy.

The intervention asks the probes to read a translated mask and optimises the activations until they
do. Whatever the optimiser finds, it cannot do better than the ideal edit: each layer's output
replaced by the unedited run's own output at that step, translated by the requested shift (the target
is fixed, so moving layers do not compound from step to step). If that moves the object only a little,
the representation the study edits does not hold the object's place in this model, and no probe or
optimiser can meet the intervention goal.

Measured like the intervention (`intervention_eval`): the centroid of the label model's foreground mask,
achieved shift over requested shift. For reference, the initial noise shifted by the same amount: a
model whose layout were a translation-equivariant function of its noise would move the object fully;
one that knows absolute position (from the convolutions' zero padding) moves it less.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MOVED = 0.5  # as intervention_eval: at least half the requested shift


def shift_tokens(a: torch.Tensor, dx_fraction: float) -> torch.Tensor:
    """Translate a layer output [rows, H·W, C] (square map) right by dx_fraction of its width:
    bilinear, so any shift is exact at every resolution; uncovered columns repeat the edge."""
    rows, hw, c = a.shape
    side = int(round(hw ** 0.5))
    if side * side != hw:
        raise ValueError(f"expected a square token map, got {hw} tokens")
    if dx_fraction == 0:
        return a
    grid = a.transpose(1, 2).reshape(rows, c, side, side).float()
    theta = torch.tensor([[1.0, 0.0, -2.0 * dx_fraction], [0.0, 1.0, 0.0]]).expand(rows, 2, 3)
    coords = F.affine_grid(theta, list(grid.shape), align_corners=False)
    out = F.grid_sample(grid, coords, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(rows, c, hw).transpose(1, 2).to(a.dtype)


def _centroid_x(mask: torch.Tensor) -> float | None:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return float(xs.float().mean() + 0.5) if len(xs) else None


def _fractions(masks: torch.Tensor, base: list[float | None], dx: float) -> list[float | None]:
    out = []
    for m, b in zip(masks, base, strict=True):
        c = _centroid_x(m)
        out.append(None if c is None or b is None else round((c - b) / dx, 4))
    return out


def summarise(values: Sequence[float | None]) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"n": len(values), "n_measured": 0}
    return {"n": len(values), "n_measured": int(len(v)), "shift_fraction_mean": round(float(v.mean()), 4),
            "shift_fraction_median": round(float(np.median(v)), 4),
            "moved_fraction": round(float((v >= MOVED).mean()), 4)}


def patching_ceiling(sampler, prompts: list[str], seeds: list[int], settings, dx: float, windows: dict[str, Sequence[int]],
                     layer_sets: dict[str, Sequence[str]], foreground, progress: bool = True) -> dict:
    """For each (layer set, step window): patch those attn1 outputs (both CFG halves) with the reference
    run's, shifted by dx pixels, and measure how far the object moved. `foreground(images) -> [N, H, W]
    bool` segments the final images. Returns per-configuration summaries and per-caption fractions."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    width = settings.width or sampler.model.default_size
    frac = dx / width
    cache: list[dict[str, torch.Tensor]] = []
    with sampler.trace(prompts, seeds, settings, layers="all", half="both") as run:
        for step in run:
            cache.append({k: v.clone() for k, v in step.activations.items()})
        reference = foreground(run.images())
    base = [_centroid_x(m) for m in reference]
    configs: dict[str, dict] = {}

    # reference: the same shift applied to the initial noise (whole latent cells)
    cells = dx / sampler.model.vae_scale_factor
    if cells == int(cells):
        r = sampler.start(prompts, seeds, settings)
        r.latents = r.latents.roll(int(cells), dims=-1)
        while not r.done:
            noise, acts = r.predict()
            r.advance(noise, acts)
        values = _fractions(foreground(sampler.decode(r.latents)), base, dx)
        configs["reference: initial noise shifted"] = {**summarise(values), "per_caption": values}

    jobs = [(ln, wn) for ln in layer_sets for wn in windows]
    for layer_name, window_name in tqdm(jobs, desc="patching", unit="config", disable=not progress):
        layers, steps = tuple(layer_sets[layer_name]), set(windows[window_name])
        with sampler.trace(prompts, seeds, settings, layers="all", half="both") as run:
            for step in run:
                if step.index in steps:
                    for name in layers:
                        step.patch(name, shift_tokens(cache[step.index][name], frac))
            values = _fractions(foreground(run.images()), base, dx)
        configs[f"{layer_name} × steps {window_name}"] = {"layers": list(layers), "steps": sorted(steps),
                                                          **summarise(values), "per_caption": values}
    return {"dx": dx, "captions": len(prompts), "configs": configs, "seconds": round(time.perf_counter() - t0, 1)}
