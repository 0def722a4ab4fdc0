"""Every request and response model of the three endpoints (probe, classify, intervene), and the
error body they share.

The request models extend the library's `GenerationSettings` with strict JSON types (no "5"
for 5, no true for 1), so a client's type mistakes come back as 400s naming the field; the CLI
validates its arguments with the same models, so both refuse the same mistakes with the same
field name. Limits that need the model, the bank or a service setting (layer names, bank
steps, the work bound, the size limits) are checked by the services.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..classify import MAX_TOP_K, ClassifyResponse, ClassSet, ImageNetClass
from ..intervene import DEFAULT_ITERATIONS, DEFAULT_LR, DEFAULT_ORDER, InterventionSpec
from ..schemas import MAX_PROMPT_CHARS, MAX_SEED, GenerationSettings

# --- shared ---------------------------------------------------------------------------------
MAX_SERVE_STEPS = 100


class ErrorBody(BaseModel):
    """The JSON body of every 4xx/5xx answer: a short code, the request field at fault
    (dotted path; "request" for the body as a whole, "" for server faults) and a readable message."""

    error: str
    field: str
    message: str


class ImagePayload(BaseModel):
    png: str
    height: int
    width: int


class PngScale(BaseModel):
    """How the PNG's grey levels map back to values: value = lo + grey / 255 · (hi - lo).
    mode "probability": a mask probe's probability, [0, 1]; "minmax": this map's own min/max."""

    mode: Literal["probability", "minmax"]
    lo: float
    hi: float


# --- the probe endpoint (POST /predictions/probe) ------------------------------------------
MAX_REQUEST_LAYERS = 16
MAX_REQUEST_PROPERTIES = 16
MapFormat = Literal["png", "array", "both"]
Protocol = Literal["ldmprobe", "study"]
PROTOCOL_DESCRIPTION = ("whose behaviours the request takes: 'study' reproduces the study's code where this "
                        "endpoint differs (recorded in the answer's metadata)")


class ProbeRequest(GenerationSettings):
    """One probe-map request. Strict JSON types (no "5" for 5, no true for 1) so a client's type
    mistakes come back as 400s naming the field instead of being silently coerced.

    - layers: probe these layers for every requested property (default: per property, the
      bank's best layer by its stored test metrics).
    - properties: default all the bank's properties.
    - return_steps: step indices 0…steps-1 whose maps to return, "last" (default) or "all".
    - format: probe maps as PNG (viewing), float16 arrays (analysis) or both.
    - map_size: maps at the probed layer's resolution (default) or upsampled to the image's, as
      the bank's protocol scored them (`bank.upsample`: bilinear, or nearest for study banks).
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
    protocol: Protocol = Field("ldmprobe", description=PROTOCOL_DESCRIPTION + "; study: a request whose timesteps "
                               "differ from the bank's is refused instead of mapped to the nearest")

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


class ArrayPayload(BaseModel):
    """A probe map as raw numbers: base64 of the little-endian C-order bytes."""

    dtype: Literal["float16"] = "float16"
    shape: list[int]
    data: str


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


class ProbeResponse(BaseModel):
    image: ImagePayload
    layers: dict[str, list[str]]  # property → layers probed
    layer_choice: dict[str, str]  # property → "request" | "bank_best" | "default"
    steps: list[StepResult]
    metadata: dict[str, Any]


# --- the classify endpoint (POST /predictions/classify) ---------------------------------------
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096
DecoderKind = Literal["vae", "tiny"]
DecodeWhat = Literal["latent", "x0"]


def decode_image(data: str) -> Any:
    """A base64 PNG/JPEG/… → RGB PIL image, bounded in bytes and pixels."""
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise ValueError(f"image is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image has more than {MAX_IMAGE_PIXELS} pixels")
        return img.convert("RGB")
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__})") from None


class ClassifyRequest(GenerationSettings):
    """Classify every step of one generation (prompt, seed, settings) or one real image
    (`image`: base64), with the probe endpoint's strictness (no type coercion, unknown fields
    refused). `target_class` is resolved at validation, so an unknown name fails here."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    image: str | None = Field(None, min_length=1, max_length=MAX_IMAGE_BYTES * 4 // 3 + 4)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    steps: int = Field(15, ge=1, le=MAX_SERVE_STEPS)
    decoder: DecoderKind = "vae"
    decode: DecodeWhat = "latent"
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)
    target_class: int | str | None = None
    previews: bool = False
    protocol: Protocol = Field("ldmprobe", description=PROTOCOL_DESCRIPTION)

    @field_validator("target_class")
    @classmethod
    def _known_class(cls, v: int | str | None, info: ValidationInfo) -> int | str | None:
        """Among the serving classifier's classes (validation context "classes"; ImageNet-1k without one)."""
        if v is not None:
            classes = (info.context or {}).get("classes") or ClassSet.imagenet()
            classes.resolve(v)  # UnknownClassError is a ValueError: pydantic reports it on this field
        return v

    @field_validator("image")
    @classmethod
    def _readable_image(cls, v: str | None) -> str | None:
        if v is not None:
            decode_image(v)
        return v

    @model_validator(mode="after")
    def _prompt_or_image(self) -> ClassifyRequest:
        if (self.prompt is None) == (self.image is None):
            raise ValueError("give either a prompt (classify a generation) or an image (classify a real image)")
        return self

    def target(self, classes: ClassSet | None = None) -> ImageNetClass | None:
        return None if self.target_class is None else (classes or ClassSet.imagenet()).resolve(self.target_class)


class ClassifyPreview(ImagePayload):
    """The decoded image of one denoising step: what the classifier saw at that step."""

    step: int


class ClassifyAnswer(ClassifyResponse):
    """The endpoint's answer: the library's ClassifyResponse plus the images. `image` is the
    final generated image (null for a real image); `previews` the per-step decoded images when
    the request asked for them."""

    image: ImagePayload | None = None
    previews: list[ClassifyPreview] | None = None


# --- the intervene endpoint (POST /predictions/intervene) -------------------------------------
MAX_ITERATIONS = 1024
MAX_MASK_BYTES = 8 * 2**20
MAX_SHIFT = 4096.0


def decode_mask(data: str) -> torch.Tensor:
    """Base64 PNG (any mode: grey, RGB(A) → luminance) → [H, W] float32 in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None
    if len(raw) > MAX_MASK_BYTES:
        raise ValueError(f"is larger than {MAX_MASK_BYTES // 2**20} MiB")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "PNG":
                raise ValueError(f"must be a PNG image, got {img.format}")
            if img.width * img.height > 4096 * 4096:
                raise ValueError("is too large (at most 4096×4096 pixels)")
            grey = img.convert("L")
            grey.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ValueError("is not a readable PNG image") from None
    import numpy as np

    return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)


class InterveneRequest(GenerationSettings):
    """Move the foreground (or reshape depth) of one generation by editing activations through
    the probes. Shift by dx, dy pixels (right, down), or give `affine` (2×3 in pixels, source →
    destination), or a `target_mask` (PNG, the image's size; foreground only)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    steps: int = Field(15, ge=1, le=MAX_SERVE_STEPS)
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    property: Literal["foreground", "depth"] = "foreground"
    dx: float = Field(0.0, ge=-MAX_SHIFT, le=MAX_SHIFT)
    dy: float = Field(0.0, ge=-MAX_SHIFT, le=MAX_SHIFT)
    affine: list[list[float]] | None = None
    target_mask: str | None = Field(None, min_length=1, max_length=MAX_MASK_BYTES * 4 // 3 + 4)
    layers: list[str] | str | None = None
    edit_steps: list[int] | None = Field(None, min_length=1, max_length=200)
    lr: float = Field(DEFAULT_LR, gt=0.0, le=1.0)
    iterations: int = Field(DEFAULT_ITERATIONS, ge=0, le=MAX_ITERATIONS)
    loss: Literal["auto", "bce", "mse", "huber"] = "auto"
    eval_layer: str | None = None
    order: Literal["sequential", "joint"] = Field(DEFAULT_ORDER, description=(
        "sequential (the study's): at each edited step the layers are edited in forward order, each on an "
        "activation that already carries the edits before it; joint: all at once on the unedited forward (faster)"))
    protocol: Protocol = Field("ldmprobe", description=PROTOCOL_DESCRIPTION + "; study: depth targets min-max "
                               "scaled to [-9, 9], timesteps that differ from the bank's refused")
    depth_target: Literal["warp", "minmax"] | None = Field(None, description=(
        "depth only: the warped map as it is (warp) or min-max scaled to [-9, 9] in the probe's normalised units "
        "(minmax, the study's); default: minmax under protocol study, else warp"))
    metric: Literal["euclidean", "activation"] | None = Field(None, description=(
        "how each activation moves to the probe outputs the optimiser decides: euclidean (Adam's own path along the "
        "probe's read-out, the study's) or activation (the smallest move in the activations' covariance metric: "
        "toward what the image's own object tokens look like); default: euclidean under protocol study, "
        "else activation"))

    @field_validator("affine")
    @classmethod
    def _two_by_three(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        if v is not None:
            if len(v) != 2 or any(len(row) != 3 for row in v):
                raise ValueError("must be a 2×3 matrix [[a, b, tx], [c, d, ty]] in pixels")
            if any(abs(x) > 1e6 or x != x for row in v for x in row):
                raise ValueError("entries must be finite numbers of at most 1e6")
        return v

    @field_validator("target_mask")
    @classmethod
    def _readable_mask(cls, v: str | None) -> str | None:
        if v is not None:
            decode_mask(v)
        return v

    @field_validator("edit_steps")
    @classmethod
    def _distinct_steps(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(s < 0 for s in v):
            raise ValueError("steps are 0-based indices (>= 0)")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> InterveneRequest:
        given = [name for name, on in (("affine", self.affine is not None), ("target_mask", self.target_mask is not None))
                 if on]
        if len(given) > 1:
            raise ValueError("give at most one of affine and target_mask (dx/dy are ignored with either)")
        if given and (self.dx or self.dy):
            raise ValueError(f"dx/dy and {given[0]} both given: choose one way to say where the object goes")
        if self.target_mask is not None and self.property != "foreground":
            raise ValueError("target_mask is for the foreground property only")
        return self

    def spec(self) -> InterventionSpec:
        mask = decode_mask(self.target_mask) if self.target_mask is not None else None
        return InterventionSpec(property=self.property, dx=self.dx, dy=self.dy, affine=self.affine, target_mask=mask,
                                layers=self.layers, edit_steps=self.edit_steps, lr=self.lr, iterations=self.iterations,
                                loss=self.loss, eval_layer=self.eval_layer, order=self.order,
                                protocol=self.protocol, depth_target=self.depth_target, metric=self.metric)


class MaskImage(ImagePayload):
    """A map as a grey PNG; png_scale says how grey levels map back to values."""

    png_scale: PngScale


class InterveneResponse(BaseModel):
    """original / edited images, original / target / achieved masks, the success numbers (see
    `ldmprobe.intervene.measure`), per-step losses, timings and metadata."""

    images: dict[str, ImagePayload]
    masks: dict[str, MaskImage]
    success: dict[str, Any]
    layers: list[str]
    edit_steps: list[int]
    losses: dict[str, dict[str, dict[str, float]]]
    metadata: dict[str, Any]
