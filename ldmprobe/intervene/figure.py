"""Pictures of an intervention: the four-panel figure (original, target, edited, achieved) and
the sweep GIF of the object sliding across a range of shifts. Written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..atomic import atomic_path
from .run import InterventionResult


def _rgb(image: torch.Tensor):
    return image.permute(1, 2, 0).clamp(0, 1).numpy()


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def plot_panel(result: InterventionResult, path: str | Path, title: str | None = None) -> Path:
    """Original image (its mask outlined), target map, edited image (target outlined), achieved
    map; the success numbers underneath."""
    from matplotlib.figure import Figure

    s = result.success
    prop = s["property"]
    fig = Figure(figsize=(12, 3.9), dpi=110, layout="constrained")
    axes = fig.subplots(1, 4)
    cmap = "gray" if prop == "foreground" else "magma"
    limits = {"vmin": 0, "vmax": 1} if prop == "foreground" else {}
    axes[0].imshow(_rgb(result.original))
    axes[1].imshow(result.target_map.numpy(), cmap=cmap, **limits)
    axes[2].imshow(_rgb(result.edited))
    axes[3].imshow(result.edited_map.numpy(), cmap=cmap, **limits)
    if prop == "foreground":
        axes[0].contour(result.original_map.numpy(), levels=[0.5], colors="cyan", linewidths=1)
        axes[2].contour(result.target_map.numpy(), levels=[0.5], colors="yellow", linewidths=1)
        axes[2].contour(result.edited_map.numpy(), levels=[0.5], colors="cyan", linewidths=1)
        names = ["original (cyan: its mask)", "target mask", "edited (yellow: target, cyan: achieved)",
                 "achieved mask"]
        line = (f"Dice to target: edited {_fmt(s.get('dice_to_target'))} vs unedited {_fmt(s.get('dice_baseline'))}"
                f"   shift requested {s.get('shift_requested_px')} px, achieved {s.get('shift_achieved_px')} px")
    else:
        names = ["original", "target depth", "edited", "achieved depth"]
        line = (f"RMSE to target: edited {_fmt(s.get('rmse_to_target'))} vs unedited {_fmt(s.get('rmse_baseline'))}"
                f"   Pearson: {_fmt(s.get('pearson_to_target'))} vs {_fmt(s.get('pearson_baseline'))}")
    rep = s.get("representation") or {}
    key = "dice" if prop == "foreground" else "rmse"
    line += (f"\nedited layers' probes at step {rep.get('step')}: {key} to target {_fmt(rep.get(f'{key}_to_target'))} "
             f"vs unedited {_fmt(rep.get(f'{key}_baseline'))}   pixel change outside the masks "
             f"{_fmt((s.get('pixel_change') or {}).get('outside'))}   latent change {_fmt(s.get('latent_change'))}")
    for ax, name in zip(axes, names, strict=True):
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    meta = result.metadata
    fig.suptitle(title or f"{meta.get('prompts', [''])[0]!r}, seed {meta.get('seeds', [''])[0]}: {prop} intervention "
                 f"on {len(result.layers)} layers × steps {result.edit_steps}", fontsize=10)
    fig.text(0.5, -0.02, line, ha="center", va="top", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def write_sweep_gif(frames: Sequence[torch.Tensor], labels: Sequence[str], path: str | Path,
                    ms_per_frame: int = 400) -> Path:
    """[3, H, W] images → an animated GIF, each frame captioned (e.g. "dx = -16")."""
    from PIL import Image, ImageDraw

    images = []
    for frame, label in zip(frames, labels, strict=True):
        arr = (frame.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        img = Image.fromarray(arr).convert("RGB")
        canvas = Image.new("RGB", (img.width, img.height + 14), "black")
        canvas.paste(img, (0, 14))
        ImageDraw.Draw(canvas).text((3, 1), label, fill="white")
        images.append(canvas.convert("P", palette=Image.Palette.ADAPTIVE))
    if not images:
        raise ValueError("no frames")
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    return Path(path)
