"""Label models of the scenes world: small networks trained on rendered scenes with exact labels,
in the roles the study's off-the-shelf models played on SD v1.4's images.

| study's model                        | here                          | output                              |
|--------------------------------------|-------------------------------|-------------------------------------|
| TRACER (salient-object segmenter)    | `LabelModels.foreground`      | P(foreground) [N, H, W] in [0, 1]   |
| MiDaS DPT_Large (relative depth)     | `LabelModels.depth`           | relative inverse depth [N, H, W]    |
| intrinsic-image shading estimator    | `LabelModels.shading`         | Lambertian shading [N, H, W]        |
| VGG-16 (ImageNet classifier)         | `LabelModels.classify`        | logits [N, 24] over colour × kind   |

The three dense maps come from one network (`DenseLabelNet`: a shared U-Net-like trunk with a head
of three channels, and optionally a shading-structure head whose floor and zero-shading channels let
the shading map tie where the exact label ties, `structured_shading`); the classifier is VGG-16's
layer layout narrowed (`vgg_classifier`, built with timm's VGG). Both run at 128×128 (the scenes model's image size); other sizes (multiples of 8) are
resized in and the maps resized back out. They are trained by `python -m training.label_models`
(augmented with blur, noise, colour jitter and resolution loss, because they are applied to the
scenes model's generated images and to blurry intermediate decodes); the shipped folder is
`ldmprobe/weights/scenes-labels/` with its model card.

Depth convention (MiDaS's, as training/labels.py): larger = nearer. The network predicts log
inverse depth up to an additive constant (it is trained with a shift-invariant loss, so up to a
scale in inverse depth, as MiDaS); `depth()` returns exp of it normalised per image so that the
geometric mean over the image is 1. Only ranks and ratios within an image mean anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = Path(__file__).parent / "weights"
SCENES_LABELS_DIR = WEIGHTS_DIR / "scenes-labels"
FORMAT = "ldmprobe-label-models"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
DENSE_FILE = "dense.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"
DENSE_CHANNELS = ("foreground", "depth", "shading")  # the dense head's output channels, in order
# The optional shading-structure head's channels, after DENSE_CHANNELS (see `structured_shading`).
STRUCTURE_CHANNELS = ("floor", "zero_shading")


class LabelModelError(ValueError):
    """A label-model folder that cannot be loaded; the message names the folder or file."""


# ---------------------------------------------------------------- architectures


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3×3 conv + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DenseLabelNet(nn.Module):
    """A small U-Net with one shared trunk and a 3-channel head: foreground logit, log inverse depth
    (up to a constant), shading logit. The stem halves the resolution (the encoder-decoder works at
    1/2 … 1/16 of the input), and a light full-resolution refinement (upsampled features + the image)
    restores sharp object edges at the cost of one 3×3 conv at full size."""

    def __init__(self, widths=(16, 32, 48, 64), refine: int = 8, global_context: bool = False,
                 shading_structure: bool = False):
        """global_context: add an image-level vector (global average pool → MLP, ParseNet's global
        context) to the bottleneck features, so a quantity constant over the image (the floor's
        shading, set by the light's elevation) is read from the whole image, not from each pixel's
        receptive field. Its last layer starts at zero: adding it to trained weights changes nothing
        until it is trained.
        shading_structure: add a second head (conv3×3-ReLU-conv1×1 over the upsampled features and the
        refinement's) with two more output channels, the floor logit (the ray hit the ground) and the
        zero-shading logit (a shadow, or a face turned from the light); `structured_shading` reads them."""
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError("widths needs at least two levels")
        self.widths = widths
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        self.enc = nn.ModuleList([_block(widths[0], widths[0])] +
                                 [_block(widths[i - 1], widths[i]) for i in range(1, len(widths))])
        self.dec = nn.ModuleList([_block(widths[i + 1] + widths[i], widths[i]) for i in range(len(widths) - 1)])
        self.refine = nn.Sequential(nn.Conv2d(widths[0] + 3, refine, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(refine), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(refine, len(DENSE_CHANNELS), 1)
        self.context = None
        if global_context:
            self.context = nn.Sequential(nn.Linear(widths[-1], widths[-1]), nn.ReLU(inplace=True),
                                         nn.Linear(widths[-1], widths[-1]))
            nn.init.zeros_(self.context[2].weight)
            nn.init.zeros_(self.context[2].bias)
        self.structure = None
        if shading_structure:
            self.structure = nn.Sequential(nn.Conv2d(widths[0] + refine, 16, 3, padding=1), nn.ReLU(inplace=True),
                                           nn.Conv2d(16, len(STRUCTURE_CHANNELS), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] (H, W multiples of 2**len(widths)) → [N, C, H, W] raw outputs: C = 3
        (DENSE_CHANNELS), 5 with the shading-structure head (+ STRUCTURE_CHANNELS)."""
        skips = []
        h = self.stem(x * 2 - 1)
        for i, block in enumerate(self.enc):
            if i:
                h = F.max_pool2d(h, 2)
            h = block(h)
            skips.append(h)
        if self.context is not None:
            skips[-1] = h = h + self.context(h.mean((2, 3)))[:, :, None, None]
        for i in reversed(range(len(self.dec))):
            h = F.interpolate(h, size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
            h = self.dec[i](torch.cat([h, skips[i]], 1))
        h = F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)
        r = self.refine(torch.cat([h, x * 2 - 1], 1))
        out = self.head(r)
        if self.structure is not None:
            out = torch.cat([out, self.structure(torch.cat([h, r], 1))], 1)
        return out


def structured_shading(raw: torch.Tensor) -> torch.Tensor:
    """Shading [N, H, W] in [0, 1] from DenseLabelNet's raw outputs [N, C, H, W].

    With 3 channels: the shading head's sigmoid. With the structure head (5 channels), the label's own
    structure is applied to it: Lambertian shading of a plane under one directional light is one value
    (the floor's n·l), and a surface in a shadow or turned from the light is exactly 0. So pixels the
    zero-shading channel calls (p > 0.5) read 0, the remaining floor pixels (floor p > 0.5) read the
    image's median of the shading head over them, and every other pixel (the object's lit faces, the
    sky) keeps the shading head's value. A continuous map cannot tie where the label ties, which caps
    its Spearman below 1 (`ldmprobe.metrics.spearman_ceiling`); this one ties where it is confident."""
    shading = torch.sigmoid(raw[:, 2].float())
    if raw.shape[1] < 5:
        return shading
    zero = raw[:, 3 + STRUCTURE_CHANNELS.index("zero_shading")] > 0
    floor = (raw[:, 3 + STRUCTURE_CHANNELS.index("floor")] > 0) & ~zero
    out = shading.masked_fill(zero, 0.0)
    for i in range(out.shape[0]):
        if bool(floor[i].any()):
            out[i][floor[i]] = shading[i][floor[i]].median()
    return out


def _relative_depth(raw: torch.Tensor) -> torch.Tensor:
    """exp of the log inverse depth channel, normalised to geometric mean 1 per image (float64)."""
    log_inv = raw[:, 1].double()
    return (log_inv - log_inv.flatten(1).mean(1)[:, None, None]).exp()


def dense_maps(raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """{foreground, depth, shading} float32 on the CPU from DenseLabelNet's raw outputs [N, C, H, W]
    (`LabelModels.maps` without the forward pass, for callers that also need the raw channels)."""
    return {"foreground": torch.sigmoid(raw[:, 0]).float().cpu(), "depth": _relative_depth(raw).float().cpu(),
            "shading": structured_shading(raw).float().cpu()}


def vgg_cfg(widths=(8, 16, 32, 64, 64)) -> list:
    """VGG-16's layer layout (configuration "D": 2, 2, 3, 3, 3 convs per stage, max-pool after each)
    with the stage widths given (VGG-16's own are 64, 128, 256, 512, 512)."""
    per_stage = (2, 2, 3, 3, 3)
    if len(widths) != 5:
        raise ValueError("VGG-16 has five stages: give five widths")
    cfg: list = []
    for n, w in zip(per_stage, widths, strict=True):
        cfg += [int(w)] * n + ["M"]
    return cfg


def vgg_classifier(num_classes: int, widths=(8, 16, 32, 64, 64), hidden: int = 128, head_kernel: int = 1,
                   input_size: int | None = None) -> nn.Module:
    """timm's VGG with a custom (narrowed) cfg and batch norm: 13 3×3 convs in 5 stages with max-pools.
    timm's head is hard-wired to VGG-16's 4096-wide 7×7 "fc6" conv (12.8 M parameters at these widths),
    so it is replaced by the same two-layer ConvMlp at `hidden` width with a `head_kernel` × `head_kernel`
    first conv, then timm's ClassifierHead (global average pool + linear). head_kernel 4 covers the
    final 4×4 map at 128×128 (as fc6's 7×7 covers 224 / 32); 1 (the default) makes the head
    translation-invariant, which trained far better here (a 4×4 kernel: top-1 0.46 after 600 steps).
    input_size: the side images are resized to before the classifier (None: the models' size, 128);
    recorded in the config, used by `LabelModels.classify`."""
    from timm.layers import ClassifierHead
    from timm.models.vgg import VGG, ConvMlp

    model = VGG(vgg_cfg(widths), num_classes=num_classes, norm_layer=nn.BatchNorm2d)
    model.pre_logits = ConvMlp(model.num_features, hidden, kernel_size=int(head_kernel), drop_rate=0.0)
    model.head = ClassifierHead(hidden, num_classes, pool_type="avg")
    model.head_hidden_size = hidden
    return model


def class_names(colors, kinds) -> list[str]:
    return [f"{c} {k}" for c in colors for k in kinds]


# ---------------------------------------------------------------- loading


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [N, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    h, w = images.shape[-2:]
    if h % 8 or w % 8 or h == 0 or w == 0:
        raise ValueError(f"image height and width must be positive multiples of 8, got {h}×{w}")
    return images


@dataclass
class LabelModels:
    """The loaded label models; every method takes float images [N, 3, H, W] in [0, 1]."""

    dense: nn.Module
    classifier: nn.Module
    class_names: list[str]
    config: dict
    source: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 32

    @property
    def size(self) -> int:
        return int(self.config["size"])

    @property
    def modules(self) -> dict[str, nn.Module]:
        """name → module: "dense" (segmenter, depth and shading: one trunk, three head channels) and
        "classifier"."""
        return {"dense": self.dense, "classifier": self.classifier}

    def class_index(self, colour: str, kind: str) -> int:
        """Index of "colour kind" in `class_names` ("cube" counts as "box")."""
        name = f"{colour} {'box' if kind == 'cube' else kind}"
        if name not in self.class_names:
            raise KeyError(f"no class {name!r}; classes are colour × kind of {self.class_names[:3]}…")
        return self.class_names.index(name)

    def _inputs(self, images: torch.Tensor):
        images = _check_images(images)
        size = (self.size, self.size)
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start:start + self.batch_size].to(self.device, torch.float32).clamp(0, 1)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            yield x

    @torch.no_grad()
    def raw(self, images: torch.Tensor) -> torch.Tensor:
        """Raw dense outputs at the input's size: [N, C, H, W] (fg logit, log inv depth, shading logit,
        then, with the shading-structure head, floor and zero-shading logits)."""
        out = [self.dense(x) for x in self._inputs(images)]
        raw = torch.cat(out)
        if tuple(raw.shape[-2:]) != tuple(images.shape[-2:]):
            raw = F.interpolate(raw, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return raw

    def foreground(self, images: torch.Tensor) -> torch.Tensor:
        """P(foreground) per pixel, [N, H, W] float32 in [0, 1]."""
        return torch.sigmoid(self.raw(images)[:, 0]).float().cpu()

    def depth(self, images: torch.Tensor) -> torch.Tensor:
        """Relative inverse depth (larger = nearer), [N, H, W] float32 > 0, geometric mean 1 per image."""
        return _relative_depth(self.raw(images)).float().cpu()

    def shading(self, images: torch.Tensor) -> torch.Tensor:
        """Lambertian shading max(0, n·l) with hard shadows (sky = 1), [N, H, W] float32 in [0, 1]
        (`structured_shading`)."""
        return structured_shading(self.raw(images)).float().cpu()

    def maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """All three dense maps from one forward pass: {foreground, depth, shading}."""
        return dense_maps(self.raw(images))

    @property
    def classifier_size(self) -> int:
        """The classifier's input side (images are resized to it; the dense model's is `size`)."""
        return int(self.config["classifier"].get("input_size") or self.size)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Logits over `class_names`, [N, C] float32."""
        s = self.classifier_size
        return torch.cat([self.classifier(x if x.shape[-1] == s else
                                          F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                                                        antialias=True))
                          for x in self._inputs(images)]).float().cpu()


def _load_weights(module: nn.Module, path: Path, may_lack: str | tuple[str, ...] | None = None) -> None:
    """may_lack: prefixes of parameters the file may lack (a module added for fine-tuning, e.g.
    DenseLabelNet's zero-initialised `context.` or its new `structure.` head); they keep their fresh
    values."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise LabelModelError(f"label models: missing weight file {path}")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise LabelModelError(f"label models: unreadable weight file {path} ({type(exc).__name__}: {exc})") from exc
    expected = module.state_dict()
    missing = sorted(k for k in set(expected) - set(state) if not (may_lack and k.startswith(may_lack)))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise LabelModelError(
            f"label models: {path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]} ({len(missing)}/{len(unexpected)}/{len(wrong)})")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=not may_lack)


def build_modules(config: dict) -> tuple[nn.Module, nn.Module]:
    """The two networks a config describes, with fresh weights."""
    dense = DenseLabelNet(**config["dense"])
    classifier = vgg_classifier(len(config["class_names"]), **config["classifier"])
    return dense, classifier


def load_label_models(path: str | Path | None = None, device: str | torch.device = "cpu") -> LabelModels:
    """Load a label-model folder (default: the shipped `ldmprobe/weights/scenes-labels/`): its
    `config.json`, `dense.safetensors` and `classifier.safetensors`. A missing or mismatched file is a
    `LabelModelError` (a ValueError) naming it."""
    folder = Path(path).expanduser() if path is not None else SCENES_LABELS_DIR
    if not folder.is_dir():
        hint = " (train them with `python -m training.label_models --out DIR`)" if path is None else ""
        raise LabelModelError(f"label models: folder {folder} does not exist{hint}")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise LabelModelError(f"label models: missing {config_path}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LabelModelError(f"label models: unreadable {config_path} ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise LabelModelError(f"label models: {config_path} is not a {FORMAT} config")
    if config.get("version") != FORMAT_VERSION:
        raise LabelModelError(f"label models: {config_path} has version {config.get('version')!r}, "
                              f"this ldmprobe reads {FORMAT_VERSION}")
    try:
        dense, classifier = build_modules(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise LabelModelError(f"label models: {config_path} describes no valid networks ({exc!r})") from exc
    _load_weights(dense, folder / config.get("files", {}).get("dense", DENSE_FILE))
    _load_weights(classifier, folder / config.get("files", {}).get("classifier", CLASSIFIER_FILE))
    dev = torch.device(device)
    for m in (dense, classifier):
        m.to(dev).eval().requires_grad_(False)
    return LabelModels(dense, classifier, list(config["class_names"]), config, str(folder), dev)
