"""Does editing the representation move the object? Interventions on many captions, summarised as a
distribution (never one lucky prompt): shift fraction (achieved centroid shift projected on the
requested one), Dice to the target vs the unedited image's, and the fraction that moved."""

from __future__ import annotations

import time

import numpy as np

MOVED = 0.5  # an object "moved" when at least half the requested shift was achieved


def run_interventions(sampler, bank, cases: list[dict], settings, label_model=None, progress: bool = True,
                      **spec_options) -> dict:
    """cases: [{"prompt", "seed", "dx", "dy"} | {"prompt", "seed", "property": "depth", ...}]; spec_options go to
    every InterventionSpec (order, iterations…). Returns per-case rows and the summary."""
    from tqdm.auto import tqdm

    from ldmprobe.intervene import Intervention, InterventionSpec

    runner = Intervention(sampler, bank, label_model=label_model)
    rows, started = [], time.perf_counter()
    for case in tqdm(cases, desc="interventions", disable=not progress, unit="edit"):
        spec = InterventionSpec(property=case.get("property", "foreground"), dx=case.get("dx", 0.0),
                                dy=case.get("dy", 0.0), **spec_options)
        t0 = time.perf_counter()
        result = runner.run(case["prompt"], case["seed"], spec, settings)
        s = result.success
        rows.append({**case, "shift_fraction": s.get("shift_fraction"), "dice_to_target": s.get("dice_to_target"),
                     "dice_baseline": s.get("dice_baseline"), "label_model": s.get("label_model"),
                     "rmse_to_target": s.get("rmse_to_target"), "rmse_baseline": s.get("rmse_baseline"),
                     "latent_change": s.get("latent_change"), "pixel_change": s.get("pixel_change"),
                     "seconds": round(time.perf_counter() - t0, 2), "_result": result})
    return {"rows": rows, "summary": summarise(rows), "seconds": round(time.perf_counter() - started, 1)}


def summarise(rows: list[dict]) -> dict:
    fg = [r for r in rows if r.get("property", "foreground") == "foreground"]
    shifts = np.array([r["shift_fraction"] for r in fg if r["shift_fraction"] is not None], dtype=float)
    better = [r["dice_to_target"] > r["dice_baseline"] for r in fg
              if r["dice_to_target"] is not None and r["dice_baseline"] is not None]
    out = {"n": len(fg), "n_measured": int(len(shifts))}
    if len(shifts):
        out |= {"shift_fraction_mean": round(float(shifts.mean()), 4),
                "shift_fraction_median": round(float(np.median(shifts)), 4),
                "shift_fraction_quartiles": [round(float(q), 4) for q in np.quantile(shifts, [0.25, 0.75])],
                "moved_fraction": round(float((shifts >= MOVED).mean()), 4)}
    if better:
        out["dice_better_fraction"] = round(float(np.mean(better)), 4)
        out["dice_to_target_mean"] = round(float(np.mean([r["dice_to_target"] for r in fg])), 4)
        out["dice_baseline_mean"] = round(float(np.mean([r["dice_baseline"] for r in fg])), 4)
    labelled = [r["label_model"] for r in fg if r.get("label_model")]
    if labelled:
        out["label_model_dice_better_fraction"] = round(float(np.mean(
            [m["dice_to_target"] > m["dice_baseline"] for m in labelled])), 4)
        seen = np.array([m["shift_fraction"] for m in labelled if m.get("shift_fraction") is not None], dtype=float)
        if len(seen):  # the move as the label model (the segmenter, not a probe) sees it in the images
            out["label_model_shift_fraction_mean"] = round(float(seen.mean()), 4)
            out["label_model_shift_fraction_median"] = round(float(np.median(seen)), 4)
            out["label_model_moved_fraction"] = round(float((seen >= MOVED).mean()), 4)
    depth = [r for r in rows if r.get("property") == "depth"]
    if depth:
        out["depth"] = {"n": len(depth), "rmse_better_fraction": round(float(np.mean(
            [r["rmse_to_target"] < r["rmse_baseline"] for r in depth])), 4)}
    return out


def intervention_grid(rows: list[dict], path, columns: int = 8) -> None:
    """`columns` cases evenly spaced through the run (not picked by outcome; the held-out captions
    come grouped by colour): unedited image above, edited below, the target mask outlined in yellow
    and the segmenter's (else the probe's) shift fraction in the title. Written atomically as PNG."""
    from matplotlib.figure import Figure

    from ldmprobe.atomic import atomic_path

    done = [r for r in rows if "_result" in r]
    shown = [done[i] for i in sorted({round(k * (len(done) - 1) / max(1, columns - 1)) for k in range(columns)})
             ] if done else []
    if not shown:
        raise ValueError("no intervention results to draw")
    fig = Figure(figsize=(1.8 * len(shown), 4.0), dpi=100, layout="constrained")
    axes = fig.subplots(2, len(shown), squeeze=False)
    for col, row in enumerate(shown):
        result = row["_result"]
        seen = (row.get("label_model") or {}).get("shift_fraction")
        fraction = seen if seen is not None else row.get("shift_fraction")
        axes[0][col].imshow(result.original.permute(1, 2, 0).clamp(0, 1).numpy())
        axes[0][col].set_title(f"{row['prompt'].removeprefix('a ').split(' on ')[0]}\ndx {row['dx']:+g}", fontsize=7)
        axes[1][col].imshow(result.edited.permute(1, 2, 0).clamp(0, 1).numpy())
        axes[1][col].contour(result.target_map.numpy(), levels=[0.5], colors="yellow", linewidths=0.8)
        axes[1][col].set_title("moved " + ("–" if fraction is None else f"{fraction:.2f}"), fontsize=7)
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("unedited", fontsize=8)
    axes[1][0].set_ylabel("edited (yellow: target)", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
