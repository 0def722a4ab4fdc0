"""VGG-16 weights: loaded from a local file, a folder or a hub id (never silently random), with
the preprocessing those weights expect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .imagenet import ClassifyError, ClassSet

VGG_ARCH = "vgg16.tv_in1k"
DEFAULT_CLASSIFIER = "timm/vgg16.tv_in1k"  # timm's copy of torchvision's IMAGENET1K_V1 weights
RANDOM = "random"


class WeightsSourceError(ClassifyError):
    """A classifier / decoder weight source that is missing, unreadable or the wrong model."""


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


PREPROCESSINGS = ("timm", "caffe", "unit")  # unit: [0, 1] RGB resized, the module normalises itself
# Keras' VGG-16 (Caffe weights): BGR channel means in 0–255 (keras.applications.imagenet_utils, mode "caffe")
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


class ImageClassifier:
    """VGG-16 with the preprocessing its weights expect.

    "timm" (default): size, interpolation, mean/std from timm's pretrained config; images are
    resized whole (shorter side to the input size, centre crop only for non-square images): no
    crop_pct margin, so a generated object that fills the frame stays in it.
    "caffe": what the capstone did with Keras' VGG-16 (Caffe weights) on its saved PNGs: values
    quantised to 8 bits (a PNG), the whole image resized to S×S with nearest neighbour (Keras'
    `load_img(target_size=…)`, PIL's NEAREST), RGB → BGR, the ImageNet BGR means subtracted in
    0–255, no division by a std. Meant for Caffe-converted weights; its curves are not
    numerically comparable with timm's `vgg16.tv_in1k` under "timm"."""

    def __init__(self, module: torch.nn.Module, source: str, random_weights: bool, input_size: int | None = None,
                 preprocessing: str = "timm", classes: ClassSet | None = None, arch: str = VGG_ARCH):
        from timm.data import resolve_data_config

        if preprocessing not in PREPROCESSINGS:
            raise ValueError(f"unknown preprocessing {preprocessing!r}; use one of {', '.join(PREPROCESSINGS)}")
        self.module, self.source, self.random_weights = module, source, random_weights
        self.classes, self.arch = classes or ClassSet.imagenet(), arch
        self.preprocessing = preprocessing
        cfg = resolve_data_config({}, model=module)
        # input_size overrides the weights' size only to make random-weight tests cheap
        self.input_size = int(input_size or cfg["input_size"][-1])
        self.interpolation = cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic") else "bilinear"
        param = next(module.parameters())
        self.device, self.dtype = param.device, param.dtype
        if preprocessing == "caffe":
            self.interpolation = "nearest"
            self.mean = torch.tensor(CAFFE_BGR_MEAN, device=self.device).view(1, 3, 1, 1)
            self.std = torch.ones(1, 3, 1, 1, device=self.device)
        elif preprocessing == "unit":
            self.mean = torch.zeros(1, 3, 1, 1, device=self.device)
            self.std = torch.ones(1, 3, 1, 1, device=self.device)
        else:
            self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
            self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] → normalised [N, 3, S, S] in the classifier's dtype."""
        if self.preprocessing == "caffe":
            return self._caffe(images)
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

    def _caffe(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.device, torch.float32).clamp(0, 1) * 255).round()  # the PNG's 8-bit values
        s = self.input_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="nearest-exact")  # PIL's NEAREST (pixel centres)
        return (x.flip(1) - self.mean).to(self.dtype)  # RGB → BGR, minus the BGR means, no std

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
        meta = {"arch": self.arch, "classes": self.classes.name, "weights": self.source, "random_weights": self.random_weights,
                "preprocessing": self.preprocessing,
                "input_size": self.input_size, "interpolation": self.interpolation,
                "mean": [round(float(v), 4) for v in self.mean.flatten()],
                "std": [round(float(v), 4) for v in self.std.flatten()], "dtype": str(self.dtype).removeprefix("torch.")}
        if self.random_weights:
            meta["warning"] = "random-init VGG-16: predictions are meaningless (tests and benchmarks only)"
        return meta


def load_vgg16(source: str | Path = DEFAULT_CLASSIFIER, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, preprocessing: str = "timm") -> ImageClassifier:
    """timm's vgg16.tv_in1k from a local file (safetensors, or a torchvision / timm .pth state
    dict), a folder holding model.safetensors, a hub id, or ``random`` (seeded random init).
    preprocessing: "timm" (the weights' own) or "caffe" (Keras' VGG-16, as the capstone; see
    `ImageClassifier`)."""
    if preprocessing not in PREPROCESSINGS:
        raise ValueError(f"unknown preprocessing {preprocessing!r}; use one of {', '.join(PREPROCESSINGS)}")
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
    return ImageClassifier(module, source, source == RANDOM, preprocessing=preprocessing)


# --- any classifier by name -----------------------------------------------------------------------
SCENES_CLASSIFIER = "scenes"  # the scenes label models' colour × kind classifier (ldmprobe.label_models)


class _LabelModelClassifier(torch.nn.Module):
    """The label models' classifier as a module of [0, 1] images (it normalises itself)."""

    def __init__(self, label_models):
        super().__init__()
        self.label_models = label_models
        self.classifier = label_models.modules["classifier"]  # its parameters give device and dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.label_models.classify(x.float())


def load_classifier(source: str | Path = DEFAULT_CLASSIFIER, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, preprocessing: str = "timm") -> ImageClassifier:
    """VGG-16 ImageNet weights (`load_vgg16`: file, folder, hub id, ``random``), or the scenes world's
    classifier: ``scenes`` (the shipped label models) or ``scenes:PATH`` (a label-model folder),
    whose classes are its own ("red sphere" …) and which takes [0, 1] images at 128 px."""
    source = str(source)
    if source != SCENES_CLASSIFIER and not source.startswith(SCENES_CLASSIFIER + ":"):
        return load_vgg16(source, device, dtype, preprocessing)
    from ..label_models import load_label_models

    path = source.partition(":")[2] or None
    try:
        lm = load_label_models(path)
    except (OSError, ValueError) as exc:
        raise WeightsSourceError(f"classifier {source!r}: {_first_line(exc)}") from None
    module = _LabelModelClassifier(lm).to(device=device).eval().requires_grad_(False)
    return ImageClassifier(module, lm.source, False, input_size=lm.size, preprocessing="unit",
                           classes=ClassSet.from_names("scenes", list(lm.class_names)),
                           arch="VGG-16 layout, narrowed (timm VGG; ldmprobe.label_models)")
