"""The denoising loop: the study's settings and noise convention, per-step outputs, capture.

`Sampler` owns the capturing (optionally compiled) U-Net of one model. `Sampler.start` returns a
`Denoising` run that is advanced one step at a time (`predict` then `advance`), so callers that
edit activations mid-generation (intervention) can predict, optimise, predict again with
patches, then advance. `Sampler.generate` is the plain loop over it, and `Sampler.trace` the
same loop as a context manager in the words of baukit's TraceDict / nnsight:

    with sampler.trace(prompts, seeds, layers="dec4") as run:
        for step in run:
            step.activations["dec4.0"]          # read a layer at this step
            step.patch("dec4.0", edited)        # and replace it in this step's forward
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .capture import CapturingUNet, validate_half
from .compiling import compile_unet, use_cache_dir
from .decode import vae_decoder
from .models import SDModel
from .schemas import GenerationSettings

SCHEDULERS = {
    "lms": "LMSDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
}


TIMESTEP_SPACINGS = ("study", "config", "linspace", "leading", "trailing")
LATENT_DTYPES = ("float32", "model")


def make_scheduler(model: SDModel, name: str, spacing: str = "study"):
    """A fresh diffusers scheduler of kind `name`, configured from the model's scheduler config.

    `spacing` decides the timesteps. "study" (default) pins LMS to linspace spacing, what the
    study's diffusers did: 999, 927.6, … 0 and an initial sigma of 14.61 for SD's schedule at 15
    steps, whatever the folder says (SD v1.4 re-saved by current diffusers says "leading": 925,
    859, … and 9.60); other schedulers keep the folder's spacing. "config" takes the folder's
    as is; "linspace", "leading" and "trailing" force that spacing."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(TIMESTEP_SPACINGS)}")
    config = dict(model.scheduler_config)
    if spacing == "study" and name == "lms":
        config["timestep_spacing"] = "linspace"
    elif spacing not in ("study", "config"):
        config["timestep_spacing"] = spacing
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def study_noise(seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The study's initial noise before scaling: torch.manual_seed(seed), then a CPU
    torch.randn of (1, 4, H/8, W/8). A private generator draws the same numbers without
    touching the global RNG, so every prompt of a batch gets exactly its unbatched noise."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, *shape), generator=gen)


@dataclass
class StepOutput:
    """What one denoising step produced. `latents` is the latent after the step (x_{t-1});
    `x0` the scheduler's prediction of the clean latent; `activations` the captured attn1
    outputs computed at this step ([rows, H·W, C] per layer name)."""

    index: int
    timestep: float
    latents: torch.Tensor
    x0: torch.Tensor
    activations: dict[str, torch.Tensor]

    def first_rows(self, n: int, batch: int) -> StepOutput:
        """The same step restricted to the first n of `batch` prompts (padding rows dropped);
        activations of both CFG halves ([2·batch, …]: uncond then cond) keep both halves."""
        def rows(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:n], x[batch:batch + n]]) if x.shape[0] == 2 * batch else x[:n]

        return StepOutput(self.index, self.timestep, self.latents[:n], self.x0[:n],
                          {k: rows(v) for k, v in self.activations.items()})


@dataclass
class GenerationResult:
    images: torch.Tensor  # [N, 3, H, W] float32 in [0, 1], on CPU
    latents: torch.Tensor  # final latents [N, 4, h, w]
    steps: list[StepOutput]
    metadata: dict[str, Any] = field(default_factory=dict)


def _x0_from_eps(scheduler, sample: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
    """Clean-latent prediction for alpha-parameterised schedulers that don't report one."""
    ab = scheduler.alphas_cumprod.to(sample.device)[int(t)].to(sample.dtype)
    if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        return ab.sqrt() * sample - (1 - ab).sqrt() * model_output
    return (sample - (1 - ab).sqrt() * model_output) / ab.sqrt()


def noised_model_input(scheduler, x0: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """The U-Net input for clean latents `x0` noised to the scheduler's step `index` (its
    forward process), without running the steps before it. Sigma-parameterised schedulers
    (LMS, Euler: init_noise_sigma > 1) use x0 + σ·ε scaled by 1/√(σ²+1); alpha-parameterised
    ones (DDIM, DDPM, PNDM, DPM) use √ᾱ·x0 + √(1−ᾱ)·ε."""
    if float(scheduler.init_noise_sigma) > 1.0:
        sigma = scheduler.sigmas[index].to(x0.device, torch.float32)
        return ((x0.float() + sigma * noise.float()) / (sigma**2 + 1).sqrt()).to(x0.dtype)
    t = int(scheduler.timesteps[index])
    ab = scheduler.alphas_cumprod[t].to(x0.device, torch.float32)
    return (ab.sqrt() * x0.float() + (1 - ab).sqrt() * noise.float()).to(x0.dtype)


class Denoising:
    """The state of one batched generation, advanced one step at a time."""

    def __init__(self, sampler: Sampler, prompts: list[str], seeds: list[int], settings: GenerationSettings,
                 capture: tuple[str, ...], half: str):
        model = sampler.model
        self.sampler, self.settings, self.capture, self.half = sampler, settings, capture, half
        self.prompts, self.seeds = list(prompts), [int(s) for s in seeds]
        height = settings.height or model.default_size
        width = settings.width or model.default_size
        self.height, self.width = height, width
        self.scheduler = make_scheduler(model, settings.scheduler, sampler.timestep_spacing)
        self.scheduler.set_timesteps(settings.steps, device=model.device)
        self.timesteps = self.scheduler.timesteps
        # The study kept its latents float32 under autocast (the U-Net in fp16): the scheduler's
        # arithmetic then runs in float32 and only the U-Net's input is cast.
        self.latent_dtype = torch.float32 if sampler.latent_dtype == "float32" else model.dtype
        shape = (model.unet.config.in_channels, height // model.vae_scale_factor, width // model.vae_scale_factor)
        noise = torch.cat([study_noise(s, shape) for s in self.seeds])
        self.latents = (noise.to(model.device) * self.scheduler.init_noise_sigma).to(self.latent_dtype)
        cond = model.encode_prompts(self.prompts)
        self.text = torch.cat([model.encode_prompts([""] * len(self.prompts)), cond]) if settings.cfg else cond
        self.index = 0
        self.generator = torch.Generator(model.device).manual_seed(self.seeds[0])  # ancestral schedulers only

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def timestep(self):
        return self.timesteps[self.index]

    @torch.no_grad()
    def predict(self, patches: Mapping[str, torch.Tensor] | None = None):
        """Guided noise prediction at the current step and the captured activations."""
        t = self.timestep
        cfg = self.settings.cfg
        latent_in = torch.cat([self.latents] * 2) if cfg else self.latents
        latent_in = self.scheduler.scale_model_input(latent_in, t).to(self.sampler.model.dtype)
        noise, acts = self.sampler.unet_fn(latent_in, t, self.text, capture=self.capture, half=self.half,
                                           cfg=cfg, patches=patches)
        if cfg:
            uncond, cond = noise.chunk(2)
            noise = uncond + self.settings.guidance * (cond - uncond)
        return noise, acts

    @torch.no_grad()
    def advance(self, noise: torch.Tensor, activations: dict[str, torch.Tensor]) -> StepOutput:
        """Scheduler step with a prediction from `predict`; returns this step's outputs."""
        t = self.timestep
        kwargs = {"generator": self.generator} if "generator" in self.scheduler.step.__code__.co_varnames else {}
        sample = self.latents
        out = self.scheduler.step(noise, t, sample, **kwargs)
        x0 = getattr(out, "pred_original_sample", None)
        if x0 is None:
            x0 = _x0_from_eps(self.scheduler, sample, noise, t)
        self.latents = out.prev_sample.to(self.latent_dtype)
        step = StepOutput(self.index, float(t), self.latents, x0.to(self.latents.dtype), activations)
        self.index += 1
        return step


class Sampler:
    """Runs the model's (optionally compiled) capturing U-Net through the denoising loop."""

    def __init__(self, model: SDModel, compile: bool = False, cache_dir: str | Path | None = None,
                 timestep_spacing: str = "study", latent_dtype: str = "float32"):
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep spacing {timestep_spacing!r}; use one of {', '.join(TIMESTEP_SPACINGS)}")
        if latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"unknown latent dtype {latent_dtype!r}; use one of {', '.join(LATENT_DTYPES)}")
        self.model = model
        self.timestep_spacing, self.latent_dtype = timestep_spacing, latent_dtype
        self.capturing = CapturingUNet(model.unet)
        self.decoder = vae_decoder(model)
        self.compiled = bool(compile)
        if compile:
            use_cache_dir(cache_dir)
            self.unet_fn = compile_unet(self.capturing, model.device)
        else:
            self.unet_fn = self.capturing

    def select_layers(self, selection: str | Iterable[str] | None) -> tuple[str, ...]:
        return self.capturing.select_layers(selection)

    def start(self, prompts: list[str], seeds: list[int], settings: GenerationSettings | None = None,
              layers: str | Iterable[str] | None = None, half: str = "cond") -> Denoising:
        settings = settings or GenerationSettings()
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            raise ValueError("no prompts given")
        step = self.model.vae_scale_factor
        for name, side in (("height", settings.height), ("width", settings.width)):
            if side is not None and side % step:
                raise ValueError(f"{name} must be a multiple of {step} for this model, got {side}")
        return Denoising(self, prompts, seeds, settings, self.select_layers(layers), validate_half(half))

    def trace(self, prompts: list[str], seeds: list[int], settings: GenerationSettings | None = None,
              layers: str | Iterable[str] | None = None, half: str = "cond") -> Trace:
        """A generation to step through in a `with` block: iterate it for each step's
        activations, `step.patch(layer, value)` to replace a layer's output in that step's
        forward; afterwards `run.latents` / `run.images()`."""
        return Trace(self.start(prompts, seeds, settings, layers, half))

    def generate(self, prompts: list[str], seeds: list[int], settings: GenerationSettings | None = None,
                 layers: str | Iterable[str] | None = None, half: str = "cond",
                 callback: Callable[[StepOutput], None] | None = None, keep_steps: bool = True,
                 progress: bool = False, pad_to: int | None = None,
                 keep_padding: bool = False) -> GenerationResult:
        """Generate a batch of images; every step's outputs go to `callback` and, when
        keep_steps, into the result (activations of all steps of a full-size model are large:
        stream them to an ActivationStore through the callback instead).

        pad_to: run the loop at this batch size (the last prompt and seed repeated), so a
        compiled U-Net reuses the graph of a few bucket sizes; the padding rows are dropped from
        every step output, the images, latents and metadata (keep_padding: step outputs keep
        them, as rows n… after the n real ones, so work on them runs at the padded size too)."""
        from tqdm.auto import tqdm

        n = len(prompts)
        batch = max(n, int(pad_to or n))
        extra = batch - n
        run = self.start(list(prompts) + list(prompts[-1:]) * extra, list(seeds) + list(seeds[-1:]) * extra,
                         settings, layers, half)
        steps: list[StepOutput] = []
        started = time.perf_counter()
        for _ in tqdm(range(len(run.timesteps)), desc="denoising", disable=not progress, unit="step"):
            step = run.advance(*run.predict())
            if extra and not keep_padding:
                step = step.first_rows(n, batch)
            if callback is not None:
                callback(step)
            if keep_steps:
                steps.append(step)
        denoise_s = time.perf_counter() - started
        images = self.decode(run.latents)[:n]
        meta = self.metadata(run)
        meta["prompts"], meta["seeds"] = meta["prompts"][:n], meta["seeds"][:n]
        meta["timings_s"] = {"denoise": round(denoise_s, 4), "decode": round(time.perf_counter() - started - denoise_s, 4)}
        return GenerationResult(images, run.latents[:n], steps, meta)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """VAE-encode [N, 3, H, W] images in [0, 1] to scaled latents (the posterior mean)."""
        vae = self.model.vae
        x = images.to(self.model.device, vae.dtype) * 2 - 1
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor

    @torch.no_grad()
    def noised_activations(self, images: torch.Tensor, prompts: list[str], seeds: list[int],
                           settings: GenerationSettings | None = None, layers: str | Iterable[str] | None = "all",
                           steps: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
        """Activations of noisy versions of real images: each image is VAE-encoded, noised to
        every requested step's timestep (the study's noise for its seed), and all steps go
        through the U-Net in one batch with the text condition (conditional rows only: they do
        not depend on the unconditional ones). Returns {layer: [N, S, H·W, C]}."""
        settings = settings or GenerationSettings()
        names = self.select_layers(layers)
        scheduler = make_scheduler(self.model, settings.scheduler, self.timestep_spacing)
        scheduler.set_timesteps(settings.steps, device=self.model.device)
        indices = list(range(len(scheduler.timesteps))) if steps is None else list(steps)
        x0 = self.encode(images)
        text = self.model.encode_prompts(list(prompts))
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for i, seed in enumerate(seeds):
            noise = study_noise(seed, tuple(x0.shape[1:])).to(x0.device)
            batch = torch.cat([noised_model_input(scheduler, x0[i:i + 1], noise, k) for k in indices])
            t = scheduler.timesteps[indices].to(self.model.device)
            _, acts = self.unet_fn(batch, t, text[i:i + 1].expand(len(indices), -1, -1), capture=names, cfg=False)
            for n in names:
                out[n].append(acts[n])
        return {n: torch.stack(v) for n, v in out.items()}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents to float32 images in [0, 1] on CPU, [N, 3, H, W]."""
        return self.decoder.decode(latents).cpu()

    def metadata(self, run: Denoising | None = None) -> dict[str, Any]:
        meta = self.model.metadata() | {"compiled": self.compiled, "capture_point": "attn1.to_out (before residual)"}
        if run is not None:
            meta |= {"prompts": run.prompts, "seeds": run.seeds, "scheduler": run.settings.scheduler,
                     "steps": run.settings.steps, "guidance": run.settings.guidance, "height": run.height,
                     "width": run.width, "layers": list(run.capture), "half": run.half,
                     "timesteps": [float(t) for t in run.timesteps],
                     "timestep_spacing": run.scheduler.config.get("timestep_spacing"),
                     "timestep_spacing_option": self.timestep_spacing,
                     "init_noise_sigma": float(run.scheduler.init_noise_sigma),
                     "latent_dtype": str(run.latent_dtype).removeprefix("torch.")}
        return meta


@dataclass
class TracedStep:
    """One step of a `Trace`: what the forward captured, and the patches to apply to it.

    `activations` are the captured layers of this step's forward ([rows, H·W, C]); `patch`
    replaces a layer's output (the conditional half, or every row) and runs the step's forward
    again with it before the scheduler steps; `patched` then holds what that forward captured
    and `output` is the advanced step (latents, x0)."""

    index: int
    timestep: float
    activations: dict[str, torch.Tensor]
    patches: dict[str, torch.Tensor] = field(default_factory=dict)
    patched: dict[str, torch.Tensor] | None = None
    output: StepOutput | None = None

    def patch(self, layer: str, value: torch.Tensor) -> None:
        if self.output is not None:
            raise RuntimeError(f"step {self.index} has already been advanced: patch inside the loop body")
        self.patches[layer] = value


class Trace:
    """`with sampler.trace(...) as run: for step in run: …` — a `Denoising` run stepped by a for
    loop. Each iteration predicts, yields the step, then (re)predicts with the step's patches and
    advances; leaving the block early leaves the run where it stopped."""

    def __init__(self, run: Denoising):
        self.run = run
        self._layers = set(run.sampler.capturing.layer_names)

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc) -> None:
        self.run.sampler.capturing._session.ctx = None  # nothing of this run outlives the block

    def __iter__(self) -> Iterator[TracedStep]:
        run = self.run
        while not run.done:
            noise, acts = run.predict()
            step = TracedStep(run.index, float(run.timestep), acts)
            yield step
            if step.patches:
                unknown = sorted(set(step.patches) - self._layers)
                if unknown:
                    raise KeyError(f"cannot patch unknown layer(s) {', '.join(unknown)}; layers: "
                                   f"{', '.join(sorted(self._layers))}")
                noise, step.patched = run.predict(step.patches)
                acts = step.patched
            step.output = run.advance(noise, acts)

    @property
    def latents(self) -> torch.Tensor:
        return self.run.latents

    def images(self) -> torch.Tensor:
        """The current latents decoded: [N, 3, H, W] in [0, 1] on CPU (the final images once the
        loop has run to the end)."""
        return self.run.sampler.decode(self.run.latents)


def to_pil(images: torch.Tensor):
    """[N, 3, H, W] floats in [0, 1] → list of PIL images."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]
