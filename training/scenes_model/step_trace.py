"""Diagnostic: what the study's sampler does step by step at a guidance scale. For each of the LMS
steps: the guided noise prediction's spread (std, max |ε|), its disagreement between the two branches
(‖c − u‖ / ‖u‖), the scheduler's multistep coefficients, the predicted clean latent's range, and the
colour adherence of that prediction decoded — so a reader sees at which step the colours are lost and
why (`python -m training.scenes_model.step_trace --guidance 7.5`). Reads the sampler; changes nothing."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import torch

from ldmprobe.jsonout import print_line


@contextlib.contextmanager
def traced(sampler):
    """Within the block, each denoising step of `sampler` appends to the yielded list: the guided noise
    prediction, the two branches' disagreement (when guidance > 1 runs both) and the scheduler's
    multistep coefficients for that step."""
    import ldmprobe.generate as generate

    log, unet_fn, advance = [], sampler.unet_fn, generate.Denoising.advance

    def recording_unet(latent_in, t, text, cfg=False, **kw):
        noise, acts = unet_fn(latent_in, t, text, cfg=cfg, **kw)
        if cfg:
            uncond, cond = noise.float().chunk(2)
            log.append({"branch_disagreement": float((cond - uncond).norm() / uncond.norm())})
        else:
            log.append({"branch_disagreement": None})
        return noise, acts

    def recording_advance(self, noise, activations):
        i, scheduler = self.index, self.scheduler
        order = min(i + 1, 4)
        coefficients = [scheduler.get_lms_coefficient(order, i, k) for k in range(order)] \
            if hasattr(scheduler, "get_lms_coefficient") else None
        log[-1] |= {"guided": noise.detach().float().cpu(), "sigma": float(scheduler.sigmas[i]),
                    "coefficients": coefficients}
        return advance(self, noise, activations)

    sampler.unet_fn, generate.Denoising.advance = recording_unet, recording_advance
    try:
        yield log
    finally:
        sampler.unet_fn, generate.Denoising.advance = unet_fn, advance


def run(model: str, guidance: float, captions: int, steps: int, first: int = 0) -> dict:
    from ldmprobe.generate import Sampler
    from ldmprobe.models import load_model
    from ldmprobe.schemas import GenerationSettings

    from .data import HELD_OUT_SEED_OFFSET, held_out_captions
    from .evaluate import judge

    chosen = held_out_captions(first + captions)[first:]
    prompts, seeds = [c["caption"] for c in chosen], [HELD_OUT_SEED_OFFSET + first + i for i in range(captions)]
    sampler = Sampler(load_model(model))
    with traced(sampler) as log:
        result = sampler.generate(prompts, seeds, GenerationSettings(steps=steps, guidance=guidance), layers=None)
    rows = []
    for rec, step in zip(log, result.steps, strict=True):
        with torch.no_grad():
            decoded = sampler.decode(step.x0)
        disagreement = rec["branch_disagreement"]
        rows.append({"index": step.index, "timestep": round(float(step.timestep), 1), "sigma": round(rec["sigma"], 4),
                     "lms_coefficients": [round(c, 4) for c in rec["coefficients"]] if rec["coefficients"] else None,
                     "eps_std": round(float(rec["guided"].std()), 3),
                     "eps_max_abs": round(float(rec["guided"].abs().amax()), 2),
                     "branch_disagreement": None if disagreement is None else round(disagreement, 4),
                     "x0_max_abs": round(float(step.x0.abs().amax()), 2),
                     "x0_colour_adherence": judge(decoded, chosen)["colour_adherence"]})
    return {"model": model, "guidance": guidance, "captions": captions, "first": first, "steps": rows,
            "final_latent_max_abs": round(float(result.latents.abs().amax()), 2),
            "colour_adherence": judge(result.images, chosen)["colour_adherence"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.scenes_model.step_trace", description=__doc__)
    p.add_argument("--model", default="scenes", help="model: scenes, tiny or a folder (default: scenes)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5, the study's)")
    p.add_argument("--captions", type=int, default=16, help="held-out captions, one seed each (default: 16)")
    p.add_argument("--first", type=int, default=0, help="index of the first held-out caption (default: 0)")
    p.add_argument("--steps", type=int, default=15, help="LMS steps (default: 15)")
    args = p.parse_args(argv)
    if not (math.isfinite(args.guidance) and 0 <= args.guidance <= 50):
        p.error(f"--guidance: a scale in 0…50, got {args.guidance}")
    if args.captions < 1 or args.steps < 1 or args.first < 0:
        p.error(f"--captions, --steps: must be >= 1, --first >= 0; got {args.captions}, {args.steps}, {args.first}")
    print_line(run(args.model, args.guidance, args.captions, args.steps, args.first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
