"""Pydantic request/response models shared by the CLI and the TorchServe handlers.

One definition of what is valid, so the CLI's exit-2 messages and the handlers' HTTP 400
bodies name the same field for the same mistake.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MAX_SEED = 2**63 - 1
MAX_SIDE = 2048
MAX_STEPS = 200
MAX_PROMPT_CHARS = 1000

SchedulerName = Literal["lms", "ddim", "pndm", "euler", "euler_a", "dpm", "ddpm"]


class GenerationSettings(BaseModel):
    """How to denoise: the study's settings by default (LMS, 15 steps, guidance 7.5)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(15, ge=1, le=MAX_STEPS)
    guidance: float = Field(7.5, ge=0.0, le=50.0)
    height: int | None = Field(None, ge=8, le=MAX_SIDE, description="pixels; model default when omitted")
    width: int | None = Field(None, ge=8, le=MAX_SIDE, description="pixels; model default when omitted")
    scheduler: SchedulerName = "lms"

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError("must be a multiple of 8")
        return v

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance runs the [uncond, cond] batch only when guidance > 1."""
        return self.guidance > 1.0


class GenerateRequest(GenerationSettings):
    """One generation with capture: what `ldmprobe generate` and the handlers accept."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    layers: list[str] | str | None = None
    half: Literal["cond", "both"] = "cond"


def first_error(exc: ValidationError) -> tuple[str, str]:
    """(field, message) of a pydantic error, for one-line CLI errors and 400 bodies."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err.get("loc", ())) or "request"
    return field, err.get("msg", str(exc))


# --- the probe endpoint (POST /predictions/probe) ------------------------------------------
MAX_SERVE_STEPS = 100
MAX_REQUEST_LAYERS = 16
MAX_REQUEST_PROPERTIES = 16
MapFormat = Literal["png", "array", "both"]


class ProbeRequest(GenerationSettings):
    """One probe-map request. Strict JSON types (no "5" for 5, no true for 1) so a client's type
    mistakes come back as 400s naming the field instead of being silently coerced.

    - layers: probe these layers for every requested property (default: per property, the
      bank's best layer by its stored test metrics).
    - properties: default all the bank's properties.
    - return_steps: step indices 0…steps-1 whose maps to return, "last" (default) or "all".
    - format: probe maps as PNG (viewing), float16 arrays (analysis) or both.
    - map_size: maps at the probed layer's resolution (default) or upsampled to the image's.
    - stream: one chunk per denoising step as it is computed (newline-delimited JSON).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    steps: int = Field(15, ge=1, le=MAX_SERVE_STEPS)
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    layers: list[str] | None = Field(None, min_length=1, max_length=MAX_REQUEST_LAYERS)
    properties: list[str] | None = Field(None, min_length=1, max_length=MAX_REQUEST_PROPERTIES)
    return_steps: list[int] | Literal["last", "all"] = "last"
    format: MapFormat = "png"
    map_size: Literal["layer", "image"] = "layer"
    stream: bool = False

    @field_validator("layers", "properties")
    @classmethod
    def _unique_names(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if any(not name for name in v):
                raise ValueError("names must be non-empty")
            if len(set(v)) != len(v):
                raise ValueError("names must not repeat")
        return v

    @field_validator("return_steps")
    @classmethod
    def _step_list(cls, v: list[int] | str, info: ValidationInfo) -> list[int] | str:
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one step index, or 'last' / 'all'")
            if any(s < 0 for s in v):
                raise ValueError("step indices must be >= 0")
            if len(set(v)) != len(v):
                raise ValueError("step indices must not repeat")
            steps = info.data.get("steps")  # absent when steps itself was invalid
            if steps is not None and max(v) >= steps:
                raise ValueError(f"step index {max(v)} is out of range for steps={steps} (0…{steps - 1})")
        return v

    def step_indices(self) -> list[int]:
        if self.return_steps == "last":
            return [self.steps - 1]
        if self.return_steps == "all":
            return list(range(self.steps))
        return sorted(self.return_steps)

    def shape_key(self) -> tuple:
        """Requests with equal keys can share one batched denoising loop."""
        return (self.steps, self.guidance, self.height, self.width, self.scheduler)


class ErrorBody(BaseModel):
    """The JSON body of every 4xx/5xx answer: a short code, the request field at fault
    (dotted path; "request" for the body as a whole, "" for server faults) and a readable message."""

    error: str
    field: str
    message: str


class ArrayPayload(BaseModel):
    """A probe map as raw numbers: base64 of the little-endian C-order bytes."""

    dtype: Literal["float16"] = "float16"
    shape: list[int]
    data: str


class PngScale(BaseModel):
    """How the PNG's grey levels map back to values: value = lo + grey / 255 · (hi - lo).
    mode "probability": a mask probe's probability, [0, 1]; "minmax": this map's own min/max."""

    mode: Literal["probability", "minmax"]
    lo: float
    hi: float


class ProbeMap(BaseModel):
    property: str
    layer: str
    kind: Literal["mask", "continuous"]
    probe: str  # "{property}/{layer}/{bank step}": the bank's tensor prefix of the probe used
    probe_step: int  # the bank step whose probe was applied (nearest timestep of the bank's schedule)
    probe_metrics: dict[str, float]
    shape: list[int]  # [H, W]
    stats: dict[str, float]
    png: str | None = None
    png_scale: PngScale | None = None
    array: ArrayPayload | None = None


class StepResult(BaseModel):
    step: int
    timestep: float
    summary: dict[str, float]  # e.g. foreground_fraction, depth_mean: one number per property
    maps: list[ProbeMap]


class ImagePayload(BaseModel):
    png: str
    height: int
    width: int


class ProbeResponse(BaseModel):
    image: ImagePayload
    layers: dict[str, list[str]]  # property → layers probed
    layer_choice: dict[str, str]  # property → "request" | "bank_best" | "default"
    steps: list[StepResult]
    metadata: dict[str, Any]

