"""Label sources: every source returns {property: float32 [N, H, W]} at image size.

- `DepthModel`: a transformers depth model (DPT, e.g. Intel/dpt-large as the study's MiDaS
  DPT_Large; Depth Anything V2 Small), from a local folder or a hub id. Its output is relative
  inverse depth (larger = nearer), the study's depth label.
- `LabelFiles`: maps produced by any external tool (TRACER masks, Intrinsic shading, MiDaS depth)
  in the layout `<root>/<property>/<id>.png|.npy|.safetensors` (PNG masks: value >
  `mask_threshold` is foreground, 127 by default (≥ 128), 0 under the study protocol; PNG maps:
  value / 255; .npy / .safetensors (tensor "label"): float maps).
- `SceneLabelModels` (`scenes:` / `scenes:PATH` in the jobs' --labels): the scenes world's label
  models (ldmprobe.label_models; the shipped ones or a trained folder), in the roles of TRACER,
  MiDaS and the shading estimator: foreground mask, relative inverse depth, shading.
- `scene_labels`: exact labels of procedurally rendered scenes (training.scenes): the mask,
  inverse z-depth (same convention as the depth models), and Lambertian shading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

PROPERTIES = {"foreground": "mask", "depth": "continuous", "shading": "continuous"}


class LabelError(ValueError):
    """A label source that cannot produce the labels asked for; the message names the file."""


class LabelSource(Protocol):
    properties: tuple[str, ...]

    def __call__(self, images: torch.Tensor, ids: list[str]) -> dict[str, torch.Tensor]: ...


def check_property(name: str) -> str:
    if name not in PROPERTIES:
        raise LabelError(f"unknown property {name!r}; use one of {', '.join(PROPERTIES)}")
    return name


class DepthModel:
    """Relative inverse depth from a transformers depth-estimation model."""

    properties = ("depth",)

    def __init__(self, source: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        try:
            self.processor = AutoImageProcessor.from_pretrained(str(source))
            self.model = AutoModelForDepthEstimation.from_pretrained(str(source)).to(device).eval()
        except Exception as exc:
            raise LabelError(f"cannot load depth model {str(source)!r}: {str(exc).splitlines()[0]}") from exc
        self.device = torch.device(device)
        self.source = str(source)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, ids: list[str]) -> dict[str, torch.Tensor]:
        arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        inputs = self.processor(images=list(arr), return_tensors="pt").to(self.device)
        depth = self.model(**inputs).predicted_depth  # [N, h, w]
        depth = F.interpolate(depth[:, None].float(), size=images.shape[-2:], mode="bicubic", align_corners=False)
        return {"depth": depth[:, 0].cpu()}


class LabelFiles:
    """Precomputed label maps from external tools, one file per (property, image id).

    `mask_threshold`: a PNG mask pixel is foreground when its value exceeds it. 127 (≥ 128, the
    midpoint) suits hard masks; the study thresholded TRACER's soft saliency maps (sigmoid ×
    255) at > 0, which counts every faintly salient pixel (a soft disk: 0.41 of the image with
    > 0, 0.17 with ≥ 128; README "Study protocol")."""

    SUFFIXES = (".png", ".npy", ".safetensors")

    def __init__(self, root: str | Path, properties: tuple[str, ...] | None = None, mask_threshold: int = 127):
        if not 0 <= int(mask_threshold) <= 254:
            raise LabelError(f"mask threshold must be 0…254 (foreground: value > threshold), got {mask_threshold}")
        self.mask_threshold = int(mask_threshold)
        self.root = Path(root)
        if not self.root.is_dir():
            raise LabelError(f"label folder {str(self.root)!r} does not exist")
        found = tuple(p.name for p in sorted(self.root.iterdir()) if p.is_dir() and p.name in PROPERTIES)
        self.properties = tuple(check_property(p) for p in properties) if properties else found
        if not self.properties:
            raise LabelError(f"label folder {str(self.root)!r} has none of the subfolders {', '.join(PROPERTIES)}")

    def _read(self, prop: str, ident: str, size: tuple[int, int]) -> torch.Tensor:
        candidates = [self.root / prop / f"{ident}{s}" for s in self.SUFFIXES]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise LabelError(f"no {prop} label for image {ident!r}: expected {candidates[0]} (or .npy/.safetensors)")
        try:
            if path.suffix == ".png":
                from PIL import Image

                arr = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
                arr = (arr > self.mask_threshold).astype(np.float32) if PROPERTIES[prop] == "mask" else arr / 255.0
                value = torch.from_numpy(arr)
            elif path.suffix == ".npy":
                value = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
            else:
                from safetensors.torch import load_file

                value = load_file(str(path))["label"].float()
        except Exception as exc:
            raise LabelError(f"{path}: unreadable label file ({type(exc).__name__}: {exc})") from exc
        if value.ndim != 2:
            raise LabelError(f"{path}: expected a 2-D map, got shape {list(value.shape)}")
        if tuple(value.shape) != size:
            value = F.interpolate(value[None, None], size=size, mode="nearest" if PROPERTIES[prop] == "mask"
                                  else "bilinear", align_corners=False if PROPERTIES[prop] != "mask" else None)[0, 0]
        return value

    def __call__(self, images: torch.Tensor, ids: list[str]) -> dict[str, torch.Tensor]:
        size = tuple(images.shape[-2:])
        return {p: torch.stack([self._read(p, i, size) for i in ids]) for p in self.properties}


class SceneLabelModels:
    """foreground, depth and shading from the scenes world's label models (`ldmprobe.label_models`):
    the shipped ones (`source` None or "") or a folder written by `python -m training.label_models`.

    foreground: the segmenter's probability P is written as the uint8 value round(255 P), then
    thresholded exactly as `LabelFiles` thresholds a saved PNG mask: foreground where value >
    `mask_threshold` (127 by default, i.e. P ≥ 0.5; 0 under the study protocol, its rule for TRACER's
    soft maps: every faintly salient pixel counts). A 0/1 float mask.
    depth: relative inverse depth (larger = nearer, geometric mean 1 per image), MiDaS's convention.
    shading: Lambertian shading in [0, 1] (no ambient, hard shadows; sky = 1)."""

    properties = ("foreground", "depth", "shading")

    def __init__(self, source: str | Path | None = None, device: str | torch.device = "cpu", mask_threshold: int = 127):
        from ldmprobe.label_models import LabelModelError, load_label_models

        if not 0 <= int(mask_threshold) <= 254:
            raise LabelError(f"mask threshold must be 0…254 (foreground: value > threshold), got {mask_threshold}")
        self.mask_threshold = int(mask_threshold)
        try:
            self.models = load_label_models(str(source) if source else None, device)
        except LabelModelError as exc:
            raise LabelError(str(exc)) from exc
        self.source = self.models.source

    def __call__(self, images: torch.Tensor, ids: list[str]) -> dict[str, torch.Tensor]:
        maps = self.models.maps(images.float())
        value = (maps["foreground"] * 255).round()
        return {"foreground": (value > self.mask_threshold).float(), "depth": maps["depth"], "shading": maps["shading"]}


def scene_labels(scenes) -> dict[str, torch.Tensor]:
    """Exact labels of rendered scenes (list of training.scenes.Scene), [N, H, W] float32."""
    return {
        "foreground": torch.from_numpy(np.stack([s.mask for s in scenes]).astype(np.float32)),
        "depth": torch.from_numpy(np.stack([1.0 / s.depth for s in scenes]).astype(np.float32)),
        "shading": torch.from_numpy(np.stack([s.shading for s in scenes]).astype(np.float32)),
    }


def standardise_per_image(maps: torch.Tensor) -> torch.Tensor:
    """[N, H, W] → each map at zero mean and unit variance over its finite pixels (`--depth-norm image`).

    What is left is the map's shape: relative depth, free of the scale and shift that a monocular
    estimator (MiDaS) cannot know and that a per-image Spearman ignores. A constant map becomes zeros;
    NaN pixels stay NaN."""
    flat = maps.reshape(maps.shape[0], -1).double()
    finite = torch.isfinite(flat)
    n = finite.sum(1, keepdim=True).clamp_min(1)
    mean = torch.where(finite, flat, 0.0).sum(1, keepdim=True) / n
    centred = torch.where(finite, flat - mean, 0.0)
    std = (centred.square().sum(1, keepdim=True) / n).sqrt()
    out = torch.where(std > 1e-12, centred / std.clamp_min(1e-12), 0.0)
    return torch.where(finite, out, flat).to(maps.dtype).reshape(maps.shape)


def merge_labels(*parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Combine the outputs of several sources; a property given twice is an error."""
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            if k in out:
                raise LabelError(f"property {k!r} comes from two label sources; configure one")
            out[k] = v
    return out
