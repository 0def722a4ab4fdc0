"""The service contract, written once: parse → validate → group → run → answer.

A service (`probe.ProbeService`, `classify.ClassifyService`, `intervene.InterveneService`) takes
raw request bodies and gives back `Outcome(status, JSON body)`; it never raises and knows
nothing of TorchServe (that is handlers/ts_adapter.py). `Service.handle` is the one loop:

1. parse: bytes / text / already-decoded JSON → the service's pydantic `Request` model
   (`parse_body`; a malformed body is `invalid_json` on field `request` everywhere, a pydantic
   error names the same dotted field path everywhere);
2. validate: `check(request, index)` → a job, against the model, the bank and the limits
   (`RequestError` naming the field → that request's 400; a validator bug → its 500);
3. group: jobs with equal `group_key` share one run, at most the largest bucket each;
   stochastic schedulers (one noise generator per call) always run alone;
4. run: `run_group(group, batch)` → one result per job (a failure is a 500 for its group only);
5. answer: `answer(job, result, batch)` → the JSON body.

A service supplies its `Request` model, its `Config` (the pydantic model of its
model-config.yaml `handler:` section: every setting declared once, documented, with its
default), `check`, `group_key`, `run_group` and `answer`. Batch-size padding and the warm-up are
here too, and so are the helpers every answer uses (`png_b64`, `map_png`). `bucket`: with
`batch_invariant` (the default) every run is padded to the largest bucket, the requests in its
first rows (a kernel's float sums can change with the batch size, never with the other rows'
contents at a fixed size: the same request gives the same bytes whatever else is in flight);
without, to the next of 1, 2, 4, … (when compiled: a handful of graphs), cheaper for small batches.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..generate import Sampler
from ..models import SDModel
from ..probes import grey_map
from .schemas import MAX_SERVE_STEPS, ErrorBody, PngScale

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


def parse_body(raw: Any, schema: type[M], decoded: bool = False, context: dict[str, Any] | None = None) -> M:
    """A raw body (bytes or text; or, with decoded=True, a JSON value a front end already
    parsed) → a validated `schema` instance, or RequestError naming the field at fault.
    context: what a validator needs to know of the service (e.g. its classifier's classes)."""
    value = _json_value(raw, decoded)
    try:
        return schema.model_validate(value, context=context)
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


def map_png(values: torch.Tensor, kind: str) -> tuple[str, PngScale]:
    """A map [H, W] as a grey PNG (base64) and how its grey levels map back to values (masks:
    probabilities; continuous maps: their own min–max)."""
    grey, mode, lo, hi = grey_map(values, kind)
    return png_b64(grey), PngScale(mode=mode, lo=lo, hi=hi)


# --- settings ---------------------------------------------------------------------------------
PATH = {"path": True}  # a setting naming a file or folder: a handler resolves it inside its archive


def path_settings(config_model: type[BaseModel]) -> list[str]:
    """The settings that name a file or folder (marked `PATH` in the config model)."""
    return [name for name, f in config_model.model_fields.items() if (f.json_schema_extra or {}).get("path")]


def resolve(value: str, folder: str) -> str:
    """A path setting as a worker reads it: relative paths name files inside the archive's
    folder (or beside a model-config.yaml); `tiny`, `scenes`, `random`, hub ids and absolute
    paths pass through."""
    if not value or value in ("tiny", "scenes") or os.path.isabs(value):
        return value
    inside = os.path.join(folder, value)
    return inside if os.path.exists(inside) else value


class ServiceConfig(BaseModel):
    """The settings every service has: its model-config.yaml `handler:` section, validated
    (unknown keys refused: a misspelt setting must fail the worker's start, not be ignored)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field("scenes", json_schema_extra=PATH,
                       description='"scenes" (built in, trained), "tiny" (random weights), a diffusers SD folder (absolute, or relative to the archive), or a hub id')
    device: str = Field("auto", description="auto: the GPU TorchServe assigned to this worker, else the CPU")
    dtype: str = Field("auto", description="auto: float16 on CUDA, float32 on CPU; or float16, bfloat16, float32")
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="attention backend (xformers: CUDA only)")
    compile: bool = Field(True, description="torch.compile the U-Net (policy: ldmprobe.compiling)")
    cache_dir: str = Field("", description='inductor cache folder; "" = $TORCHINDUCTOR_CACHE_DIR')
    compile_cache: str = Field("", json_schema_extra=PATH,
                               description="portable torch.compile cache loaded before anything compiles (written by "
                                           "ldmprobe.serve.precompile, packed into the archive by build_archives.sh); "
                                           '"" = none: compile (or read the inductor cache) at warm-up')
    warm_batch_sizes: list[int] = Field([1], description="padded batch sizes compiled at start-up (≤ batchSize)")
    warm_settings: dict[str, Any] = Field({}, description="request fields of the warm-up request (e.g. height, width)")
    max_side: int = Field(0, ge=0, description="largest height/width served; 0 = twice the model's default size")
    max_steps: int = Field(50, ge=1, le=MAX_SERVE_STEPS, description="most denoising steps a request may ask for")
    batch_invariant: bool = Field(
        True, description="the same request gives the same bytes whatever else is in flight: every call runs at the "
                          "largest batch size (batchSize rows, requests in the first rows); false: pad only to the "
                          "next bucket (1, 2, 4, …), faster for a lone request, answers equal up to float rounding")


@dataclass
class Batch:
    """What a run and an answer know of the batch they are part of."""

    requests: int  # bodies in this call of `handle` (a TorchServe batch)
    validate_s: float  # seconds spent parsing and validating all of them
    on_step: Callable[[int, dict[str, Any]], None] | None = None  # streaming: (request index, chunk)


# --- the contract -----------------------------------------------------------------------------
class Service:
    """parse → validate → group → run → answer for one model; see the module docstring."""

    Config: ClassVar[type[ServiceConfig]] = ServiceConfig
    Request: ClassVar[type[BaseModel]]
    work: ClassVar[str] = "generation"  # what a failed group reports: "<work> failed: …"
    batches: ClassVar[bool] = True  # False: every request runs alone (groups of one)

    def __init__(self, model: SDModel, config: ServiceConfig | None = None, *, max_batch: int = 8,
                 pad_batches: bool | None = None, **settings: Any):
        """`config` and/or keyword settings (validated by `Config`); max_batch is TorchServe's
        batchSize; pad_batches defaults to padding when compiled."""
        started = time.perf_counter()
        base = config.model_dump() if config is not None else {}
        try:
            self.config = self.Config.model_validate(base | settings)
        except ValidationError as exc:
            field, message = error_field(exc)
            raise ValueError(f"{type(self).__name__} setting {field}: {message}") from None
        self.model = model
        self.compile_cache = self._load_compile_cache()
        self.sampler = Sampler(model, compile=self.config.compile, cache_dir=self.config.cache_dir or None)
        self.compiled = self.config.compile
        self.pad_batches = self.compiled if pad_batches is None else bool(pad_batches)
        self.buckets = buckets_for(max_batch if self.batches else 1)
        self.batch_invariant = self.config.batch_invariant
        self.max_side = int(self.config.max_side or 2 * model.default_size)
        self.max_steps = int(self.config.max_steps)
        self.setup()
        self.worker = worker_info(started) | {"compile_cache": self.compile_cache}

    def _load_compile_cache(self) -> dict[str, Any] | None:
        """Seed the compile caches from `compile_cache` (before the sampler compiles anything);
        what was loaded goes into metadata.worker. A named file that is missing is a start-up
        failure, not a silent cold compile."""
        path = self.config.compile_cache
        if not path or not self.config.compile:
            return None
        if not os.path.isfile(path):
            raise ValueError(f"{type(self).__name__} setting compile_cache: no such file {path}")
        from ..compiling import load_cache_artifacts, use_cache_dir

        use_cache_dir(self.config.cache_dir or None)
        started = time.perf_counter()
        info = load_cache_artifacts(path)
        return {"file": os.path.basename(path), **info, "load_s": round(time.perf_counter() - started, 3)}

    def setup(self) -> None:
        """Service-specific state built once (runners, bank metadata): after the sampler."""

    # --- the parts a service supplies ---------------------------------------------------------
    def check(self, request: Any, index: int = 0) -> Any:
        """A schema-valid request against this service → a job (with .index and .request), or
        RequestError naming the field."""
        raise NotImplementedError

    def group_key(self, job: Any) -> Hashable:
        """Jobs with equal keys share one `run_group` (default: every job alone)."""
        return ("job", job.index)

    def run_group(self, group: list[Any], batch: Batch) -> list[Any]:
        """One run for a group → one result per job, in order."""
        raise NotImplementedError

    def answer(self, job: Any, result: Any, batch: Batch) -> dict[str, Any]:
        """A job's result → its JSON body."""
        raise NotImplementedError

    # --- the loop -----------------------------------------------------------------------------
    def parse(self, raw: Any, decoded: bool = False, index: int = 0) -> Any:
        """A raw body → a validated job, or RequestError naming the field."""
        return self.check(parse_body(raw, self.Request, decoded, self.validation_context()), index)

    def validation_context(self) -> dict[str, Any] | None:
        """Passed to the request model's validators (pydantic's validation context); none by default."""
        return None

    def handle(self, bodies: Sequence[Any], decoded: Sequence[bool] | None = None,
               on_step: Callable[[int, dict[str, Any]], None] | None = None) -> list[Outcome]:
        """Answer a batch of raw bodies (decoded[i]: body i is an already-parsed JSON value).
        on_step(i, chunk) receives the chunks of a request that streams. Never raises: bad input
        is a 400 for that request only, an internal failure a 500 for the requests of its group."""
        started = time.perf_counter()
        outcomes: list[Outcome | None] = [None] * len(bodies)
        jobs = []
        for i, raw in enumerate(bodies):
            try:
                jobs.append(self.parse(raw, decoded=bool(decoded and decoded[i]), index=i))
            except RequestError as exc:
                outcomes[i] = Outcome(exc.status, exc.body())
            except Exception as exc:  # a validator bug must not take the batch down
                outcomes[i] = internal_error(f"{type(exc).__name__}: {exc}")
        batch = Batch(len(bodies), time.perf_counter() - started, on_step)
        for group in self.groups(jobs):
            try:
                results = self.run_group(group, batch)
                answers = [self.answer(job, result, batch) for job, result in zip(group, results, strict=True)]
            except Exception as exc:
                for job in group:
                    outcomes[job.index] = internal_error(f"{self.failed(group)} failed: {type(exc).__name__}: {exc}")
                continue
            for job, body in zip(group, answers, strict=True):
                outcomes[job.index] = Outcome(200, body)
        return [o if o is not None else internal_error("no answer") for o in outcomes]

    def failed(self, group: list[Any]) -> str:
        """What a failure of this group was (the 500's message starts with it)."""
        return self.work

    def groups(self, jobs: Sequence[Any]) -> list[list[Any]]:
        """Jobs that share one run, at most the largest bucket each."""
        by_key: dict[Hashable, list[Any]] = {}
        for job in jobs:
            key = self.group_key(job) if self.batches else ("job", job.index)
            if getattr(job.request, "scheduler", None) in STOCHASTIC_SCHEDULERS:
                key = (key, job.index)
            by_key.setdefault(key, []).append(job)
        limit = self.buckets[-1]
        return [members[i:i + limit] for members in by_key.values() for i in range(0, len(members), limit)]

    def bucket(self, rows: int) -> int:
        """The batch size a run of `rows` rows runs at: always the largest bucket when
        batch-invariant (float sums never change with the company), else the next bucket when
        padding."""
        if self.batch_invariant:
            return self.buckets[-1]
        return bucket(rows, self.buckets, self.pad_batches)

    # --- start-up -----------------------------------------------------------------------------
    def warm_request(self) -> dict[str, Any]:
        """The body of the warm-up request (before the `warm_settings`)."""
        return {"prompt": "warm-up", "steps": 2}

    def warm(self, batch_sizes: Sequence[int] | None = None, settings: Mapping[str, Any] | None = None) -> float:
        """Compile (or load from the inductor cache) the graphs of these batch sizes (default:
        the config's `warm_batch_sizes`, those a batch can reach) with one short request each,
        so the first real request does not pay for it. A refusal is a start-up failure."""
        sizes = batch_sizes if batch_sizes is not None else self.config.warm_batch_sizes
        sizes = [s for s in sizes if s <= self.buckets[-1]] or [1]
        if self.batch_invariant:  # every call runs at the largest bucket: one graph to warm
            sizes = [1]
        body = self.warm_request() | dict(self.config.warm_settings if settings is None else settings)
        return warm_up(self, sizes, body)
