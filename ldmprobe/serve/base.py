"""What every HTTP-facing service of the library shares: refusals, outcomes, body parsing.

The services (`service.ProbeService`, `classify_service.ClassifyService`, …) take raw request
bodies and give back `Outcome(status, JSON body)`; they never raise. This module holds the parts
that do not depend on the endpoint, so that each service gets the same answers for the same
mistakes (a malformed body is `invalid_json` on field `request` everywhere, a pydantic error
names the same dotted field path everywhere) and a new endpoint does not copy them:

- `RequestError` / `Outcome` / `internal_error`: the 4xx/5xx contract (`ErrorBody`).
- `parse_body`: bytes / text / already-decoded JSON → a validated pydantic model, or
  RequestError naming the field.
- `buckets_for` and `make_sampler`: padded batch sizes and the (optionally compiled) sampler,
  so every service compiles a handful of graphs and keeps them.
- `png_b64`: images into the base64 PNGs the JSON answers carry.

Nothing here knows TorchServe (that is handlers/ts_adapter.py).
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .schemas import ErrorBody

M = TypeVar("M", bound=BaseModel)
# Schedulers that draw step noise from one generator per generate call: a batched request would
# not get its unbatched result, so the services run their requests alone.
STOCHASTIC_SCHEDULERS = frozenset({"euler_a", "ddpm"})


class RequestError(Exception):
    """A request the service refuses: becomes an HTTP 4xx with an ErrorBody."""

    def __init__(self, error: str, field: str, message: str, status: int = 400):
        super().__init__(message)
        self.error, self.field, self.message, self.status = error, field, message, status

    def body(self) -> dict[str, Any]:
        return ErrorBody(error=self.error, field=self.field, message=self.message).model_dump()


@dataclass
class Outcome:
    """What to answer for one request: HTTP status and JSON-ready body."""

    status: int
    body: dict[str, Any]


def internal_error(message: str) -> Outcome:
    """A 500 for a server fault (field "": nothing the client sent is to blame)."""
    return Outcome(500, RequestError("internal", "", message, 500).body())


def _json_value(raw: Any, decoded: bool) -> Any:
    """bytes / text → the JSON value; an already-decoded value passes (but a decoded string
    means the client sent a JSON string, not an object)."""
    if decoded and isinstance(raw, str):
        raise RequestError("invalid_request", "request", "the body must be a JSON object, got a string")
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError("invalid_json", "request", f"the body is not UTF-8 text: {exc}") from exc
    if isinstance(raw, str):
        if not raw.strip():
            raise RequestError("invalid_json", "request", "empty body: send a JSON object")
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise RequestError("invalid_json", "request", f"malformed JSON: {exc}") from exc
    if raw is None:
        raise RequestError("invalid_json", "request",
                           "no JSON body: send a JSON object with Content-Type: application/json")
    if not isinstance(raw, dict):
        kind = {"list": "an array", "str": "a string", "bool": "a boolean"}.get(type(raw).__name__, "a number")
        raise RequestError("invalid_request", "request", f"the body must be a JSON object, got {kind}")
    return raw


def error_field(exc: ValidationError) -> tuple[str, str]:
    """(field, message) of a pydantic error for a 400 body: the field and list indices, without
    pydantic's union-member tags ("list[int]", "str"); "request" for model-level errors."""
    err = exc.errors()[0]
    loc = err.get("loc") or ("request",)
    where = ".".join([str(loc[0])] + [str(p) for p in loc[1:] if isinstance(p, int)])
    return where, err.get("msg", str(exc))


def parse_body(raw: Any, schema: type[M], decoded: bool = False) -> M:
    """A raw body (bytes or text; or, with decoded=True, a JSON value a front end already
    parsed) → a validated `schema` instance, or RequestError naming the field at fault."""
    value = _json_value(raw, decoded)
    try:
        return schema.model_validate(value)
    except ValidationError as exc:
        where, message = error_field(exc)
        raise RequestError("invalid_request", where, message) from exc


def check_generation(req, model, max_steps: int, max_side: int) -> tuple[int, int]:
    """A request's steps and image size against a service's limits → (height, width) in pixels
    (the model's default size where the request gives none), or RequestError naming the field."""
    if req.steps > max_steps:
        raise RequestError("invalid_request", "steps", f"at most {max_steps} steps are served, got {req.steps}")
    factor = model.vae_scale_factor
    sizes = []
    for name in ("height", "width"):
        side = getattr(req, name)
        if side is not None and (side > max_side or side % factor or side < factor):
            raise RequestError("invalid_request", name, f"must be a multiple of {factor} between {factor} and "
                               f"{max_side} for this model, got {side}")
        sizes.append(side or model.default_size)
    return sizes[0], sizes[1]


def warm_up(service, batch_sizes, body: dict[str, Any]) -> float:
    """Answer `body` once per batch size (so compiled graphs exist before the first real
    request); a refusal is a start-up failure. Records and returns the seconds it took."""
    started = time.perf_counter()
    for size in batch_sizes:
        bad = [o for o in service.handle([body] * size) if o.status != 200]
        if bad:
            raise RuntimeError(f"warm-up request failed: {bad[0].body}")
    service.worker["warm_s"] = round(time.perf_counter() - started, 3)
    return service.worker["warm_s"]


def buckets_for(max_batch: int) -> tuple[int, ...]:
    """Padded batch sizes: powers of two below max_batch, and max_batch itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max(1, max_batch))


def bucket(rows: int, buckets: tuple[int, ...], pad: bool) -> int:
    """The batch size a call of `rows` rows runs at: the next bucket when padding."""
    return next((b for b in buckets if b >= rows), rows) if pad else rows


def make_sampler(model, compile: bool = False, cache_dir: str | Path | None = None):
    """The model's Sampler. Compiled, dynamo may keep one graph per (bucket, image size,
    guidance on/off): keep them all compiled rather than falling back to eager after its
    default limit of 8."""
    from .generate import Sampler

    if compile:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return Sampler(model, compile=compile, cache_dir=cache_dir)


def worker_info(started: float) -> dict[str, Any]:
    """The metadata.worker block: which process answered, how long it took to set up."""
    return {"pid": os.getpid(), "setup_s": round(time.perf_counter() - started, 3), "warm_s": None}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_b64(image: Any) -> str:
    """A PIL image or a uint8 [H, W] / [H, W, 3] numpy array → base64 PNG."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return b64(buf.getvalue())
