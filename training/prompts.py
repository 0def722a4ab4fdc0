"""Prompt sets for the batch jobs: the study's CSV (prompts, seeds), any CSV with those
columns, or a text file of prompts with a base seed. Errors name the file and line."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from ldmprobe.schemas import MAX_PROMPT_CHARS, MAX_SEED

ROOT = Path(__file__).resolve().parents[1]
STUDY_DIR = Path(os.environ.get("LDMPROBE_STUDY_DATA", ROOT.parent / "shared" / "data" / "beyond_surface_statistics"))


class PromptFileError(ValueError):
    """A prompt file that cannot be read as a prompt set; the message names file and line."""


@dataclass(frozen=True)
class PromptItem:
    id: str  # stable identifier: the study's prompt_inds, else the row/line number
    prompt: str
    seed: int


def study_split(split: str) -> Path:
    """The reference study's train (246) or test (371) split CSV."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return STUDY_DIR / f"{split}_split_prompts_seeds.csv"


def _item(path: Path, line: int, ident: str, prompt: str, seed_text: str) -> PromptItem:
    prompt = (prompt or "").strip()
    if not prompt:
        raise PromptFileError(f"{path}:{line}: empty prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptFileError(f"{path}:{line}: prompt longer than {MAX_PROMPT_CHARS} characters")
    try:
        seed = int(str(seed_text).strip())
    except ValueError:
        raise PromptFileError(f"{path}:{line}: seed {seed_text!r} is not an integer") from None
    if not 0 <= seed <= MAX_SEED:
        raise PromptFileError(f"{path}:{line}: seed {seed} out of range 0..{MAX_SEED}")
    return PromptItem(ident, prompt, seed)


def load_prompts(path: str | Path, base_seed: int = 0, limit: int | None = None,
                 encoding: str = "utf-8") -> list[PromptItem]:
    """Read a CSV (columns prompts, seeds, optional prompt_inds) or a text file (one prompt per
    line, `#` comments and blank lines skipped, seed = base_seed + prompt number).

    `encoding`: UTF-8 by default. The study read its CSVs as ISO-8859-1 (pandas, encoding=
    "ISO-8859-1"), which turns 39 of its 617 UTF-8 prompts into mojibake ("Choice®" →
    "ChoiceÂ®"); the study protocol reads them the same way so the text encoder sees what the
    study's saw."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found")
    items: list[PromptItem] = []
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding=encoding) as f:
                reader = csv.DictReader(f)
                missing = {"prompts", "seeds"} - set(reader.fieldnames or [])
                if missing:
                    raise PromptFileError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                                          f"(found {', '.join(reader.fieldnames or []) or 'none'})")
                for i, row in enumerate(reader):
                    ident = (row.get("prompt_inds") or "").strip() or str(i)
                    items.append(_item(path, i + 2, ident, row["prompts"], row["seeds"]))
        else:
            n = 0
            for line_no, line in enumerate(path.read_text(encoding=encoding).splitlines(), start=1):
                if line.strip() and not line.lstrip().startswith("#"):
                    items.append(_item(path, line_no, str(n), line, str(base_seed + n)))
                    n += 1
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not {encoding.upper()} text ({exc.reason})") from None
    except LookupError:
        raise PromptFileError(f"{path}: unknown text encoding {encoding!r}") from None
    if not items:
        raise PromptFileError(f"{path}: no prompts")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PromptFileError(f"{path}: duplicate prompt id {dup!r}")
    return items[:limit] if limit else items


SPLITS_DIR = Path(__file__).resolve().parent / "splits"


def named_split(name: str, split: str, encoding: str = "utf-8") -> list[PromptItem]:
    """A split of the study's 617 prompts other than its own 246/371, by prompt id, in the order
    the split file lists them (`training/splits/<name>.json`, e.g. the capstone's 500/117 split
    for shading: `capstone-shading`)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    file = SPLITS_DIR / f"{name.replace('-', '_')}.json"
    if not file.is_file():
        raise PromptFileError(f"{file}: no split named {name!r}")
    import json

    wanted = json.loads(file.read_text())[split]
    pool = {it.id: it for part in ("train", "test") for it in load_prompts(study_split(part), encoding=encoding)}
    missing = [i for i in wanted if i not in pool]
    if missing:
        raise PromptFileError(f"{file}: prompt id(s) {', '.join(missing[:5])} are not in the study's CSVs")
    return [pool[i] for i in wanted]
