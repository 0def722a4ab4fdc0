"""Report of a fitting run: `python -m training.report --run OUT [--curve-model dpt:PATH]`.

Reads OUT/metrics.json (test-split scores of every probe, written by training.fit) and writes,
atomically, under OUT/report (or --out):
- tables/: per property and metric a layers × steps CSV (plus `baseline` and `ceiling` rows), the long form
  of every score (CSV + JSON) and tables.json;
- figures/: a layer × step heatmap per property, the emergence curves (best layer per step, the
  step it first reaches 90 % of its final value, the trivial baseline, and an off-the-shelf
  model run on the decoded intermediate images when --curve-model is given), and the study's
  Figure 4 (decoded image, probe maps, label model, final labels across steps);
- report.json: per property the emergence step, the best probe, the baseline and the curve
  model's per-step scores.
Tables and the heatmaps / curves need only metrics.json; Figure 4 and the curve model load the
model and the run's probe bank.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldmprobe.atomic import atomic_path, write_json
from ldmprobe.jsonout import print_line, sanitize

from .fit import PRIMARY, REFERENCE_ROWS, TEST_SEED_OFFSET, per_image_metrics
from .labels import PROPERTIES

EXIT_USAGE = 2
EMERGENCE_FRACTION = 0.9
METRIC_NAMES = {"dice": "Dice", "spearman": "Spearman ρ", "pearson": "Pearson r", "rmse": "RMSE",
                "rmse_study": "RMSE (study units)"}
CORRELATIONS = ("spearman", "pearson")
CMAPS = {"foreground": "gray", "depth": "magma", "shading": "gray"}


class ReportError(Exception):
    """Bad input: exit code 2 with one line on stderr."""


# --- reading a run -------------------------------------------------------------------------------
def layer_key(name: str) -> tuple:
    """Execution order enc1.0 … mid.0 … dec4.2 (not alphabetical, not named_modules order)."""
    m = re.fullmatch(r"(enc|mid|dec)(\d*)\.(\d+)", name)
    if m is None:
        return (3, 0, 0, name)
    return ({"enc": 0, "mid": 1, "dec": 2}[m[1]], int(m[2] or 0), int(m[3]), name)


def kind_of(prop: str) -> str:
    return PROPERTIES.get(prop, "continuous")


def primary(prop: str) -> str:
    return PRIMARY[kind_of(prop)]


@dataclass
class Run:
    """The scores of one fitting run, as read from its metrics.json."""

    path: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    properties: list[str]
    layers: list[str]
    steps: list[int]

    def __post_init__(self):
        self._index = {(r["property"], r["layer"], int(r["step"]), r["metric"]):
                       math.nan if r["value"] is None else float(r["value"]) for r in self.rows}

    @property
    def test_images(self) -> int:
        return int(self.summary.get("test_images") or max((r["n_images"] for r in self.rows), default=0))

    @property
    def mode(self) -> str:
        return self.summary.get("job", {}).get("mode", "noised")

    @property
    def options(self) -> dict[str, Any]:
        return self.summary.get("job", {}).get("options", {})

    @property
    def recipe(self) -> str:
        """The recipe that fitted these probes (runs from before recipes: named by their method)."""
        job = self.summary.get("job", {})
        return job.get("recipe") or job.get("method") or "ridge"

    @property
    def protocol(self) -> str:
        return self.summary.get("job", {}).get("protocol") or "ldmprobe"

    @property
    def provenance(self) -> str:
        """One line naming what produced the figures of this run."""
        return f"recipe: {self.recipe} · protocol: {self.protocol}"

    def metrics(self, prop: str) -> list[str]:
        found = {r["metric"] for r in self.rows if r["property"] == prop}
        return [m for m in METRIC_NAMES if m in found]

    def value(self, prop: str, layer: str, step: int, metric: str) -> float:
        return self._index.get((prop, layer, step, metric), math.nan)

    def table(self, prop: str, metric: str) -> list[list[float]]:
        """[layer][step] values in execution order; NaN where the run has no score."""
        return [[self.value(prop, la, s, metric) for s in self.steps] for la in self.layers]

    def baseline(self, prop: str, metric: str) -> float:
        return self.value(prop, "baseline", -1, metric)

    def ceiling(self, prop: str, metric: str) -> float:
        """The best a tie-free map could score (Spearman only); NaN where not measured (older runs)."""
        return self.value(prop, "ceiling", -1, metric)


def load_run(path: Path) -> Run:
    if not path.is_dir():
        raise ReportError(f"--run {path}: no such run folder")
    file = path / "metrics.json"
    if not file.is_file():
        raise ReportError(f"--run {path}: no metrics.json (has training.fit finished there?)")
    try:
        data = json.loads(file.read_text())
        rows = data["rows"]
        keys = {"property", "layer", "step", "metric", "value", "n_images"}
        if not rows or not all(keys <= set(r) for r in rows):
            raise ValueError("rows lack " + ", ".join(sorted(keys)))
    except (ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"{file}: not a metrics file of training.fit ({exc})") from exc
    found = {r["property"] for r in rows}
    summary = data.get("summary") or {}
    order = dict.fromkeys([*summary.get("job", {}).get("properties", []), *PROPERTIES])  # the job's, else the study's
    props = [p for p in order if p in found] + sorted(found - set(order))
    layers = sorted({r["layer"] for r in rows if r["layer"] not in REFERENCE_ROWS}, key=layer_key)
    steps = sorted({int(r["step"]) for r in rows if r["layer"] not in REFERENCE_ROWS})
    if not layers or not steps:
        raise ReportError(f"{file}: holds no probe scores")
    return Run(path, rows, summary, props, layers, steps)


# --- summaries -----------------------------------------------------------------------------------
def emergence_step(steps: Sequence[int], values: Sequence[float], fraction: float = EMERGENCE_FRACTION) -> int | None:
    """First step whose score reaches `fraction` of the last step's score. None when the final
    score is undefined or ≤ 0: a fraction of a score at or below chance marks nothing."""
    final = values[-1] if len(values) else math.nan
    if not (math.isfinite(final) and final > 0):
        return None
    return next(s for s, v in zip(steps, values, strict=True) if math.isfinite(v) and v >= fraction * final)


def best_per_step(run: Run, prop: str, metric: str) -> tuple[list[float], list[str | None]]:
    """The envelope over layers: at each step the best score and the layer that has it."""
    values, layers = [], []
    for col in zip(*run.table(prop, metric), strict=True):
        finite = [(v, la) for v, la in zip(col, run.layers, strict=True) if math.isfinite(v)]
        v, la = max(finite) if finite else (math.nan, None)
        values.append(v)
        layers.append(la)
    return values, layers


def best_layer(run: Run, prop: str, metric: str) -> str | None:
    """The layer with the best score at the last step (the probe Figure 4 shows, as fit's `best`)."""
    return best_per_step(run, prop, metric)[1][-1]


def property_summary(run: Run, prop: str) -> dict[str, Any]:
    metric = primary(prop)
    envelope, argmax = best_per_step(run, prop, metric)
    layer = best_layer(run, prop, metric)
    fixed = [run.value(prop, layer, s, metric) for s in run.steps] if layer else []
    cells = [(v, la, s) for la, row in zip(run.layers, run.table(prop, metric), strict=True)
             for s, v in zip(run.steps, row, strict=True) if math.isfinite(v)]
    top = max(cells, default=None)
    return {
        "kind": kind_of(prop), "metric": metric, "test_images": run.test_images,
        "emergence_step": emergence_step(run.steps, envelope),
        "emergence_step_best_layer": emergence_step(run.steps, fixed) if fixed else None,
        "emergence_fraction": EMERGENCE_FRACTION,
        "final": {"layer": layer, "step": run.steps[-1], "value": envelope[-1]},
        "best": {"layer": top[1], "step": top[2], "value": top[0]} if top else None,
        "best_per_step": {"values": envelope, "layers": argmax},
        "baseline": {m: run.baseline(prop, m) for m in run.metrics(prop)},
        "ceiling": run.ceiling(prop, metric),
    }


# --- tables --------------------------------------------------------------------------------------
def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_tables(run: Run, props: list[str], out: Path) -> dict[str, str]:
    """Per (property, metric) a layers × steps CSV whose last rows are the baseline and, for
    Spearman where measured, the tie-free ceiling (the same value in every step column: neither
    depends on the step), plus the long form and tables.json."""
    files, nested = {}, {}
    header = ["layer", *(f"step_{s}" for s in run.steps)]
    for prop in props:
        nested[prop] = {}
        for metric in run.metrics(prop):
            table = run.table(prop, metric)
            base = run.baseline(prop, metric)
            rows = [[la, *row] for la, row in zip(run.layers, table, strict=True)]
            rows.append(["baseline", *[base] * len(run.steps)])
            if math.isfinite(run.ceiling(prop, metric)):
                rows.append(["ceiling", *[run.ceiling(prop, metric)] * len(run.steps)])
            path = _write_text(out / "tables" / f"{prop}_{metric}.csv", _csv_text(header, rows))
            files[f"{prop}/{metric}"] = str(path)
            nested[prop][metric] = {"primary": metric == primary(prop), "layers": run.layers, "steps": run.steps,
                                    "values": table, "baseline": base, "file": path.name}
    fields = ["property", "layer", "step", "metric", "value", "n_images", "n_undefined", "primary"]
    chosen = sorted((r for r in run.rows if r["property"] in props),
                    key=lambda r: (props.index(r["property"]),
                                   (-1, r["layer"]) if r["layer"] in REFERENCE_ROWS else layer_key(r["layer"]),
                                   r["step"], r["metric"]))
    long = [{**{k: r.get(k) for k in fields[:-1]}, "primary": r["metric"] == primary(r["property"])} for r in chosen]
    files["long_csv"] = str(_write_text(out / "tables" / "metrics_long.csv",
                                        _csv_text(fields, [[r[k] for k in fields] for r in long])))
    files["long_json"] = str(write_json(out / "tables" / "metrics_long.json", sanitize(long)))
    files["tables_json"] = str(write_json(out / "tables" / "tables.json",
                                          sanitize({"test_images": run.test_images, "properties": nested})))
    return files


# --- figures -------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    """A figure on the Agg canvas, without pyplot's global state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def save_png(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _baseline_line(run: Run, prop: str, metric: str) -> tuple[float, str]:
    """Where to draw the trivial baseline and how to name it; a constant map has no correlation
    (NaN in metrics.json), which is chance level, drawn at 0."""
    value = run.baseline(prop, metric)
    what = "all-background mask" if kind_of(prop) == "mask" else "training mean"
    if not math.isfinite(value) and metric in CORRELATIONS:
        return 0.0, f"baseline: {what} (constant, ρ undefined → 0)"
    return value, f"baseline: {what} ({value:.2f})"


def heatmap_figure(run: Run, prop: str):
    metric = primary(prop)
    values = np.array(run.table(prop, metric), dtype=float)
    n_layers, n_steps = values.shape
    fig = _figure(2.2 + 0.5 * n_steps, 1.6 + 0.32 * n_layers)
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6,
                   aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_steps), [str(s) for s in run.steps])
    ax.set_yticks(range(n_layers), run.layers)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("self-attention layer (execution order)")
    if n_layers * n_steps <= 400:  # values readable in the cells
        for (i, j), v in np.ndenumerate(values):
            if math.isfinite(v):
                dark = (v - lo) / ((hi - lo) or 1) < 0.6
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
    if finite.size:
        i, j = np.unravel_index(np.nanargmax(values), values.shape)
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.8))
    bar = fig.colorbar(im, ax=ax, shrink=0.9)
    bar.set_label(f"{METRIC_NAMES[metric]} (test split, mean over {run.test_images} images)")
    base, name = _baseline_line(run, prop, metric)
    if lo <= base <= hi:
        bar.ax.axhline(base, color="white", linestyle="--", linewidth=2)
        bar.set_label(bar.ax.get_ylabel() + "\n(dashed: trivial baseline)")
    ax.set_title(f"{prop}: {METRIC_NAMES[metric]} of linear probes per layer and step\n"
                 f"test set n = {run.test_images} images · red box = best · {name}\n{run.provenance}", fontsize=10)
    return fig


def emergence_figure(run: Run, props: list[str], show_layers: Sequence[str] = (),
                     curves: dict[str, dict[str, Any]] | None = None):
    """One panel per property: probes (best layer per step, and named layers), the 90 % step,
    the baseline, and the curve model's score on decoded intermediate images where computed."""
    curves = curves or {}
    fig = _figure(4.6 * len(props), 4.2)
    axes = fig.subplots(1, len(props), squeeze=False)[0]
    for ax, prop in zip(axes, props, strict=True):
        metric = primary(prop)
        envelope, _ = best_per_step(run, prop, metric)
        step = emergence_step(run.steps, envelope)
        ax.plot(run.steps, envelope, "-o", color="C0", linewidth=2, markersize=4,
                label="probe: best layer per step" + (" (final ≤ 0: no emergence)" if step is None else ""))
        for k, layer in enumerate(show_layers):
            ax.plot(run.steps, [run.value(prop, layer, s, metric) for s in run.steps], "-", color=f"C{k + 2}",
                    linewidth=1, alpha=0.8, label=f"probe: {layer}")
        if step is not None:
            ax.axvline(step, color="C0", linestyle=":", linewidth=1.5,
                       label=f"probe reaches 90 % of final at step {step}")
        curve = curves.get(prop)
        if curve:
            values = curve["values"][metric]
            none = " (final ≤ 0: no emergence)" if curve["emergence_step"] is None else ""
            ax.plot(run.steps[:len(values)], values, "-s", color="C1", linewidth=2, markersize=4,
                    label=f"{curve['name']} on decoded images (n = {curve['items']}){none}")
            if curve["emergence_step"] is not None:
                ax.axvline(curve["emergence_step"], color="C1", linestyle=":", linewidth=1.5,
                           label=f"{curve['name']} reaches 90 % at step {curve['emergence_step']}")
        base, name = _baseline_line(run, prop, metric)
        if math.isfinite(base):
            ax.axhline(base, color="grey", linestyle="--", linewidth=1.2, label=name)
        ceiling = run.ceiling(prop, metric)
        if math.isfinite(ceiling) and ceiling < 0.995:  # drawn only where the labels' ties bind
            ax.axhline(ceiling, color="black", linestyle=":", linewidth=1.2,
                       label=f"ceiling: best tie-free map vs the tied labels ({ceiling:.2f})")
        ax.set_xlabel("denoising step")
        ax.set_ylabel(f"{METRIC_NAMES[metric]} (test split)")
        ax.set_title(f"{prop} (n = {run.test_images} test images)", fontsize=10)
        ax.set_xticks(run.steps if len(run.steps) <= 16 else run.steps[::2])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.suptitle(f"When each property becomes linearly decodable ({run.provenance})", fontsize=11)
    return fig


def _panel_image(value: torch.Tensor, prop: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    """An image [3,H,W] as is; a mask map on a fixed 0…1 scale; a continuous map normalised per
    panel (2–98th percentiles: label models give relative depth, so only the ordering counts)."""
    if value.ndim == 3:
        return value.permute(1, 2, 0).clamp(0, 1).numpy(), {}
    arr = value.float().numpy()
    if prop is not None and kind_of(prop) == "mask":
        return arr, {"cmap": CMAPS.get(prop, "gray"), "vmin": 0.0, "vmax": 1.0}
    lo, hi = (float(v) for v in np.nanpercentile(arr, [2, 98])) if np.isfinite(arr).any() else (0.0, 1.0)
    return arr, {"cmap": CMAPS.get(prop, "viridis"), "vmin": lo, "vmax": hi if hi > lo else lo + 1.0}


@dataclass
class GridRow:
    name: str
    prop: str | None  # None: an RGB image row
    cells: list[torch.Tensor | None]  # one per shown step, then the final column


def figure4_figure(title: str, columns: list[str], rows: list[GridRow]):
    fig = _figure(1.5 + 1.45 * len(columns), 0.9 + 1.45 * len(rows))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row.cells):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if cell is None:
                ax.text(0.5, 0.5, "no label", ha="center", va="center", fontsize=8, color="grey",
                        transform=ax.transAxes)
            else:
                arr, style = _panel_image(cell, row.prop)
                ax.imshow(arr, interpolation="nearest", **style)
            if i == 0:
                ax.set_title(columns[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(row.name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


# --- model-dependent parts ----------------------------------------------------------------------
@dataclass
class Example:
    """One image followed through the denoising steps."""

    title: str
    step_images: torch.Tensor  # [S, 3, H, W]: what is decoded at each step
    final_image: torch.Tensor  # [3, H, W]: the clean scene or the generated image
    labels: dict[str, torch.Tensor]  # property → [H, W]
    activations: dict[str, torch.Tensor] = field(default_factory=dict)  # layer → [S, H·W, C]


@dataclass
class Context:
    sampler: Any
    bank: Any
    settings: Any
    curve: Any = None  # a label source run on decoded images (training.labels.DepthModel or SceneLabelModels)
    curve_name: str = ""
    scenes: dict[int, Example] = field(default_factory=dict)  # Figure 4's scene is also a test item

    @property
    def size(self) -> tuple[int, int]:
        return (self.settings.height, self.settings.width)


def open_context(args, run: Run) -> Context:
    from ldmprobe.generate import Sampler
    from ldmprobe.models import load_model
    from ldmprobe.probes import ProbeBank
    from ldmprobe.schemas import GenerationSettings

    bank_file = run.path / "bank.safetensors"
    if not bank_file.is_file():
        raise ReportError(f"--run {run.path}: no bank.safetensors (needed for Figure 4 and --curve-model)")
    model = load_model(args.model, device=args.device)
    bank = ProbeBank.load(bank_file, model)
    height, width = bank.image_size or (model.default_size, model.default_size)
    settings = GenerationSettings(steps=bank.num_steps or len(run.steps), scheduler=bank.scheduler or "lms",
                                  guidance=args.guidance, height=height, width=width)
    # The bank's own schedule: the timesteps its probes were fitted at.
    ctx = Context(Sampler(model, timestep_spacing=bank.extra.get("timestep_spacing_option", "study")), bank, settings)
    if args.curve_model:
        from .labels import DepthModel, SceneLabelModels

        kind, target = curve_target(args.curve_model)
        if kind == "dpt":
            ctx.curve, ctx.curve_name = DepthModel(target, model.device), f"DPT ({Path(target).name})"
        else:  # the scenes world's label models: foreground, depth and shading curves
            ctx.curve = SceneLabelModels(target or None, model.device)
            ctx.curve_name = f"scenes label models ({Path(target).name if target else 'shipped'})"
    return ctx


def curve_target(spec: str) -> tuple[str, str]:
    """(kind, target) of a --curve-model spec: dpt:PATH_OR_HUB_ID, scenes: (shipped) or scenes:DIR."""
    kind, _, target = spec.partition(":")
    if kind == "scenes":
        return kind, target
    if kind != "dpt" or not target:
        raise ReportError(f"--curve-model: {spec!r} is not dpt:PATH_OR_HUB_ID, scenes: or scenes:DIR")
    return kind, target


def scene_example(ctx: Context, seed: int, layers: Sequence[str] = ()) -> Example:
    """A rendered scene in noised mode: the scene's clean latent noised to each step, decoded (the
    image the model sees at that step); exact labels. Remembered per seed (VAE passes are slow)."""
    from ldmprobe.generate import make_scheduler, noised_model_input, study_noise

    from .labels import scene_labels
    from .scenes import render_scene

    sampler = ctx.sampler
    # the model's own world (world.json of a trained model such as scenes), as the fitting job's test scenes
    scene = render_scene(seed, ctx.size, **((sampler.model.world() or {}).get("render_options") or {}))
    image = torch.from_numpy(scene.image).permute(2, 0, 1).float()[None] / 255
    ex = ctx.scenes.get(seed)
    if ex is None:
        scheduler = make_scheduler(sampler.model, ctx.settings.scheduler, sampler.timestep_spacing)
        scheduler.set_timesteps(ctx.settings.steps, device=sampler.model.device)
        x0 = sampler.encode(image)
        noise = study_noise(seed, tuple(x0.shape[1:])).to(x0.device)
        inputs = torch.cat([noised_model_input(scheduler, x0, noise, k) for k in range(len(scheduler.timesteps))])
        labels = {p: v[0] for p, v in scene_labels([scene]).items()}
        ex = ctx.scenes[seed] = Example(f"scene {seed}: “{scene.prompt}”", sampler.decode(inputs), image[0], labels)
    missing = [la for la in layers if la not in ex.activations]
    if missing:
        acts = sampler.noised_activations(image, [scene.prompt], [seed], ctx.settings, missing)
        ex.activations.update({la: a[0] for la, a in acts.items()})
    return ex


def prompt_examples(ctx: Context, items: Sequence[tuple[str, int]], layers: Sequence[str] = ()) -> list[Example]:
    """Generated mode, the study's way: every step's latent decoded; the final image labelled by
    the curve model (when one is configured)."""
    result = ctx.sampler.generate([p for p, _ in items], [s for _, s in items], ctx.settings, layers=tuple(layers))
    decoded = torch.stack([ctx.sampler.decode(st.latents) for st in result.steps], dim=1)  # [N, S, 3, H, W]
    labels = ctx.curve(result.images, [str(i) for i in range(len(items))]) if ctx.curve else {}
    return [Example(f"“{prompt}” (seed {seed})", decoded[i], result.images[i], {p: v[i] for p, v in labels.items()},
                    {la: torch.stack([st.activations[la][i] for st in result.steps]) for la in layers})
            for i, (prompt, seed) in enumerate(items)]


def curve_model_scores(ctx: Context, examples: list[Example], steps: list[int]) -> dict[str, dict[str, Any]]:
    """Score the curve model, run on every step's decoded image, against each example's final
    labels with the probes' metrics; mean over examples (undefined values skipped and counted)."""
    per: dict[tuple[str, str], list[torch.Tensor]] = {}
    for n, ex in enumerate(examples):
        outputs = ctx.curve(ex.step_images, [f"{n}:{s}" for s in steps])
        for prop, pred in outputs.items():
            if prop in ex.labels:
                target = ex.labels[prop].expand_as(pred)
                for metric, values in per_image_metrics(pred, target, kind_of(prop)).items():
                    per.setdefault((prop, metric), []).append(values)
    out: dict[str, dict[str, Any]] = {}
    for (prop, metric), values in per.items():
        v = torch.stack(values)  # [items, S]
        ok = torch.isfinite(v)
        means = (torch.where(ok, v, 0).sum(0) / ok.sum(0)).tolist()  # NaN where all undefined
        entry = out.setdefault(prop, {"name": ctx.curve_name, "items": len(examples), "metric": primary(prop),
                                      "steps": steps, "values": {}, "n_undefined": {}})
        entry["values"][metric] = means
        entry["n_undefined"][metric] = (~ok).sum(0).tolist()
    for entry in out.values():
        entry["emergence_step"] = emergence_step(steps, entry["values"][entry["metric"]])
    return out


def curve_examples(ctx: Context, run: Run, args) -> list[Example]:
    """The first --curve-items test items of the run's split (scenes, or --curve-prompts)."""
    n = min(args.curve_items, run.test_images or args.curve_items)
    if run.mode == "noised":
        return [scene_example(ctx, TEST_SEED_OFFSET + i) for i in range(n)]
    from .prompts import load_prompts, named_split, study_split

    enc, split = run.options.get("prompt_encoding", "utf-8"), run.options.get("split")
    if args.curve_prompts is None and split:
        items = named_split(split, "test", enc)[:n]
    else:
        items = load_prompts(args.curve_prompts or study_split("test"), limit=n, encoding=enc)
    return prompt_examples(ctx, [(it.prompt, it.seed) for it in items])


def shown_steps(spec: str | None, steps: list[int]) -> list[int]:
    """Steps Figure 4 shows: all of up to 8 steps, else every other one, always with the last."""
    if spec:
        try:
            chosen = steps if spec == "all" else [int(s) for s in spec.split(",")]
        except ValueError:
            raise ReportError(f"--figure4-steps: {spec!r} is not 'all' or a comma-separated list of steps") from None
        bad = [s for s in chosen if s not in steps]
        if bad:
            raise ReportError(f"--figure4-steps: step(s) {bad} not in the run (steps {steps[0]}–{steps[-1]})")
        return chosen
    if len(steps) <= 8:
        return steps
    return sorted(set(steps[::2]) | {steps[-1]})


def figure4(ctx: Context, run: Run, props: list[str], steps: list[int], args) -> tuple[Any, dict[str, Any]]:
    best = {p: best_layer(run, p, primary(p)) for p in props}
    best = {p: la for p, la in best.items() if la is not None}
    layers = sorted(set(best.values()), key=layer_key)
    if args.figure4_prompt is not None:
        ex = prompt_examples(ctx, [(args.figure4_prompt, args.figure4_seed)], layers)[0]
        image_row, final_image = "decoded latent", "final image"
    else:
        ex = scene_example(ctx, args.figure4_scene, layers)
        image_row, final_image = "decoded model\ninput (noised)", "clean image"
    rows = [GridRow(image_row, None, [ex.step_images[s] for s in steps] + [ex.final_image])]
    for prop, layer in best.items():
        maps = [ctx.bank.apply({layer: ex.activations[layer][s:s + 1]}, s, properties=[prop], layers=[layer],
                               size=ctx.size)[(prop, layer)][0].cpu() for s in steps]
        rows.append(GridRow(f"{prop} probe\n({layer})", prop, maps + [ex.labels.get(prop)]))
    if ctx.curve is not None:
        outputs = ctx.curve(ex.step_images[steps], [str(s) for s in steps])
        for prop, pred in outputs.items():
            rows.append(GridRow(f"{prop}:\n{ctx.curve_name}", prop, list(pred) + [ex.labels.get(prop)]))
    title = (f"Figure 4 — {ex.title}\nprobe maps from the best layer per property; "
             f"continuous maps normalised per panel; last column: final label\n{run.provenance}")
    columns = [f"step {s}" for s in steps] + [f"{final_image} / label"]
    return figure4_figure(title, columns, rows), {"example": ex.title, "steps": steps, "layers": best}


# --- the job -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    p = _Parser(prog="python -m training.report", description="Tables and figures of a fitting run.")
    p.add_argument("--run", type=Path, required=True, help="the output folder of training.fit (required)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/report)")
    p.add_argument("--properties", default=None, help="comma-separated subset (default: all in the run)")
    p.add_argument("--show-layers", default="", help="comma-separated layers drawn beside the best-per-step curve (default: none)")
    p.add_argument("--model", default="tiny", help="the model the bank was fitted for, for Figure 4 and the curve model (default: tiny)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto = CUDA when available)")
    p.add_argument("--guidance", type=float, default=7.5, help="generated mode: classifier-free guidance (default: 7.5)")
    fig4 = p.add_mutually_exclusive_group()
    fig4.add_argument("--figure4-scene", type=int, default=None,
                      help=f"rendered scene seed for Figure 4 (default: the first test scene, {TEST_SEED_OFFSET})")
    fig4.add_argument("--figure4-prompt", default=None, help="a prompt for Figure 4, generated mode (default: none)")
    fig4.add_argument("--no-figure4", action="store_true", help="skip Figure 4, no model needed (default: off)")
    p.add_argument("--figure4-seed", type=int, default=None, help="seed of --figure4-prompt (default 0)")
    p.add_argument("--figure4-steps", default=None, help="'all' or e.g. 0,2,4 (default: ≤ 8 steps shown)")
    p.add_argument("--curve-model", default=None, metavar="dpt:PATH",
                   help="label model run on every step's decoded image, scored against the final labels: dpt:PATH_OR_HUB_ID, "
                        "scenes: (the shipped scenes label models) or scenes:DIR (default: none)")
    p.add_argument("--curve-items", type=int, default=8, help="test items the curve model is scored on (default: 8)")
    p.add_argument("--curve-prompts", type=Path, default=None,
                   help="generated mode: test prompts for the curve model (default: the study's test split)")
    return p


def _selected(run: Run, args) -> tuple[list[str], list[str]]:
    props = run.properties
    if args.properties:
        props = [p.strip() for p in args.properties.split(",") if p.strip()]
        unknown = [p for p in props if p not in run.properties]
        if unknown or not props:
            raise ReportError(f"--properties: unknown property {', '.join(map(repr, unknown)) or 'none'}; "
                              f"this run has {', '.join(run.properties)}")
    layers = [la.strip() for la in args.show_layers.split(",") if la.strip()]
    unknown = [la for la in layers if la not in run.layers]
    if unknown:
        raise ReportError(f"--show-layers: unknown layer {', '.join(map(repr, unknown))}; "
                          f"this run has {', '.join(run.layers)}")
    return props, layers


def make_report(args) -> dict[str, Any]:
    if args.figure4_seed is not None and args.figure4_prompt is None:
        raise ReportError("--figure4-seed needs --figure4-prompt")
    if args.curve_items < 1:
        raise ReportError("--curve-items must be ≥ 1")
    if args.curve_model is not None:
        curve_target(args.curve_model)  # fail before loading the model
    run = load_run(args.run)
    props, show = _selected(run, args)
    steps = shown_steps(args.figure4_steps, run.steps)  # checked before the model loads
    out = args.out or run.path / "report"
    args.figure4_seed = 0 if args.figure4_seed is None else args.figure4_seed
    if args.figure4_scene is None:
        args.figure4_scene = TEST_SEED_OFFSET

    from .recipes import RECIPES

    recipe = RECIPES.get(run.recipe)
    report: dict[str, Any] = {"run": str(run.path), "mode": run.mode, "recipe": run.recipe,
                              "recipe_description": recipe.description if recipe else None,
                              "protocol": run.protocol, "test_images": run.test_images,
                              "steps": run.steps, "layers": run.layers,
                              "properties": {p: property_summary(run, p) for p in props}}
    files = {"tables": write_tables(run, props, out), "figures": {}}
    for prop in props:
        files["figures"][f"heatmap_{prop}"] = str(save_png(heatmap_figure(run, prop), out / "figures" /
                                                           f"heatmap_{prop}.png"))
    curves: dict[str, dict[str, Any]] = {}
    if args.curve_model or not args.no_figure4:
        ctx = open_context(args, run)
        if ctx.curve is not None:
            curves = curve_model_scores(ctx, curve_examples(ctx, run, args), run.steps)
            for prop, entry in curves.items():
                if prop in report["properties"]:
                    report["properties"][prop]["curve_model"] = entry
        if not args.no_figure4:
            fig, info = figure4(ctx, run, props, steps, args)
            files["figures"]["figure4"] = str(save_png(fig, out / "figures" / "figure4.png"))
            report["figure4"] = info
    files["figures"]["emergence"] = str(save_png(emergence_figure(run, props, show, curves),
                                                 out / "figures" / "emergence.png"))
    report["files"] = files
    write_json(out / "report.json", sanitize(report))
    return report


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from ldmprobe.models import BackendUnavailableError, ModelSourceError
    from ldmprobe.probes import ProbeBankError

    from .labels import LabelError
    from .prompts import PromptFileError

    args = build_parser().parse_args(argv)
    try:
        report = make_report(args)
    except (ReportError, ProbeBankError, LabelError, PromptFileError, ModelSourceError,
            BackendUnavailableError) as exc:
        print(f"training.report: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"training.report: error: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return EXIT_USAGE
    summary = {p: {"emergence_step": s["emergence_step"], s["metric"]: s["final"]["value"],
                   "layer": s["final"]["layer"],
                   **({"curve_model_emergence_step": s["curve_model"]["emergence_step"]} if "curve_model" in s else {})}
               for p, s in report["properties"].items()}
    print_line({"report": str((args.out or args.run / "report") / "report.json"),
                "recipe": report["recipe"], "protocol": report["protocol"], **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
