"""When does an ImageNet classifier recognise the prompted object? Per-step decoding + VGG-16.

The study decoded every intermediate latent of a generation with the VAE, classified it with
VGG-16 and plotted the confidence per step. Here every step of a generation (the current latent,
as the study did, or the scheduler's predicted x0) goes through a decoder (the full VAE, or
diffusers' AutoencoderTiny with TAESD weights for cheap previews) and the classifier in chunked
batches, never one image at a time. Real images go through the same preprocessing and classifier,
for the study's generated-vs-real comparison.

Weights never appear silently: the classifier and the tiny decoder load from a local path or a
hub id, and random initialisation happens only when the source is the word ``random`` (tests and
benchmarks), which the outputs' metadata then says.

Entry points: `load_vgg16`, `make_decoder`, `StepClassifier` (`classify_generation`,
`classify_image`), `imagenet_class` for target lookup, `Classification` (tensors) and its
`response()` (the pydantic `ClassifyResponse` a CLI or HTTP handler serialises), `ClassifyRequest`.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .schemas import MAX_PROMPT_CHARS, MAX_SEED, MAX_SERVE_STEPS, GenerationSettings

VGG_ARCH = "vgg16.tv_in1k"
DEFAULT_CLASSIFIER = "timm/vgg16.tv_in1k"  # timm's copy of torchvision's IMAGENET1K_V1 weights
DEFAULT_TINY_DECODER = "madebyollin/taesd"  # TAESD for SD v1/v2 latents
RANDOM = "random"
CONFIDENCE = 0.9  # the study's "recognised" level: the target's probability passes 90 %
MAX_TOP_K = 100
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096

DecoderKind = Literal["vae", "tiny"]
DecodeWhat = Literal["latent", "x0"]


class ClassifyError(ValueError):
    """Bad input to classification (CLI: one line, exit 2; HTTP: 400)."""


class UnknownClassError(ClassifyError):
    """A target class that names no ImageNet class, or several; the message lists close matches."""


class WeightsSourceError(ClassifyError):
    """A classifier / decoder weight source that is missing, unreadable or the wrong model."""


# --- ImageNet classes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageNetClass:
    index: int
    wnid: str
    names: tuple[str, ...]  # the synonyms of timm's description, first = the usual name

    @property
    def name(self) -> str:
        return self.names[0]

    def info(self) -> ClassInfo:
        return ClassInfo(index=self.index, wnid=self.wnid, name=self.name)


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1000 ImageNet-1k classes in classifier output order (timm's offline tables)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(ImageNetClass(i, info.index_to_label_name(i),
                               tuple(s.strip() for s in info.index_to_description(i).split(", ")))
                 for i in range(info.num_classes()))


@lru_cache(maxsize=1)
def _name_index() -> tuple[dict[str, list[int]], dict[str, int]]:
    """Lower-cased synonym → class indices (a few synonyms name two classes), wnid → index."""
    by_name: dict[str, list[int]] = {}
    for c in imagenet_classes():
        for syn in dict.fromkeys(s.lower() for s in c.names):
            by_name.setdefault(syn, []).append(c.index)
    return by_name, {c.wnid: c.index for c in imagenet_classes()}


def _close_matches(query: str, limit: int = 5) -> str:
    by_name, _ = _name_index()
    names = [n for n in by_name if query in n] + difflib.get_close_matches(query, by_name, n=2 * limit, cutoff=0.6)
    found: dict[tuple[int, ...], str] = {}  # one entry per class (set), first matching name
    for n in names:
        found.setdefault(tuple(by_name[n]), n)
    if not found:
        return "no close matches; give an index 0-999, a WordNet id (n07749582) or a class name"
    return "close matches: " + ", ".join(f"{n} ({'/'.join(map(str, idx))})" for idx, n in list(found.items())[:limit])


def imagenet_class(query: int | str) -> ImageNetClass:
    """Resolve a class by index (951, "951"), WordNet id ("n07749582") or name ("lemon",
    "Granny Smith", a synonym such as "man-eater"; case-insensitive, "_" as " "). A name that no
    class or several classes carry ("crane") raises UnknownClassError listing the candidates."""
    classes = imagenet_classes()
    if isinstance(query, bool) or not isinstance(query, int | str):
        raise UnknownClassError(f"class must be an index, WordNet id or name, got {type(query).__name__}")
    text = str(query).strip()
    if not text:
        raise UnknownClassError("class must not be empty; give an index 0-999, a WordNet id or a class name")
    if re.fullmatch(r"[+-]?\d+", text):
        index = int(text)
        if not 0 <= index < len(classes):
            raise UnknownClassError(f"class index {index} is out of range 0-{len(classes) - 1}")
        return classes[index]
    by_name, by_wnid = _name_index()
    if re.fullmatch(r"n\d{8}", text.lower()):
        if text.lower() not in by_wnid:
            raise UnknownClassError(f"WordNet id {text!r} is not an ImageNet-1k class")
        return classes[by_wnid[text.lower()]]
    key = " ".join(text.replace("_", " ").lower().split())
    full = [c for c in classes if ", ".join(c.names).lower() == key]
    hits = [classes[i] for i in by_name.get(key, [])] or full
    if len(hits) == 1:
        return hits[0]
    if hits:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        options = "; ".join(f"{c.index} {c.wnid} ({info.index_to_description(c.index, detailed=True)[:70]}…)"
                            for c in hits)
        raise UnknownClassError(f"class name {text!r} is ambiguous: {options}; give the index or WordNet id")
    raise UnknownClassError(f"unknown ImageNet class {text!r}; {_close_matches(key)}")


# --- weights -----------------------------------------------------------------------------------
def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch state-dict file (loaded weights_only: no code)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsSourceError(f"could not read weights from {str(path)!r} ({_first_line(exc)})") from None
    for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsSourceError(f"{str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _timm_vgg_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's VGG-16 keys → timm's: its three Linear classifier layers are timm's 7×7 and
    1×1 convolutions (same numbers, reshaped) plus the head. timm-format dicts pass unchanged."""
    renames = {"classifier.0.": "pre_logits.fc1.", "classifier.3.": "pre_logits.fc2.", "classifier.6.": "head.fc."}
    out = {}
    for key, value in sd.items():
        for old, new in renames.items():
            if key.startswith(old):
                if key == "classifier.0.weight":
                    value = value.reshape(value.shape[0], -1, 7, 7)
                elif key == "classifier.3.weight":
                    value = value.reshape(value.shape[0], value.shape[1], 1, 1)
                key = new + key.removeprefix(old)
        out[key] = value
    return out


def _vgg_weights_file(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():  # a timm / hub-style folder
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise WeightsSourceError(f"classifier folder {source!r} has no model.safetensors or pytorch_model.bin")
    if path.is_file():
        return path
    if _looks_like_hub_id(source):
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(source, "model.safetensors"))
        except Exception as exc:
            raise WeightsSourceError(
                f"could not download classifier weights {source!r} ({_first_line(exc)}); pass a local "
                f"safetensors / torchvision .pth file, or '{RANDOM}' for random weights (tests only)") from None
    raise WeightsSourceError(f"classifier weights {source!r} do not exist (a file, a folder, a hub id, or '{RANDOM}')")


class ImageClassifier:
    """VGG-16 with the preprocessing its weights expect (size, interpolation, mean/std from
    timm's pretrained config). Images are resized whole (shorter side to the input size, centre
    crop only for non-square images): no crop_pct margin, so a generated object that fills the
    frame stays in it, for generated and real images alike."""

    def __init__(self, module: torch.nn.Module, source: str, random_weights: bool, input_size: int | None = None):
        from timm.data import resolve_data_config

        self.module, self.source, self.random_weights = module, source, random_weights
        cfg = resolve_data_config({}, model=module)
        # input_size overrides the weights' size only to make random-weight tests cheap
        self.input_size = int(input_size or cfg["input_size"][-1])
        self.interpolation = cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic") else "bilinear"
        param = next(module.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] → normalised [N, 3, S, S] in the classifier's dtype."""
        x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        s = self.input_size
        scale = s / min(h, w)
        size = (max(s, round(h * scale)), max(s, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode=self.interpolation, antialias=True, align_corners=False)
        top, left = (size[0] - s) // 2, (size[1] - s) // 2
        x = x[..., top:top + s, left:left + s].clamp(0, 1)
        return ((x - self.mean) / self.std).to(self.dtype)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the 1000 classes, float32 on CPU, for one batch of images in [0, 1]."""
        return self.preprocessed_probabilities(self.preprocess(images))

    @torch.no_grad()
    def preprocessed_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The same for inputs already through `preprocess` (images of different sizes are
        preprocessed one by one, then classified together)."""
        return self.module(x).float().softmax(-1).cpu()

    def metadata(self) -> dict[str, Any]:
        meta = {"arch": VGG_ARCH, "weights": self.source, "random_weights": self.random_weights,
                "input_size": self.input_size, "interpolation": self.interpolation,
                "mean": [round(float(v), 4) for v in self.mean.flatten()],
                "std": [round(float(v), 4) for v in self.std.flatten()], "dtype": str(self.dtype).removeprefix("torch.")}
        if self.random_weights:
            meta["warning"] = "random-init VGG-16: predictions are meaningless (tests and benchmarks only)"
        return meta


def load_vgg16(source: str | Path = DEFAULT_CLASSIFIER, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> ImageClassifier:
    """timm's vgg16.tv_in1k from a local file (safetensors, or a torchvision / timm .pth state
    dict), a folder holding model.safetensors, a hub id, or ``random`` (seeded random init)."""
    import timm

    source = str(source)
    if source == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = timm.create_model(VGG_ARCH, pretrained=False)
    else:
        sd = _timm_vgg_names(_read_state_dict(_vgg_weights_file(source)))
        with torch.device("meta"):
            module = timm.create_model(VGG_ARCH, pretrained=False)
        expected = module.state_dict()
        missing = [k for k in expected if k not in sd]
        unexpected = [k for k in sd if k not in expected]
        wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise WeightsSourceError(
                f"{source!r} is not a VGG-16 ImageNet state dict: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(wrong)} of wrong shape (e.g. {wrong[:2]})")
        module.load_state_dict(sd, strict=True, assign=True)
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ImageClassifier(module, source, source == RANDOM)


class LatentDecoder:
    """Latents in the diffusion model's space → images [N, 3, H, W] in [0, 1] (float32, on the
    decoder's device). Each decoder undoes its own latent scaling from its config: SD's VAE was
    trained on unscaled latents (divide by 0.18215), TAESD on the diffusion latents themselves
    (its scaling_factor is 1.0), so dividing by the VAE's factor would feed TAESD latents 5.5×
    too large. AutoencoderTiny's latent_magnitude/latent_shift only pack latents into uint8
    images and play no part in decoding."""

    def __init__(self, kind: str, module: torch.nn.Module, source: str, random_weights: bool):
        self.kind, self.module, self.source, self.random_weights = kind, module, source, random_weights
        cfg = module.config
        self.scaling_factor = float(cfg.get("scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(cfg.get("shift_factor", 0.0) or 0.0)
        self.latent_channels = int(cfg.get("latent_channels", 4))
        param = next(module.parameters())
        self.device, self.dtype = param.device, param.dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.shape[1] != self.latent_channels:
            raise ClassifyError(f"the {self.kind} decoder takes {self.latent_channels}-channel latents, "
                                f"got {latents.shape[1]}")
        z = latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        images = self.module.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def metadata(self) -> dict[str, Any]:
        meta = {"kind": self.kind, "class": type(self.module).__name__, "weights": self.source,
                "random_weights": self.random_weights, "scaling_factor": self.scaling_factor}
        if self.random_weights:
            meta["warning"] = "random-init decoder: previews are meaningless (tests and benchmarks only)"
        return meta


def load_tiny_decoder(source: str | Path = DEFAULT_TINY_DECODER, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> LatentDecoder:
    """diffusers' AutoencoderTiny from a diffusers-format folder (config.json + weights), a hub
    id such as madebyollin/taesd, or ``random`` (its default config, seeded random init)."""
    from diffusers import AutoencoderTiny

    source = str(source)
    if source == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = AutoencoderTiny()
    else:
        path = Path(source).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise WeightsSourceError(f"tiny decoder {source!r} is not a diffusers AutoencoderTiny folder "
                                     "(needs config.json + diffusion_pytorch_model.safetensors)")
        if not path.exists() and not _looks_like_hub_id(source):
            raise WeightsSourceError(f"tiny decoder {source!r} does not exist (a folder, a hub id, or '{RANDOM}')")
        try:
            with warnings.catch_warnings():  # the hub client's deprecation noise would break one-line errors
                warnings.simplefilter("ignore", UserWarning)
                module = AutoencoderTiny.from_pretrained(path if path.exists() else source)
        except Exception as exc:
            raise WeightsSourceError(f"could not load the tiny decoder {source!r} ({_first_line(exc)}); pass a "
                                     f"local AutoencoderTiny folder, or '{RANDOM}' (tests only)") from None
    if (next(module.parameters()).device, module.dtype) != (torch.device(device), dtype):
        module = module.to(device=device, dtype=dtype)  # diffusers warns on any .to(dtype)
    return LatentDecoder("tiny", module.eval().requires_grad_(False), source, source == RANDOM)


def make_decoder(model, kind: str = "vae", tiny_source: str | Path | None = DEFAULT_TINY_DECODER) -> LatentDecoder:
    """The model's own VAE, or a tiny decoder on the model's device and dtype (same latents in,
    same image size out)."""
    if kind == "vae":
        return LatentDecoder("vae", model.vae, str(getattr(model, "source", "vae")), False)
    if kind != "tiny":
        raise ClassifyError(f"unknown decoder {kind!r}; use vae or tiny")
    decoder = load_tiny_decoder(tiny_source or DEFAULT_TINY_DECODER, model.device, model.dtype)
    want = int(model.vae.config.latent_channels)
    if decoder.latent_channels != want:
        raise WeightsSourceError(f"tiny decoder {tiny_source!r} takes {decoder.latent_channels}-channel latents; "
                                 f"the model's are {want}-channel")
    return decoder


# --- per-step statistics ----------------------------------------------------------------------------
def first_steps(probabilities: torch.Tensor, target: int, threshold: float = CONFIDENCE) -> dict[str, int | None]:
    """From a [steps, classes] probability table: the first step whose top-1 class is `target`,
    the first whose target probability passes (>) `threshold`, and for both the step from which
    it holds to the last step (a lucky early hit does not count there). None: never."""
    p = probabilities[:, target]
    top1 = probabilities.argmax(-1) == target
    confident = p > threshold

    def first(mask: torch.Tensor) -> int | None:
        hits = mask.nonzero().flatten()
        return int(hits[0]) if len(hits) else None

    def holds_from(mask: torch.Tensor) -> int | None:
        misses = (~mask).nonzero().flatten()
        start = int(misses[-1]) + 1 if len(misses) else 0
        return start if start < len(mask) else None

    return {"first_top1_step": first(top1), "first_confident_step": first(confident),
            "top1_from_step": holds_from(top1), "confident_from_step": holds_from(confident)}


# --- pydantic request / response (shared by the CLI and an HTTP handler) -----------------------------
class ClassInfo(BaseModel):
    index: int
    wnid: str
    name: str


class ClassScore(ClassInfo):
    probability: float


class StepPrediction(BaseModel):
    step: int
    timestep: float | None  # None for a real image
    top: list[ClassScore]
    target_probability: float | None = None


class ClassifyResponse(BaseModel):
    steps: list[StepPrediction]
    target: ClassInfo | None = None
    target_curve: list[float] | None = None
    confidence_threshold: float = CONFIDENCE
    first_top1_step: int | None = None
    first_confident_step: int | None = None
    top1_from_step: int | None = None
    confident_from_step: int | None = None
    metadata: dict[str, Any] = {}


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

    @field_validator("target_class")
    @classmethod
    def _known_class(cls, v: int | str | None) -> int | str | None:
        if v is not None:
            imagenet_class(v)  # UnknownClassError is a ValueError: pydantic reports it on this field
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

    def target(self) -> ImageNetClass | None:
        return None if self.target_class is None else imagenet_class(self.target_class)

    def settings(self) -> GenerationSettings:
        return GenerationSettings(**self.model_dump(include=set(GenerationSettings.model_fields)))


# --- results ---------------------------------------------------------------------------------------
@dataclass
class Classification:
    """The classifier's output for every step of one generation (or for one real image)."""

    probabilities: torch.Tensor  # [steps, 1000] float32 on CPU
    timesteps: list[float | None]
    top_k: int = 5
    target: ImageNetClass | None = None
    previews: torch.Tensor | None = None  # [steps, 3, H, W] in [0, 1] on CPU: what was classified
    image: torch.Tensor | None = None  # the final image [3, H, W] (generations only)
    threshold: float = CONFIDENCE
    metadata: dict[str, Any] = field(default_factory=dict)

    def top(self, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, class indices), both [steps, k], best first."""
        return self.probabilities.topk(min(k or self.top_k, self.probabilities.shape[1]), dim=-1)

    @property
    def target_curve(self) -> list[float] | None:
        return None if self.target is None else self.probabilities[:, self.target.index].tolist()

    def statistics(self) -> dict[str, int | None]:
        if self.target is None:
            return dict.fromkeys(("first_top1_step", "first_confident_step", "top1_from_step", "confident_from_step"))
        return first_steps(self.probabilities, self.target.index, self.threshold)

    def steps(self) -> list[StepPrediction]:
        classes = imagenet_classes()
        values, indices = self.top()
        curve = self.target_curve
        return [StepPrediction(step=s, timestep=self.timesteps[s],
                               top=[ClassScore(**classes[i].info().model_dump(), probability=p)
                                    for p, i in zip(values[s].tolist(), indices[s].tolist(), strict=True)],
                               target_probability=None if curve is None else curve[s])
                for s in range(len(self.timesteps))]

    def response(self) -> ClassifyResponse:
        return ClassifyResponse(steps=self.steps(), target=self.target.info() if self.target else None,
                                target_curve=self.target_curve, confidence_threshold=self.threshold,
                                metadata=self.metadata, **self.statistics())

    def rows(self) -> list[dict[str, Any]]:
        """The long table: one row per step × rank (CSV)."""
        return [{"step": sp.step, "timestep": sp.timestep, "rank": r + 1, "index": c.index, "wnid": c.wnid,
                 "name": c.name, "probability": c.probability, "target_probability": sp.target_probability}
                for sp in self.steps() for r, c in enumerate(sp.top)]


def _image_tensor(image: Any) -> torch.Tensor:
    """PIL image, [3, H, W] or [N, 3, H, W] tensor (floats in [0, 1] or uint8) → [N, 3, H, W] float."""
    if not isinstance(image, torch.Tensor):
        import numpy as np

        image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    x = image.unsqueeze(0) if image.dim() == 3 else image
    if x.dim() != 4 or x.shape[1] != 3:
        raise ClassifyError(f"expected an RGB image [3, H, W] or [N, 3, H, W], got shape {list(image.shape)}")
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


class StepClassifier:
    """Decoder + classifier, run over many latents in chunks of `batch_size` images: one decoder
    and one classifier call per chunk, the same numbers as one image at a time."""

    def __init__(self, decoder: LatentDecoder, classifier: ImageClassifier, batch_size: int = 8):
        if batch_size < 1:
            raise ClassifyError(f"batch_size must be >= 1, got {batch_size}")
        self.decoder, self.classifier, self.batch_size = decoder, classifier, int(batch_size)

    @torch.no_grad()
    def classify_latents(self, latents: torch.Tensor, keep_previews: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[M, C, h, w] latents → ([M, 1000] probabilities, [M, 3, H, W] decoded images or None)."""
        probs, previews = [], []
        for chunk in latents.split(self.batch_size):
            images = self.decoder.decode(chunk)
            probs.append(self.classifier.probabilities(images))
            if keep_previews:
                previews.append(images.cpu())
        return torch.cat(probs), (torch.cat(previews) if keep_previews else None)

    @torch.no_grad()
    def classify_images(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.probabilities(c) for c in images.split(self.batch_size)])

    def metadata(self) -> dict[str, Any]:
        return {"decoder": self.decoder.metadata(), "classifier": self.classifier.metadata(),
                "batch_size": self.batch_size, "confidence_threshold": CONFIDENCE}

    def classify_generation(self, sampler, prompts: Sequence[str], seeds: Sequence[int],
                            settings: GenerationSettings | None = None, decode: str = "latent",
                            targets: Sequence[int | str | None] | int | str | None = None, top_k: int = 5,
                            keep_previews: bool = False, progress: bool = False,
                            pad_to: int | None = None) -> list[Classification]:
        """Generate (one batched denoising loop for all prompts), keep every step's latent
        (`decode="latent"`, the study's choice: x_{t-1} after the step) or predicted clean
        latent (`"x0"`), then decode + classify all steps of all prompts in chunks.
        One Classification per prompt.

        pad_to: run the denoising loop at this batch size (the last prompt repeated), so a
        compiled U-Net reuses the graph of a few bucket sizes; the padding rows' steps are
        neither decoded nor classified."""
        import time

        n = len(prompts)
        if not n:
            raise ClassifyError("no prompts given")
        batch_rows = max(n, int(pad_to or n))
        if decode not in ("latent", "x0"):
            raise ClassifyError(f"decode must be 'latent' or 'x0', got {decode!r}")
        if not 1 <= top_k <= MAX_TOP_K:
            raise ClassifyError(f"top_k must be in 1-{MAX_TOP_K}, got {top_k}")
        if targets is None or isinstance(targets, int | str):
            targets = [targets] * len(prompts)
        if len(targets) != len(prompts):
            raise ClassifyError(f"got {len(prompts)} prompts but {len(targets)} targets")
        resolved = [None if t is None else imagenet_class(t) for t in targets]  # fail before generating

        kept: list[torch.Tensor] = []
        timesteps: list[float] = []

        def on_step(step) -> None:
            kept.append((step.latents if decode == "latent" else step.x0)[:n].detach())
            timesteps.append(step.timestep)

        padding = batch_rows - n
        result = sampler.generate(list(prompts) + [prompts[-1]] * padding, list(seeds) + [seeds[-1]] * padding,
                                  settings, layers=None, callback=on_step, keep_steps=False, progress=progress)
        started = time.perf_counter()
        s = len(kept)
        stacked = torch.stack(kept, dim=1).flatten(0, 1)  # [N·S, C, h, w], prompt-major
        probs, previews = self.classify_latents(stacked, keep_previews)
        classify_s = time.perf_counter() - started
        meta = result.metadata | self.metadata() | {"decode": decode, "top_k": top_k, "mode": "generation",
                                                     "generate_rows": batch_rows}
        meta["prompts"], meta["seeds"] = meta["prompts"][:n], meta["seeds"][:n]
        meta["timings_s"] = dict(meta.get("timings_s", {})) | {"decode_classify": round(classify_s, 4)}
        out = []
        for i in range(n):
            rows = slice(i * s, (i + 1) * s)
            item_meta = meta | {"prompt": prompts[i], "seed": int(seeds[i])}
            out.append(Classification(probs[rows], list(timesteps), top_k, resolved[i],
                                      None if previews is None else previews[rows], result.images[i], CONFIDENCE,
                                      item_meta))
        return out

    def classify_image(self, image: Any, target: int | str | None = None, top_k: int = 5) -> Classification:
        """A real image (PIL or tensor) through the same preprocessing and classifier: the
        study's generated-vs-real comparison. One "step" with no timestep."""
        return self.classify_image_batch([image], [target], top_k)[0]

    @torch.no_grad()
    def classify_image_batch(self, images: Sequence[Any], targets: Sequence[int | str | None] | None = None,
                             top_k: int = 5, keep_images: bool = True) -> list[Classification]:
        """Several real images (sizes may differ): each preprocessed alone, then classified
        together in chunks of `batch_size`. One Classification per image, as classify_image."""
        targets = [None] * len(images) if targets is None else list(targets)
        if len(targets) != len(images):
            raise ClassifyError(f"got {len(images)} images but {len(targets)} targets")
        resolved = [None if t is None else imagenet_class(t) for t in targets]
        tensors = [_image_tensor(image)[:1] for image in images]
        x = torch.cat([self.classifier.preprocess(t) for t in tensors]) if tensors else None
        probs = (torch.cat([self.classifier.preprocessed_probabilities(c) for c in x.split(self.batch_size)])
                 if x is not None else torch.zeros(0, 1000))
        out = []
        for i, t in enumerate(tensors):
            meta = {"classifier": self.classifier.metadata(), "top_k": top_k, "mode": "image",
                    "image_size": list(t.shape[-2:])}
            out.append(Classification(probs[i:i + 1], [None], top_k, resolved[i],
                                      t.clamp(0, 1) if keep_images else None, None, CONFIDENCE, meta))
        return out


# --- the figure --------------------------------------------------------------------------------------
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

    from .atomic import atomic_path

    probs = result.probabilities
    steps = probs.shape[0]
    classes = imagenet_classes()
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
