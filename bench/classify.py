"""Per-step decode + classify cost, measured side by side in one run. Prints one JSON line.

(a) one denoising step's decode + VGG-16 classification with the tiny decoder (AutoencoderTiny,
    default config = TAESD's architecture) vs the full VAE (the real SD v1.4 VAE config), both
    random weights (cost does not depend on the values); goal: tiny ≤ 5 % of the VAE's cost;
(b) all steps of a generation (15) decoded + classified in chunked batches vs one step at a time
    (tiny decoder, the preview path), with the largest probability difference between the two.
Variants run in interleaved rounds (this machine is shared and noisy), compared by medians.
On CPU the default image size is 256×256 (a 512×512 VAE decode takes ~50 s on 2 cores); the
classifier always sees 224×224, so its fixed cost weighs more at small sizes. FLOP counts
(torch's FlopCounterMode on meta tensors, no compute) give the same ratios at 512×512.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from ldmprobe.jsonout import print_line  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_decoders(device: torch.device, dtype: torch.dtype):
    """The real SD v1.4 VAE and AutoencoderTiny's default config, seeded random weights."""
    from diffusers import AutoencoderKL

    from ldmprobe.classify import LatentDecoder, load_tiny_decoder
    from ldmprobe.models import sd_v1_4_config

    config = {k: v for k, v in sd_v1_4_config("vae").items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**config).eval().requires_grad_(False)
    if (device, dtype) != (torch.device("cpu"), torch.float32):
        vae = vae.to(device, dtype)
    return LatentDecoder("vae", vae, "random", True), load_tiny_decoder("random", device, dtype)


def gflops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e9


def flop_table(size: int) -> dict[str, float]:
    """GFLOP per step (one image) at `size`, counted on the meta device (shapes only)."""
    import timm
    from diffusers import AutoencoderKL, AutoencoderTiny

    from ldmprobe.models import sd_v1_4_config

    config = {k: v for k, v in sd_v1_4_config("vae").items() if not k.startswith("_")}
    with torch.device("meta"):
        vae, tiny = AutoencoderKL(**config), AutoencoderTiny()
        vgg = timm.create_model("vgg16.tv_in1k", pretrained=False)
        z = torch.zeros(1, 4, size // 8, size // 8)
        return {"vae_decode": round(gflops(lambda: vae.decode(z)), 1),
                "tiny_decode": round(gflops(lambda: tiny.decode(z)), 1),
                "vgg16_224": round(gflops(lambda: vgg(torch.zeros(1, 3, 224, 224))), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto = CUDA when available)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (default: 512 on CUDA, 256 on CPU, 64 with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps classified (default: 15; 3 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of the per-step comparison (default: 3; 1 with --quick)")
    parser.add_argument("--batch-rounds", type=int, default=None,
                        help="rounds of the all-steps comparison, at most --rounds (default: 2 on CPU, where one "
                             "round takes ~1 min; 3 on CUDA)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run at 64 px, 3 steps, 1 round: checks it runs, its ratios mean nothing "
                             "(default: off)")
    args = parser.parse_args()
    args.steps = args.steps or (3 if args.quick else 15)
    args.rounds = args.rounds or (1 if args.quick else 3)

    from ldmprobe.classify import StepClassifier, load_vgg16
    from ldmprobe.models import resolve_device, resolve_dtype

    started = time.perf_counter()
    device = resolve_device(args.device)
    dtype = resolve_dtype(None, device)
    size = args.size or (64 if args.quick else 512 if device.type == "cuda" else 256)
    batch_rounds = min(args.batch_rounds or (3 if device.type == "cuda" else 2), args.rounds)
    vae, tiny = build_decoders(device, dtype)
    vgg = load_vgg16("random", device, dtype)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(args.steps, 4, size // 8, size // 8, generator=gen).to(device, dtype)
    one = latents[:1]

    def step_cost(decoder) -> tuple[float, float]:
        """(decode s, classify s) for one step's latent."""
        sync(device)
        t0 = time.perf_counter()
        images = decoder.decode(one)
        sync(device)
        t1 = time.perf_counter()
        vgg.probabilities(images)
        sync(device)
        return t1 - t0, time.perf_counter() - t1

    batched = StepClassifier(tiny, vgg, batch_size=args.steps)
    one_by_one = StepClassifier(tiny, vgg, batch_size=1)

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    with torch.no_grad():  # warm-up on small latents: first-call allocations, not a full decode
        small = torch.randn(2, 4, 8, 8, generator=gen).to(device, dtype)
        for dec in (vae, tiny):
            vgg.probabilities(dec.decode(small))
        cost: dict[str, dict[str, list[float]]] = {k: {"decode": [], "classify": []} for k in ("vae", "tiny")}
        runs: dict[str, list[float]] = {"batched": [], "one_by_one": []}
        probs: dict[str, torch.Tensor] = {}
        for r in range(args.rounds):
            for name, dec in (("vae", vae), ("tiny", tiny)):
                d, c = step_cost(dec)
                cost[name]["decode"].append(d)
                cost[name]["classify"].append(c)
            for name, runner in (("batched", batched), ("one_by_one", one_by_one)) if r < batch_rounds else ():
                runs[name].append(timed(lambda r=runner, n=name: probs.__setitem__(n, r.classify_latents(latents)[0])))
        diff = float((probs["batched"] - probs["one_by_one"]).abs().max())

    med = {k: {part: statistics.median(v) for part, v in parts.items()} for k, parts in cost.items()}
    total = {k: m["decode"] + m["classify"] for k, m in med.items()}
    run_med = {k: statistics.median(v) for k, v in runs.items()}
    flops = {"size": flop_table(size)} if size == 512 else {"size": flop_table(size), "512": flop_table(512)}

    def flop_ratio(t: dict[str, float]) -> float:
        return round((t["tiny_decode"] + t["vgg16_224"]) / (t["vae_decode"] + t["vgg16_224"]), 4)

    ratio = total["tiny"] / total["vae"]
    print_line({
        "bench": "classify", "quick": args.quick,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "image_size": size, "latent_size": size // 8, "classifier_input": vgg.input_size, "steps": args.steps,
        "rounds": args.rounds, "batch_rounds": batch_rounds, "weights": "random (SD v1.4 VAE config, AutoencoderTiny default config, vgg16.tv_in1k)",
        "step_ms": {k: {part: round(v * 1000, 1) for part, v in m.items()} | {"total": round(total[k] * 1000, 1)}
                    for k, m in med.items()},
        "tiny_decoder_cost_ratio": round(ratio, 4),
        "decoder_only_cost_ratio": round(med["tiny"]["decode"] / med["vae"]["decode"], 4),
        "all_steps_ms": {k: round(v * 1000, 1) for k, v in run_med.items()},
        "batched_speedup": round(run_med["one_by_one"] / run_med["batched"], 4),
        "batched_max_abs_prob_diff": diff,
        "gflop_per_step": flops,
        "flop_ratio": {k: flop_ratio(t) for k, t in flops.items()},
        "goals": {"tiny_decoder_cost_ratio": "<= 0.05"},
        "goal_met": ratio <= 0.05,
        "wall_s": round(time.perf_counter() - started, 1),
    })


if __name__ == "__main__":
    main()
