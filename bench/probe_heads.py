"""Probe heads benchmark; prints ONE JSON line.

(a) 16 layers × 3 properties (foreground with sigmoid, depth, shading) of one step:
    batched  = ProbeBank.apply at layer resolution (one grouped_linear call),
    reference = the study's way: one nn.Linear per probe on that layer's [H·W, C] activations,
                then F.interpolate of every map to 512×512 (nearest),
    and the batched path with nearest upsampling to 512×512 as the apples-to-apples figure.
    The three run interleaved (rotating order) and each figure is a median over repeats, because
    the machine is shared and noisy. Tiny-model shapes by default, SD v1.4 shapes with --full.
(b) the batched heads on SD v1.4 shapes (conditional half, batch 1) as a fraction of one full
    SD v1.4 U-Net step (random weights, batch 2 for CFG, 64×64 latent); --skip-unet skips the
    expensive step (fraction is then null).

All paths run with the same number of CPU threads, 1 by default: on this shared 2-core machine,
2 OpenMP threads wait on a busy core and single measurements scatter from 3 to 200 ms; one
thread gives stable ratios (use --threads 0 for torch's default on a dedicated machine).

    python bench/probe_heads.py [--quick] [--full] [--skip-unet] [--repeats N] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from ldmprobe.jsonout import print_line  # noqa: E402
from ldmprobe.layers import LayerRegistry  # noqa: E402
from ldmprobe.models import TINY_UNET, config_identity, sd_v1_4_config  # noqa: E402
from ldmprobe.probes import ProbeBank  # noqa: E402

PROPERTIES = ("foreground", "depth", "shading")
IMAGE = 512
GOAL_SPEEDUP = 10.0
GOAL_FRACTION = 0.01


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(config: dict, device: torch.device, seed: int = 0):
    """A random bank for every layer of `config` and random cond-half activations [1, H·W, C]."""
    registry = LayerRegistry.from_config(config)
    bank = ProbeBank.random(registry, PROPERTIES, steps=(0,), seed=seed, identity=config_identity(config))
    gen = torch.Generator().manual_seed(seed)
    acts = {s.name: torch.randn(1, s.tokens, s.channels, generator=gen).to(device) for s in registry}
    return registry, bank, acts


class ReferenceHeads:
    """The study's per-probe evaluation: nn.Linear on [H·W, C], reshape, F.interpolate to 512²."""

    def __init__(self, bank: ProbeBank, step: int, device: torch.device):
        self.items = []
        for p in bank:
            if p.step != step:
                continue
            lin = torch.nn.Linear(p.weight.shape[0], p.k).to(device)
            with torch.no_grad():
                lin.weight.copy_(p.weight.T)
                lin.bias.copy_(p.bias)
            shape = bank.layer_shapes[p.layer]
            std = torch.tensor(p.std, device=device)
            mean = torch.tensor(p.mean, device=device)
            self.items.append((p.property, p.layer, lin, std, mean, p.sigmoid, shape.height, shape.width))

    @torch.no_grad()
    def __call__(self, acts: dict[str, torch.Tensor], upsample: bool = True) -> dict[tuple[str, str], torch.Tensor]:
        out = {}
        for prop, layer, lin, std, mean, sigmoid, h, w in self.items:
            y = lin(acts[layer][0]) * std + mean  # [H·W, K]
            if sigmoid:
                y = torch.sigmoid(y)
            y = y.T.reshape(1, -1, h, w)
            out[(prop, layer)] = F.interpolate(y, size=(IMAGE, IMAGE), mode="nearest")[:, 0] if upsample else y[:, 0]
        return out


def time_ms(fn, inner: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - start) / inner * 1e3


def calibrate(fn, device: torch.device, target_s: float = 0.05) -> int:
    """Calls per measurement so that one measurement lasts about target_s (timer noise)."""
    fn()  # warm up (plans, allocator, kernel compilation)
    single = min(time_ms(fn, 1, device) for _ in range(3)) / 1e3  # min: robust to a busy machine
    return max(1, min(1000, round(target_s / max(single, 1e-6))))


def compare(bank: ProbeBank, acts, device: torch.device, repeats: int) -> dict:
    """Interleaved medians of the batched, batched+upsampled and reference heads (and of the
    reference without its upsampling, to show where its time goes)."""
    ref = ReferenceHeads(bank, 0, device)
    fns = {
        "batched": lambda: bank.apply(acts, 0),
        "batched_upsampled": lambda: bank.apply(acts, 0, size=IMAGE, mode="nearest"),
        "reference": lambda: ref(acts),
        "reference_no_upsample": lambda: ref(acts, upsample=False),  # where the reference's time goes
    }
    inner = {name: calibrate(fn, device) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate: no path always runs first
            times[name].append(time_ms(fns[name], inner[name], device))
    batched_up = bank.apply(acts, 0, size=IMAGE, mode="nearest")
    expected = ref(acts)
    diff = max(float((batched_up[k] - expected[k]).abs().max()) for k in expected)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"median_ms": med, "runs_ms": {k: [round(t, 4) for t in v] for k, v in times.items()}, "inner": inner,
            "max_abs_diff_vs_reference": diff, "backend": bank.apply(acts, 0).backend, "probes": len(ref.items)}


def shape_summary(registry: LayerRegistry) -> list[dict]:
    """[{channels, tokens, layers}] in execution order, merging equal consecutive shapes."""
    rows: list[dict] = []
    for s in registry:
        if rows and (rows[-1]["channels"], rows[-1]["tokens"]) == (s.channels, s.tokens):
            rows[-1]["layers"] += 1
        else:
            rows.append({"channels": s.channels, "tokens": s.tokens, "layers": 1})
    return rows


def heads_ms(bank: ProbeBank, acts, device: torch.device, repeats: int) -> float:
    fn = lambda: bank.apply(acts, 0)  # noqa: E731
    inner = calibrate(fn, device)
    return statistics.median(time_ms(fn, inner, device) for _ in range(repeats))


@torch.inference_mode()
def unet_step_ms(device: torch.device, dtype: torch.dtype, runs: int) -> tuple[list[float], float]:
    """One full SD v1.4 U-Net forward: random weights, batch 2 (CFG), 64×64 latent, 77 tokens."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in sd_v1_4_config("unet").items() if not k.startswith("_")}
    torch.manual_seed(0)
    start = time.perf_counter()
    unet = UNet2DConditionModel(**config).to(device, dtype).eval()
    build_s = time.perf_counter() - start
    sample = torch.randn(2, 4, 64, 64, device=device, dtype=dtype)
    text = torch.randn(2, 77, config["cross_attention_dim"], device=device, dtype=dtype)
    t = torch.tensor(981, device=device)
    out = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        unet(sample, t, encoder_hidden_states=text, return_dict=False)
        sync(device)
        out.append((time.perf_counter() - start) * 1e3)
    del unet
    gc.collect()
    return out, build_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true",
                    help="(a) on SD v1.4 shapes instead of the tiny model's (default: off)")
    ap.add_argument("--skip-unet", action="store_true",
                    help="skip the SD v1.4 U-Net step, fraction is then null (default: off; on with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="measurements per path (default: 15; 3 with --quick)")
    ap.add_argument("--unet-runs", type=int, default=2, help="timed SD v1.4 U-Net steps, the fastest counts (default: 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--unet-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="dtype of the SD v1.4 U-Net step (default: float32)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for every measurement; 0 = torch's default, see the module docstring "
                         "(default: 1)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 3 repeats, no U-Net step; checks it runs, its ratios mean nothing (default: off)")
    args = ap.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 15)
    args.skip_unet = args.skip_unet or args.quick
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    sd_config = sd_v1_4_config("unet")
    a_config = sd_config if args.full else TINY_UNET
    registry, bank, acts = setup(a_config, device)
    a = compare(bank, acts, device, args.repeats)
    med = a["median_ms"]

    if args.full:
        sd_registry, heads = registry, med["batched"]
    else:
        sd_registry, sd_bank, sd_acts = setup(sd_config, device)
        heads = heads_ms(sd_bank, sd_acts, device, args.repeats)
        del sd_bank, sd_acts
    unet_runs, build_s, unet_ms, fraction = None, None, None, None
    if not args.skip_unet:
        unet_runs, build_s = unet_step_ms(device, getattr(torch, args.unet_dtype), args.unet_runs)
        unet_ms = min(unet_runs)  # the fastest run: the conservative denominator
        fraction = heads / unet_ms

    result = {
        "bench": "probe_heads", "quick": args.quick,
        "shapes": "sd-v1-4" if args.full else "tiny",
        "layer_shapes": shape_summary(registry),
        "properties": list(PROPERTIES),
        "probes": a["probes"],
        "rows": 1,
        "upsample_to": IMAGE,
        "batched_ms": round(med["batched"], 4),
        "batched_upsampled_ms": round(med["batched_upsampled"], 4),
        "reference_ms": round(med["reference"], 4),
        "reference_no_upsample_ms": round(med["reference_no_upsample"], 4),
        "speedup_vs_reference": round(med["reference"] / med["batched"], 2),
        "speedup_vs_reference_upsampled": round(med["reference"] / med["batched_upsampled"], 2),
        "goal_speedup": GOAL_SPEEDUP,
        "meets_speedup_goal": med["reference"] / med["batched"] >= GOAL_SPEEDUP,
        "max_abs_diff_vs_reference": a["max_abs_diff_vs_reference"],
        "repeats": args.repeats,
        "calls_per_measurement": a["inner"],
        "runs_ms": a["runs_ms"],
        "heads_sd14_ms": round(heads, 4),
        "heads_sd14_shapes": shape_summary(sd_registry),
        "unet_step_ms": None if unet_ms is None else round(unet_ms, 1),
        "unet_step_runs_ms": None if unet_runs is None else [round(t, 1) for t in unet_runs],
        "unet_build_s": None if build_s is None else round(build_s, 1),
        "unet_batch": 2,
        "unet_latent": 64,
        "unet_dtype": args.unet_dtype,
        "fraction_of_unet_step": None if fraction is None else round(fraction, 6),
        "goal_fraction": GOAL_FRACTION,
        "meets_fraction_goal": None if fraction is None else fraction <= GOAL_FRACTION,
        "backend": a["backend"],
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print_line(result)


if __name__ == "__main__":
    main()
