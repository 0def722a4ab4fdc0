"""The README's samples figure: renders of held-out captions beside a model's samples of the same captions
at several guidance scales, with the evaluation's seeds, so the picture shows what `evaluate` scores
(`python -m training.scenes_model.samples_figure --out docs/scenes-samples.png`)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ldmprobe.jsonout import print_line


def samples_figure(out: Path, model: str = "scenes", guidances=(2.0, 7.5), captions: int = 64, every: int = 4,
                   steps: int = 15) -> dict:
    """Sample the first `captions` held-out captions at each guidance (seeds as `evaluate`'s) and draw every
    `every`-th one: a row of renders, then a row per guidance."""
    from .data import held_out_captions
    from .evaluate import at_size_of, grid_png, held_out_renders, sample

    chosen = held_out_captions(captions)
    pick = list(range(0, captions, every))
    renders = held_out_renders(captions)
    rows = {"render": renders[pick]}
    for g in guidances:
        images, _ = sample(model, chosen, steps, g, progress=False)
        rows[f"{model}, guidance {g:g}"] = at_size_of(images, renders)[pick]
    grid_png(out, rows, [chosen[i] for i in pick], columns=len(pick))
    return {"figure": str(out), "model": model, "guidances": list(guidances), "columns": len(pick)}


def _guidances(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and 0 <= v <= 50 for v in values):
        raise argparse.ArgumentTypeError(f"each scale in 0…50, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.scenes_model.samples_figure", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("docs/scenes-samples.png"), help="PNG path (default: docs/scenes-samples.png)")
    p.add_argument("--model", default="scenes", help="model: scenes, tiny or a folder (default: scenes)")
    p.add_argument("--guidance", type=_guidances, default=(2.0, 7.5), help="scales, comma-separated (default: 2,7.5)")
    p.add_argument("--captions", type=int, default=64, help="held-out captions sampled (default: 64)")
    p.add_argument("--every", type=int, default=4, help="draw every N-th caption (default: 4: two of each colour)")
    p.add_argument("--steps", type=int, default=15, help="LMS steps (default: 15)")
    args = p.parse_args(argv)
    for name in ("captions", "every", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: must be >= 1, got {getattr(args, name)}")
    print_line(samples_figure(args.out, args.model, args.guidance, args.captions, args.every, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
