"""Probe fitting: streaming closed-form ridge (the job) vs the study's recipe; prints ONE JSON line.

Both methods see the same data: the tiny model in noised mode on rendered scenes
(training.data.SceneSource), activations of the fitted steps stored as float16 (as the job's
reference path keeps them) with exact labels, written once to one file per image.
- ridge: training.fit's path: Accumulator.add_batch streaming over shards of images (every
  `--val-every`-th image held out), then Accumulator.label_norm + solve_ridge (λ chosen on validation,
  refit on train + validation) per (layer, step);
- reference: training.reference.fit_reference (bias-free linear, Adam lr 1e-3, 30 epochs, 4 images
  per batch, BCE on logits for the mask, Huber on z-scored continuous targets, losses on the
  nearest-upsampled output at image resolution as the study) on all training images.
Each method runs in its own fresh process (one torch thread), reading its inputs image by image;
fit times exclude the file reads (reported apart) and are medians over `--repeats`. Peak memory:
the process's resident-set high-water mark (VmHWM, reset after a warm-up run through
/proc/self/clear_refs) minus its resident set just before the measured runs, with glibc's mmap
threshold fixed so freed blocks leave the resident set. Both probes are scored on the same test
images at image resolution (layer map nearest-upsampled, as the study), averaged over the
fitted (layer, step) pairs.

    python bench/fit.py [--quick] [--train 48] [--test 16] [--layers dec4.0,dec3.0,mid.0] [--fit-steps 0,7,14]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldmprobe.jsonout import print_line  # noqa: E402
from training.fit import TEST_SEED_OFFSET, Accumulator, solve_ridge  # noqa: E402
from training.labels import PROPERTIES  # noqa: E402
from training.reference import fit_reference  # noqa: E402
from training.ridge import DEFAULT_GRID  # noqa: E402

PROPS = list(PROPERTIES)  # foreground, depth, shading: fitted together (K = 3) by both methods
KINDS = [PROPERTIES[p] for p in PROPS]
GOALS = {"speedup_vs_reference": ">= 50", "ridge_metric": ">= reference_metric (headline)"}


QUICK = {"train": 5, "test": 2, "layers": "dec4.0", "fit_steps": "14", "epochs": 1, "repeats": 1}
DEFAULTS = {"train": 48, "test": 16, "layers": "dec4.0,dec3.0,mid.0", "fit_steps": "0,7,14", "epochs": 30, "repeats": 3}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d, q = DEFAULTS, QUICK
    p.add_argument("--train", type=int, default=None,
                   help=f"training scenes, incl. validation images (default: {d['train']}; {q['train']} with --quick)")
    p.add_argument("--test", type=int, default=None, help=f"test scenes (default: {d['test']}; {q['test']} with --quick)")
    p.add_argument("--layers", default=None,
                   help=f"layers extracted and fitted (default: {d['layers']}; {q['layers']} with --quick)")
    p.add_argument("--steps", type=int, default=15, help="denoising steps of the schedule (default: 15)")
    p.add_argument("--fit-steps", default=None,
                   help=f"step indices extracted and fitted (default: {d['fit_steps']}; {q['fit_steps']} with --quick)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"reference: epochs (default: {d['epochs']}; {q['epochs']} with --quick)")
    p.add_argument("--batch-images", type=int, default=4, help="reference: images per Adam step (default: 4)")
    p.add_argument("--val-every", type=int, default=5,
                   help="ridge: every Nth training image is validation (default: 5)")
    p.add_argument("--shard-size", type=int, default=8, help="images per extraction / accumulation batch (default: 8)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed fits per method, median (default: {d['repeats']}; {q['repeats']} with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of both fitting processes (default: 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run on a few scenes, one layer and step: checks it runs, its numbers mean nothing "
                        "(default: off)")
    p.add_argument("--worker", choices=["ridge", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# --- data ------------------------------------------------------------------------------------------
class _FitSteps:
    """Sampler adapter: SceneSource extracts only the fitted steps (the rest would be discarded)."""

    def __init__(self, sampler, steps: list[int]):
        self.model, self._sampler, self._steps = sampler.model, sampler, steps

    def noised_activations(self, *args, **kwargs):
        return self._sampler.noised_activations(*args, steps=self._steps, **kwargs)


def extract(args, fit_steps: list[int], data: Path) -> dict:
    """Write one safetensors file per image ({layer: [S, P, C] fp16, labels: [K, H, W]}) + meta."""
    from safetensors.torch import save_file

    from ldmprobe.generate import Sampler
    from ldmprobe.models import load_model
    from ldmprobe.schemas import GenerationSettings
    from training.data import SceneSource

    model = load_model("tiny")
    sampler = Sampler(model)
    layers = list(sampler.select_layers(args.layers))
    registry = model.registry()
    settings = GenerationSettings(steps=args.steps)
    seeds = {"train": list(range(args.train)), "test": list(range(TEST_SEED_OFFSET, TEST_SEED_OFFSET + args.test))}
    for split, ids in seeds.items():
        (data / split).mkdir(parents=True)
        src = SceneSource(_FitSteps(sampler, fit_steps), settings, tuple(layers), ids)
        for start in range(0, len(src.ids), args.shard_size):
            batch = src.batch(src.ids[start:start + args.shard_size])
            labels = torch.stack([batch.labels[p] for p in PROPS], 1)
            for i, ident in enumerate(batch.ids):
                tensors = {la: batch.activations[la][i].to(torch.float16).contiguous() for la in layers}
                save_file({**tensors, "labels": labels[i].contiguous()}, str(data / split / f"{ident}.safetensors"))
    meta = {"layers": layers, "fit_steps": fit_steps, "size": list(labels.shape[-2:]),
            "shapes": {la: [registry[la].height, registry[la].width] for la in layers},
            "channels": {la: registry[la].channels for la in layers},
            "train": [str(s) for s in seeds["train"]], "test": [str(s) for s in seeds["test"]],
            **{k: getattr(args, k) for k in ("epochs", "batch_images", "val_every", "shard_size", "repeats", "threads")}}
    (data / "meta.json").write_text(json.dumps(meta))
    return meta


def read_image(path: Path) -> dict[str, torch.Tensor]:
    """Plain read (no mmap), so the page cache never counts in the resident set."""
    from safetensors.torch import load

    return load(path.read_bytes())


# --- the two methods (run in a worker process) -----------------------------------------------------
def fit_ridge(meta: dict, files: list[Path]) -> tuple[dict, dict, int]:
    """The job's path: stream shards into the accumulator, then solve per (layer, step).
    Returns the probes, times {fit, read, solve} and the bytes kept across images (statistics)."""
    from types import SimpleNamespace

    layers, S = meta["layers"], len(meta["fit_steps"])
    shapes = {la: tuple(meta["shapes"][la]) for la in layers}
    acc = Accumulator(meta["channels"], S, PROPS)
    io = fit = 0.0
    every, size = meta["val_every"], meta["shard_size"]
    for start in range(0, len(files), size):
        t0 = time.perf_counter()
        imgs = [read_image(f) for f in files[start:start + size]]
        batch = SimpleNamespace(labels={p: torch.stack([im["labels"][k] for im in imgs]) for k, p in enumerate(PROPS)},
                                activations={la: torch.stack([im[la] for im in imgs]) for la in layers})
        split_of = ["val" if n % every == every - 1 else "train" for n in range(start, start + len(imgs))]
        t1 = time.perf_counter()
        acc.add_batch(batch, split_of, shapes)
        io, fit = io + t1 - t0, fit + time.perf_counter() - t1
        del imgs, batch
    t0 = time.perf_counter()
    acc.label_norm()  # the job computes it for the bank's mean/std
    out = {}
    for la in layers:
        for s in range(S):
            weight, bias, _, _ = solve_ridge(acc, la, s, DEFAULT_GRID)
            out[f"{la}/{s}/weight"], out[f"{la}/{s}/bias"] = weight.float(), bias.float()
    solve = time.perf_counter() - t0
    held = sum(t.nbytes for st in acc.stats.values() for t in st.state_dict().values()) + acc.moments.nbytes
    return out, {"fit": fit + solve, "read": io, "solve": solve}, held


def fit_ref(meta: dict, files: list[Path], epochs: int) -> tuple[dict, dict, int]:
    """The study's recipe on all training images: every activation and every full-size label is
    held for all epochs (its Huber loss is taken at image resolution). Returns the probes, times
    {fit, read} and the bytes kept across images (the training set)."""
    layers, S = meta["layers"], len(meta["fit_steps"])
    acts: dict[str, list[torch.Tensor]] = {la: [] for la in layers}
    labels: list[torch.Tensor] = []
    moments = Accumulator(meta["channels"], S, PROPS)  # the job's label z-score (image-size pixels)
    io = fit = 0.0
    for f in files:
        t0 = time.perf_counter()
        img = read_image(f)
        t1 = time.perf_counter()
        moments.add_moments(img["labels"][None])
        labels.append(img["labels"])
        for la in layers:
            acts[la].append(img[la])
        io, fit = io + t1 - t0, fit + time.perf_counter() - t1
        del img
    held = sum(t.nbytes for v in (*acts.values(), labels) for t in v)
    t0 = time.perf_counter()
    mean, std = (torch.tensor(v) for v in moments.label_norm())
    mask = torch.tensor([k == "mask" for k in KINDS])
    shift, scale = torch.where(mask, 0.0, mean), torch.where(mask, 1.0, std)
    out = {"shift": shift, "scale": scale}
    Y = (torch.stack(labels) - shift[:, None, None]) / scale[:, None, None]  # [N, K, H, W]
    for la in layers:
        X = torch.stack(acts.pop(la))  # [N, S, P, C] fp16
        for s in range(S):
            w = fit_reference(X[:, s], Y, tuple(meta["shapes"][la]), KINDS, epochs=epochs,
                              batch_images=meta["batch_images"])
            out[f"{la}/{s}/weight"] = w
        del X
    fit += time.perf_counter() - t0
    return out, {"fit": fit, "read": io}, held


def proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(method: str, data: Path) -> None:
    """Warm up on a few images (lazy library init), reset the peak, run the timed fits."""
    from safetensors.torch import save_file

    meta = json.loads((data / "meta.json").read_text())
    torch.set_num_threads(meta["threads"])
    files = [data / "train" / f"{i}.safetensors" for i in meta["train"]]
    run = (lambda fs, ep: fit_ridge(meta, fs)) if method == "ridge" else (lambda fs, ep: fit_ref(meta, fs, ep))
    run(files[:meta["val_every"]], 1)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
    base_kb = proc_kb("VmRSS")
    times: dict[str, list[float]] = {}
    for _ in range(meta["repeats"]):
        out, t, held = run(files, meta["epochs"])
        for k, v in t.items():
            times.setdefault(k, []).append(v)
    peak_mb = (proc_kb("VmHWM") - base_kb) / 1024
    save_file({k: v.contiguous() for k, v in out.items()}, str(data / f"{method}.safetensors"))
    print_line({"times": times, "peak_mb": peak_mb, "held_mb": held / 2**20, "base_rss_mb": base_kb / 1024})


def run_worker(method: str, data: Path) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=str(json.loads((data / "meta.json").read_text())["threads"]))
    done = subprocess.run([sys.executable, __file__, "--worker", method, "--data", str(data)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{method} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- evaluation ------------------------------------------------------------------------------------
def predict(params: dict, method: str, key: str, X: torch.Tensor, shape, size) -> torch.Tensor:
    """[N, P, C] fp16 → maps [N, K, H, W] in label units (masks: probability-like, threshold 0.5)."""
    z = X.float() @ params[f"{key}/weight"]
    if method == "ridge":
        y = z + params[f"{key}/bias"]
    else:
        y = z * params["scale"] + params["shift"]
        mask = torch.tensor([k == "mask" for k in KINDS])
        y = torch.where(mask, torch.sigmoid(z), y)
    y = y.transpose(1, 2).reshape(X.shape[0], len(PROPS), *shape)
    return F.interpolate(y, size=tuple(size), mode="nearest")


def evaluate(meta: dict, data: Path) -> dict:
    """Per method: test Dice (foreground), Spearman (depth, shading) per (layer, step) and averaged."""
    from safetensors.torch import load_file

    from ldmprobe import metrics as M

    imgs = [read_image(data / "test" / f"{i}.safetensors") for i in meta["test"]]
    labels = torch.stack([im["labels"] for im in imgs])
    params = {m: load_file(str(data / f"{m}.safetensors")) for m in ("ridge", "reference")}
    per_pair: dict[str, dict[str, list[float]]] = {}
    for la in meta["layers"]:
        X = torch.stack([im[la] for im in imgs])  # [N, S, P, C]
        for s, step in enumerate(meta["fit_steps"]):
            row = per_pair.setdefault(f"{la}@{step}", {})
            for m in params:
                y = predict(params[m], m, f"{la}/{s}", X[:, s], meta["shapes"][la], meta["size"])
                row[m] = [M.summarize(M.dice(y[:, 0], labels[:, 0]))["mean"],
                          M.summarize(M.spearman(y[:, 1], labels[:, 1]))["mean"],
                          M.summarize(M.spearman(y[:, 2], labels[:, 2]))["mean"]]
    out = {}
    for m in params:
        fg, dp, sh = (statistics.fmean(r[m][j] for r in per_pair.values()) for j in range(3))
        out[m] = {"foreground_dice": round(fg, 4), "depth_spearman": round(dp, 4), "shading_spearman": round(sh, 4),
                  "headline": round((fg + dp) / 2, 4)}
    rounded = {k: {m: [round(v, 3) for v in vals] for m, vals in r.items()} for k, r in per_pair.items()}
    return {"metrics": out, "per_pair": rounded}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, args.data)
    fit_steps = [int(s) for s in args.fit_steps.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        data = Path(tmp)
        started = time.perf_counter()
        meta = extract(args, fit_steps, data)
        extract_s = time.perf_counter() - started
        res = {m: run_worker(m, data) for m in ("ridge", "reference")}
        scores = evaluate(meta, data)
    med = {m: {k: statistics.median(v) for k, v in r["times"].items()} for m, r in res.items()}
    n_val = sum(1 for n in range(args.train) if n % args.val_every == args.val_every - 1)
    print_line({
        "bench": "fit", "quick": args.quick, "model": "tiny", "mode": "noised (rendered scenes)",
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "n_train": args.train, "n_val_of_train": n_val, "n_test": args.test,
        "layers": meta["layers"], "channels": meta["channels"],
        "tokens": {la: h * w for la, (h, w) in meta["shapes"].items()}, "image_size": meta["size"],
        "schedule_steps": args.steps, "fit_steps": fit_steps, "properties": PROPS,
        "reference_recipe": {"epochs": args.epochs, "lr": 1e-3, "batch_images": args.batch_images,
                             "loss": "BCE-with-logits (mask) + Huber (z-scored continuous)", "bias": False,
                             "images": "all training images (train + val)"},
        "ridge_recipe": {"lambda_grid": len(DEFAULT_GRID), "val_every": args.val_every,
                         "refit": "train + val with the chosen lambda", "shard_images": args.shard_size},
        "speedup_vs_reference": round(med["reference"]["fit"] / med["ridge"]["fit"], 2),
        "ridge_fit_s": round(med["ridge"]["fit"], 4), "reference_fit_s": round(med["reference"]["fit"], 4),
        "ridge_solve_s": round(med["ridge"]["solve"], 4),
        "fit_s_runs": {m: [round(t, 4) for t in r["times"]["fit"]] for m, r in res.items()},
        "read_s_excluded": {m: round(med[m]["read"], 4) for m in res},
        "extract_s": round(extract_s, 2),
        "ridge_metric": scores["metrics"]["ridge"], "reference_metric": scores["metrics"]["reference"],
        "metric_resolution": "image (layer map nearest-upsampled to the image size); mean over test images, "
                             "then over fitted (layer, step) pairs; dice at 0.5 (reference: sigmoid of logits)",
        "headline": "mean of foreground_dice and depth_spearman",
        "per_pair_dice_depth_shading": scores["per_pair"],
        "ridge_peak_mb": round(res["ridge"]["peak_mb"], 2), "reference_peak_mb": round(res["reference"]["peak_mb"], 2),
        "memory_method": "each method in a fresh process (1 thread) reading its inputs image by image from files "
                         "(no mmap); peak = VmHWM - VmRSS, VmHWM reset via /proc/self/clear_refs after a warm-up "
                         "run on a few images, glibc mmap threshold fixed at 64 KiB so freed blocks leave RSS; "
                         "so it counts everything the method allocates over all repeats (ridge: one shard of "
                         "images with its temporaries + float64 statistics; reference: all training activations "
                         "fp16 + layer-resolution labels + Adam and batch temporaries)",
        "held_mb": {m: round(r["held_mb"], 3) for m, r in res.items()},
        "held_method": "bytes kept across images: ridge = RidgeStats + label moments (O(C^2), independent of "
                       "image count); reference = its training set (O(images))",
        "worker_base_rss_mb": {m: round(r["base_rss_mb"], 1) for m, r in res.items()},
        "goals": GOALS,
    })


if __name__ == "__main__":
    main()
