"""The classify service: validated requests → batched generations or real images → VGG-16 per step.

Why the batching looks the way it does:
- Generation requests with equal shape settings (steps, guidance, height, width, scheduler) AND
  equal decoder / decode share one `StepClassifier.classify_generation` call: one denoising loop
  for all their prompts, then decoder + VGG-16 over all their steps in chunks. Every row draws
  its initial noise from its own seed, so a batched answer equals the unbatched one up to float
  rounding. Stochastic schedulers (euler_a, ddpm) draw step noise from one generator per call,
  so their requests run alone to keep that promise.
- top_k, target_class and previews are per request: they change what is reported, not what is
  computed, so they do not split a batch.
- Real-image requests of one batch are classified together (each preprocessed alone, one
  chunked VGG-16 pass): the study's generated-vs-real comparison at the same cost per image.
- batch_invariant (the default): every denoising loop runs at the largest bucket and every
  decoder + VGG-16 call at exactly `chunk_size` images (padding dropped afterwards), so an
  answer's bytes never depend on what else is in flight. Off, and compiled, a call is padded
  to the next bucket (1, 2, 4, …) so a handful of U-Net graphs serve every batch; the padding
  rows are not classified.

Limits are checked before anything runs: steps ≤ max_steps, height/width multiples of the VAE
factor ≤ max_side, images ≤ max_image_bytes / max_image_pixels, and decoder "tiny" only when a
tiny decoder is configured (no silent fallback to random weights or to the VAE).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from ..classify import (
    DEFAULT_CLASSIFIER,
    Classification,
    ClassifyResponse,
    ImageClassifier,
    LatentDecoder,
    StepClassifier,
    load_classifier,
    make_decoder,
)
from ..generate import to_pil
from ..models import SDModel, load_model
from .base import PATH, Batch, RequestError, Service, ServiceConfig, check_generation, png_b64
from .schemas import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    ClassifyAnswer,
    ClassifyPreview,
    ClassifyRequest,
    ImagePayload,
    decode_image,
)

# Fields that only mean something for a generation: refused with an image rather than ignored.
GENERATION_ONLY = ("seed", "steps", "guidance", "height", "width", "scheduler", "decoder", "decode", "previews")


class ClassifyConfig(ServiceConfig):
    """The classify model's settings (handlers/classify-config.yaml, `handler:`). Weights never
    appear silently: `classifier` names VGG-16 weights or says `random`; `tiny_decoder` is empty
    (decoder "tiny" is a 400), a TAESD folder / hub id, or `random`."""

    classifier: str = Field(DEFAULT_CLASSIFIER, json_schema_extra=PATH,
                            description='VGG-16 weights: file, folder or hub id; "random" only when asked; "scenes" '
                                        '(or scenes:PATH): the scenes label models\' colour × kind classifier')
    tiny_decoder: str = Field("", json_schema_extra=PATH,
                              description='AutoencoderTiny (TAESD) folder or hub id, "random", or "" = none')
    preprocessing: Literal["timm", "caffe"] = Field(
        "timm", description="timm: the weights' own (vgg16.tv_in1k); caffe: Keras' VGG-16 as the capstone (8-bit, "
                            "nearest resize, BGR, ImageNet means in 0-255, no std), for Caffe-converted weights")
    input_size: int = Field(0, ge=0, description="classifier input side; 0 = the weights' own (224); smaller: tests")
    chunk_size: int = Field(8, ge=1, description="images per decoder + VGG-16 call")
    max_image_bytes: int = Field(0, ge=0, description="largest real image in bytes; 0 = 20 MiB")
    max_image_pixels: int = Field(0, ge=0, description="largest real image in pixels; 0 = 4096 × 4096")


@dataclass
class _Job:
    """A validated request and what it resolved to."""

    index: int
    request: ClassifyRequest
    height: int = 0
    width: int = 0
    image: Any = None  # the decoded PIL image (image mode)

    @property
    def is_image(self) -> bool:
        return self.request.image is not None


@dataclass
class _Classified:
    """What a group's run leaves for each answer."""

    result: Classification
    runner: StepClassifier | None
    rows: int
    padded: int
    row: int
    timings: dict[str, float]


class ClassifyService(Service):
    """Serves per-step VGG-16 classifications for one model, one classifier, one or two decoders."""

    Config = ClassifyConfig
    Request = ClassifyRequest

    def __init__(self, model: SDModel, classifier: ImageClassifier, config: ClassifyConfig | None = None, *,
                 tiny_decoder: LatentDecoder | None = None, **settings: Any):
        self.classifier, self.tiny_decoder = classifier, tiny_decoder
        super().__init__(model, config, **settings)

    def setup(self) -> None:
        cfg = self.config
        self.max_image_bytes = int(cfg.max_image_bytes or MAX_IMAGE_BYTES)
        self.max_image_pixels = int(cfg.max_image_pixels or MAX_IMAGE_PIXELS)
        decoders = {"vae": make_decoder(self.model, "vae")}
        if self.tiny_decoder is not None:
            decoders["tiny"] = self.tiny_decoder
        self.runners = {kind: StepClassifier(dec, self.classifier, batch_size=cfg.chunk_size,
                                              fixed_chunks=cfg.batch_invariant)
                        for kind, dec in decoders.items()}

    @classmethod
    def from_config(cls, config: ClassifyConfig, **kwargs: Any) -> ClassifyService:
        """Load the model, VGG-16 (a weights file or folder, a hub id, or "random") and, when a
        source is given, the tiny decoder (an AutoencoderTiny folder, a hub id, or "random"), on
        the model's device and dtype. input_size overrides the classifier's input side: only to
        make random-weight tests cheap (the weights' own size otherwise)."""
        sd = load_model(config.model, device=config.device, dtype=config.dtype, attention=config.attention)
        vgg = load_classifier(config.classifier, sd.device, sd.dtype, preprocessing=config.preprocessing)
        if config.input_size:
            vgg = ImageClassifier(vgg.module, vgg.source, vgg.random_weights, input_size=config.input_size,
                                  preprocessing=vgg.preprocessing, classes=vgg.classes, arch=vgg.arch)
        tiny = make_decoder(sd, "tiny", config.tiny_decoder) if config.tiny_decoder else None
        return cls(sd, vgg, config, tiny_decoder=tiny, **kwargs)

    @classmethod
    def load(cls, model: str = "tiny", classifier: str = DEFAULT_CLASSIFIER, tiny_decoder: str | None = None,
             **settings: Any) -> ClassifyService:
        """`from_config` with the settings as keywords (max_batch, pad_batches too)."""
        extra = {k: settings.pop(k) for k in ("max_batch", "pad_batches") if k in settings}
        config = cls.Config(model=str(model), classifier=str(classifier), tiny_decoder=str(tiny_decoder or ""),
                            **settings)
        return cls.from_config(config, **extra)

    # --- validation ---------------------------------------------------------------------------
    def validation_context(self) -> dict[str, Any]:
        return {"classes": self.classifier.classes}  # target_class is one of this classifier's classes

    def check(self, req: ClassifyRequest, index: int = 0) -> _Job:
        """A schema-valid request against this service's model, decoders and limits."""
        if req.image is not None:
            extra = [name for name in GENERATION_ONLY if name in req.model_fields_set]
            if extra:
                raise RequestError("invalid_request", extra[0],
                                   f"{extra[0]!r} only applies to a generation (prompt); an image is classified as is")
            size = len(req.image) * 3 // 4 - req.image[-2:].count("=")
            if size > self.max_image_bytes:
                raise RequestError("invalid_request", "image",
                                   f"the image is {size} bytes; this service takes at most {self.max_image_bytes}")
            try:
                image = decode_image(req.image)
            except ValueError as exc:
                raise RequestError("invalid_request", "image", str(exc)) from None
            if image.width * image.height > self.max_image_pixels:
                raise RequestError("invalid_request", "image",
                                   f"the image is {image.width}×{image.height} pixels; this service takes at most "
                                   f"{self.max_image_pixels} pixels")
            return _Job(index, req, image.height, image.width, image)
        height, width = check_generation(req, self.model, self.max_steps, self.max_side)
        if req.decoder not in self.runners:
            raise RequestError("invalid_request", "decoder",
                               f"no {req.decoder} decoder is configured on this server (handler setting "
                               f"tiny_decoder); use decoder 'vae'")
        return _Job(index, req, height, width)

    def group_key(self, job: _Job) -> tuple:
        r = job.request
        if job.is_image:
            return ("image",)
        return ("generation", r.steps, r.guidance, job.height, job.width, r.scheduler, r.decoder, r.decode)

    def failed(self, group: list[_Job]) -> str:
        return "classification" if group[0].is_image else "generation"

    # --- running ------------------------------------------------------------------------------
    def run_group(self, group: list[_Job], batch: Batch) -> list[_Classified]:
        return self.run_images(group) if group[0].is_image else self.run_generation(group)

    def run_generation(self, group: list[_Job]) -> list[_Classified]:
        """One batched generation + per-step classification for jobs with equal group keys."""
        started = time.perf_counter()
        first = group[0].request
        runner = self.runners[first.decoder]
        rows = len(group)
        padded = self.bucket(rows)
        results = runner.classify_generation(
            self.sampler, [j.request.prompt for j in group], [j.request.seed for j in group], first.settings(),
            decode=first.decode, targets=[j.request.target_class for j in group],
            top_k=max(j.request.top_k for j in group), keep_previews=any(j.request.previews for j in group),
            pad_to=padded)
        timings = dict(results[0].metadata.get("timings_s", {})) | {"started": started}
        return [_Classified(result, runner, rows, padded, row, timings) for row, result in enumerate(results)]

    def run_images(self, group: list[_Job]) -> list[_Classified]:
        """Real images of one batch: classified together."""
        started = time.perf_counter()
        runner = self.runners["vae"]  # the decoder plays no part: images go straight to the classifier
        results = runner.classify_image_batch([j.image for j in group], [j.request.target_class for j in group],
                                              top_k=max(j.request.top_k for j in group), keep_images=False)
        timings = {"classify": time.perf_counter() - started, "started": started}
        return [_Classified(result, None, len(group), len(group), row, timings) for row, result in enumerate(results)]

    # --- answering ----------------------------------------------------------------------------
    def answer(self, job: _Job, done: _Classified, batch: Batch) -> dict[str, Any]:
        req, result = job.request, done.result
        result.top_k = req.top_k
        meta = self.metadata(result, done.runner, batch.requests, done.rows, done.padded, done.row)
        meta["protocol"] = req.protocol
        validate_ms = round(batch.validate_s * 1e3, 2)
        if job.is_image:
            meta["settings"] = {"image_size": [job.height, job.width]}
            meta["timings_ms"] = {"validate": validate_ms, "classify": round(done.timings["classify"] * 1e3, 2),
                                  "total": round((time.perf_counter() - done.timings["started"] + batch.validate_s)
                                                 * 1e3, 2)}
            return self.body(result, meta)
        encode_started = time.perf_counter()
        image = ImagePayload(png=png_b64(to_pil(result.image[None])[0]), height=job.height, width=job.width)
        previews = None
        if req.previews:
            previews = [ClassifyPreview(step=s, png=png_b64(img), height=job.height, width=job.width)
                        for s, img in enumerate(to_pil(result.previews))]
        encode_s = time.perf_counter() - encode_started
        meta["settings"] = {"prompt": req.prompt, "seed": req.seed, "steps": req.steps, "guidance": req.guidance,
                            "height": job.height, "width": job.width, "scheduler": req.scheduler,
                            "timesteps": result.timesteps}
        meta["decode"] = req.decode
        library_s = done.timings
        meta["timings_ms"] = {
            "validate": validate_ms,
            "denoise": round(library_s.get("denoise", 0.0) * 1e3, 2),
            "decode_final": round(library_s.get("decode", 0.0) * 1e3, 2),
            "decode_classify": round(library_s.get("decode_classify", 0.0) * 1e3, 2),
            "encode_images": round(encode_s * 1e3, 2),
            "total": round((time.perf_counter() - library_s["started"] + batch.validate_s) * 1e3, 2),
        }
        return self.body(result, meta, image=image, previews=previews)

    def metadata(self, result: Classification, runner: StepClassifier | None, batch_size: int, rows: int,
                 padded: int, row: int) -> dict[str, Any]:
        """What produced an answer. Only this request's prompt and seed appear (never those of
        the other requests it was batched with); random weights are flagged in `warnings`."""
        parts = {"classifier": self.classifier.metadata()}
        if runner is not None:
            parts["decoder"] = runner.decoder.metadata()
        return {
            **self.model.metadata(),
            "compiled": self.compiled,
            "mode": result.metadata.get("mode"),
            **parts,
            "top_k": result.top_k,
            "batch": {"requests": batch_size, "rows": rows, "padded_to": padded, "row": row},
            "worker": self.worker,
            "warnings": [f"{name}: {p['warning']}" for name, p in parts.items() if p.get("warning")],
        }

    @staticmethod
    def body(result: Classification, metadata: dict[str, Any], image: ImagePayload | None = None,
             previews: list[ClassifyPreview] | None = None) -> dict[str, Any]:
        response = result.response()
        fields = {name: getattr(response, name) for name in ClassifyResponse.model_fields if name != "metadata"}
        return ClassifyAnswer(**fields, metadata=metadata, image=image, previews=previews).model_dump(mode="json")
