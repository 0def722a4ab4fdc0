"""Diagnostic: where in the denoising does guidance 7.5 cost the scenes model its colours? Samples the
held-out captions with one guidance scale on the first steps and another on the last K, and scores them
as `evaluate` does (`python -m training.scenes_model.late_guidance --late-steps 5`). Not an option of
ldmprobe's sampler: the study's loop uses one scale throughout, and so do the service and the jobs."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

from ldmprobe.jsonout import print_line


@contextlib.contextmanager
def late_guidance(late_steps: int, scale: float):
    """Within the block, every Denoising uses guidance `scale` on its last `late_steps` steps."""
    import ldmprobe.generate as generate

    original = generate.Denoising.predict

    def predict(self, patches=None):
        if self.index < len(self.timesteps) - late_steps:
            return original(self, patches)
        settings = self.settings
        self.settings = settings.model_copy(update={"guidance": scale})
        try:
            return original(self, patches)
        finally:
            self.settings = settings

    generate.Denoising.predict = predict
    try:
        yield
    finally:
        generate.Denoising.predict = original


def run(model: str, guidance: float, late_steps: int, late_scale: float, captions: int, steps: int,
        label_models=None) -> dict:
    from ldmprobe.label_models import load_label_models

    from .data import held_out_captions
    from .evaluate import judge, sample

    chosen = held_out_captions(captions)
    with late_guidance(late_steps, late_scale):
        images, seconds = sample(model, chosen, steps, guidance, progress=False)
    verdict = judge(images, chosen, load_label_models(label_models))
    return {"model": model, "captions": captions, "steps": steps, "guidance": guidance, "late_steps": late_steps,
            "late_guidance": late_scale, **{k: v for k, v in verdict.items() if k != "rows"}, "sample_s": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.scenes_model.late_guidance", description=__doc__)
    p.add_argument("--model", default="scenes", help="model: scenes, tiny or a folder (default: scenes)")
    p.add_argument("--guidance", type=float, default=7.5, help="scale on the first steps (default: 7.5)")
    p.add_argument("--late-steps", type=int, required=True, help="how many of the last steps use --late-guidance")
    p.add_argument("--late-guidance", type=float, default=2.0, help="scale on the last steps (default: 2)")
    p.add_argument("--captions", type=int, default=64, help="held-out captions, one seed each (default: 64)")
    p.add_argument("--steps", type=int, default=15, help="LMS steps (default: 15)")
    p.add_argument("--label-models", default=None, help="label-model folder (default: the shipped scenes label models)")
    args = p.parse_args(argv)
    for name in ("guidance", "late_guidance"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 0 <= value <= 50):
            p.error(f"--{name.replace('_', '-')}: a scale in 0…50, got {value}")
    if not 0 <= args.late_steps <= args.steps:
        p.error(f"--late-steps: in 0…{args.steps}, got {args.late_steps}")
    if args.captions < 1 or args.steps < 1:
        p.error(f"--captions and --steps: must be >= 1, got {args.captions} and {args.steps}")
    print_line(run(args.model, args.guidance, args.late_steps, args.late_guidance, args.captions, args.steps,
                   args.label_models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
