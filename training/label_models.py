"""Train the scenes world's label models: `python -m training.label_models --out DIR`.

The study labelled SD v1.4's images with off-the-shelf models (TRACER saliency, MiDaS depth, an
intrinsic-image shading estimator, VGG-16 for the per-step classification). The scenes world has no
such models, so this job trains small ones on renders of the scenes model's own world
(`training.scenes.MODEL_SCENES`: one plain object, 8 colours × sphere / box / cylinder, on a plain floor that fades into the horizon colour with distance),
where every label is exact, and writes a folder `ldmprobe.label_models.load_label_models` reads:

  config.json              architectures, class names, image size
  dense.safetensors        DenseLabelNet: foreground, depth, shading (one trunk, three head channels;
                           with --shading-structure, a head of floor / zero-shading logits too)
  classifier.safetensors   VGG-16's layout narrowed (timm VGG), colour × kind = 24 classes
  card.md / card.json      data, exact command, seed, wall time per model, held-out figures, sha256

Why one trunk for the three dense maps: the fitting job needs all three for every image, so one
forward pass serves it; the three share their cues (object outline, surface orientation), and one
training run costs a third of three on 2 shared cores.

Robustness: the models are applied to the scenes model's generated images and to blurry, noisy
decodes of intermediate denoising steps, so every training image is augmented (Gaussian blur of
random strength, JPEG compression at a random quality, down-and-up resampling, pixel noise,
brightness / contrast / per-channel gain jitter, horizontal flips); the labels stay the exact
labels of the clean render. Held-out figures are computed on clean renders and on blurred ones.

Data: training renders use seeds TRAIN_SEED_OFFSET + i, held-out evaluation EVAL_SEED_OFFSET + i;
the tests draw from TEST_SEED_OFFSET on. None overlaps the scenes model's own seeds (0… for
training, 5 000 000… for its held-out captions), so the label models never saw its renders.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldmprobe.atomic import atomic_path, write_json
from ldmprobe.label_models import (
    CLASSIFIER_FILE,
    CONFIG_FILE,
    DENSE_CHANNELS,
    DENSE_FILE,
    FORMAT,
    FORMAT_VERSION,
    STRUCTURE_CHANNELS,
    LabelModels,
    build_modules,
    class_names,
    dense_maps,
)
from ldmprobe.metrics import dice, rmse, spearman, spearman_ceiling

from .scenes import KINDS, MODEL_COLORS, MODEL_SCENES, SKY_DEPTH, render_scene

TRAIN_SEED_OFFSET = 7_000_000
EVAL_SEED_OFFSET = 8_000_000
TEST_SEED_OFFSET = 9_000_000  # the tests' renders: never used here
TARGETS = {"dice": 0.9, "depth_spearman": 0.9, "shading_spearman": 0.8, "top1": 0.9}
SKY_WEIGHT = 0.25  # weight of sky pixels in the depth loss (their label is the far plane)
# Weight of the shading gradient-matching term (MiDaS's multi-scale gradient matching, applied to shading).
# Spearman over an image is decided inside its big ties (the evenly lit floor): a predictor that wobbles
# there is ranked at random within the tie. Matching gradients asks for flat where the label is flat.
SHADING_GRAD_WEIGHT = 4.0
GRAD_SCALES = (1, 2, 4, 8)
# Weight of the shading tie loss (`tie_variance`): gradient matching sees a slow drift across the floor
# only as tiny per-pixel differences, yet the drift is what ranks the tied floor pixels (0 = off).
SHADING_TIE_WEIGHT = 0.0
TIE_MIN_FRACTION = 0.01  # a label value held by at least this share of an image's pixels is a tie
FP16_TOLERANCE = 1e-3  # a model ships in fp16 when no held-out figure moves by more than this


class JobError(ValueError):
    pass


# ---------------------------------------------------------------- data


def render_set(seeds, size: int = 128, progress: bool = False, desc: str = "render") -> dict[str, np.ndarray]:
    """Renders of MODEL_SCENES for the given seeds: images uint8 [N,H,W,3], mask/valid bool, depth
    (z, world units) and shading float32 [N,H,W], label int64 [N] (colour × kind index)."""
    from tqdm.auto import tqdm

    out: dict[str, list] = {k: [] for k in ("image", "mask", "valid", "depth", "shading", "label")}
    for seed in tqdm(list(seeds), desc=desc, unit="scene", disable=not progress):
        s = render_scene(seed, size, **MODEL_SCENES)
        (obj,) = s.spec.objects
        out["image"].append(s.image)
        out["mask"].append(s.mask)
        out["valid"].append(s.valid)
        out["depth"].append(s.depth)
        out["shading"].append(s.shading)
        out["label"].append(MODEL_COLORS.index(obj.material.color) * len(KINDS) + KINDS.index(obj.kind))
    return {k: np.stack(v) for k, v in out.items()}


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] → float [N,3,H,W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)


def gaussian_blur(x: torch.Tensor, sigma) -> torch.Tensor:
    """Separable Gaussian blur of [N,C,H,W] with a per-image sigma (pixels; ≤ 0 leaves it as is)."""
    n, c, h, w = x.shape
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(n)
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = torch.where(sigma[:, None] > 0, k, (t[None] == 0).float())
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*C, K]
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(images).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def augment(images: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """uint8 [N,H,W,3] → augmented float [N,3,H,W] in [0, 1] (no geometric change: labels stay valid)."""
    images = np.stack([jpeg(im, rng.integers(15, 80)) if rng.random() < 0.3 else im for im in images])
    x = to_float(images)
    n = x.shape[0]
    for i in np.flatnonzero(rng.random(n) < 0.25):  # resolution loss: down ×2–4 and back up (a decoder's softness)
        f = int(rng.integers(2, 5))
        small = F.interpolate(x[i:i + 1], scale_factor=1 / f, mode="area")
        x[i:i + 1] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    sigma = np.where(rng.random(n) < 0.6, rng.uniform(0.3, 3.5, n), 0.0)
    x = gaussian_blur(x, torch.from_numpy(sigma).float())
    mean = x.mean((1, 2, 3), keepdim=True)
    contrast = torch.from_numpy(rng.uniform(0.8, 1.15, (n, 1, 1, 1))).float()
    brightness = torch.from_numpy(rng.uniform(0.85, 1.15, (n, 1, 1, 1))).float()
    gain = torch.from_numpy(rng.uniform(0.95, 1.05, (n, 3, 1, 1))).float()
    x = ((x - mean) * contrast + mean) * brightness * gain
    noise = torch.from_numpy(np.where(rng.random(n) < 0.5, rng.uniform(0, 0.07, n), 0.0)).float()
    x = x + noise[:, None, None, None] * torch.randn(x.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
    return x.clamp(0, 1)


# ---------------------------------------------------------------- training


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def gradient_matching(pred: torch.Tensor, target: torch.Tensor, scales=GRAD_SCALES) -> torch.Tensor:
    """Mean L1 between the finite differences of pred and target [N, H, W], over several scales
    (2×2 … average-pooled), as MiDaS's gradient-matching loss: zero only where the prediction is
    flat exactly where the label is, and steps exactly where it steps."""
    total = pred.new_zeros(())
    p, t = pred[:, None], target[:, None]
    for k in scales:
        pk, tk = (F.avg_pool2d(p, k), F.avg_pool2d(t, k)) if k > 1 else (p, t)
        r = pk - tk
        total = total + (r[..., :, 1:] - r[..., :, :-1]).abs().mean() + (r[..., 1:, :] - r[..., :-1, :]).abs().mean()
    return total / len(scales)


def tie_variance(pred: torch.Tensor, target: torch.Tensor, min_fraction: float = TIE_MIN_FRACTION) -> torch.Tensor:
    """Mean over images [N, H, W] of the prediction's spread inside the label's ties: for every value the
    label takes on at least `min_fraction` of an image's pixels (the evenly lit floor, a shadow, the sky),
    the squared deviation of pred from its mean there, summed and divided by the image's pixel count.
    Zero only where the prediction is constant wherever the label is, whatever that constant is (the
    level is left to the per-pixel loss)."""
    n = pred.shape[0]
    total = pred.new_zeros(())
    for p, t in zip(pred.reshape(n, -1), target.reshape(n, -1), strict=True):
        values, inverse, counts = torch.unique(t, return_inverse=True, return_counts=True)
        tied = (counts >= min_fraction * t.numel())[inverse]
        if not bool(tied.any()):
            continue
        means = p.new_zeros(len(values)).index_add(0, inverse, p) / counts.to(p.dtype)
        total = total + (p - means[inverse])[tied].square().sum() / t.numel()
    return total / n


def dense_loss(out: torch.Tensor, mask, valid, depth, shading,
               grad_weight: float = SHADING_GRAD_WEIGHT, tie_weight: float = SHADING_TIE_WEIGHT) -> dict[str, torch.Tensor]:
    """BCE for foreground; shift-invariant weighted MSE of log inverse depth (sky at the far plane,
    weighted SKY_WEIGHT); soft-target BCE for shading plus `grad_weight` × its gradient matching and
    `tie_weight` × its spread inside the label's ties. With the shading-structure head (5 channels),
    BCE for its floor channel (the ray hit the ground: valid, not the object) and its zero-shading
    channel (valid and shading exactly 0)."""
    fg = F.binary_cross_entropy_with_logits(out[:, 0], mask)
    w = torch.where(valid > 0, 1.0, SKY_WEIGHT)
    r = out[:, 1] - torch.log(1.0 / depth)
    r = r - (w * r).sum((1, 2), keepdim=True) / w.sum((1, 2), keepdim=True)
    dep = ((w * r * r).sum((1, 2)) / w.sum((1, 2))).mean()
    sh = F.binary_cross_entropy_with_logits(out[:, 2], shading)
    grad = gradient_matching(torch.sigmoid(out[:, 2]), shading) if grad_weight else out.new_zeros(())
    tie = tie_variance(torch.sigmoid(out[:, 2]), shading) if tie_weight else out.new_zeros(())
    losses = {"foreground": fg, "depth": dep, "shading": sh, "shading_grad": grad, "shading_tie": tie,
              "total": fg + dep + sh + grad_weight * grad + tie_weight * tie}
    if out.shape[1] == len(DENSE_CHANNELS) + len(STRUCTURE_CHANNELS):
        targets = {"floor": valid * (1 - mask), "zero_shading": valid * (shading == 0).to(valid.dtype)}
        for i, name in enumerate(STRUCTURE_CHANNELS):
            losses[name] = F.binary_cross_entropy_with_logits(out[:, len(DENSE_CHANNELS) + i], targets[name])
            losses["total"] = losses["total"] + losses[name]
    return losses


def train_dense(model, data, steps, batch, lr, seed, progress=True, grad_weight: float = SHADING_GRAD_WEIGHT,
                tie_weight: float = SHADING_TIE_WEIGHT, only: str | None = None) -> dict:
    """only: the name of one submodule to train (e.g. "structure"), every other weight frozen and
    batch norm in eval mode, so the other outputs stay bit-identical; None trains everything."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng([seed, 1])
    trained = getattr(model, only) if only else model
    if only:
        model.requires_grad_(False).eval()
        trained.requires_grad_(True)
    opt = torch.optim.AdamW(trained.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, max(1, steps // 20)))
    trained.train()
    n, ema, t0 = len(data["image"]), None, time.perf_counter()
    bar = tqdm(range(steps), desc=f"dense ({only or 'fg/depth/shading'})", unit="step", disable=not progress)
    for _ in bar:
        idx = rng.choice(n, batch, replace=False)
        flip = rng.random(batch) < 0.5

        def take(key, idx=idx, flip=flip):
            a = data[key][idx]
            a[flip] = a[flip][:, :, ::-1]
            return a

        x = augment(take("image"), rng)
        mask = torch.from_numpy(take("mask").astype(np.float32))
        valid = torch.from_numpy(take("valid").astype(np.float32))
        depth = torch.from_numpy(take("depth").astype(np.float32))
        shading = torch.from_numpy(take("shading").astype(np.float32))
        losses = dense_loss(model(x), mask, valid, depth, shading, grad_weight, tie_weight)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
        sched.step()
        vals = {k: float(v.detach()) for k, v in losses.items()}
        ema = vals if ema is None else {k: 0.98 * ema[k] + 0.02 * vals[k] for k in vals}
        bar.set_postfix(loss=f"{ema['total']:.3f}")
    model.eval()
    if only:
        model.requires_grad_(True)
    return {"wall_s": round(time.perf_counter() - t0, 1), "final_loss": {k: round(v, 5) for k, v in ema.items()}}


def train_classifier(model, data, steps, batch, lr, seed, progress=True, input_size: int | None = None) -> dict:
    from tqdm.auto import tqdm

    rng = np.random.default_rng([seed, 2])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, max(1, steps // 20)))
    model.train()
    n, ema, t0 = len(data["image"]), None, time.perf_counter()
    labels = torch.from_numpy(data["label"])
    bar = tqdm(range(steps), desc="classifier (VGG layout)", unit="step", disable=not progress)
    for _ in bar:
        idx = rng.choice(n, batch, replace=False)
        imgs = data["image"][idx]
        flip = rng.random(batch) < 0.5
        imgs[flip] = imgs[flip][:, :, ::-1]
        x = augment(imgs, rng)
        if input_size and x.shape[-1] != input_size:  # as LabelModels.classify resizes
            x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
        loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    return {"wall_s": round(time.perf_counter() - t0, 1), "final_loss": round(ema, 5)}


# ---------------------------------------------------------------- evaluation


def evaluate(models: LabelModels, data: dict, blur: float = 0.0) -> dict:
    """Held-out figures (means over images): foreground Dice (p > 0.5), depth Spearman over valid
    pixels (vs inverse z-depth), shading Spearman and RMSE over valid pixels and Spearman over all
    pixels, classifier top-1; and `ceiling`, what a map without ties could reach at best against the
    same labels (exact shading is one value on a lit floor, 0 in every shadow). With the
    shading-structure head, `shading_head` holds the shading head's own figures (its sigmoid alone,
    before `structured_shading`). `blur`: Gaussian sigma in pixels applied to the images first."""
    x = to_float(data["image"])
    if blur > 0:
        x = gaussian_blur(x, blur)
    raw = models.raw(x).float().cpu()
    maps = dense_maps(raw)  # one forward pass for the maps and the shading head's own figures
    head = torch.sigmoid(raw[:, 2])
    mask = torch.from_numpy(data["mask"]).float()
    valid = torch.from_numpy(data["valid"])
    inv = torch.from_numpy(1.0 / data["depth"]).float()
    shading = torch.from_numpy(data["shading"]).float()
    d = dice(maps["foreground"], mask)
    rows: dict[str, list] = {k: [] for k in ("dep", "sh", "sh_rmse", "head", "head_rmse", "dep_ceiling", "sh_ceiling")}
    for i in range(len(x)):
        v = valid[i]
        t = shading[i][v][None]
        rows["dep"].append(float(spearman(maps["depth"][i][v][None], inv[i][v][None])[0]))
        rows["sh"].append(float(spearman(maps["shading"][i][v][None], t)[0]))
        rows["sh_rmse"].append(float(rmse(maps["shading"][i][v][None], t)[0]))
        rows["head"].append(float(spearman(head[i][v][None], t)[0]))
        rows["head_rmse"].append(float(rmse(head[i][v][None], t)[0]))
        rows["dep_ceiling"].append(float(spearman_ceiling(inv[i][v][None])[0]))
        rows["sh_ceiling"].append(float(spearman_ceiling(t)[0]))
    top1 = (models.classify(x).argmax(1).numpy() == data["label"]).astype(np.float64)

    def mean(values) -> float:
        a = np.asarray(values, dtype=np.float64)
        return round(float(np.nanmean(a)), 4)

    out = {"images": int(len(x)), "blur_sigma": blur, "dice": mean(d.numpy()), "depth_spearman": mean(rows["dep"]),
           "shading_spearman": mean(rows["sh"]),
           "shading_spearman_all_pixels": mean(spearman(maps["shading"], shading).numpy()),
           "shading_rmse": mean(rows["sh_rmse"]),
           "top1": mean(top1), "dice_min": round(float(d.min()), 4),
           "depth_spearman_min": round(float(np.nanmin(rows["dep"])), 4),
           # The best any map without ties could score against these labels (exact shading ties).
           "ceiling": {"depth_spearman": mean(rows["dep_ceiling"]), "shading_spearman": mean(rows["sh_ceiling"]),
                       "shading_spearman_all_pixels": mean(spearman_ceiling(shading).numpy())}}
    if raw.shape[1] > len(DENSE_CHANNELS):
        out["shading_head"] = {"shading_spearman": mean(rows["head"]),
                               "shading_spearman_all_pixels": mean(spearman(head, shading).numpy()),
                               "shading_rmse": mean(rows["head_rmse"])}
    return out


# ---------------------------------------------------------------- files


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_weights(module: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})


def _rounded(module: torch.nn.Module, dtype: torch.dtype):
    """A copy of the module with its floating-point state rounded through `dtype`."""
    import copy

    twin = copy.deepcopy(module)
    twin.load_state_dict({k: (v.to(dtype).to(v.dtype) if v.is_floating_point() else v)
                          for k, v in module.state_dict().items()})
    return twin.eval()


def _lineage(folder: Path) -> dict:
    """What a fine-tuned run started from: the folder and its own card's command, wall time and lineage."""
    prev = json.loads((folder / "card.json").read_text()) if (folder / "card.json").is_file() else {}
    return {"folder": str(folder), "command": prev.get("command"), "wall_min_total": prev.get("wall_min_total"),
            "init_from": prev.get("init_from"), "dense_from": prev.get("dense_from")}


STRUCTURE_NOTE = """
The shading map is the shading head with the label's structure applied (`structured_shading`): 0 where
the structure head sees a shadow or a face turned from the light, one value per image on the rest of the
floor (a plane under one directional light has one n·l), the shading head elsewhere. So it can tie where
the label ties, and the ceiling does not bind it. The rows "shading head alone" score the shading head's
own sigmoid on the same renders; RMSE says whether the ties are right, not only well ranked."""


def _card_md(card: dict) -> str:
    f = card["figures"]

    def cell(row: dict, key: str) -> str:
        return f"{row[key]:.3f}" if key in row else "—"

    rows = "\n".join(
        f"| {name} | {f[name]['dice']:.3f} | {f[name]['depth_spearman']:.3f} | {f[name]['shading_spearman']:.3f} "
        f"| {f[name]['shading_spearman_all_pixels']:.3f} | {cell(f[name], 'shading_rmse')} | {f[name]['top1']:.3f} |"
        for name in f)
    structure = ""
    for name in f:  # the shading head alone, before the structure head ties it
        if "shading_head" in f[name]:
            h = f[name]["shading_head"]
            rows += (f"\n| *{name}: shading head alone* | — | — | {h['shading_spearman']:.3f} "
                     f"| {h['shading_spearman_all_pixels']:.3f} | {h['shading_rmse']:.3f} | — |")
            structure = STRUCTURE_NOTE
    ceiling = f["clean"].get("ceiling")
    if ceiling:  # the same labels under every row: one line
        rows += (f"\n| *ceiling: the exact labels, ties broken* | — | {ceiling['depth_spearman']:.3f} "
                 f"| {ceiling['shading_spearman']:.3f} | {ceiling['shading_spearman_all_pixels']:.3f} | 0 | — |")
    files = "\n".join(f"| `{n}` | {v['bytes']} | {v['dtype']} | `{v['sha256']}` |" for n, v in card["files"].items())
    targets = ", ".join(f"{k} ≥ {v}" for k, v in card["targets"].items())
    lineage = ""
    if card.get("init_from"):
        prev = card["init_from"]
        lineage += (f"\nFine-tuned from `{prev['folder']}`, itself trained by `{prev['command']}` "
                    f"({prev['wall_min_total']} min; its own lineage is in card.json).\n")
    if card.get("classifier_from"):
        prev = card["classifier_from"]
        lineage += (f"\nClassifier kept from `{prev['folder']}` (trained by `{prev['command']}`, "
                    f"{prev['wall_min_total']} min).\n")
    if card.get("dense_from"):
        lineage += (f"\nDense model kept from `{card['dense_from']['from']}` (trained by "
                    f"`{card['dense_from']['from_command']}`).\n")
    return f"""# Scenes label models — model card

Small models in the roles of the study's label models, for the scenes world
(`training.scenes.MODEL_SCENES`: one plain object, {len(MODEL_COLORS)} colours × sphere / box / cylinder, on a plain floor that fades into the horizon colour with distance):

| role (study's model) | here | output |
|---|---|---|
| TRACER saliency | `dense` channel 0 | P(foreground) |
| MiDaS relative depth | `dense` channel 1 | relative inverse depth (larger = nearer) |
| intrinsic-image shading | `dense` {"channels 2–4 (`structured_shading`)" if structure else "channel 2"} | Lambertian shading (no ambient, hard shadows; sky = 1) |
| VGG-16 | `classifier` | logits over {len(card['class_names'])} colour × kind classes |

Load with `ldmprobe.label_models.load_label_models()`.

## Architectures
- **dense**: {card['architecture']['dense']} — {card['parameters']['dense']:,} parameters.
- **classifier**: {card['architecture']['classifier']} — {card['parameters']['classifier']:,} parameters.

## Data
{card['data']}

## Training
Command (from the repository root): `{card['command']}`

Seed {card['seed']}; {card['device']}, torch {card['torch']}, {card['threads']} thread(s).
Wall time (s): {json.dumps(card['wall_s'])} — {card['wall_min_total']} min in all.
Final training losses (EMA): {json.dumps(card['final_loss'])}.
{lineage}
## Held-out figures
{card['eval_scenes']} renders with seeds {EVAL_SEED_OFFSET}… never used in training; means over images.
Dice of P > 0.5 vs the exact mask; Spearman per image over valid pixels (ray hit ground or object) against
inverse z-depth and against shading, and shading over all pixels (sky included); classifier top-1.
"blur σ" = the same renders Gaussian-blurred by σ pixels first. Targets on clean renders: {targets}.
The ceiling row is the best Spearman any map without ties can reach against these labels: exact shading
ties (one value on a lit floor, 0 in every shadow and on faces turned from the light, 1 for the sky), and
the order a map gives the pixels of one tie changes nothing, but its distinct values spread them over
several ranks. The exact label itself, its ties broken, scores the ceiling.{structure}

| renders | Dice | depth Spearman | shading Spearman (valid) | shading Spearman (all) | shading RMSE (valid) | top-1 |
|---|---|---|---|---|---|---|
{rows}

Each model is stored in fp16 when rounding its weights to fp16 moves no held-out figure by more than
{FP16_TOLERANCE} (measured: {json.dumps(card['fp16_check'])}), else fp32.

## Files
| file | bytes | dtype | sha256 |
|---|---|---|---|
{files}
"""


# ---------------------------------------------------------------- CLI


def _widths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m training.label_models",
                description="Train the scenes world's label models (segmenter, depth, shading, classifier).")
    p.add_argument("--out", type=Path, required=True, help="output folder (required; created if missing)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, batch order and augmentation (default: 0)")
    p.add_argument("--scenes", type=int, default=3000, help=f"training renders, seeds {TRAIN_SEED_OFFSET}+ (default: 3000)")
    p.add_argument("--eval-scenes", type=int, default=128, help=f"held-out renders, seeds {EVAL_SEED_OFFSET}+ (default: 128)")
    p.add_argument("--dense-steps", type=int, default=1000, help="dense model steps (default: 1000)")
    p.add_argument("--classifier-steps", type=int, default=1200, help="classifier steps (default: 1200)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate, cosine decay (default: 3e-3)")
    p.add_argument("--dense-widths", type=_widths, default=(16, 32, 48, 64),
                   help="DenseLabelNet widths per level (default: 16,32,48,64)")
    p.add_argument("--dense-global-context", action="store_true",
                   help="DenseLabelNet adds an image-level vector (global pool → MLP) to its bottleneck; with "
                        "--init-from a model without it, the new part starts at zero (default: off)")
    p.add_argument("--shading-structure", action="store_true",
                   help="DenseLabelNet gains a shading-structure head (floor and zero-shading logits; the "
                        "shading map then ties where the label ties, see ldmprobe.label_models.structured_shading); "
                        "with --init-from a model without it, the head starts fresh (default: off)")
    p.add_argument("--dense-train", choices=("all", "structure"), default="all",
                   help="what of the dense model trains: all of it, or only the shading-structure head with "
                        "every other weight frozen, so the other maps stay bit-identical to --init-from "
                        "(default: all)")
    p.add_argument("--vgg-widths", type=_widths, default=(8, 16, 32, 64, 64),
                   help="classifier stage widths, VGG-16's five (default: 8,16,32,64,64)")
    p.add_argument("--vgg-hidden", type=int, default=128, help="classifier head width (default: 128)")
    p.add_argument("--vgg-head-kernel", type=int, default=1,
                   help="kernel of the classifier head's first conv over the final 4×4 map; 4 = fc6-like (default: 1)")
    p.add_argument("--classifier-size", type=int, default=128,
                   help="side the classifier's input is resized to (multiple of 32; default: 128)")
    p.add_argument("--dense-from", type=Path, default=None,
                   help="a label-model folder whose dense model is kept as is (its training skipped; "
                        "default: train it)")
    p.add_argument("--classifier-from", type=Path, default=None,
                   help="a label-model folder whose classifier is kept as is (its training skipped; default: train it)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="a label-model folder whose weights the trained models start from (fine-tuning; the "
                        "architecture options must match its config.json; default: random initialisation)")
    p.add_argument("--shading-grad-weight", type=float, default=SHADING_GRAD_WEIGHT,
                   help=f"weight of the shading gradient-matching loss; 0 = BCE only (default: {SHADING_GRAD_WEIGHT:g})")
    p.add_argument("--shading-tie-weight", type=float, default=SHADING_TIE_WEIGHT,
                   help="weight of the shading tie loss: the prediction's spread where the label is one value "
                        f"(the evenly lit floor, a shadow, the sky); 0 = off (default: {SHADING_TIE_WEIGHT:g})")
    p.add_argument("--eval-blur", type=float, action="append", default=None,
                   help="also evaluate on renders blurred by this sigma in pixels; repeatable (default: 1.5 and 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    return p


def _load_starting_weights(p, args, config: dict, dense, classifier) -> dict:
    """Load --init-from (both models, to fine-tune) and --dense-from / --classifier-from (kept as they are,
    training skipped) into the fresh modules; returns the stats of the kept ones. Weights that do not fit the
    asked architecture are a usage error."""
    from ldmprobe.label_models import _load_weights

    def load(module, path: Path, flag: str) -> None:
        try:  # a dense model gaining global context (zero-initialised) fine-tunes from one without
            _load_weights(module, path, may_lack=("context.", "structure.") if flag == "--init-from" else None)
        except Exception as exc:  # a shape mismatch: the architecture options differ from its config
            p.error(f"{flag}: {path.parent}: {str(exc).splitlines()[0]}")

    kept: dict = {}
    if args.init_from is not None:
        load(dense, args.init_from / DENSE_FILE, "--init-from")
        load(classifier, args.init_from / CLASSIFIER_FILE, "--init-from")
    if args.dense_from is not None:
        load(dense, args.dense_from / DENSE_FILE, "--dense-from")
        previous = json.loads((args.dense_from / "card.json").read_text()) if (args.dense_from / "card.json").is_file() else {}
        kept["dense"] = {"wall_s": 0.0, "final_loss": (previous.get("final_loss") or {}).get("dense"),
                         "from": str(args.dense_from), "from_command": previous.get("command"),
                         "from_wall_s": (previous.get("wall_s") or {}).get("dense")}
    if args.classifier_from is not None:
        theirs = json.loads((args.classifier_from / CONFIG_FILE).read_text()).get("classifier") \
            if (args.classifier_from / CONFIG_FILE).is_file() else None
        if theirs != config["classifier"]:  # the same weights at another input size would be another model
            p.error(f"--classifier-from: its classifier config {theirs} differs from this run's {config['classifier']}; "
                    "pass the same --vgg-widths, --vgg-hidden, --vgg-head-kernel and --classifier-size")
        load(classifier, args.classifier_from / CLASSIFIER_FILE, "--classifier-from")
        kept["classifier"] = {"wall_s": 0.0, "final_loss": None, "from": _lineage(args.classifier_from)}
    dense.float(), classifier.float()
    for name in kept:
        (dense if name == "dense" else classifier).eval()
    return kept


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    if args.scenes < args.batch or args.batch < 2:
        p.error(f"--scenes ({args.scenes}) must be ≥ --batch ({args.batch}) ≥ 2")
    if args.eval_scenes < 1 or args.dense_steps < 1 or args.classifier_steps < 1:
        p.error("--eval-scenes, --dense-steps and --classifier-steps must be ≥ 1")
    if not 1 <= args.vgg_head_kernel <= 4:
        p.error("--vgg-head-kernel: 1…4 (the final map is 4×4 at 128×128)")
    if args.classifier_size % 32 or not 32 <= args.classifier_size <= 128:
        p.error(f"--classifier-size: a multiple of 32 in 32…128, got {args.classifier_size}")
    if args.vgg_head_kernel > args.classifier_size // 32:
        p.error(f"--vgg-head-kernel: at most {args.classifier_size // 32} (the final map at --classifier-size)")
    if args.dense_from is not None and not (args.dense_from / "dense.safetensors").is_file():
        p.error(f"--dense-from: {args.dense_from} holds no dense.safetensors")
    if args.classifier_from is not None and not (args.classifier_from / CLASSIFIER_FILE).is_file():
        p.error(f"--classifier-from: {args.classifier_from} holds no {CLASSIFIER_FILE}")
    if args.init_from is not None and not all((args.init_from / f).is_file() for f in (DENSE_FILE, CLASSIFIER_FILE)):
        p.error(f"--init-from: {args.init_from} lacks {DENSE_FILE} or {CLASSIFIER_FILE}")
    if not (math.isfinite(args.shading_grad_weight) and args.shading_grad_weight >= 0):
        p.error(f"--shading-grad-weight: a finite weight ≥ 0, got {args.shading_grad_weight}")
    if not (math.isfinite(args.shading_tie_weight) and args.shading_tie_weight >= 0):
        p.error(f"--shading-tie-weight: a finite weight ≥ 0, got {args.shading_tie_weight}")
    if args.dense_train == "structure" and not (args.shading_structure and args.init_from is not None):
        p.error("--dense-train structure: needs --shading-structure and --init-from (the frozen rest comes from it)")
    if len(args.vgg_widths) != 5:
        p.error("--vgg-widths: VGG-16 has five stages, give five widths")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out: {args.out} exists and is not a folder")
    blurs = args.eval_blur if args.eval_blur is not None else [1.5, 3.0]
    progress = not args.no_progress
    size = 128
    torch.manual_seed(args.seed)
    wall: dict[str, float] = {}

    names = class_names(MODEL_COLORS, KINDS)
    config = {"format": FORMAT, "version": FORMAT_VERSION, "size": size, "class_names": names,
              "dense": {"widths": list(args.dense_widths)}
                       | ({"global_context": True} if args.dense_global_context else {})
                       | ({"shading_structure": True} if args.shading_structure else {}),
              "classifier": {"widths": list(args.vgg_widths), "hidden": args.vgg_hidden,
                             "head_kernel": args.vgg_head_kernel, "input_size": args.classifier_size},
              "dense_channels": ["foreground logit", "log inverse depth + c", "shading logit"]
                                + (["floor logit", "zero-shading logit"] if args.shading_structure else []),
              "files": {"dense": DENSE_FILE, "classifier": CLASSIFIER_FILE}}
    dense, classifier = build_modules(config)
    kept = _load_starting_weights(p, args, config, dense, classifier)  # before any work: a mismatch exits 2 at once
    t = time.perf_counter()
    train = render_set(range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + args.scenes), size, progress, "render train")
    held = render_set(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + args.eval_scenes), size, progress, "render held-out")
    wall["render"] = round(time.perf_counter() - t, 1)

    if "dense" in kept:
        dense_stats = kept["dense"]
    else:
        dense_stats = train_dense(dense, train, args.dense_steps, args.batch, args.lr, args.seed, progress,
                                  args.shading_grad_weight, args.shading_tie_weight,
                                  only="structure" if args.dense_train == "structure" else None)
    wall["dense"] = dense_stats["wall_s"]
    if "classifier" in kept:
        cls_stats = kept["classifier"]
    else:
        cls_stats = train_classifier(classifier, train, args.classifier_steps, args.batch, args.lr, args.seed, progress,
                                     input_size=args.classifier_size)
    wall["classifier"] = cls_stats["wall_s"]

    t = time.perf_counter()
    models = LabelModels(dense, classifier, names, config, str(args.out))
    figures = {"clean": evaluate(models, held)}
    for b in blurs:
        figures[f"blur σ={b:g}"] = evaluate(models, held, b)
    # fp16 where it loses nothing measurable: the clean and blurred figures with fp16-rounded weights
    half = LabelModels(_rounded(dense, torch.float16), _rounded(classifier, torch.float16), names, config, "")
    fig16 = {"clean": evaluate(half, held)}
    for b in blurs:
        fig16[f"blur σ={b:g}"] = evaluate(half, held, b)
    keys = {"dense": ("dice", "depth_spearman", "shading_spearman", "shading_spearman_all_pixels", "shading_rmse"),
            "classifier": ("top1",)}
    fp16_check = {m: max(abs(fig16[s][k] - figures[s][k]) for s in figures for k in ks) for m, ks in keys.items()}
    dtypes = {m: torch.float16 if fp16_check[m] <= FP16_TOLERANCE else torch.float32 for m in keys}
    wall["evaluate"] = round(time.perf_counter() - t, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    save_weights(dense, args.out / DENSE_FILE, dtypes["dense"])
    save_weights(classifier, args.out / CLASSIFIER_FILE, dtypes["classifier"])
    write_json(args.out / CONFIG_FILE, config)
    files = {}
    for name, fname in ((None, CONFIG_FILE), ("dense", DENSE_FILE), ("classifier", CLASSIFIER_FILE)):
        path = args.out / fname
        files[fname] = {"bytes": path.stat().st_size, "sha256": sha256(path),
                        "dtype": str(dtypes[name]).removeprefix("torch.") if name else "json"}
    card = {
        "model": "scenes-labels",
        "architecture": {
            "dense": f"DenseLabelNet (ldmprobe/label_models.py): stride-2 stem, U-Net with levels of widths "
                     f"{list(args.dense_widths)} at 1/2…1/{2 ** len(args.dense_widths)} resolution (2 × conv3×3-BN-ReLU "
                     "per level, max-pool down, bilinear up + skip), a full-resolution refinement conv over the "
                     "upsampled features and the image, a 1×1 head of 3 channels (foreground logit, log inverse "
                     "depth up to a constant, shading logit); input 128×128"
                     + ("; global context: the bottleneck's global average → Linear-ReLU-Linear, added to every "
                        "bottleneck position (ParseNet)" if args.dense_global_context else "")
                     + ("; shading structure: a second head (conv3×3-ReLU-conv1×1 over the upsampled features "
                        "and the refinement's) with a floor logit and a zero-shading logit; the shading map is "
                        "0 where zero-shading p > 0.5, one value per image (the shading head's median there) on "
                        "the rest of the floor p > 0.5, the shading head elsewhere" if args.shading_structure else ""),
            "classifier": f"VGG-16's layout (13 conv3×3 in stages of 2, 2, 3, 3, 3, max-pool after each) with "
                          f"batch norm, stage widths {list(args.vgg_widths)} (VGG-16: 64, 128, 256, 512, 512), "
                          f"built by timm's VGG with a custom cfg; timm's 4096-wide 7×7 fc6 head replaced by its "
                          f"ConvMlp at width {args.vgg_hidden} with a {args.vgg_head_kernel}×{args.vgg_head_kernel} first "
                          f"kernel over the final {args.classifier_size // 32}×{args.classifier_size // 32} map, then timm's ClassifierHead (global average pool + linear) → "
                          f"{len(names)} classes; input resized to {args.classifier_size}×{args.classifier_size}"},
        "parameters": {"dense": sum(p.numel() for p in dense.parameters()),
                       "classifier": sum(p.numel() for p in classifier.parameters())},
        "class_names": names,
        "data": (f"{args.scenes} renders of training.scenes with MODEL_SCENES ({json.dumps(MODEL_SCENES)}), seeds "
                 f"{TRAIN_SEED_OFFSET}…{TRAIN_SEED_OFFSET + args.scenes - 1}, 128×128, every (colour, kind, floor) "
                 f"allowed; labels exact: mask, inverse z-depth (sky = 1/{SKY_DEPTH:g}), shading, colour × kind. "
                 "Augmentation per training image: JPEG (quality 15–80, p 0.3), down-and-up resampling ×2–4 "
                 "(p 0.25), Gaussian blur σ 0.3–3.5 px (p 0.6), contrast ×0.8–1.15, brightness ×0.85–1.15, "
                 "per-channel gain ×0.95–1.05, Gaussian pixel noise σ ≤ 0.07 (p 0.5), horizontal flip (p 0.5)."),
        "command": "python -m training.label_models " + shlex.join(argv),
        "seed": args.seed,
        "config": {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                   for k, v in vars(args).items()},
        "eval_scenes": args.eval_scenes,
        "eval_seeds": [EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + args.eval_scenes - 1],
        "train_seeds": [TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + args.scenes - 1],
        "wall_s": wall,
        "wall_min_total": round(sum(wall.values()) / 60, 1),
        "final_loss": {"dense": dense_stats["final_loss"], "classifier": cls_stats["final_loss"]},
        "dense_from": ({k: dense_stats[k] for k in ("from", "from_command", "from_wall_s")}
                       if args.dense_from is not None else None),
        "init_from": _lineage(args.init_from) if args.init_from is not None else None,
        "classifier_from": cls_stats.get("from"),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "targets": TARGETS,
        "figures": figures,
        "figures_fp16": fig16,
        "fp16_check": fp16_check,
        "meets_targets": {k: figures["clean"][k] >= v for k, v in TARGETS.items()},
        "files": files,
    }
    write_json(args.out / "card.json", card)
    with atomic_path(args.out / "card.md") as tmp:
        tmp.write_text(_card_md(card))
    c = figures["clean"]
    print(f"wrote {args.out}: Dice {c['dice']:.3f}, depth ρ {c['depth_spearman']:.3f}, shading ρ "
          f"{c['shading_spearman']:.3f}, top-1 {c['top1']:.3f} (clean, {args.eval_scenes} held-out renders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
