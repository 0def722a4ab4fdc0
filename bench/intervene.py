"""Intervention cost and effect, measured side by side in one run. Prints one JSON line.

(a) Optimisation of one edited step: all nine decoder layers (dec2.0 … dec4.2) at the REAL SD v1.4
    shapes (from its config at --size px: 16×16×1280, 32×32×640, 64×64×320), the study's
    defaults (Adam, lr 5e-3, 128 iterations, cross-entropy to a translated mask), random
    activations and probes. Three variants in interleaved rounds, compared by medians:
    the reference's one-layer-at-a-time autograd loop (torch.optim.Adam per layer), our batched
    exact Adam with factored moments (eager), and the same step under torch.compile. Goal:
    ≥ 3× faster than the reference at equal final loss (the max relative difference of the
    final losses is reported).
(b) A whole intervention on the built-in tiny model (the study's 9 decoder layers × steps 0–4 × 128
    iterations, dx = --dx) vs one plain generation of the same prompt, and what it achieved:
    Dice to the target for the edited vs the unedited image (final-step evaluation probe) and
    for the edited layers' own probes. The bank: --bank, else a small one fitted on rendered
    scenes by the training job (about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
from ldmprobe.jsonout import print_line  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimisation_case(size: int, seed: int = 0, device: str | torch.device = "cpu"):
    """Activations, probes and translated-mask targets for the decoder layers at SD v1.4 shapes."""
    from ldmprobe import intervene as iv
    from ldmprobe.layers import LayerRegistry
    from ldmprobe.models import sd_v1_4_config
    from ldmprobe.probes import Probe

    registry = LayerRegistry.from_config(sd_v1_4_config("unet"), size // 8)
    gen = torch.Generator().manual_seed(seed)
    theta = iv.affine_theta(iv.translation(size // 8, 0), size, size)
    acts, targets = {}, []
    for name in iv.STUDY_LAYERS["foreground"]:
        spec = registry[name]
        x = torch.randn(spec.height * spec.width, spec.channels, generator=gen)
        probe = Probe("foreground", name, 0, torch.randn(spec.channels, 1, generator=gen) / spec.channels**0.5,
                      torch.zeros(1), "mask", True, (0.0,), (1.0,))
        own = torch.sigmoid(iv.raw_output(probe, x)).reshape(1, spec.height, spec.width)
        goal = (iv.transform_maps(own, theta, 0.0).flatten() > 0.5).float()
        acts[name] = x.to(device)
        targets.append(iv.LayerTarget(name, probe, goal.to(device), "bce"))
    return acts, targets, {n: [registry[n].height, registry[n].width, registry[n].channels] for n in acts}


def bench_optimisation(size: int, iterations: int, rounds: int, device: torch.device) -> dict:
    from ldmprobe import intervene as iv

    acts, targets, shapes = optimisation_case(size, device=device)
    started = time.perf_counter()
    iv.optimise(acts, targets, iterations=2, compiled=True)  # compile (or load from the inductor cache)
    sync(device)
    compile_s = time.perf_counter() - started
    variants = {
        "reference": lambda: iv.optimise_reference(acts, targets, iterations=iterations),
        "batched_eager": lambda: iv.optimise(acts, targets, iterations=iterations),
        "batched_compiled": lambda: iv.optimise(acts, targets, iterations=iterations, compiled=True),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    finals: dict[str, dict[str, float]] = {}
    initial = None
    for _ in range(rounds):
        for name, fn in variants.items():
            sync(device)
            started = time.perf_counter()
            out = fn()
            sync(device)
            times[name].append(time.perf_counter() - started)
            finals[name] = out.final_loss
            initial = out.initial_loss
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = finals["reference"]
    rel = {k: max(abs(finals[k][la] - ref[la]) / max(abs(ref[la]), 1e-12) for la in ref) for k in finals}
    return {
        "speedup_vs_reference": round(med["reference"] / med["batched_compiled"], 2),
        "speedup_vs_reference_eager": round(med["reference"] / med["batched_eager"], 2),
        "optimise_ms": {k: round(v * 1e3, 1) for k, v in med.items()},
        "final_loss_max_rel_diff": {k: float(f"{v:.2e}") for k, v in rel.items() if k != "reference"},
        "mean_loss": {"initial": round(sum(initial.values()) / len(initial), 5),
                      "final": round(sum(ref.values()) / len(ref), 5)},
        "compile_s": round(compile_s, 2), "layer_shapes": shapes, "iterations": iterations,
    }


def fitted_bank(model, steps: int, path: str | None) -> tuple[Path, str]:
    if path:
        return Path(path), path
    from training.fit import main as fit

    out = Path(tempfile.mkdtemp(prefix="bench-intervene-")) / "bank"
    with contextlib.redirect_stdout(sys.stderr):  # the job's own JSON line: stdout is this bench's one line
        rc = fit(["--scenes", "12", "--test-scenes", "4", "--properties", "foreground", "--layers", "dec2,dec3,dec4",
                  "--steps", str(steps), "--out", str(out), "--no-progress"])
    if rc != 0:
        raise SystemExit("fitting the scene bank failed")
    return out / "bank.safetensors", "fitted on 12 rendered scenes (training.fit, noised mode)"


def bench_end_to_end(steps: int, dx: float, bank_path: str | None, compile: bool) -> dict:
    from ldmprobe.generate import Sampler
    from ldmprobe.intervene import STUDY_LAYERS, Intervention, InterventionSpec
    from ldmprobe.models import load_model
    from ldmprobe.probes import ProbeBank
    from ldmprobe.schemas import GenerationSettings

    model = load_model("tiny")
    path, source = fitted_bank(model, steps, bank_path)
    bank = ProbeBank.load(path, model)
    sampler = Sampler(model, compile=compile)
    runner = Intervention(sampler, bank)
    settings = GenerationSettings(steps=steps)
    prompt, seed = "a red apple on a wooden table", 5107435
    study = STUDY_LAYERS["foreground"]  # the nine decoder layers of (a), whatever the bank holds
    spec = InterventionSpec(dx=dx, edit_steps=[s for s in range(5) if s < steps], layers=study)
    runner.run(prompt, seed, InterventionSpec(dx=dx, edit_steps=[0], iterations=2, layers=study), settings)  # warm
    sampler.generate([prompt], [seed], settings, keep_steps=False)
    gen_s, iv_s, result = [], [], None
    for _ in range(2):
        t0 = time.perf_counter()
        sampler.generate([prompt], [seed], settings, keep_steps=False)
        gen_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = runner.run(prompt, seed, spec, settings)
        iv_s.append(time.perf_counter() - t0)
    s = result.success
    rep = s["representation"]
    return {
        "dice_to_target": s["dice_to_target"], "dice_baseline": s["dice_baseline"],
        "shift_requested_px": s["shift_requested_px"], "shift_achieved_px": s["shift_achieved_px"],
        "pixel_change_outside": s["pixel_change"]["outside"], "latent_change": s["latent_change"],
        "representation": {k: rep[k] for k in ("step", "dice_to_target", "dice_baseline", "rmse_to_target",
                                               "rmse_baseline")},
        "intervention_vs_generation": round(min(iv_s) / min(gen_s), 2),
        "generation_s": round(min(gen_s), 3), "intervention_s": round(min(iv_s), 3),
        "intervention_timings_s": result.timings_s, "bank": source, "steps": steps, "dx": dx,
        "edit": {"layers": len(result.layers), "steps": result.edit_steps, "iterations": spec.iterations},
        "compiled": compile,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=None,
                   help="image size whose SD v1.4 layer shapes are optimised (default: 512; 128 with --quick)")
    p.add_argument("--iterations", type=int, default=None, help="Adam iterations (default: 128; 8 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 3; 1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="tiny model: denoising steps (default: 15; 4 with --quick)")
    p.add_argument("--dx", type=float, default=32.0, help="tiny model: shift in pixels, image 128 px (default: 32)")
    p.add_argument("--bank", default=None,
                   help="tiny model's probe bank (default: fit a small one on 12 rendered scenes, about a minute)")
    p.add_argument("--compile", action="store_true",
                   help="tiny model: compile the U-Net and the Adam step (default: off)")
    p.add_argument("--skip-end-to-end", action="store_true", help="only the optimisation part (a) (default: off)")
    p.add_argument("--device", default="auto",
                   help="optimisation part: auto, cpu or cuda (default: auto = CUDA when available)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run at 128 px, 8 iterations, 1 round, 4 steps: checks it runs, its numbers mean "
                        "nothing (default: off)")
    args = p.parse_args(argv)
    for key, full, quick in (("size", 512, 128), ("iterations", 128, 8), ("rounds", 3, 1), ("steps", 15, 4)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    torch.manual_seed(0)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    out = {"bench": "intervene", "quick": args.quick, "torch": torch.__version__, "device": str(device), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "machine": platform.machine()}
    out |= bench_optimisation(args.size, args.iterations, args.rounds, device)
    if not args.skip_end_to_end:
        e2e = bench_end_to_end(args.steps, args.dx, args.bank, args.compile)
        out |= {"dice_to_target": e2e.pop("dice_to_target"), "dice_baseline": e2e.pop("dice_baseline"),
                "end_to_end": e2e}
    print_line(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
