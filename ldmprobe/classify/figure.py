"""The study's "Image Classification in the Reverse Diffusion Process" figure."""

from __future__ import annotations

from pathlib import Path

from .runner import Classification


def curve_classes(result: Classification, count: int = 5) -> list[int]:
    """Classes worth a curve: the target, then the highest peak probabilities across steps."""
    order = result.probabilities.max(0).values.argsort(descending=True).tolist()
    first = [result.target.index] if result.target is not None else []
    return (first + [c for c in order if c not in first])[:count]


def plot_classification(result: Classification, path: str | Path, title: str | None = None,
                        count: int = 5, max_previews: int = 16) -> Path:
    """The study's "Image Classification in the Reverse Diffusion Process" figure: confidence
    curves of the top classes across steps, the decoded image of each step under its x position."""
    from matplotlib.figure import Figure

    from ..atomic import atomic_path

    probs = result.probabilities
    steps = probs.shape[0]
    classes = result.classes
    width = max(8.0, 0.8 * min(steps, max_previews) + 2.5)
    cell = (width - 2.5) / steps
    has_previews = result.previews is not None
    fig = Figure(figsize=(width, 4.2 + (cell + 0.4 if has_previews else 0)), dpi=110, layout="constrained")
    grid = fig.add_gridspec(2 if has_previews else 1, 1, height_ratios=[4.2, cell + 0.4] if has_previews else [1])
    ax = fig.add_subplot(grid[0])
    x = list(range(steps))
    for c in curve_classes(result, count):
        is_target = result.target is not None and c == result.target.index
        ax.plot(x, probs[:, c].tolist(), marker="o", ms=3, lw=2.6 if is_target else 1.4,
                label=f"{classes[c].name} ({c})" + (" — target" if is_target else ""))
    peak = float(probs.max())
    if peak > 0.3:
        ax.set_ylim(0, 1.02)
        ax.axhline(result.threshold, ls="--", c="grey", lw=1)
        ax.text(0, result.threshold + 0.01, f"{result.threshold:.0%}", color="grey", va="bottom", fontsize=8)
    else:  # a random-init classifier never gets near 90 %: zoom in on the plotted curves
        low = float(probs[:, curve_classes(result, count)].min())
        ax.set_ylim(low - 0.1 * (peak - low) - 1e-9, peak + 0.15 * (peak - low) + 1e-9)
    stats = result.statistics()
    if stats["first_confident_step"] is not None:
        ax.axvline(stats["first_confident_step"], c="grey", lw=0.8, ls=":")
    ax.set_xlim(-0.5, steps - 0.5)
    ax.set_ylabel("classifier probability")
    ax.legend(fontsize=8, loc="upper left")
    meta = result.metadata
    what = meta.get("prompt", "image")
    ax.set_title(title or f"{str(what).title()} Image Classification in the Reverse Diffusion Process", fontsize=11)
    notes = [f"decoder: {meta.get('decoder', {}).get('kind', '?')}, decoded: {meta.get('decode', '?')}"]
    if meta.get("classifier", {}).get("random_weights") or meta.get("decoder", {}).get("random_weights"):
        notes.append("RANDOM WEIGHTS: not a result")
    ax.text(1.0, -0.02, "; ".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=7, color="dimgrey")
    if has_previews:
        strip = fig.add_subplot(grid[1], sharex=ax)
        shown = x if steps <= max_previews else sorted({round(i * (steps - 1) / (max_previews - 1))
                                                       for i in range(max_previews)})
        for s in shown:
            img = result.previews[s].permute(1, 2, 0).clamp(0, 1).numpy()
            strip.imshow(img, extent=(s - 0.45, s + 0.45, 0, 1), aspect="auto", interpolation="antialiased")
        strip.set_ylim(0, 1)
        strip.set_yticks([])
        strip.set_xticks(x)
        strip.set_xlabel("denoising step")
        ax.tick_params(labelbottom=False)
    else:
        ax.set_xlabel("denoising step")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
