"""How well a model draws what a held-out caption asks for.

For each of the first N held-out captions (training/scenes_model/data.py) one image is sampled with
the study's settings (LMS, 15 steps, guidance 7.5, seed HELD_OUT_SEED_OFFSET + i). Colour and count
by an exact rule on the renderer's palette (`palette_masks`); the kind by the scenes classifier
(trained on renders) when the label models are present. The same judges run on renders of the same
captions: their score there is the ceiling of the measurement.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from .data import HELD_OUT_SEED_OFFSET, held_out_captions, held_out_scenes

MIN_COMPONENT = 0.01  # a connected region counts as an object from 1 % of the image
PRESENT = 0.02  # a colour is present when 2 % of the pixels have it
OBJECT_SHARE = 0.1  # object colour: the named colour covers at least 10 % of the object's pixels
HUE_TOL, SAT_TOL, MIN_SAT, MIN_VALUE = 15.0, 0.25, 0.35, 0.15


def _hsv(rgb: np.ndarray) -> np.ndarray:
    from matplotlib.colors import rgb_to_hsv

    return rgb_to_hsv(np.clip(rgb, 0, 1))


def palette_masks(image: torch.Tensor) -> dict[str, np.ndarray]:
    """Per object colour of the model's world, the pixels of an image [3, H, W] in [0, 1] that have it:
    an exact rule on the renderer's palette. Shading scales a surface's linear RGB, which leaves hue and
    saturation unchanged, so a lit or shadowed red is still red; greys, beige and brown floors and the
    pale sky fall under the saturation floor or off every object hue."""
    from ..scenes import MODEL_COLORS, OBJECT_COLORS

    hsv = _hsv(image.permute(1, 2, 0).float().numpy())
    h, sat, val = hsv[..., 0] * 360, hsv[..., 1], hsv[..., 2]
    out = {}
    for name in MODEL_COLORS:
        ph, ps, _ = _hsv(np.asarray(OBJECT_COLORS[name], dtype=np.float32))
        dh = np.abs((h - ph * 360 + 180) % 360 - 180)
        out[name] = (dh <= HUE_TOL) & (np.abs(sat - ps) <= SAT_TOL) & (sat >= MIN_SAT) & (val >= MIN_VALUE)
    return out


def judge(images: torch.Tensor, captions: list[dict], label_models=None) -> dict:
    """Adherence of images [N, 3, H, W] in [0, 1] to their captions, and the per-image verdicts.
    colour: the named colour is the object colour covering most of the image, and >= 2 % of it (palette
    rule; `colour_present` counts mere presence, which random colour noise also passes); count: the object colours form
    exactly one region of >= 1 % (connected components); kind: the scenes classifier's kind, marginalised
    over colours, when label models are given (else not measured). With label models also
    `object_colour`: the same palette rule on the object's own pixels (the segmenter's P > 0.5, at
    least 1 % of the image) — the named colour is the most common object colour there and covers
    >= 10 % of them — so a floor drawn more saturated than the palette's brown (which the whole-image
    rule then counts as orange) does not decide the object's colour."""
    from scipy import ndimage

    kinds_pred = objects = None
    if label_models is not None:
        objects = (label_models.foreground(images) > 0.5).numpy()
        names = label_models.class_names
        probs = label_models.classify(images).softmax(-1)
        kinds = sorted({n.split()[1] for n in names})
        pk = torch.stack([probs[:, [i for i, n in enumerate(names) if n.split()[1] == k]].sum(1) for k in kinds], 1)
        kinds_pred = [kinds[int(i)] for i in pk.argmax(1)]
    rows = []
    for i, cap in enumerate(captions):
        masks = palette_masks(images[i])
        fractions = {c: float(m.mean()) for c, m in masks.items()}
        any_object = np.logical_or.reduce(list(masks.values()))
        labelled, _ = ndimage.label(any_object)
        sizes = np.bincount(labelled.ravel())[1:] / any_object.size
        count = int((sizes >= MIN_COMPONENT).sum())
        row = {"caption": cap["caption"], "colour_fraction": round(fractions[cap["colour"]], 4),
               "dominant_colour": max(fractions, key=fractions.get), "count": count,
               "colour_present": fractions[cap["colour"]] >= PRESENT,
               "colour_ok": fractions[cap["colour"]] >= PRESENT and max(fractions, key=fractions.get) == cap["colour"],
               "count_ok": count == 1}
        if kinds_pred is not None:
            row |= {"kind": kinds_pred[i], "kind_ok": kinds_pred[i] == cap["kind"]}
        if objects is not None:
            obj = objects[i]
            inside = {c: float((m & obj).sum()) / max(1.0, float(obj.sum())) for c, m in masks.items()}
            row |= {"object_fraction": round(float(obj.mean()), 4), "object_colour": max(inside, key=inside.get),
                    "object_colour_ok": bool(obj.mean() >= MIN_COMPONENT and inside[cap["colour"]] >= OBJECT_SHARE
                                             and max(inside, key=inside.get) == cap["colour"])}
        rows.append(row)
    out = {"colour_adherence": round(float(np.mean([r["colour_ok"] for r in rows])), 4),
           "colour_present": round(float(np.mean([r["colour_present"] for r in rows])), 4),
           "kind_adherence": round(float(np.mean([r["kind_ok"] for r in rows])), 4) if kinds_pred else None,
           "count_adherence": round(float(np.mean([r["count_ok"] for r in rows])), 4), "rows": rows}
    if objects is not None:
        out["object_colour_adherence"] = round(float(np.mean([r["object_colour_ok"] for r in rows])), 4)
    return out


def sample(model_source: str, captions: list[dict], steps: int, guidance: float, batch: int = 8,
           progress: bool = True) -> tuple[torch.Tensor, float]:
    """Images of the captions (seed HELD_OUT_SEED_OFFSET + i each) and the seconds it took."""
    from tqdm.auto import tqdm

    from ldmprobe.generate import Sampler
    from ldmprobe.models import load_model
    from ldmprobe.schemas import GenerationSettings

    sampler = Sampler(load_model(model_source))
    settings = GenerationSettings(steps=steps, guidance=guidance)
    started, out = time.perf_counter(), []
    for i in tqdm(range(0, len(captions), batch), desc=f"sample {model_source}", disable=not progress):
        chunk = captions[i:i + batch]
        out.append(sampler.generate([c["caption"] for c in chunk],
                                    [HELD_OUT_SEED_OFFSET + i + j for j in range(len(chunk))], settings, layers=None).images)
    return torch.cat(out), time.perf_counter() - started


def held_out_renders(count: int) -> torch.Tensor:
    """The renders of the first `count` held-out captions (held_out_scenes), float [N, 3, H, W] in [0, 1]."""
    return torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in held_out_scenes(count)])


def at_size_of(images: torch.Tensor, renders: torch.Tensor) -> torch.Tensor:
    """Samples resized to the renders' size (a model of another resolution is judged at the renders')."""
    if images.shape[-2:] == renders.shape[-2:]:
        return images
    return torch.nn.functional.interpolate(images, size=renders.shape[-2:], mode="bilinear", antialias=True)


def grid_png(path: Path, rows: dict[str, torch.Tensor], captions: list[dict], columns: int = 16) -> Path:
    """Renders beside samples of the same captions: one row per source, the first `columns` captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldmprobe.atomic import atomic_path

    n = min(columns, len(captions))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.45 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                ax.set_title(captions[c]["caption"].replace(" on ", "\non "), fontsize=5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def run_evaluation(args) -> dict:
    from ldmprobe.atomic import write_json

    judges = None
    try:
        from ldmprobe.label_models import load_label_models

        judges = load_label_models(args.label_models)
    except (ImportError, ValueError) as exc:  # no label models in this checkout: kind is not measured
        print(f"training.scenes_model evaluate: kind adherence not measured ({exc})", file=sys.stderr)
    captions = held_out_captions(args.captions)
    renders = held_out_renders(len(captions))
    result = {"captions": len(captions), "steps": args.steps, "guidance": args.guidance,
              "renders": {k: v for k, v in judge(renders, captions, judges).items() if k != "rows"}}
    rows = {"render": renders}
    for key, source in (("model", args.model), ("contrast", args.contrast)):
        if source in (None, "none"):
            continue
        images, seconds = sample(source, captions, args.steps, args.guidance)
        images = at_size_of(images, renders)
        verdict = judge(images, captions, judges)
        result[key] = {"source": source, **{k: v for k, v in verdict.items() if k != "rows"},
                       "sample_s": round(seconds, 1)}
        result[key + "_rows"] = verdict["rows"]
        rows[source] = images
    if args.out is not None:
        result["grid"] = str(grid_png(Path(args.out) / "samples.png", rows, captions))
        write_json(Path(args.out) / "evaluate.json", result)
    return {k: v for k, v in result.items() if not k.endswith("_rows")}
