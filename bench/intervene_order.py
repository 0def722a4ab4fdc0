"""The two intervention orders on the same requests: sequential (the study's) vs joint. One JSON line.

Tiny model, a probe bank fitted on rendered scenes (the tests' scene bank: foreground + depth on
all 16 layers, LMS, --steps steps; or --bank), the study's foreground spec (dec2–dec4, Euclidean edit, steps 0–4,
128 Adam iterations, lr 5e-3) shifted by --dx. Per request and order: the success numbers
(`measure`: Dice to the target of the evaluation probe, edited vs unedited; centroid shift
achieved / requested; the edited layers' own probes on the patched forward) and the wall time;
between the orders: the edited images' and latents' difference, next to what the edit itself
changed (edited vs unedited).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))

REQUESTS = [("a red apple on a wooden table", 5107435), ("a blue ball on the grass", 11), ("a green cube", 2024)]


def scene_bank(steps: int, path: str | None) -> Path:
    if path:
        return Path(path)
    from training.fit import main as fit

    out = Path(tempfile.mkdtemp(prefix="order-bench-")) / "run"
    with contextlib.redirect_stdout(sys.stderr):  # this bench prints one JSON line: the job's goes to stderr
            rc = fit(["--scenes", "12", "--test-scenes", "4", "--properties", "foreground,depth", "--steps", str(steps),
                  "--out", str(out), "--no-progress"])
    if rc:
        raise SystemExit(f"bench/intervene_order.py: fitting the scene bank failed ({rc})")
    return out / "bank.safetensors"


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", default=None, help="probe bank of the tiny model (default: fit the scene bank)")
    p.add_argument("--steps", type=int, default=6, help="denoising steps (default: 6, the scene bank's)")
    p.add_argument("--dx", type=float, default=32.0, help="shift in pixels (default: 32)")
    p.add_argument("--requests", type=int, default=3, help=f"how many of the {len(REQUESTS)} requests (default: 3)")
    args = p.parse_args(argv)

    import torch

    from ldmprobe.generate import Sampler
    from ldmprobe.intervene import STUDY_LAYERS, Intervention, InterventionSpec
    from ldmprobe.models import load_model
    from ldmprobe.probes import ProbeBank
    from ldmprobe.schemas import GenerationSettings

    torch.manual_seed(0)
    model = load_model("tiny")
    runner = Intervention(Sampler(model), ProbeBank.load(scene_bank(args.steps, args.bank), model))
    settings = GenerationSettings(steps=args.steps)
    rows = []
    for prompt, seed in REQUESTS[: args.requests]:
        row: dict = {"prompt": prompt, "seed": seed}
        got = {}
        for order in ("sequential", "joint"):
            started = time.perf_counter()
            got[order] = runner.run(prompt, seed, InterventionSpec(dx=args.dx, order=order, layers=STUDY_LAYERS["foreground"], metric="euclidean"), settings)
            s = got[order].success
            rep = s.get("representation") or {}
            row[order] = {"seconds": round(time.perf_counter() - started, 3),
                          "dice_to_target": _num(s.get("dice_to_target")), "dice_baseline": _num(s.get("dice_baseline")),
                          "shift_fraction": _num(s.get("shift_fraction")), "latent_change": _num(s.get("latent_change")),
                          "pixel_change_all": _num((s.get("pixel_change") or {}).get("all")),
                          "layers_rmse_ratio": _num(rep["rmse_to_target"] / rep["rmse_baseline"])
                          if rep.get("rmse_baseline") else None}
        seq, joint = got["sequential"], got["joint"]
        row["between_orders"] = {
            "image_mean_abs": _num((seq.edited - joint.edited).abs().mean()),
            "image_max_abs": _num((seq.edited - joint.edited).abs().max()),
            "latent_rel": _num((seq.edited_latents - joint.edited_latents).norm() / joint.edited_latents.norm()),
            "edit_itself_image_mean_abs": _num((joint.edited - joint.original).abs().mean()),
        }
        rows.append(row)

    def med(order, key):
        vals = [r[order][key] for r in rows if r[order][key] is not None]
        return _num(statistics.median(vals)) if vals else None

    summary = {"bench": "intervene_order", "model": "tiny", "steps": args.steps, "dx": args.dx,
               "requests": len(rows), "torch_threads": torch.get_num_threads(),
               "median": {o: {k: med(o, k) for k in rows[0][o]} for o in ("sequential", "joint")},
               "time_ratio_sequential_over_joint": _num(statistics.median(
                   r["sequential"]["seconds"] / r["joint"]["seconds"] for r in rows)),
               "rows": rows}
    print(json.dumps(summary, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
