"""The classify service: validated requests → batched generations or real images → VGG-16 per step.

The library side of POST /predictions/classify, shaped like `service.ProbeService`: raw bodies
in, `Outcome(status, JSON body)` out, never raises (bad input is a 400 naming the field, an
internal failure a 500 for the requests it touched), nothing of TorchServe.

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
- Compiled, a call is padded to the next bucket (1, 2, 4, …) so a handful of U-Net graphs serve
  every batch; the padding rows are not classified.

Limits are checked before anything runs: steps ≤ max_steps, height/width multiples of the VAE
factor ≤ max_side, images ≤ max_image_bytes / max_image_pixels, and decoder "tiny" only when a
tiny decoder is configured (no silent fallback to random weights or to the VAE).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .classify import (
    DEFAULT_CLASSIFIER,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    ImageClassifier,
    LatentDecoder,
    StepClassifier,
    decode_image,
    load_vgg16,
    make_decoder,
)
from .generate import to_pil
from .models import SDModel, load_model
from .schemas import MAX_SERVE_STEPS, ImagePayload
from .serving import (
    STOCHASTIC_SCHEDULERS,
    Outcome,
    RequestError,
    bucket,
    buckets_for,
    check_generation,
    internal_error,
    make_sampler,
    parse_body,
    png_b64,
    warm_up,
    worker_info,
)

# Fields that only mean something for a generation: refused with an image rather than ignored.
GENERATION_ONLY = ("seed", "steps", "guidance", "height", "width", "scheduler", "decoder", "decode", "previews")


class ClassifyPreview(ImagePayload):
    """The decoded image of one denoising step: what the classifier saw at that step."""

    step: int


class ClassifyAnswer(ClassifyResponse):
    """The endpoint's answer: the library's ClassifyResponse plus the images. `image` is the
    final generated image (null for a real image); `previews` the per-step decoded images when
    the request asked for them."""

    image: ImagePayload | None = None
    previews: list[ClassifyPreview] | None = None


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

    def group_key(self) -> tuple:
        r = self.request
        if self.is_image:
            return ("image",)
        key = ("generation", r.steps, r.guidance, self.height, self.width, r.scheduler, r.decoder, r.decode)
        return key + ((self.index,) if r.scheduler in STOCHASTIC_SCHEDULERS else ())


class ClassifyService:
    """Serves per-step VGG-16 classifications for one model, one classifier, one or two decoders."""

    def __init__(self, model: SDModel, classifier: ImageClassifier, *, tiny_decoder: LatentDecoder | None = None,
                 compile: bool = False, cache_dir: str | Path | None = None, max_batch: int = 8,
                 pad_batches: bool | None = None, max_side: int | None = None, max_steps: int = MAX_SERVE_STEPS,
                 max_image_bytes: int | None = None, max_image_pixels: int | None = None, chunk_size: int = 8):
        started = time.perf_counter()
        self.model, self.classifier = model, classifier
        self.sampler = make_sampler(model, compile, cache_dir)
        self.compiled = bool(compile)
        self.pad_batches = self.compiled if pad_batches is None else bool(pad_batches)
        self.buckets = buckets_for(max_batch)
        self.max_side = int(max_side or 2 * model.default_size)
        self.max_steps = int(max_steps)
        self.max_image_bytes = int(max_image_bytes or MAX_IMAGE_BYTES)
        self.max_image_pixels = int(max_image_pixels or MAX_IMAGE_PIXELS)
        decoders = {"vae": make_decoder(model, "vae")}
        if tiny_decoder is not None:
            decoders["tiny"] = tiny_decoder
        self.runners = {kind: StepClassifier(dec, classifier, batch_size=chunk_size) for kind, dec in decoders.items()}
        self.worker = worker_info(started)

    @classmethod
    def load(cls, model: str = "tiny", classifier: str | Path = DEFAULT_CLASSIFIER,
             tiny_decoder: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
             attention: str = "sdpa", input_size: int | None = None, **kwargs) -> ClassifyService:
        """Load the model, VGG-16 (a weights file or folder, a hub id, or "random") and, when a
        source is given, the tiny decoder (an AutoencoderTiny folder, a hub id, or "random"), on
        the model's device and dtype. input_size overrides the classifier's input side: only to
        make random-weight tests cheap (the weights' own size otherwise)."""
        sd = load_model(model, device=device, dtype=dtype, attention=attention)
        vgg = load_vgg16(classifier, sd.device, sd.dtype)
        if input_size:
            vgg = ImageClassifier(vgg.module, vgg.source, vgg.random_weights, input_size=int(input_size))
        tiny = None
        if tiny_decoder:
            tiny = make_decoder(sd, "tiny", tiny_decoder)
        return cls(sd, vgg, tiny_decoder=tiny, **kwargs)

    # --- validation ---------------------------------------------------------------------------
    def parse(self, raw: Any, decoded: bool = False, index: int = 0) -> _Job:
        """A raw body → a validated job, or RequestError naming the field."""
        return self.check(parse_body(raw, ClassifyRequest, decoded), index)

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

    # --- running ------------------------------------------------------------------------------
    def handle(self, bodies: Sequence[Any], decoded: Sequence[bool] | None = None) -> list[Outcome]:
        """Answer a batch of raw bodies (decoded[i]: body i is an already-parsed JSON value).
        Never raises: bad input is a 400 for that request only, an internal failure a 500 for
        the requests of its group."""
        started = time.perf_counter()
        outcomes: list[Outcome | None] = [None] * len(bodies)
        jobs: list[_Job] = []
        for i, raw in enumerate(bodies):
            try:
                jobs.append(self.parse(raw, decoded=bool(decoded and decoded[i]), index=i))
            except RequestError as exc:
                outcomes[i] = Outcome(exc.status, exc.body())
            except Exception as exc:  # a validator bug must not take the batch down
                outcomes[i] = internal_error(f"{type(exc).__name__}: {exc}")
        validate_s = time.perf_counter() - started
        for group in self.groups(jobs):
            try:
                run = self.run_images if group[0].is_image else self.run_generation
                for job, body in zip(group, run(group, len(bodies), validate_s), strict=True):
                    outcomes[job.index] = Outcome(200, body)
            except Exception as exc:
                what = "classification" if group[0].is_image else "generation"
                for job in group:
                    outcomes[job.index] = internal_error(f"{what} failed: {type(exc).__name__}: {exc}")
        return [o if o is not None else internal_error("no answer") for o in outcomes]

    def groups(self, jobs: Sequence[_Job]) -> list[list[_Job]]:
        """Jobs that share one call, at most the largest bucket each."""
        by_key: dict[tuple, list[_Job]] = {}
        for job in jobs:
            by_key.setdefault(job.group_key(), []).append(job)
        limit = self.buckets[-1]
        return [members[i:i + limit] for members in by_key.values() for i in range(0, len(members), limit)]

    def run_generation(self, group: list[_Job], batch_size: int, validate_s: float) -> list[dict[str, Any]]:
        """One batched generation + per-step classification for jobs with equal group keys."""
        started = time.perf_counter()
        first = group[0].request
        runner = self.runners[first.decoder]
        rows = len(group)
        padded = bucket(rows, self.buckets, self.pad_batches)
        results = runner.classify_generation(
            self.sampler, [j.request.prompt for j in group], [j.request.seed for j in group], first.settings(),
            decode=first.decode, targets=[j.request.target_class for j in group],
            top_k=max(j.request.top_k for j in group), keep_previews=any(j.request.previews for j in group),
            pad_to=padded)
        library_s = results[0].metadata.get("timings_s", {})
        bodies = []
        for row, (job, result) in enumerate(zip(group, results, strict=True)):
            req = job.request
            result.top_k = req.top_k
            encode_started = time.perf_counter()
            image = ImagePayload(png=png_b64(to_pil(result.image[None])[0]), height=job.height, width=job.width)
            previews = None
            if req.previews:
                previews = [ClassifyPreview(step=s, png=png_b64(img), height=job.height, width=job.width)
                            for s, img in enumerate(to_pil(result.previews))]
            encode_s = time.perf_counter() - encode_started
            meta = self.metadata(result, runner, batch_size, rows, padded, row)
            meta["settings"] = {"prompt": req.prompt, "seed": req.seed, "steps": req.steps, "guidance": req.guidance,
                                "height": job.height, "width": job.width, "scheduler": req.scheduler,
                                "timesteps": result.timesteps}
            meta["decode"] = req.decode
            meta["timings_ms"] = {
                "validate": round(validate_s * 1e3, 2),
                "denoise": round(library_s.get("denoise", 0.0) * 1e3, 2),
                "decode_final": round(library_s.get("decode", 0.0) * 1e3, 2),
                "decode_classify": round(library_s.get("decode_classify", 0.0) * 1e3, 2),
                "encode_images": round(encode_s * 1e3, 2),
                "total": round((time.perf_counter() - started + validate_s) * 1e3, 2),
            }
            bodies.append(self.answer(result, meta, image=image, previews=previews))
        return bodies

    def run_images(self, group: list[_Job], batch_size: int, validate_s: float) -> list[dict[str, Any]]:
        """Real images of one batch: classified together."""
        started = time.perf_counter()
        runner = self.runners["vae"]  # the decoder plays no part: images go straight to the classifier
        results = runner.classify_image_batch([j.image for j in group], [j.request.target_class for j in group],
                                              top_k=max(j.request.top_k for j in group), keep_images=False)
        classify_s = time.perf_counter() - started
        bodies = []
        for row, (job, result) in enumerate(zip(group, results, strict=True)):
            result.top_k = job.request.top_k
            meta = self.metadata(result, None, batch_size, len(group), len(group), row)
            meta["settings"] = {"image_size": [job.height, job.width]}
            meta["timings_ms"] = {"validate": round(validate_s * 1e3, 2), "classify": round(classify_s * 1e3, 2),
                                  "total": round((time.perf_counter() - started + validate_s) * 1e3, 2)}
            bodies.append(self.answer(result, meta))
        return bodies

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
    def answer(result: Classification, metadata: dict[str, Any], image: ImagePayload | None = None,
               previews: list[ClassifyPreview] | None = None) -> dict[str, Any]:
        response = result.response()
        fields = {name: getattr(response, name) for name in ClassifyResponse.model_fields if name != "metadata"}
        return ClassifyAnswer(**fields, metadata=metadata, image=image, previews=previews).model_dump(mode="json")

    # --- start-up -----------------------------------------------------------------------------
    def warm(self, batch_sizes: Sequence[int] = (1,), settings: Mapping[str, Any] | None = None) -> float:
        """Compile (or load from the inductor cache) the U-Net graphs of these batch sizes with
        one short request each, and run the classifier once, so the first real request does not
        pay for it."""
        return warm_up(self, batch_sizes, {"prompt": "warm-up", "steps": 2, **(settings or {})})
