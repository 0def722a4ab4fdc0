"""The study's protocol end to end on one model: `python -m training.study --model scenes --out runs/study`.

Stages (each resumable: a finished stage leaves `stages/<name>.json` and is skipped on a rerun; the
fitting jobs inside are resumable themselves):
1. prompts     a study-shaped prompt/seed set from the model's world (captions of renders), split
               40/60 into train/test as the study's 246/371;
2. generated   probes in the study's mode: generate, label the final images with the label models
               (`scenes:`), fit all layers × steps × properties (training.fit), score on the test split;
3. noised      the same probes with exact labels on noised renders (training.fit --mode noised);
4. reports     training.report on both runs: tables, heatmaps, emergence beside the label models run
               on every step's decoded image, Figure 4;
5. classify    the label models' classifier (VGG-16's role) on every step's decode (latent and x0)
               of the test generations: accuracy per step, first top-1 step, the step it passes 90 %;
6. intervene   ≥ 32 captions × dx ±16, ±24 (and depth edits): shift fraction, Dice to target vs
               baseline, label-model Dice, sequential (the study's) and joint edits, histogram, a sweep GIF;
7. report.md   everything above in one page, with the wall time of every stage.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ldmprobe.atomic import atomic_path, write_json
from ldmprobe.jsonout import print_line, sanitize

EXIT_USAGE = 2
PROMPT_SEED_OFFSET = 3_000_000  # renders whose captions make the prompt set (never a training render seed)
KIND_OF_NOUN = {"sphere": "sphere", "box": "box", "cube": "box", "cylinder": "cylinder"}
STAGES = ("prompts", "generated", "noised", "reports", "classify", "intervene")


class StudyError(Exception):
    """Bad input: exit code 2 with one line."""


# --- bookkeeping -------------------------------------------------------------------------------------
class Stages:
    """`stages/<name>.json` per finished stage: its result and wall time; a rerun skips it."""

    def __init__(self, out: Path, config: dict[str, Any]):
        self.out, self.dir = out, out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        stored = out / "study.json"
        if stored.is_file():
            old = json.loads(stored.read_text())["config"]
            changed = [k for k in config if old.get(k) != config[k]]
            if changed:
                raise StudyError(f"--out {out} holds a study with other settings ({', '.join(changed)}); "
                                 "use another --out")
        write_json(stored, {"job": "training.study", "config": config})

    def done(self, name: str) -> dict[str, Any] | None:
        path = self.dir / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, name: str, fn) -> dict[str, Any]:
        found = self.done(name)
        if found is not None:
            print(f"study: {name}: done before ({found['wall_s']} s), skipped", file=sys.stderr)
            return found
        print(f"study: {name} …", file=sys.stderr)
        t0 = time.perf_counter()
        result = fn()
        entry = {"result": result, "wall_s": round(time.perf_counter() - t0, 1)}
        write_json(self.dir / f"{name}.json", sanitize(entry))
        return entry


# --- stage 1: prompts ----------------------------------------------------------------------------------
def caption_class(prompt: str) -> str:
    """"a red sphere on a grey floor" → "red sphere" (box and cube are one kind)."""
    words = prompt.split(" on ")[0].split()
    return f"{words[-2]} {KIND_OF_NOUN.get(words[-1], words[-1])}"


def make_prompts(out: Path, model_source: str, count: int, train_fraction: float) -> dict[str, Any]:
    """Captions of renders of the model's world (seeds from PROMPT_SEED_OFFSET), one generation seed each;
    the first 40 % train, the rest test, written as the study's CSV layout (prompts, seeds)."""
    from ldmprobe.models import load_model

    from .scenes import render_scene

    world = (load_model(model_source).world() or {}).get("render_options") or {}
    rows = [{"prompts": render_scene(PROMPT_SEED_OFFSET + i, 32, **world).prompt, "seeds": i} for i in range(count)]
    n_train = max(2, round(count * train_fraction))
    files = {}
    for split, part in (("train", rows[:n_train]), ("test", rows[n_train:])):
        path = out / "prompts" / f"{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["prompts", "seeds"])
            writer.writeheader()
            writer.writerows(part)
        files[split] = str(path)
    return {"files": files, "train": n_train, "test": count - n_train, "world": world,
            "distinct_captions": len({r["prompts"] for r in rows})}


# --- stages 2-4: the fitting jobs and their reports ------------------------------------------------------
def _call(main, argv: list[str], what: str) -> None:
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"{what} exited {rc}: {' '.join(argv)}")


def fit_generated(args, prompts: dict[str, Any]) -> dict[str, Any]:
    from .fit import main as fit_main

    out = args.out / "generated"
    argv = ["--model", args.model, "--mode", "generated", "--prompts", prompts["files"]["train"],
            "--test-prompts", prompts["files"]["test"], "--labels", args.labels, "--steps", str(args.steps),
            "--guidance", f"{args.guidance:g}",
            "--val-every", str(max(2, min(5, prompts["train"] // 2))),  # λ is chosen on every 5th (small runs: 2nd)
            "--out", str(out), *(["--no-progress"] if args.no_progress else [])]
    _call(fit_main, argv, "training.fit (generated)")
    return {"run": str(out), "command": "python -m training.fit " + " ".join(argv)}


def fit_noised(args) -> dict[str, Any]:
    from .fit import main as fit_main

    out = args.out / "noised"
    argv = ["--model", args.model, "--mode", "noised", "--scenes", str(args.noised_scenes),
            "--test-scenes", str(args.noised_test_scenes), "--steps", str(args.steps), "--out", str(out),
            "--val-every", str(max(2, min(5, args.noised_scenes // 2))),
            *(["--no-progress"] if args.no_progress else [])]
    _call(fit_main, argv, "training.fit (noised)")
    return {"run": str(out), "command": "python -m training.fit " + " ".join(argv)}


def reports(args, prompts: dict[str, Any]) -> dict[str, Any]:
    from .report import main as report_main

    out = {}
    for mode in ("generated", "noised"):
        run = args.out / mode
        argv = ["--run", str(run), "--model", args.model, "--curve-model", args.labels,
                "--curve-items", str(args.curve_items), "--guidance", f"{args.guidance:g}"]
        if mode == "generated":
            argv += ["--curve-prompts", prompts["files"]["test"],
                     "--figure4-prompt", _first_test_prompt(prompts)["prompts"], "--figure4-seed",
                     str(_first_test_prompt(prompts)["seeds"])]
        _call(report_main, argv, f"training.report ({mode})")
        out[mode] = json.loads((run / "report" / "report.json").read_text())
    return out


def _first_test_prompt(prompts: dict[str, Any]) -> dict[str, str]:
    with open(prompts["files"]["test"], newline="") as fh:
        return next(csv.DictReader(fh))


# --- stage 5: classification ------------------------------------------------------------------------------
def classify(args, prompts: dict[str, Any]) -> dict[str, Any]:
    """The scenes classifier on every step's decode of the test generations, latent and x0."""
    from ldmprobe.classify import StepClassifier, load_classifier, make_decoder
    from ldmprobe.generate import Sampler
    from ldmprobe.models import load_model
    from ldmprobe.schemas import GenerationSettings

    with open(prompts["files"]["test"], newline="") as fh:
        items = list(csv.DictReader(fh))[:args.classify_items]
    model = load_model(args.model)
    classifier = load_classifier(args.classifier, model.device, model.dtype)
    runner = StepClassifier(make_decoder(model, "vae"), classifier, batch_size=16)
    sampler = Sampler(model)
    targets = [classifier.classes.resolve(caption_class(r["prompts"])).index for r in items]
    out: dict[str, Any] = {"items": len(items), "classifier": classifier.metadata()}
    for decode in ("latent", "x0"):
        correct, first_top1 = [], []
        for start in range(0, len(items), 8):
            chunk = items[start:start + 8]
            results = runner.classify_generation(sampler, [r["prompts"] for r in chunk], [int(r["seeds"]) for r in chunk],
                                                 GenerationSettings(steps=args.steps, guidance=args.guidance), decode=decode,
                                                 targets=targets[start:start + 8], progress=not args.no_progress)
            for res in results:
                correct.append((res.probabilities.argmax(-1) == res.target.index).float().numpy())
                first_top1.append(res.statistics()["first_top1_step"])
        acc = np.mean(correct, axis=0)
        out[decode] = {"top1_accuracy_per_step": [round(float(a), 4) for a in acc],
                       "first_step_accuracy_ge_0.9": next((s for s, a in enumerate(acc) if a >= 0.9), None),
                       "first_step_accuracy_ge_half_final": next((s for s, a in enumerate(acc) if a >= acc[-1] / 2), None),
                       "median_first_top1_step": _median([s for s in first_top1 if s is not None]),
                       "never_top1": sum(s is None for s in first_top1)}
    out["figure"] = str(_classification_figure(out, args.out / "figures" / "classification.png"))
    return out


def _median(values: list[int]) -> float | None:
    return float(np.median(values)) if values else None


def _classification_figure(result: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.6), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for decode in ("latent", "x0"):
        acc = result[decode]["top1_accuracy_per_step"]
        ax.plot(range(len(acc)), acc, marker="o", ms=3, label=f"decode {decode}")
    ax.axhline(0.9, color="grey", lw=0.8, ls="--", label="90 %")
    ax.set(xlabel="denoising step", ylabel="top-1 accuracy (caption's colour × kind)", ylim=(0, 1.02),
           title=f"Scenes classifier on each step's decoded image ({result['items']} test generations)")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# --- stage 6: intervention -------------------------------------------------------------------------------
# name → (order, metric, layers, shifts): the study's edit (sequential, Adam's own path, the decoder's nine
# layers), the same in the joint order, and ldmprobe's (all 16 layers, the smallest move in the
# activations' covariance metric, `ldmprobe.intervene.activation_metric_edit`)
INTERVENTION_RUNS = {"sequential": ("sequential", "euclidean", "study", [16, -16, 24, -24]),
                     "joint": ("joint", "euclidean", "study", [24, -24]),
                     "activation": ("sequential", "activation", "all", [16, -16, 24, -24])}


HISTOGRAM_LABELS = {"sequential": "the study's edit, sequential", "joint": "the study's edit, joint",
                    "activation": "ldmprobe's edit (activation metric, all 16 layers)"}


def intervene(args, prompts: dict[str, Any]) -> dict[str, Any]:
    """Each test caption edited at dx ∈ ±16, ±24 px: the study's edit (sequential, Euclidean), the joint
    order on ±24, and the activation-metric edit; depth edits at dx 24 on a quarter of them (the study's
    edit); scored by the probe and by the label models."""
    from ldmprobe.generate import Sampler
    from ldmprobe.intervene import STUDY_LAYERS
    from ldmprobe.label_models import load_label_models
    from ldmprobe.models import load_model
    from ldmprobe.probes import ProbeBank
    from ldmprobe.schemas import GenerationSettings

    from .scenes_model.intervention_eval import run_interventions

    with open(prompts["files"]["test"], newline="") as fh:
        items = list(csv.DictReader(fh))[:args.intervene_captions]
    model = load_model(args.model)
    bank = ProbeBank.load(args.out / "generated" / "bank.safetensors", model)
    sampler = Sampler(model)
    labels = load_label_models(args.labels.partition(":")[2] or None)
    settings = GenerationSettings(steps=args.steps, guidance=args.guidance)
    out: dict[str, Any] = {"captions": len(items), "bank": "generated"}
    # the study's edited steps (0-4; depth 0-2) unless a short schedule has fewer
    edit = {} if args.steps >= 5 else {"edit_steps": list(range(args.steps))}
    keep: dict[str, Any] = {}
    for name, (order, metric, layers, shifts) in INTERVENTION_RUNS.items():
        cases = [{"prompt": r["prompts"], "seed": int(r["seeds"]), "dx": float(dx)} for r in items for dx in shifts]
        chosen = STUDY_LAYERS["foreground"] if layers == "study" else layers
        res = run_interventions(sampler, bank, cases, settings, label_model=labels.foreground,
                                progress=not args.no_progress, order=order, metric=metric, layers=chosen,
                                iterations=args.iterations, **edit)
        out[name] = {"order": order, "metric": metric, "layers": layers, "summary": res["summary"],
                     "seconds": res["seconds"],
                     "by_shift": {str(dx): _summary_of([r for r in res["rows"] if r["dx"] == dx]) for dx in shifts},
                     "rows": [{k: v for k, v in r.items() if k != "_result"} for r in res["rows"]]}
        keep[name] = res["rows"]
    depth_cases = [{"prompt": r["prompts"], "seed": int(r["seeds"]), "dx": 24.0, "property": "depth"}
                   for r in items[:max(1, len(items) // 4)]]
    depth = run_interventions(sampler, bank, depth_cases, settings, label_model=labels.depth,
                              progress=not args.no_progress, order="sequential", metric="euclidean", layers="all",
                              iterations=args.iterations,
                              **({} if args.steps >= 3 else edit))
    out["depth"] = {"summary": depth["summary"], "seconds": depth["seconds"],
                    "rows": [{k: v for k, v in r.items() if k != "_result"} for r in depth["rows"]]}
    out["histogram"] = str(_histogram(keep, args.out / "figures" / "intervention_histogram.png"))
    out["sweep_gif"] = str(_sweep(sampler, bank, items[0], settings, args, args.out / "figures" / "sweep.gif"))
    return out


def _summary_of(rows: list[dict]) -> dict[str, Any]:
    from .scenes_model.intervention_eval import summarise

    return summarise(rows)


def _histogram(rows: dict[str, list[dict]], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.4), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    bins = np.linspace(-1, 2, 31)
    for name, rs in rows.items():
        values = [r["shift_fraction"] for r in rs if r["shift_fraction"] is not None]
        ax.hist(np.clip(values, -1, 2), bins=bins, alpha=0.6,
                label=f"{HISTOGRAM_LABELS.get(name, name)} (n={len(values)})")
    ax.axvline(0.5, color="grey", lw=0.8, ls="--", label="moved (≥ 0.5)")
    ax.set(xlabel="shift fraction (achieved / requested centroid shift)", ylabel="interventions",
           title="Intervention: how far the object moved")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _sweep(sampler, bank, item: dict[str, str], settings, args, path: Path) -> Path:
    from ldmprobe.intervene import Intervention, InterventionSpec
    from ldmprobe.intervene.figure import write_sweep_gif

    runner = Intervention(sampler, bank)
    frames, labels = [], []
    for dx in (-24, -16, -8, 0, 8, 16, 24):
        spec = InterventionSpec(dx=float(dx), iterations=args.iterations,
                                edit_steps=None if args.steps >= 5 else list(range(args.steps)))
        result = runner.run(item["prompts"], int(item["seeds"]), spec, settings)
        frames.append(result.edited)
        labels.append(f"dx = {dx:+d}")
    return write_sweep_gif(frames, labels, path)


# --- stage 7: report.md ----------------------------------------------------------------------------------
def layer_table(model_source: str) -> list[dict[str, Any]]:
    from ldmprobe.models import load_model

    model = load_model(model_source)
    blocks: dict[str, dict[str, Any]] = {}
    for spec in model.registry():
        b = blocks.setdefault(spec.block, {"block": spec.block, "layers": [], "size": f"{spec.height}×{spec.width}",
                                            "channels": spec.channels})
        b["layers"].append(spec.name)
    return list(blocks.values())


def crossover(probe: list, label_model: list) -> int | str:
    """The first step from which the label model on the decoded image scores at least as well as the
    best probe at every later step ("never" if it does not)."""
    pairs = [(p, m) for p, m in zip(probe, label_model, strict=False) if p is not None and m is not None]
    for step in range(len(pairs)):
        if all(m >= p for p, m in pairs[step:]):
            return step
    return "never"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


# How the fit job's --depth-norm is said in report.md.
DEPTH_NORM_NOTES = {
    "image": "Depth is fitted and scored as relative depth (`--depth-norm image`: each image's map at zero mean, "
             "unit variance; RMSE in those units). ",
    "none": "Depth is fitted and scored in the label's own values (`--depth-norm none`). ",
}
# How the fit job's --upsample is said in report.md.
UPSAMPLE_NOTES = {
    "bilinear": "Probe maps are scored at image size after bilinear upsampling (`--upsample bilinear`; fitted at "
                "layer resolution). ",
    "nearest": "Probe maps are scored at image size after nearest upsampling (`--upsample nearest`, as the study). ",
}


def write_report(args, results: dict[str, dict[str, Any]]) -> Path:
    lines = [f"# The study on `{args.model}`", "",
             f"`python -m training.study {' '.join(sys.argv[1:]) if args.argv is None else ' '.join(args.argv)}`", ""]
    prompts = results["prompts"]["result"]
    lines += [f"Prompts: {prompts['train']} train / {prompts['test']} test captions of renders of the model's world "
              f"({prompts['distinct_captions']} distinct), one seed each; {args.steps} LMS steps, guidance {args.guidance:g}.", ""]
    lines += ["## Layers", "", "| block | layers | size | channels |", "|---|---|---|---|"]
    lines += [f"| {b['block']} | {', '.join(b['layers'])} | {b['size']} | {b['channels']} |" for b in layer_table(args.model)]
    rep = results["reports"]["result"]
    lines += ["", "## Best probes (Table 2 analogue)", "",
              "| mode | property | metric | best layer | step | value | at last step (layer) | trivial baseline "
              "| tie-free ceiling |", "|---|---|---|---|---|---|---|---|---|"]
    for mode in ("generated", "noised"):
        for prop, s in rep[mode]["properties"].items():
            best, final = s.get("best") or {}, s.get("final") or {}
            base = (s.get("baseline") or {}).get(s["metric"])
            lines.append(f"| {mode} | {prop} | {s['metric']} | {best.get('layer')} | {best.get('step')} | "
                         f"{_fmt(best.get('value'))} | {_fmt(final.get('value'))} ({final.get('layer')}) | {_fmt(base)} "
                         f"| {_fmt(s.get('ceiling'))} |")
    job = args.out / "generated" / "job.json"
    options = (json.loads(job.read_text()).get("options") or {}) if job.is_file() else {}
    norm = DEPTH_NORM_NOTES.get(options.get("depth_norm"), "") + UPSAMPLE_NOTES.get(options.get("upsample"), "")
    lines += ["", "Generated mode = the study's protocol: labels are the label models' outputs on the final image. "
              "Noised mode: exact labels of renders, the render noised to each step. " + norm +
              "Tie-free ceiling: the best Spearman any map without ties could reach against these labels; shading "
              "ties (exact shading: one value on the lit floor, 0 in shadow, 1 for the sky; the label models' "
              "shading map ties on the floor and in shadow the same way), so it stays below 1.", "",
              "## Emergence: probes vs the label models on each step's decoded image", "",
              "| mode | property | probe reaches 90 % of final at step | label model reaches 90 % at step | "
              "probe at step 3 | label model at step 3 | label model ≥ probe from step |", "|---|---|---|---|---|---|---|"]
    for mode in ("generated", "noised"):
        for prop, s in rep[mode]["properties"].items():
            curve = s.get("curve_model") or {}
            probe3 = (s.get("best_per_step") or {}).get("values", [None] * 4)
            cm3 = (curve.get("values") or {}).get(curve.get("metric"), [None] * 4)
            lines.append(f"| {mode} | {prop} | {s.get('emergence_step')} | {curve.get('emergence_step')} | "
                         f"{_fmt(probe3[3] if len(probe3) > 3 else None)} | {_fmt(cm3[3] if len(cm3) > 3 else None)} | "
                         f"{crossover(probe3, cm3)} |")
    lines += ["", "![emergence, generated](generated/report/figures/emergence.png)",
              "![heatmap foreground](generated/report/figures/heatmap_foreground.png)",
              "![heatmap depth](generated/report/figures/heatmap_depth.png)",
              "![heatmap shading](generated/report/figures/heatmap_shading.png)",
              "![Figure 4](generated/report/figures/figure4.png)", ""]
    if "classify" in results:
        c = results["classify"]["result"]
        lines += ["## Classification of each step's decode", "",
                  f"The scenes classifier (VGG-16's role; {c['classifier'].get('arch')}) on {c['items']} test generations.", "",
                  "| decode | accuracy at step 0 / 3 / last | first step ≥ 90 % | median first top-1 step | never top-1 |",
                  "|---|---|---|---|---|"]
        for d in ("latent", "x0"):
            acc = c[d]["top1_accuracy_per_step"]
            lines.append(f"| {d} | {_fmt(acc[0], 2)} / {_fmt(acc[min(3, len(acc) - 1)], 2)} / {_fmt(acc[-1], 2)} | "
                         f"{c[d]['first_step_accuracy_ge_0.9']} | {c[d]['median_first_top1_step']} | {c[d]['never_top1']} |")
        lines += ["", "![classification](figures/classification.png)", ""]
    if "intervene" in results:
        iv = results["intervene"]["result"]
        lines += ["## Intervention", "", f"{iv['captions']} test captions, the generated-mode bank.", "",
                  "Shift fractions as the evaluation probe reads the final image and (label model) as the segmenter "
                  "sees it. Metric: euclidean = Adam's own path along the probe's read-out (the study's); activation "
                  "= the same probe outputs reached by the smallest move in the activations' covariance metric. "
                  "Layers: study = the decoder's nine (dec2.0-dec4.2), all = the 16.", "",
                  "| order | metric | layers | shift | n | mean shift fraction (probe) | (label model) | moved (≥ 0.5) | "
                  "Dice to target > baseline (probe) | (label model) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name in (n for n in INTERVENTION_RUNS if n in iv):
            run = iv[name]
            for dx, s in run["by_shift"].items():
                lines.append(f"| {run.get('order', name)} | {run.get('metric', 'euclidean')} | "
                             f"{run.get('layers', 'study')} | {dx} | {s.get('n')} | "
                             f"{_fmt(s.get('shift_fraction_mean'))} | {_fmt(s.get('label_model_shift_fraction_mean'))} | "
                             f"{_fmt(s.get('moved_fraction'))} | {_fmt(s.get('dice_better_fraction'))} | "
                             f"{_fmt(s.get('label_model_dice_better_fraction'))} |")
        d = iv["depth"]["summary"].get("depth", {})
        lines += ["", f"Depth edits (dx 24): {d.get('n')} cases, RMSE to target below baseline in "
                  f"{_fmt(d.get('rmse_better_fraction'))} of them.", "",
                  "![histogram](figures/intervention_histogram.png)", "", "![sweep](figures/sweep.gif)", ""]
    lines += ["## Wall time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {results[name]['wall_s']} |" for name in STAGES if name in results]
    lines += [f"| total | {round(sum(r['wall_s'] for r in results.values()), 1)} |", ""]
    path = args.out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


# --- the command ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.study", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="scenes", help="the model studied (default: scenes)")
    p.add_argument("--out", type=Path, required=True, help="study folder (rerun the same command to resume)")
    p.add_argument("--labels", default="scenes:", help="label models: scenes: (shipped) or scenes:PATH (default: scenes:)")
    p.add_argument("--classifier", default="scenes", help="classifier of the classification stage (default: scenes)")
    p.add_argument("--prompts", type=int, default=100, help="prompts in all, split 40/60 (default: 100)")
    p.add_argument("--train-fraction", type=float, default=0.4, help="train share of the prompts (default: 0.4, the study's)")
    p.add_argument("--steps", type=int, default=15, help="LMS steps (default: 15, the study's)")
    p.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance of every generation (default: 7.5, the study's; the scenes "
                        "model follows its captions best at 2, see its card)")
    p.add_argument("--noised-scenes", type=int, default=48, help="noised mode: training renders (default: 48)")
    p.add_argument("--noised-test-scenes", type=int, default=16, help="noised mode: test renders (default: 16)")
    p.add_argument("--curve-items", type=int, default=8, help="test items the label models are run on per step (default: 8)")
    p.add_argument("--classify-items", type=int, default=32, help="test generations classified per step (default: 32)")
    p.add_argument("--intervene-captions", type=int, default=32, help="test captions edited (default: 32)")
    p.add_argument("--iterations", type=int, default=20, help="optimisation iterations per edited layer (default: 20)")
    p.add_argument("--skip", default="", help="comma-separated stages to skip: classify, intervene (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    return p


def check(args) -> None:
    if args.prompts < 5:
        raise StudyError(f"--prompts: need at least 5, got {args.prompts}")
    if not 0.1 <= args.train_fraction <= 0.9:
        raise StudyError(f"--train-fraction: must be in [0.1, 0.9], got {args.train_fraction}")
    if args.steps < 3:
        raise StudyError(f"--steps: need at least 3 (depth edits take steps 0-2), got {args.steps}")
    for name in ("steps", "noised_scenes", "noised_test_scenes", "curve_items", "classify_items", "intervene_captions",
                 "iterations"):
        if getattr(args, name) < 1:
            raise StudyError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.guidance) and 0 <= args.guidance <= 50):
        raise StudyError(f"--guidance: a scale in 0…50, got {args.guidance}")
    if args.noised_scenes < 2:
        raise StudyError(f"--noised-scenes: need at least 2, got {args.noised_scenes}")
    if not args.labels.startswith("scenes:"):
        raise StudyError(f"--labels: use scenes: or scenes:PATH, got {args.labels!r}")
    unknown = [s for s in args.skip.split(",") if s and s not in ("classify", "intervene")]
    if unknown:
        raise StudyError(f"--skip: unknown stage {unknown[0]!r}; use classify, intervene")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        check(args)
        config = {k: v for k, v in vars(args).items() if k not in ("out", "no_progress", "argv", "skip")}
        stages = Stages(args.out, config)
    except StudyError as exc:
        print(f"training.study: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, dict[str, Any]] = {}
    results["prompts"] = stages.run("prompts", lambda: make_prompts(args.out, args.model, args.prompts,
                                                                    args.train_fraction))
    prompts = results["prompts"]["result"]
    results["generated"] = stages.run("generated", lambda: fit_generated(args, prompts))
    results["noised"] = stages.run("noised", lambda: fit_noised(args))
    results["reports"] = stages.run("reports", lambda: reports(args, prompts))
    if "classify" not in skip:
        results["classify"] = stages.run("classify", lambda: classify(args, prompts))
    if "intervene" not in skip:
        results["intervene"] = stages.run("intervene", lambda: intervene(args, prompts))
    path = write_report(args, results)
    print_line({"study": str(path), "wall_s": {k: v["wall_s"] for k, v in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
