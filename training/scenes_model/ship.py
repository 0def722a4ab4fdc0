"""Ship a trained run: its exported folder copied into the package (ldmprobe/weights/scenes), with a
model card (card.md for people, card.json for tests) giving the data, the exact command, the seed,
the wall time, the evaluation figures and the sha256 of every file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ldmprobe.atomic import atomic_path, write_json
from ldmprobe.jsonout import sanitize

CARD_FILES = ("card.md", "card.json", "README.md")  # the card and its pointers beside each weight file


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but the card itself, by relative path."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in CARD_FILES}


LONG_ROWS = 32  # a figure's per-item list ("rows", "*_rows") longer than this stays in its run folder


def compact_figures(figures: dict) -> dict:
    """The figures as the card keeps them: a figure's long per-item tables ("rows", e.g. the probe job's
    2410 layer × step × metric rows, which the bank's own metadata carries per probe; "model_rows", the
    evaluation's 64 captions) are replaced by their lengths, so the card stays readable; summaries are
    kept whole."""
    out = {}
    for name, value in figures.items():
        if isinstance(value, dict):
            long = [k for k, v in value.items() if (k == "rows" or k.endswith("_rows")) and isinstance(v, list)
                    and len(v) > LONG_ROWS]
            if long:
                value = {k: v for k, v in value.items() if k not in long} | {
                    f"{k}_omitted": f"{len(value[k])} rows: see the run folder (and, for probes, the bank's metadata)"
                    for k in long}
        out[name] = value
    return out


def ship(run: Path, to: Path, command: str, figures: dict, extra_files: dict[str, Path] | None = None) -> dict:
    job = json.loads((run / "job.json").read_text())
    tmp = to.with_name(to.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run / "model", tmp)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    for readme in to.rglob("README.md") if to.is_dir() else ():  # the hand-written summary and its pointers stay
        (tmp / readme.relative_to(to)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(readme, tmp / readme.relative_to(to))
    files = file_hashes(tmp)
    total = sum((tmp / f).stat().st_size for f in files)
    card = {"model": "scenes", "architecture": "Stable Diffusion v1.4's (UNet2DConditionModel, AutoencoderKL ×8 / 4 "
            "latent channels, CLIPTextModel), scaled down; see training/scenes_model/architecture.py",
            "data": "renders of training.scenes with MODEL_SCENES (one plain object of 8 colours × 3 kinds, anywhere in "
                    "the frame, on a plain floor of 5 colours that fades into the horizon colour with distance), "
                    f"{job['config']['scenes']} training scenes, 64 held-out "
                    "captions never rendered for training (training/scenes_model/data.py)",
            "command": command, "seed": job["config"]["seed"], "config": job["config"],
            "wall_s": job["wall_s"], "wall_min_total": round(sum(job["wall_s"].values()) / 60, 1),
            "world_size": job.get("world_size"), "device": job.get("device"), "torch": job.get("torch"),
            "final_loss": job.get("loss"), "scaling_factor": job.get("scaling_factor"),
            "figures": sanitize(compact_figures(figures)), "bytes_total": total, "sha256": files}
    write_json(tmp / "card.json", card)
    with atomic_path(tmp / "card.md") as p:
        p.write_text(render_card(card))
    shutil.rmtree(to, ignore_errors=True)
    tmp.rename(to)
    return card


def render_card(card: dict) -> str:
    lines = ["# The scenes model — model card", "",
             f"{card['architecture']}.", "",
             f"- **Data**: {card['data']}.",
             f"- **Command**: `{card['command']}`",
             f"- **Seed**: {card['seed']}; world size {card['world_size']} on {card['device']} (torch {card['torch']}).",
             f"- **Wall time**: {card['wall_min_total']} min in all — " +
             ", ".join(f"{k} {v / 60:.1f} min" for k, v in card["wall_s"].items()) + ".",
             f"- **Final training loss** (last 50 steps): {card['final_loss']}; VAE scaling factor "
             f"{card['scaling_factor']:.4f} (1 / std of the latents, as SD's 0.18215).",
             f"- **Size**: {card['bytes_total'] / 2**20:.2f} MiB in all.", "", "## Figures", "",
             "```json", json.dumps(card["figures"], indent=2), "```", "", "## Files (sha256)", ""]
    lines += [f"- `{name}` `{digest}`" for name, digest in card["sha256"].items()]
    return "\n".join(lines) + "\n"
