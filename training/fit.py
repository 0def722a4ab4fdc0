"""Fit a probe bank: `python -m training.fit --model tiny --mode noised --scenes 96 --out runs/bank`.

One pass over the training images accumulates, per (layer, step), the float64 statistics of
(activations, labels) for all properties at once (training.ridge); the closed-form ridge fit
then gives every probe for every λ, λ chosen per property on held-out images. The job is
resumable (statistics checkpointed per shard, atomically) and distributed (under torchrun each
rank takes every world-th shard; the statistics are all-reduced). `--method reference` trains
the study's recipe (Adam, no bias; training.reference) instead, for comparison; `--recipe`
names a recipe (training.recipes: ridge, reference, capstone-shading) and `--protocol study`
switches every audited difference to the study's behaviour (ldmprobe.protocol). The bank is
scored on the test split with the same probe-head path the service uses, and written
atomically; it records the protocol, the recipe and the exact timesteps it was fitted at.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldmprobe.atomic import atomic_path, write_json
from ldmprobe.jsonout import print_line
from ldmprobe.probes import ProbeBank
from ldmprobe.protocol import STUDY_DEPTH_MEAN, STUDY_DEPTH_STD

from .labels import PROPERTIES, LabelError
from .recipes import RECIPES, JobOptions, RecipeError, resolve
from .reference import fit_reference
from .ridge import DEFAULT_GRID, RidgeStats, area_average, fit, fit_at, to_tokens

EXIT_USAGE = 2
REFERENCE_ROWS = ("baseline", "ceiling")  # metrics.json rows that score no probe (step -1)
TEST_SEED_OFFSET = 1_000_000  # test scenes never share a seed with training scenes
PRIMARY = ProbeBank.PRIMARY_METRIC  # kind → the metric that ranks probes: the bank's policy
# rmse_study: RMSE in the study's normalised units, (x - 15.740597) / 9.281932 (its fixed MiDaS
# depth scaling, which the capstone also applied to shading), beside the raw units.
METRICS = {"mask": ("dice", "pearson"), "continuous": ("spearman", "pearson", "rmse", "rmse_study")}


class JobError(Exception):
    """Bad input or an output folder holding another job: exit code 2 with one line."""


# --- distribution ----------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device: torch.device) -> Dist:
    """torchrun sets WORLD_SIZE/RANK; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def all_reduce_(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


# --- statistics --------------------------------------------------------------------------------
@dataclass
class Accumulator:
    """RidgeStats per (split, layer, step) for K stacked properties."""

    channels: dict[str, int]
    steps: int
    props: list[str]
    stats: dict[tuple[str, str, int], RidgeStats] = field(default_factory=dict)
    # Per property over every training pixel at image size: count, sum, sum of squares (float64).
    moments: torch.Tensor | None = None

    def __post_init__(self):
        if self.moments is None:
            self.moments = torch.zeros(3, len(self.props), dtype=torch.float64)

    def add_moments(self, labels: torch.Tensor) -> None:
        """labels [N, K, H, W] at image size."""
        y = labels.transpose(0, 1).reshape(len(self.props), -1)
        self.moments += torch.stack([torch.full((y.shape[0],), float(y.shape[1]), dtype=torch.float64),
                                     y.sum(1, dtype=torch.float64), y.square().sum(1, dtype=torch.float64)])

    def label_norm(self) -> tuple[list[float], list[float]]:
        """The global z-score of each target over all training pixels (the study's fixed depth
        scaling): one mean and std per property, shared by every layer and step."""
        n, total, squares = self.moments
        if float(n.min()) == 0:
            raise JobError("no training labels were seen")
        mean = total / n
        return mean.tolist(), (squares / n - mean**2).clamp_min(1e-12).sqrt().tolist()

    def get(self, split: str, layer: str, step: int) -> RidgeStats:
        key = (split, layer, step)
        if key not in self.stats:
            self.stats[key] = RidgeStats(self.channels[layer], len(self.props))
        return self.stats[key]

    def add_batch(self, batch, split_of: list[str], shapes: dict[str, tuple[int, int]]) -> None:
        labels = torch.stack([batch.labels[p] for p in self.props], dim=1)  # [N, K, H, W]
        self.add_moments(labels)
        rows = {sp: [i for i, s in enumerate(split_of) if s == sp] for sp in ("train", "val")}
        for layer, (h, w) in shapes.items():
            y_layer = area_average(labels, (h, w))  # exact for nearest upsampling, squared loss
            acts = batch.activations[layer]  # [N, S, h·w, C]
            for split, idx in rows.items():
                if not idx:
                    continue
                y = to_tokens(y_layer[idx])  # one add per (split, layer, step) for the whole shard
                for s in range(self.steps):
                    self.get(split, layer, s).add(acts[idx, s].reshape(-1, acts.shape[-1]), y)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{sp}/{la}/{st}/{k}": v for (sp, la, st), rs in self.stats.items() for k, v in rs.state_dict().items()}
        return state | {"labels/moments": self.moments.clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        grouped: dict[tuple[str, str, int], dict[str, torch.Tensor]] = {}
        for name, value in state.items():
            if name == "labels/moments":
                self.moments += value
                continue
            sp, la, st, k = name.split("/")
            grouped.setdefault((sp, la, int(st)), {})[k] = value
        for key, part in grouped.items():
            self.get(*key).merge(RidgeStats.from_state_dict(part))

    def all_reduce(self, d: Dist, layers: list[str]) -> None:
        if d.world == 1:
            return
        all_reduce_(self.moments, d)
        for split in ("train", "val"):  # every rank creates every key, so the calls line up
            for layer in layers:
                for s in range(self.steps):
                    self.get(split, layer, s).all_reduce()


def shard_path(out: Path, index: int) -> Path:
    return out / "stats" / f"shard_{index:05d}.safetensors"


def save_shard(path: Path, acc: Accumulator, ids: list[str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(acc.state_dict(), str(tmp), metadata={"ids": json.dumps(ids)})


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise JobError(f"{path}: unreadable statistics checkpoint ({exc}); delete it to recompute that shard") from exc


# --- fitting -----------------------------------------------------------------------------------
def solve_ridge(acc: Accumulator, layer: str, step: int, grid) -> tuple[torch.Tensor, torch.Tensor, list[float], dict]:
    """Weights [C, K], bias [K] and λ per property: λ chosen on validation statistics, then the
    probe refitted on train + validation with that λ."""
    train, val = acc.get("train", layer, step), acc.get("val", layer, step)
    if val.n == 0:
        raise JobError("no validation images: use more training images or a smaller --val-every")
    chosen = fit(train, val, grid)
    lams = [float(v) for v in chosen.lam]
    weight, bias = fit_at(RidgeStats(train.C, train.K).merge(train).merge(val), lams)
    info = {"lambda": lams, "val_mse": [float(v) for v in chosen.val_mse[chosen.lambdas.tolist().index(lams[0])]],
            "n_train_pixels": int(train.n), "n_val_pixels": int(val.n)}
    return weight, bias, lams, info


# --- evaluation --------------------------------------------------------------------------------
class MetricSums:
    """Per (property, layer, step, metric): sum of per-image values, images counted, undefined."""

    def __init__(self):
        self.sums: dict[tuple[str, str, int, str], list[float]] = {}

    def ensure(self, prop: str, layer: str, step: int, metric_names) -> None:
        """Create entries up front so every rank all-reduces the same keys, even with no images."""
        for metric in metric_names:
            self.sums.setdefault((prop, layer, step, metric), [0.0, 0.0, 0.0])

    def add(self, prop: str, layer: str, step: int, per_image: dict[str, torch.Tensor]) -> None:
        for metric, values in per_image.items():
            entry = self.sums.setdefault((prop, layer, step, metric), [0.0, 0.0, 0.0])
            finite = values[torch.isfinite(values)]
            entry[0] += float(finite.sum())
            entry[1] += float(finite.numel())
            entry[2] += float(values.numel() - finite.numel())

    def reduce(self, d: Dist) -> None:
        if d.world == 1:
            return
        keys = sorted(self.sums)
        flat = torch.tensor([v for k in keys for v in self.sums[k]], dtype=torch.float64)
        all_reduce_(flat, d)
        for i, k in enumerate(keys):
            self.sums[k] = flat[3 * i:3 * i + 3].tolist()

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for (prop, layer, step, metric), (total, n, nan) in sorted(self.sums.items()):
            out.append({"property": prop, "layer": layer, "step": step, "metric": metric,
                        "value": total / n if n else math.nan, "n_images": int(n + nan), "n_undefined": int(nan)})
        return out


def per_image_metrics(pred: torch.Tensor, target: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    from ldmprobe import metrics as M

    if kind == "mask":
        return {"dice": M.dice(pred, target), "pearson": M.pearson(pred, target)}
    study = M.rmse((pred - STUDY_DEPTH_MEAN) / STUDY_DEPTH_STD, (target - STUDY_DEPTH_MEAN) / STUDY_DEPTH_STD)
    return {"spearman": M.spearman(pred, target), "pearson": M.pearson(pred, target), "rmse": M.rmse(pred, target),
            "rmse_study": study}


def evaluate(bank: ProbeBank, source, ids: list[str], props: list[str], layers: list[str], steps: int,
             shard_size: int, d: Dist, train_means: dict[str, float], progress: bool) -> MetricSums:
    """Score every probe on the test images at image resolution (maps upsampled as the bank says:
    the protocol's `upsample`; nearest for the study), through the batched probe-head path; plus
    the trivial baselines: the all-background mask and the training mean; and, for continuous
    properties, the `ceiling`: the best Spearman any map without ties could reach against labels
    that tie (exact shading: a flat lit floor, shadows, the sky)."""
    from tqdm.auto import tqdm

    from ldmprobe.metrics import spearman_ceiling

    sums = MetricSums()
    for prop in props:
        names = METRICS[PROPERTIES[prop]]
        sums.ensure(prop, "baseline", -1, names)
        if PROPERTIES[prop] != "mask":
            sums.ensure(prop, "ceiling", -1, ["spearman"])
        for layer in layers:
            for s in range(steps):
                sums.ensure(prop, layer, s, names)
    shards = [ids[i:i + shard_size] for i in range(0, len(ids), shard_size)]
    for shard in tqdm(shards[d.rank::d.world], desc="test", disable=not progress, unit="shard"):
        batch = source.batch(shard)
        size = tuple(batch.images.shape[-2:])
        for s in range(steps):
            maps = bank.apply({la: batch.activations[la][:, s] for la in layers}, s, properties=props,
                              layers=layers, size=size)
            for (prop, layer), value in maps.items():
                sums.add(prop, layer, s, per_image_metrics(value, batch.labels[prop], PROPERTIES[prop]))
        for prop in props:
            target = batch.labels[prop]
            const = torch.full_like(target, 0.0 if PROPERTIES[prop] == "mask" else train_means[prop])
            sums.add(prop, "baseline", -1, per_image_metrics(const, target, PROPERTIES[prop]))
            if PROPERTIES[prop] != "mask":
                sums.add(prop, "ceiling", -1, {"spearman": spearman_ceiling(target)})
    sums.reduce(d)
    return sums


# --- the job -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    p = _Parser(prog="python -m training.fit", description="Fit a probe bank (streaming closed-form ridge).")
    p.add_argument("--model", default="tiny",
                   help="tiny (built-in, random weights), a diffusers SD folder or a hub id (default: tiny)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto = CUDA when available)")
    p.add_argument("--dtype", default="auto",
                   help="auto, float16, bfloat16 or float32 (default: auto = float16 on CUDA, float32 on CPU)")
    p.add_argument("--mode", choices=["noised", "generated"], default="noised",
                   help="noised: rendered scenes noised to every step, exact labels; generated: the model's own "
                        "images of --prompts, labelled by --labels (default: noised)")
    p.add_argument("--scenes", type=int, default=96, help="noised mode: training scenes, seeds 0…N-1 (default: 96)")
    p.add_argument("--test-scenes", type=int, default=32,
                   help=f"noised mode: test scenes, seeds {TEST_SEED_OFFSET}+ (default: 32)")
    p.add_argument("--world", choices=["auto", "full", "scenes"], default="auto",
                   help="noised mode: scene distribution; auto = the model's own world (world.json of a trained "
                        "model such as scenes), else the renderer's full one; scenes = the shipped scenes model's "
                        "world whatever the model (e.g. the random tiny model on the same scenes) (default: auto)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="generated mode: training prompts, CSV or text (default: the study's 246-prompt train split)")
    p.add_argument("--test-prompts", type=Path, default=None,
                   help="generated mode: test prompts (default: the study's 371-prompt test split)")
    p.add_argument("--base-seed", type=int, default=0,
                   help="seed of the first prompt of a text prompt file, +1 per line (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each file (default: all)")
    p.add_argument("--labels", action="append", default=[], metavar="SPEC",
                   help="generated mode label source: dpt:PATH_OR_HUB_ID (depth), files:DIR, or scenes: (the shipped "
                        "scenes label models: foreground, depth, shading) / scenes:DIR (a trained folder); repeatable "
                        "(default: none; generated mode needs one)")
    p.add_argument("--protocol", choices=["ldmprobe", "study"], default="ldmprobe",
                   help="study: every audited difference the study's way, README: Study protocol (default: ldmprobe)")
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="ridge, reference (the study's Adam recipe) or capstone-shading (dec4.0 shading, Adam lr "
                        "1e-2, the capstone's 500/117 split) (default: ridge; reference under --protocol study)")
    p.add_argument("--properties", default=None,
                   help="comma-separated properties to fit (default: foreground,depth,shading, or the recipe's)")
    p.add_argument("--layers", default=None,
                   help="attn1 layers: all, groups or names, e.g. dec4,mid.0 (default: all 16, or the recipe's)")
    p.add_argument("--steps", type=int, default=15, help="denoising steps of the schedule (default: 15)")
    p.add_argument("--scheduler", default="lms", help="lms, ddim, pndm, euler, euler_a, dpm or ddpm (default: lms)")
    p.add_argument("--guidance", type=float, default=7.5,
                   help="generated mode: classifier-free guidance scale (default: 7.5)")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels, a multiple of 8 (default: the model's size, 128 for tiny)")
    p.add_argument("--width", type=int, default=None,
                   help="image width in pixels, a multiple of 8 (default: the model's size, 128 for tiny)")
    p.add_argument("--method", choices=["ridge", "reference"], default=None,
                   help="ridge: streaming closed form, λ by validation; reference: the study's Adam recipe "
                        "(default: the protocol's: ridge, or reference under --protocol study)")
    p.add_argument("--timestep-spacing", choices=["study", "config", "linspace", "leading", "trailing"], default=None,
                   help="LMS timesteps; study = the study's linspace whatever the model folder says (default: study)")
    p.add_argument("--mask-threshold", type=int, default=None,
                   help="files: PNG masks: foreground where value > N (default: 127, i.e. ≥ 128; study protocol: 0)")
    p.add_argument("--prompt-encoding", default=None,
                   help="text encoding of prompt files (default: utf-8; study protocol: iso-8859-1, as the study read them)")
    p.add_argument("--depth-norm", choices=["image", "none"], default=None,
                   help="depth labels as fitted and scored: image = each map standardised (zero mean, unit variance: "
                        "relative depth, as MiDaS predicts it); none = the label source's values (default: the "
                        "protocol's: image, none under --protocol study)")
    p.add_argument("--upsample", choices=["nearest", "bilinear"], default=None,
                   help="how probe maps reach image size for scoring and in the bank's image-size maps (probes are "
                        "fitted at layer resolution either way; default: the protocol's: bilinear, nearest under "
                        "--protocol study)")
    p.add_argument("--val-every", type=int, default=5,
                   help="every Nth training image is held out to choose λ (default: 5)")
    p.add_argument("--shard-size", type=int, default=8, help="images per checkpointed shard (default: 8)")
    p.add_argument("--epochs", type=int, default=None, help="reference method: epochs (default: the recipe's, 30)")
    p.add_argument("--lr", type=float, default=None,
                   help="reference method: Adam learning rate (default: the recipe's, 1e-3)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (required; rerunning the same command resumes it)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (default: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr (default: off)")
    return p


def _sources(args, opts: JobOptions, sampler, settings, layers):
    """(train, test) example sources; depth labels standardised per image under --depth-norm image."""
    from .data import DepthPerImage

    train, test = _label_sources(args, opts, sampler, settings, layers)
    if opts.depth_norm == "image":
        return DepthPerImage(train), DepthPerImage(test)
    return train, test


def _world(choice: str, model) -> dict | None:
    """Render options of the noised-mode scenes: the model's own world, the full renderer's, or the
    shipped scenes model's (world.json)."""
    if choice == "full":
        return None
    if choice == "scenes":
        from ldmprobe.models import scenes_folder

        return json.loads((scenes_folder() / "world.json").read_text()).get("render_options")
    return (model.world() or {}).get("render_options")


def _label_sources(args, opts: JobOptions, sampler, settings, layers):
    from .data import PromptSource, SceneSource
    from .labels import DepthModel, LabelFiles, SceneLabelModels
    from .prompts import load_prompts, named_split, study_split

    if args.mode == "noised":
        if args.scenes < 2 or args.test_scenes < 1:
            raise JobError("--scenes must be ≥ 2 and --test-scenes ≥ 1")
        world = _world(args.world, sampler.model)
        return (SceneSource(sampler, settings, layers, list(range(args.scenes)), world),
                SceneSource(sampler, settings, layers, list(range(TEST_SEED_OFFSET, TEST_SEED_OFFSET + args.test_scenes)),
                            world))
    enc = opts.prompt_encoding

    def items(path, split):
        if path is None and opts.split:
            return named_split(opts.split, split, enc)[:args.limit]
        return load_prompts(path or study_split(split), args.base_seed, args.limit, enc)

    train_items, test_items = items(args.prompts, "train"), items(args.test_prompts, "test")
    if not args.labels:
        raise JobError("--labels: generated mode needs at least one label source (dpt:…, files:… or scenes:)")
    sources, names = [], []
    for spec in args.labels:
        kind, _, target = spec.partition(":")
        if kind == "dpt" and target:
            sources.append(DepthModel(target, sampler.model.device))
        elif kind == "files" and target:
            sources.append(LabelFiles(target, mask_threshold=opts.mask_threshold))
        elif kind == "scenes":  # scenes: the shipped label models, scenes:DIR a trained folder
            sources.append(SceneLabelModels(target or None, sampler.model.device, mask_threshold=opts.mask_threshold))
        else:
            raise JobError(f"--labels: {spec!r} is not dpt:PATH_OR_ID or files:DIR or scenes:[DIR]")
        names.append(spec)
    return (PromptSource(sampler, settings, layers, train_items, sources, names),
            PromptSource(sampler, settings, layers, test_items, sources, names))


def schedule_record(sampler, settings) -> dict[str, Any]:
    """The exact timesteps (and what chose them) this job's activations are computed at."""
    from ldmprobe.generate import make_scheduler

    sched = make_scheduler(sampler.model, settings.scheduler, sampler.timestep_spacing)
    sched.set_timesteps(settings.steps)
    return {"timesteps": [float(t) for t in sched.timesteps], "timestep_spacing": sched.config.get("timestep_spacing"),
            "timestep_spacing_option": sampler.timestep_spacing, "init_noise_sigma": float(sched.init_noise_sigma)}


def reference_norm(opts: JobOptions, kinds: list[str], mean: list[float], std: list[float]):
    """Shift and scale of each target for the reference recipe: masks as they are; continuous
    targets by the training z-score ("fitted") or the study's fixed constants ("study")."""
    if opts.label_norm == "study":
        mean, std = [STUDY_DEPTH_MEAN] * len(kinds), [STUDY_DEPTH_STD] * len(kinds)
    shift = torch.tensor([0.0 if k == "mask" else v for k, v in zip(kinds, mean, strict=True)])
    scale = torch.tensor([1.0 if k == "mask" else v for k, v in zip(kinds, std, strict=True)])
    return shift, scale


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from ldmprobe.generate import Sampler
    from ldmprobe.models import load_model
    from ldmprobe.schemas import GenerationSettings

    opts = resolve(args)
    props = [p.strip() for p in opts.properties.split(",") if p.strip()]
    for p in props:
        if p not in PROPERTIES:
            raise JobError(f"--properties: unknown property {p!r}; use {', '.join(PROPERTIES)}")
    if args.val_every < 2 or args.shard_size < 1:
        raise JobError("--val-every must be ≥ 2 and --shard-size ≥ 1")
    settings = GenerationSettings(steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                                  scheduler=args.scheduler)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    d = init_dist(model.device)
    sampler = Sampler(model, compile=args.compile, timestep_spacing=opts.timestep_spacing,
                      latent_dtype=opts.latent_dtype)
    layers = list(sampler.select_layers(opts.layers))
    height, width = settings.height or model.default_size, settings.width or model.default_size
    registry = model.registry(height, width)
    train_src, test_src = _sources(args, opts, sampler, settings, layers)
    schedule = schedule_record(sampler, settings)
    progress = d.main and not args.no_progress
    out: Path = args.out
    steps = settings.steps  # one output per U-Net evaluation (LMS: = steps)

    job = {"model_identity": model.identity, "mode": args.mode, "properties": props, "layers": layers,
           "steps": steps, "scheduler": settings.scheduler, "size": [height, width], "method": opts.method,
           "guidance": settings.guidance if args.mode == "generated" else None,
           "protocol": opts.protocol, "recipe": opts.recipe, "options": opts.as_dict(), **schedule,
           "val_every": args.val_every, "shard_size": args.shard_size, "source": train_src.describe(),
           "train_ids_sha": hashlib.sha256(json.dumps(train_src.ids).encode()).hexdigest()[:16]}
    job_file = out / "job.json"
    if job_file.exists():
        previous = json.loads(job_file.read_text())
        diff = [k for k in job if previous.get(k) != job[k]]
        if diff:
            raise JobError(f"--out {out} holds another job ({', '.join(diff)} differ); use a new folder")
    elif d.main:
        write_json(job_file, job)

    ids = train_src.ids
    split_of = {i: ("val" if n % args.val_every == args.val_every - 1 else "train") for n, i in enumerate(ids)}
    shards = [ids[i:i + args.shard_size] for i in range(0, len(ids), args.shard_size)]
    shapes = {la: (registry[la].height, registry[la].width) for la in layers}
    channels = {la: registry[la].channels for la in layers}
    started = time.perf_counter()
    acc = Accumulator(channels, steps, props)
    kept: dict[str, list[torch.Tensor]] = {}  # reference method: activations and labels in memory
    mine = list(range(len(shards)))[d.rank::d.world]
    resumed = 0
    for index in tqdm(mine, desc="train", disable=not progress, unit="shard"):
        path = shard_path(out, index)
        if opts.method == "ridge" and path.exists():
            acc.load_state(load_shard(path))
            resumed += 1
            continue
        batch = train_src.batch(shards[index])
        if opts.method == "reference":
            kept.setdefault("labels", []).append(torch.stack([batch.labels[p] for p in props], 1))
            for la in layers:
                kept.setdefault(la, []).append(batch.activations[la].to(torch.float16))
            continue
        part = Accumulator(channels, steps, props)
        part.add_batch(batch, [split_of[i] for i in shards[index]], shapes)
        save_shard(path, part, shards[index])
        acc.load_state(part.state_dict())
    for split in ("train", "val"):
        for la in layers:
            for s in range(steps):
                acc.get(split, la, s)  # every key exists on every rank before the all-reduce
    acc.all_reduce(d, layers)
    extract_s = time.perf_counter() - started

    bank = ProbeBank.for_model(model, height, width, scheduler=settings.scheduler, num_steps=steps,
                               label_sources={"mode": args.mode, **train_src.describe()},
                               split={"train": len(ids), "val_every": args.val_every, "test": len(test_src.ids)},
                               fit={"method": opts.method, "recipe": opts.recipe, "protocol": opts.protocol},
                               extra={"protocol": opts.protocol, "recipe": opts.recipe, "options": opts.as_dict(),
                                      **schedule}, upsample=opts.upsample)
    fit_started = time.perf_counter()
    if opts.method == "reference":
        acc.add_moments(torch.cat(kept["labels"]))
    mean, std = acc.label_norm()
    kinds = [PROPERTIES[p] for p in props]
    for la in layers:
        for s in range(steps):
            if opts.method == "ridge":
                weight, bias, lams, info = solve_ridge(acc, la, s, DEFAULT_GRID)
            else:
                shift, scale = reference_norm(opts, kinds, mean, std)
                Y = (torch.cat(kept["labels"]) - shift[:, None, None]) / scale[:, None, None]  # image size
                weight = fit_reference(torch.cat(kept[la])[:, s], Y, shapes[la], kinds, epochs=opts.epochs,
                                       lr=opts.lr, batch_images=opts.batch_images, init=opts.probe_init,
                                       mask_head=opts.mask_head).double() * scale
                bias, lams = shift.double(), [math.nan] * len(props)
                info = {"recipe": opts.recipe, "lr": opts.lr, "epochs": opts.epochs, "batch_images": opts.batch_images,
                        "init": opts.probe_init, "mask_head": opts.mask_head, "label_norm": opts.label_norm}
            for k, prop in enumerate(props):
                mask = PROPERTIES[prop] == "mask"
                m, sd = (0.0, 1.0) if mask else (mean[k], std[k])
                sigmoid = mask and opts.method == "reference"  # the reference trains logits
                bank.add(prop, la, s, (weight[:, k] / sd).float(), ((bias[k] - m) / sd).float().reshape(1),
                         PROPERTIES[prop], sigmoid=sigmoid, mean=m, std=sd,
                         fit={"method": opts.method, "lambda": lams[k]} | {k2: v for k2, v in info.items()
                                                                          if k2 != "lambda" and k2 != "val_mse"})
    fit_s = time.perf_counter() - fit_started
    train_means = dict(zip(props, mean, strict=True))

    eval_started = time.perf_counter()
    sums = evaluate(bank, test_src, test_src.ids, props, layers, steps, args.shard_size, d, train_means, progress)
    rows = sums.rows()
    for r in rows:
        if r["layer"] not in REFERENCE_ROWS:
            bank.probe(r["property"], r["layer"], r["step"]).metrics[r["metric"]] = r["value"]
    eval_s = time.perf_counter() - eval_started
    summary = {"job": job, "train_images": len(ids), "test_images": len(test_src.ids), "resumed_shards": resumed,
               "world_size": d.world, "timings_s": {"extract": round(extract_s, 2), "fit": round(fit_s, 3),
                                                    "evaluate": round(eval_s, 2)},
               "baselines": {r["property"] + "/" + r["metric"]: r["value"] for r in rows if r["layer"] == "baseline"},
               "ceilings": {r["property"] + "/" + r["metric"]: r["value"] for r in rows if r["layer"] == "ceiling"},
               "best": best_probes(rows, props)}
    if d.main:
        bank.save(out / "bank.safetensors")
        write_json(out / "metrics.json", {"rows": rows, "summary": summary})
        write_csv(out / "metrics.csv", rows)
    return summary


def best_probes(rows: list[dict], props: list[str]) -> dict[str, dict]:
    """Per property, the probe with the best primary metric at the last step."""
    last = max(r["step"] for r in rows)
    best = {}
    for p in props:
        metric = PRIMARY[PROPERTIES[p]]
        cands = [r for r in rows if r["property"] == p and r["metric"] == metric and r["step"] == last
                 and not math.isnan(r["value"])]
        if cands:
            top = max(cands, key=lambda r: r["value"])
            best[p] = {"layer": top["layer"], "step": last, metric: top["value"]}
    return best


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["property", "layer", "step", "metric", "value", "n_images", "n_undefined"])
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from ldmprobe.layers import UnknownLayerError
    from ldmprobe.models import BackendUnavailableError, ModelSourceError

    from .prompts import PromptFileError

    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (JobError, RecipeError, PromptFileError, LabelError, ModelSourceError, BackendUnavailableError,
            UnknownLayerError) as exc:
        print(f"training.fit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"training.fit: error: --{'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return EXIT_USAGE
    if int(os.environ.get("RANK", "0")) == 0:
        print_line({"bank": str(args.out / "bank.safetensors"), **summary["timings_s"], "best": summary["best"],
                    "baselines": summary["baselines"], "ceilings": summary["ceilings"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
