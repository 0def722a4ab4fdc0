"""Where a depth probe loses rank on the scenes world: the probe's per-image Spearman beside the same
map with one region (object, floor, sky) replaced by the exact inverse depth, the floor alone, and
two ceilings that need no model (the exact map flat on the floor; the exact map block-averaged to the
probe layer's grid). Noised mode, the fitting job's test scenes, the bank's probe at one layer and step.

`python -m training.scenes_model.depth_ceiling [--model scenes] [--bank PATH] [--layer dec3.0]`
prints one JSON line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ldmprobe.jsonout import print_line


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """The fitting job's Spearman (ties averaged; NaN for a constant map) on one image or pixel set."""
    import torch

    from ldmprobe.metrics import spearman

    return float(spearman(torch.from_numpy(np.asarray(a, np.float64).reshape(1, -1)),
                          torch.from_numpy(np.asarray(b, np.float64).reshape(1, -1)))[0])


def _in_units_of(pred: np.ndarray, inv_depth: np.ndarray) -> np.ndarray:
    """The exact map a·inv_depth + b nearest `pred` in least squares: the exact values in the probe's own
    units (inverse depth, or relative depth under --depth-norm image), so a region swapped in is not off
    by a scale or a shift. A constant map is kept as it is."""
    x, y = inv_depth.ravel().astype(np.float64), pred.ravel().astype(np.float64)
    var = x.var()
    if var <= 0:
        return inv_depth.astype(np.float64)
    a = ((x - x.mean()) * (y - y.mean())).mean() / var
    return a * inv_depth + (y.mean() - a * x.mean())


def region_oracles(pred: np.ndarray, inv_depth: np.ndarray, ids: np.ndarray, grid: int) -> dict[str, float]:
    """One image's figures: `pred` and `inv_depth` [H, W] (H, W multiples of `grid`), `ids` the
    renderer's (-1 sky, 0 floor, ≥ 1 object). Each oracle swaps a region of `pred` for the exact map in
    `pred`'s units, so the figures do not change when `pred` is scaled or shifted."""
    h, w = inv_depth.shape
    out = {"probe": _spearman(pred, inv_depth)}
    exact = _in_units_of(pred, inv_depth)
    for name, sel in (("object_exact", ids >= 1), ("floor_exact", ids == 0), ("sky_exact", ids == -1)):
        mixed = pred.copy()
        mixed[sel] = exact[sel]
        out[name] = _spearman(mixed, inv_depth)
    floor = ids == 0
    out["floor_only"] = _spearman(pred[floor], inv_depth[floor]) if floor.sum() > 1 else float("nan")
    flat = inv_depth.copy()
    flat[floor] = inv_depth[floor].mean() if floor.any() else 0.0
    out["ceiling_flat_floor"] = _spearman(flat, inv_depth)
    bh, bw = h // grid, w // grid
    blocks = inv_depth.reshape(grid, bh, grid, bw).mean((1, 3)).repeat(bh, 0).repeat(bw, 1)
    out["ceiling_block_average"] = _spearman(blocks, inv_depth)
    return out


def measure(model_name: str, bank_path: Path | None, layer: str, scenes: int, step: int) -> dict:
    from ldmprobe.generate import Sampler
    from ldmprobe.models import SCENES_DIR, load_model
    from ldmprobe.probes import ProbeBank
    from ldmprobe.schemas import GenerationSettings

    from ..data import SceneSource
    from ..fit import TEST_SEED_OFFSET
    from ..scenes import render_scene

    model = load_model(model_name, device="cpu", dtype="float32")
    world = (model.world() or {}).get("render_options") or {}
    bank = ProbeBank.load(bank_path or SCENES_DIR / "bank.safetensors", model)
    seeds = list(range(TEST_SEED_OFFSET, TEST_SEED_OFFSET + scenes))
    source = SceneSource(Sampler(model), GenerationSettings(), (layer,), seeds, world)
    batch = source.batch([str(s) for s in seeds])
    size = tuple(batch.images.shape[-2:])
    tokens = batch.activations[layer].shape[2]
    grid = int(round(tokens ** 0.5))
    pred = bank.apply({layer: batch.activations[layer][:, step]}, step, properties=["depth"], layers=[layer],
                      size=size)[("depth", layer)].numpy()
    rows = []
    for i, seed in enumerate(seeds):
        scene = render_scene(seed, size, **world)
        rows.append(region_oracles(pred[i], 1.0 / scene.depth, scene.ids, grid))
    means = {k: round(float(np.nanmean([r[k] for r in rows])), 4) for k in rows[0]}
    return {"model": model_name, "layer": layer, "step": step, "grid": grid, "scenes": scenes, "mean": means,
            "probe_per_scene": [round(r["probe"], 3) for r in rows]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.scenes_model.depth_ceiling", description=__doc__)
    p.add_argument("--model", default="scenes", help="model (default: scenes)")
    p.add_argument("--bank", type=Path, default=None, help="probe bank (default: the scenes model's shipped bank)")
    p.add_argument("--layer", default="dec3.0", help="probe layer (default: dec3.0, the shipped bank's best for depth)")
    p.add_argument("--scenes", type=int, default=16, help="test scenes (default: 16, the acceptance's)")
    p.add_argument("--step", type=int, default=14, help="denoising step (default: 14, the last of 15)")
    args = p.parse_args(argv)
    if args.scenes < 1 or not 0 <= args.step < 15:
        p.exit(2, "depth_ceiling: --scenes must be ≥ 1 and --step in 0…14\n")
    print_line(measure(args.model, args.bank, args.layer, args.scenes, args.step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
