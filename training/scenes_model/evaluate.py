"""How well a model draws what a held-out caption asks for, judged by the scenes label models.

For each of the first N held-out captions (training/scenes_model/data.py) one image is sampled with
the study's settings (LMS, 15 steps, guidance 7.5, seed HELD_OUT_SEED_OFFSET + i). The classifier
(colour × kind, trained on renders) gives the colour and the kind, each marginalised over the other;
the segmenter's mask gives the object count (connected components over 1 % of the image). The same
judges run on renders of the same captions: their score there is the ceiling of the measurement.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .data import HELD_OUT_SEED_OFFSET, held_out_captions, held_out_scenes

MIN_COMPONENT = 0.01  # a connected foreground region counts as an object from 1 % of the image


def judge(images: torch.Tensor, captions: list[dict], label_models) -> dict:
    """Adherence rates of images [N, 3, H, W] in [0, 1] to their captions, and the per-image verdicts."""
    from scipy import ndimage

    names = label_models.class_names
    probs = label_models.classify(images).softmax(-1)
    colours = sorted({n.split()[0] for n in names})
    kinds = sorted({n.split()[1] for n in names})
    pc = torch.stack([probs[:, [i for i, n in enumerate(names) if n.split()[0] == c]].sum(1) for c in colours], 1)
    pk = torch.stack([probs[:, [i for i, n in enumerate(names) if n.split()[1] == k]].sum(1) for k in kinds], 1)
    masks = (label_models.foreground(images) > 0.5).numpy()
    rows = []
    for i, cap in enumerate(captions):
        labelled, n = ndimage.label(masks[i])
        sizes = np.bincount(labelled.ravel())[1:] / masks[i].size
        count = int((sizes >= MIN_COMPONENT).sum())
        rows.append({"caption": cap["caption"], "colour": colours[int(pc[i].argmax())], "kind": kinds[int(pk[i].argmax())],
                     "count": count, "colour_ok": colours[int(pc[i].argmax())] == cap["colour"],
                     "kind_ok": kinds[int(pk[i].argmax())] == cap["kind"], "count_ok": count == 1})
    return {"colour_adherence": round(float(np.mean([r["colour_ok"] for r in rows])), 4),
            "kind_adherence": round(float(np.mean([r["kind_ok"] for r in rows])), 4),
            "count_adherence": round(float(np.mean([r["count_ok"] for r in rows])), 4), "rows": rows}


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
                                    [HELD_OUT_SEED_OFFSET + i + j for j in range(len(chunk))], settings, layers="none").images)
    return torch.cat(out), time.perf_counter() - started


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
    from ldmprobe.label_models import load_label_models

    judges = load_label_models(args.label_models)
    captions = held_out_captions()
    captions = [captions[i % len(captions)] for i in range(args.captions)]
    renders = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255
                           for s in held_out_scenes(len(captions))])
    result = {"captions": len(captions), "steps": args.steps, "guidance": args.guidance,
              "renders": {k: v for k, v in judge(renders, captions, judges).items() if k != "rows"}}
    rows = {"render": renders}
    for key, source in (("model", args.model), ("contrast", args.contrast)):
        if source in (None, "none"):
            continue
        images, seconds = sample(source, captions, args.steps, args.guidance)
        if images.shape[-1] != renders.shape[-1]:
            images = torch.nn.functional.interpolate(images, size=renders.shape[-2:], mode="bilinear", antialias=True)
        verdict = judge(images, captions, judges)
        result[key] = {"source": source, **{k: v for k, v in verdict.items() if k != "rows"},
                       "sample_s": round(seconds, 1)}
        result[key + "_rows"] = verdict["rows"]
        rows[source] = images
    if args.out is not None:
        result["grid"] = str(grid_png(Path(args.out) / "samples.png", rows, captions))
        write_json(Path(args.out) / "evaluate.json", result)
    return {k: v for k, v in result.items() if not k.endswith("_rows")}
