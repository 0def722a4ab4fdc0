"""Strict JSON for what programs print: NaN and ±inf become null, so any JSON parser reads it.

Python's json module writes NaN / Infinity by default, which is not JSON. Every job and bench
prints its result line through `print_line`; tests read lines back with `loads_strict`.
"""

from __future__ import annotations

import json
import math
import sys
from typing import IO, Any


def sanitize(obj: Any) -> Any:
    """A copy of `obj` with non-finite floats as None, tuples as lists and 0-d numpy / torch
    scalars as Python numbers; everything else is returned as is."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if getattr(obj, "ndim", None) == 0 and callable(getattr(obj, "item", None)):
        return sanitize(obj.item())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps of the sanitised object; raises ValueError if anything non-finite is left."""
    return json.dumps(sanitize(obj), allow_nan=False, **kwargs)


def print_line(obj: Any, file: IO[str] | None = None) -> None:
    """Print `obj` as ONE strict JSON line and flush (stdout by default)."""
    out = file or sys.stdout
    out.write(dumps(obj) + "\n")
    out.flush()


def _reject(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name}")


def loads_strict(text: str) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity."""
    return json.loads(text, parse_constant=_reject)
