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

This module is the step runner: `StepClassifier` (`classify_generation`, `classify_image`),
`Classification` (tensors) and its `response()` (the pydantic `ClassifyResponse` a CLI or HTTP
handler serialises), `first_steps`. The rest of the package: `imagenet.py` (class lookup),
`weights.py` (`load_vgg16`), `decoders.py` (`make_decoder`), `figure.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel

from ..schemas import GenerationSettings
from .decoders import LatentDecoder
from .imagenet import ClassifyError, ClassInfo, ClassSet, ImageNetClass
from .weights import ImageClassifier

CONFIDENCE = 0.9  # the study's "recognised" level: the target's probability passes 90 %
MAX_TOP_K = 100


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


# --- the response (what the CLI writes and the endpoint answers) ---------------------------------------
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
    classes: ClassSet = field(default_factory=ClassSet.imagenet)  # the classifier's output classes

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
        classes = self.classes
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
    and one classifier call per chunk, the same numbers as one image at a time.

    fixed_chunks: every call runs at exactly `batch_size` images (the last chunk padded with
    copies of its last image, dropped afterwards), so an image's numbers never depend on how
    many others share its call (float sums of a kernel can change with the batch size)."""

    def __init__(self, decoder: LatentDecoder, classifier: ImageClassifier, batch_size: int = 8,
                 fixed_chunks: bool = False):
        if batch_size < 1:
            raise ClassifyError(f"batch_size must be >= 1, got {batch_size}")
        self.decoder, self.classifier, self.batch_size = decoder, classifier, int(batch_size)
        self.fixed_chunks = bool(fixed_chunks)

    def chunks(self, x: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """x split into calls of batch_size: (chunk, real rows), padded when fixed_chunks."""
        out = []
        for chunk in x.split(self.batch_size):
            real = chunk.shape[0]
            if self.fixed_chunks and real < self.batch_size:
                chunk = torch.cat([chunk, chunk[-1:].expand(self.batch_size - real, *chunk.shape[1:])])
            out.append((chunk, real))
        return out

    @torch.no_grad()
    def classify_latents(self, latents: torch.Tensor, keep_previews: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[M, C, h, w] latents → ([M, 1000] probabilities, [M, 3, H, W] decoded images or None)."""
        probs, previews = [], []
        for chunk, real in self.chunks(latents):
            images = self.decoder.decode(chunk)
            probs.append(self.classifier.probabilities(images)[:real])
            if keep_previews:
                previews.append(images[:real].cpu())
        return torch.cat(probs), (torch.cat(previews) if keep_previews else None)

    @torch.no_grad()
    def classify_images(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.probabilities(c)[:real] for c, real in self.chunks(images)])

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
        resolved = [None if t is None else self.classifier.classes.resolve(t) for t in targets]  # fail before generating

        kept: list[torch.Tensor] = []
        timesteps: list[float] = []

        def on_step(step) -> None:
            kept.append((step.latents if decode == "latent" else step.x0).detach())
            timesteps.append(step.timestep)

        result = sampler.generate(list(prompts), list(seeds), settings, layers=None, callback=on_step,
                                  keep_steps=False, progress=progress, pad_to=batch_rows)
        started = time.perf_counter()
        s = len(kept)
        stacked = torch.stack(kept, dim=1).flatten(0, 1)  # [N·S, C, h, w], prompt-major
        probs, previews = self.classify_latents(stacked, keep_previews)
        classify_s = time.perf_counter() - started
        meta = result.metadata | self.metadata() | {"decode": decode, "top_k": top_k, "mode": "generation",
                                                     "generate_rows": batch_rows}
        meta["timings_s"] = dict(meta.get("timings_s", {})) | {"decode_classify": round(classify_s, 4)}
        out = []
        for i in range(n):
            rows = slice(i * s, (i + 1) * s)
            item_meta = meta | {"prompt": prompts[i], "seed": int(seeds[i])}
            out.append(Classification(probs[rows], list(timesteps), top_k, resolved[i],
                                      None if previews is None else previews[rows], result.images[i], CONFIDENCE,
                                      item_meta, self.classifier.classes))
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
        resolved = [None if t is None else self.classifier.classes.resolve(t) for t in targets]
        tensors = [_image_tensor(image)[:1] for image in images]
        x = torch.cat([self.classifier.preprocess(t) for t in tensors]) if tensors else None
        probs = (torch.cat([self.classifier.preprocessed_probabilities(c)[:real] for c, real in self.chunks(x)])
                 if x is not None else torch.zeros(0, len(self.classifier.classes)))
        out = []
        for i, t in enumerate(tensors):
            meta = {"classifier": self.classifier.metadata(), "top_k": top_k, "mode": "image",
                    "image_size": list(t.shape[-2:])}
            out.append(Classification(probs[i:i + 1], [None], top_k, resolved[i],
                                      t.clamp(0, 1) if keep_images else None, None, CONFIDENCE, meta,
                                      self.classifier.classes))
        return out
