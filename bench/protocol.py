"""The study protocol's differences, measured on the tiny model; prints ONE JSON line.

Each entry is one audited difference (README: "Study protocol"), both behaviours side by side
on the same inputs:
- timesteps: LMS with the study's linspace spacing vs a folder's "leading" config (tiny model,
  `--prompts` study prompts, 15 steps): timesteps, initial sigma, image and latent difference;
- latents: float32 latents vs latents in the U-Net's dtype, U-Net in bfloat16 (CPU), each
  against the float32 model: relative latent error;
- encoding: the first `--prompts` of the study's prompts that ISO-8859-1 garbles, generated as
  UTF-8 and as ISO-8859-1: image and dec4.0 activation difference;
- mask_threshold: foreground fraction of a soft disk (255 · sigmoid((15 - r) / 1.5), 64²) at
  > 0 and ≥ 128;
- huber: gradient at w = 0 of the reference Huber loss, image resolution (the study) vs
  area-averaged labels (before), on z-scored scene depth, per layer;
- reference: probes fitted with the reference recipe under its variants on rendered scenes
  (noised mode, `--train` / `--test` scenes, `--layers`, last step): before (area-averaged Huber,
  one logit from zero), ldmprobe (Huber at image resolution), study (plus nn.Linear init,
  two-class head, the study's fixed units), capstone (lr 1e-2 vs 1e-3 on shading): test Dice /
  Spearman / RMSE in raw and the study's units.

    python bench/protocol.py [--train 24] [--test 8] [--prompts 4] [--epochs 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldmprobe.jsonout import print_line

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldmprobe.generate import Sampler  # noqa: E402
from ldmprobe.models import load_model  # noqa: E402
from ldmprobe.protocol import STUDY_DEPTH_MEAN, STUDY_DEPTH_STD  # noqa: E402
from ldmprobe.schemas import GenerationSettings  # noqa: E402
from training.fit import TEST_SEED_OFFSET, per_image_metrics  # noqa: E402
from training.labels import PROPERTIES  # noqa: E402
from training.prompts import load_prompts, study_split  # noqa: E402
from training.reference import fit_reference, reference_loss  # noqa: E402
from training.ridge import area_average  # noqa: E402

PROPS = list(PROPERTIES)
KINDS = [PROPERTIES[p] for p in PROPS]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def timesteps_effect(tiny, prompts, seeds, settings) -> dict:
    leading = dataclasses.replace(tiny, scheduler_config=tiny.scheduler_config | {"timestep_spacing": "leading"})
    study = Sampler(leading).generate(prompts, seeds, settings)
    folder = Sampler(leading, timestep_spacing="config").generate(prompts, seeds, settings)
    return {"study_timesteps": study.metadata["timesteps"][:3], "leading_timesteps": folder.metadata["timesteps"][:3],
            "study_init_sigma": round(study.metadata["init_noise_sigma"], 3),
            "leading_init_sigma": round(folder.metadata["init_noise_sigma"], 3),
            "image_mean_abs_diff": float((study.images - folder.images).abs().mean()),
            "latent_rel_diff": rel(folder.latents, study.latents)}


def latents_effect(tiny, prompts, seeds, settings) -> dict:
    reference = Sampler(tiny).generate(prompts, seeds, settings).latents
    half = load_model("tiny", dtype="bfloat16")
    return {f"{ld}_rel_err_vs_fp32_model": rel(Sampler(half, latent_dtype=ld).generate(prompts, seeds, settings).latents,
                                               reference) for ld in ("float32", "model")} | {"unet_dtype": "bfloat16"}


def encoding_effect(sampler, n, settings) -> dict:
    utf8 = load_prompts(study_split("train")) + load_prompts(study_split("test"))
    latin = {it.id: it.prompt for part in ("train", "test")
             for it in load_prompts(study_split(part), encoding="iso-8859-1")}
    garbled = [it for it in utf8 if latin[it.id] != it.prompt][:n]
    a = sampler.generate([it.prompt for it in garbled], [it.seed for it in garbled], settings, layers="dec4.0")
    b = sampler.generate([latin[it.id] for it in garbled], [it.seed for it in garbled], settings, layers="dec4.0")
    return {"garbled_prompts": sum(latin[it.id] != it.prompt for it in utf8), "of": len(utf8), "measured": len(garbled),
            "image_mean_abs_diff": float((a.images - b.images).abs().mean()),
            "dec4.0_last_step_rel_diff": rel(b.steps[-1].activations["dec4.0"], a.steps[-1].activations["dec4.0"])}


def mask_threshold_effect() -> dict:
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 31.5, xx - 31.5)
    soft = (255 / (1 + np.exp(-(15 - r) / 1.5))).astype(np.uint8)
    return {"study_gt0_fraction": float((soft > 0).mean()), "ldmprobe_ge128_fraction": float((soft >= 128).mean())}


def scene_data(sampler, seeds, layers, settings):
    from training.data import SceneSource

    batch = SceneSource(sampler, settings, tuple(layers), seeds).batch([str(s) for s in seeds])
    labels = torch.stack([batch.labels[p] for p in PROPS], 1)  # [N, K, H, W]
    return {la: batch.activations[la][:, -1] for la in layers}, labels


def old_reference(X, Y_layer, kinds, epochs, lr, seed=0):
    """The recipe before this change: Huber / BCE on labels area-averaged to the layer, zero init."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(X.shape[-1], Y_layer.shape[-1]))
    opt = torch.optim.Adam([w], lr=lr)
    m = [k for k, kind in enumerate(kinds) if kind == "mask"]
    c = [k for k, kind in enumerate(kinds) if kind != "mask"]
    for _ in range(epochs):
        order = torch.randperm(X.shape[0], generator=gen)
        for start in range(0, X.shape[0], 4):
            idx = order[start:start + 4]
            pred, y = X[idx].float() @ w, Y_layer[idx]
            loss = F.binary_cross_entropy_with_logits(pred[..., m], y[..., m]) + F.huber_loss(pred[..., c], y[..., c])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach()


def score(weight, shift, scale, sigmoid_mask, X, labels, grid) -> dict:
    h, w = grid
    z = (X.float() @ weight) * scale + shift  # [N, P, K] in label units (mask: logit or regression)
    maps = F.interpolate(z.reshape(len(X), h, w, -1).permute(0, 3, 1, 2), size=labels.shape[-2:], mode="nearest")
    out = {}
    for k, (prop, kind) in enumerate(zip(PROPS, KINDS, strict=True)):
        pred = torch.sigmoid(maps[:, k]) if kind == "mask" and sigmoid_mask else maps[:, k]
        metrics = per_image_metrics(pred, labels[:, k], kind)
        for name in (("dice",) if kind == "mask" else ("spearman", "rmse", "rmse_study")):
            v = metrics[name]
            out[f"{prop}_{name}"] = round(float(v[torch.isfinite(v)].mean()), 4)
    return out


def reference_effect(tiny, args, settings) -> dict:
    sampler = Sampler(tiny)
    layers = args.layers.split(",")
    reg = tiny.registry()
    Xtr, Ytr = scene_data(sampler, list(range(args.train)), layers, settings)
    Xte, Yte = scene_data(sampler, list(range(TEST_SEED_OFFSET, TEST_SEED_OFFSET + args.test)), layers, settings)
    mask = torch.tensor([k == "mask" for k in KINDS])
    mean, std = Ytr.transpose(0, 1).flatten(1).mean(1), Ytr.transpose(0, 1).flatten(1).std(1)
    fitted = (torch.where(mask, 0.0, mean), torch.where(mask, 1.0, std))
    study = (torch.where(mask, 0.0, STUDY_DEPTH_MEAN), torch.where(mask, 1.0, STUDY_DEPTH_STD))
    out: dict = {"huber_grad_rel_diff_at_w0": {}}
    for la in layers:
        grid = (reg[la].height, reg[la].width)
        shift, scale = fitted
        Yn = (Ytr - shift[:, None, None]) / scale[:, None, None]
        depth = Yn[:, 1:2]
        a = torch.zeros(len(Yn), 1, *grid, requires_grad=True)
        reference_loss(a, depth, ["continuous"], [[0]]).backward()
        b = torch.zeros(len(Yn), 1, *grid, requires_grad=True)
        F.huber_loss(b, area_average(depth, grid)).backward()
        out["huber_grad_rel_diff_at_w0"][la] = round(rel(b.grad, a.grad), 4)
        entry = {}
        t0 = time.perf_counter()
        Ylayer = area_average(Yn, grid).flatten(2).transpose(1, 2)
        entry["before"] = score(old_reference(Xtr[la], Ylayer, KINDS, args.epochs, 1e-3), shift, scale, True, Xte[la],
                                Yte, grid)
        entry["ldmprobe"] = score(fit_reference(Xtr[la], Yn, grid, KINDS, epochs=args.epochs), shift, scale, True,
                                  Xte[la], Yte, grid)
        shift, scale = study
        Ys = (Ytr - shift[:, None, None]) / scale[:, None, None]
        entry["study"] = score(fit_reference(Xtr[la], Ys, grid, KINDS, epochs=args.epochs, init="linear-default",
                                             mask_head="two-class"), shift, scale, True, Xte[la], Yte, grid)
        entry["study_lr_1e-2"] = score(fit_reference(Xtr[la], Ys, grid, KINDS, epochs=args.epochs, lr=1e-2,
                                                     init="linear-default", mask_head="two-class"),
                                       shift, scale, True, Xte[la], Yte, grid)
        entry["fit_s"] = round(time.perf_counter() - t0, 2)
        out[la] = entry
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=24, help="training scenes of the fits compared (default: 24)")
    p.add_argument("--test", type=int, default=8, help="test scenes of the fits compared (default: 8)")
    p.add_argument("--prompts", type=int, default=4, help="prompts generated both ways (default: 4)")
    p.add_argument("--epochs", type=int, default=30, help="reference recipe epochs (default: 30)")
    p.add_argument("--layers", default="dec4.0,mid.0", help="layers fitted (default: dec4.0,mid.0)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tiny = load_model("tiny")
    settings = GenerationSettings(steps=15)
    items = load_prompts(study_split("train"), limit=args.prompts)
    prompts, seeds = [it.prompt for it in items], [it.seed for it in items]
    out = {"torch": torch.__version__, "machine": platform.machine(), "model": "tiny (random weights)",
           "mask_threshold": mask_threshold_effect(),
           "timesteps": timesteps_effect(tiny, prompts, seeds, settings),
           "latents": latents_effect(tiny, prompts, seeds, settings),
           "encoding": encoding_effect(Sampler(tiny), args.prompts, settings),
           "reference": reference_effect(tiny, args, settings)}
    print_line(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
