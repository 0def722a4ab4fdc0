"""Capture cost, measured side by side in one run. Prints one JSON line.

(a) compiled + capture of all 16 attn1 layers vs compiled without capture (goal ≤ 1.03×);
(b) compiled + capture vs the reference study's way: eager diffusers U-Net with forward hooks
    that copy each activation (conditional half) to CPU (goal ≥ 1.5× faster).
Variants are timed in interleaved rounds (this machine is shared and noisy) and compared by
their medians. `--full` uses the real SD v1.4 U-Net config with random weights (meant for a
GPU; on CPU one round of one step proves it runs).
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

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from ldmprobe.jsonout import print_line  # noqa: E402


def build_unet(full: bool, device: torch.device, dtype: torch.dtype):
    """A fresh U-Net with diffusers' default processors (so hooks see the plain model)."""
    from diffusers import UNet2DConditionModel

    from ldmprobe.models import TINY_UNET, sd_v1_4_config

    config = {k: v for k, v in sd_v1_4_config("unet").items() if not k.startswith("_")} if full else TINY_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device, dtype).eval().requires_grad_(False)
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="real SD v1.4 U-Net config, random weights (default: off = the tiny model)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto = CUDA when available)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default: 7; 1 for --full on CPU or with --quick)")
    parser.add_argument("--calls", type=int, default=None,
                        help="U-Net calls per variant per round (default: 10; 1 for --full on CPU or with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run, 1 round of 1 call: checks it runs, its ratios mean nothing (default: off)")
    args = parser.parse_args()

    from ldmprobe.capture import CapturingUNet, HookCapture
    from ldmprobe.compiling import compile_unet
    from ldmprobe.models import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(None, device)
    few = args.quick or (args.full and device.type == "cpu")
    rounds = args.rounds or (1 if few else 7)
    calls = args.calls or (1 if few else 10)

    ref_unet = build_unet(args.full, device, dtype)  # the reference: plain processors + hooks
    our_unet = build_unet(args.full, device, dtype)
    cfg = our_unet.config
    latent = cfg.sample_size
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, cfg.in_channels, latent, latent, generator=gen).to(device, dtype)
    text = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen).to(device, dtype)
    t = torch.tensor(500.0, device=device)

    capturing = CapturingUNet(our_unet)
    names = capturing.select_layers("all")
    compiled = compile_unet(capturing, device)
    hooks = HookCapture(ref_unet, names)

    variants = {
        "compiled": lambda: compiled(sample, t, text),
        "compiled_capture": lambda: compiled(sample, t, text, capture=names),
        "eager_hooks": lambda: ref_unet(sample, t, encoder_hidden_states=text, return_dict=False)[0],
    }
    compile_s = {}
    with torch.no_grad():
        for name, fn in variants.items():  # warm-up; first compiled calls compile
            start = time.perf_counter()
            fn()
            sync(device)
            compile_s[name] = round(time.perf_counter() - start, 2)
        # the capture really happens: 16 tensors of the right shapes, equal to the hooks' copies
        _, acts = variants["compiled_capture"]()
        variants["eager_hooks"]()
        assert len(acts) == 16 and len(hooks.values) == 16
        max_diff = max(float((acts[n].float().cpu() - hooks.values[n].float()).abs().max()) for n in names)

        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync(device)
                times[name].append((time.perf_counter() - start) / calls)
    med = {k: statistics.median(v) for k, v in times.items()}
    print_line({
        "bench": "capture", "quick": args.quick,
        "model": "sd-v1-4 (random weights)" if args.full else "tiny",
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "batch": 2, "latent": latent, "layers": len(names), "rounds": rounds, "calls_per_round": calls,
        "step_ms": {k: round(v * 1000, 3) for k, v in med.items()},
        "first_call_s": compile_s,
        "capture_overhead": round(med["compiled_capture"] / med["compiled"], 4),
        "speedup_vs_hooks": round(med["eager_hooks"] / med["compiled_capture"], 4),
        "max_abs_diff_vs_hooks": max_diff,
        "goals": {"capture_overhead": "<= 1.03", "speedup_vs_hooks": ">= 1.5"},
    })


if __name__ == "__main__":
    main()
