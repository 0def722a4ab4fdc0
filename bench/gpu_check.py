"""GPU check: the grouped probe kernel, the full SD v1.4 U-Net and the probe service's stages.

One section per run (bench/gpu_check.sh runs each in its own process with its own timeout); each
writes OUT/<section>.json after every variant, so a killed section keeps what it finished.
- env:     versions, device, Triton / xformers availability, where diffusers was imported from;
- kernel:  ProbeBank.apply through the Triton kernel (compiled) vs the torch fallback at SD v1.4
           shapes (16 layers × 3 properties, 1 and 4 rows): equal to 1e-3, ms per step;
- unet:    the SD v1.4 U-Net (its config, random weights), fp16, 512² (64² latent), batch 2 (CFG):
           eager with SDPA and with xformers, capture of 16 layers eager / compiled, compiled, CUDA
           graphs (mode="reduce-overhead") with and without capture: it/s, first call, max diffs;
- service: the probe endpoint's stages in-process on that model with a random bank: text encode,
           denoise / probes / map encoding per step, VAE decode and encode, image PNG.
--summary reads the section files, writes OUT/summary.json and prints ONE JSON line.
--dry-run runs the same code paths on CPU at the tiny model's shapes (its configs), 2 steps, the
Triton kernel in interpreter mode and torch.compile with dynamo's "eager" backend.

    python bench/gpu_check.py --section env|kernel|unet|service --out DIR [--dry-run] [--budget-s S]
    python bench/gpu_check.py --summary --out DIR [--rc kernel=0 ...]
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from ldmprobe.atomic import atomic_path  # noqa: E402
from ldmprobe.jsonout import dumps, loads_strict, print_line  # noqa: E402

SECTIONS = ("env", "kernel", "unet", "service")
PROPS = ("foreground", "depth", "shading")
SERVICE_LAYER = "dec4.0"  # the service answers one layer per property; the largest maps
PROMPT = "a red apple on a wooden table"
PACKAGES = ("torch", "triton", "diffusers", "transformers", "tokenizers", "huggingface_hub", "safetensors",
            "pydantic", "pydantic_core", "numpy", "pillow", "regex", "xformers")


class Skipped(Exception):
    """A variant that cannot run here (the reason is recorded, not an error)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


class Context:
    """What every section needs: device, dtype, sizes, timing, the compile backend."""

    def __init__(self, args: argparse.Namespace):
        self.dry = args.dry_run
        self.device = torch.device(args.device if args.device != "auto" else
                                   ("cpu" if self.dry or not torch.cuda.is_available() else "cuda"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.backend = args.compile_backend or ("eager" if self.dry else "inductor")
        self.repeats = args.repeats or (2 if self.dry else 10)
        self.steps = args.steps or (2 if self.dry else 15)
        self.target_s = 0.002 if self.dry else 0.05  # one timed measurement lasts about this long

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ms(self, fn: Callable[[], Any], repeats: int | None = None) -> dict[str, Any]:
        """Median / min ms per call over `repeats` measurements after one warm-up call; each
        measurement runs enough calls to last about target_s (device synchronised around it)."""
        fn()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        inner = max(1, min(200, round(self.target_s / max(time.perf_counter() - t0, 1e-6))))
        runs = []
        for _ in range(repeats or self.repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            self.sync()
            runs.append((time.perf_counter() - t0) / inner * 1e3)
        return {"median_ms": round(statistics.median(runs), 4), "min_ms": round(min(runs), 4),
                "runs_ms": [round(r, 4) for r in runs], "calls_per_run": inner}

    def compile(self, module: torch.nn.Module, mode: str | None = None):
        """The library's compile (ldmprobe.compiling.compile_unet) or, with another backend /
        a mode, torch.compile with the same fullgraph / static-shape settings."""
        from ldmprobe.compiling import compile_unet

        if self.backend == "inductor" and mode is None:
            return compile_unet(module, self.device)
        kwargs = {"mode": mode} if self.backend == "inductor" else {}
        return torch.compile(module, fullgraph=True, dynamic=False, backend=self.backend, **kwargs)


class Report:
    """One section's JSON file, rewritten atomically after every variant."""

    def __init__(self, out: Path, section: str, ctx: Context, budget_s: float):
        self.path = out / f"{section}.json"
        self.ctx, self.budget_s, self.started = ctx, budget_s, time.monotonic()
        self.data: dict[str, Any] = {
            "section": section, "status": "running", "dry_run": ctx.dry, "device": str(ctx.device),
            "dtype": str(ctx.dtype).removeprefix("torch."), "compile_backend": ctx.backend, "budget_s": budget_s,
            "results": {}, "skipped": {}, "errors": {}, "variant_s": {}}
        self.save()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        self.data["wall_s"] = round(time.monotonic() - self.started, 2)
        if self.ctx.device.type == "cuda":
            self.data["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.ctx.device) / 2**30, 3)
        with atomic_path(self.path) as tmp:
            tmp.write_text(dumps(self.data, indent=2) + "\n")

    def run(self, name: str, fn: Callable[[], Any], need_s: float = 0.0) -> Any:
        """results[name] = fn(); an exception goes to errors (traceback on stderr), Skipped to
        skipped; not started when less than need_s of the budget is left."""
        if self.left() < need_s:
            self.data["skipped"][name] = f"budget: {self.left():.0f} s left, needs about {need_s:.0f} s"
            self.save()
            return None
        t0 = time.monotonic()
        value = None
        try:
            value = self.data["results"][name] = fn()
        except Skipped as exc:
            self.data["skipped"][name] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not lose the others
            traceback.print_exc()
            self.data["errors"][name] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:500]}"
            if self.ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        self.data["variant_s"][name] = round(time.monotonic() - t0, 2)
        self.save()
        return value

    def finish(self, **extra: Any) -> None:
        self.data.update(extra)
        self.data["status"] = "done"
        self.save()
        print_line({"section": self.data["section"], "status": "done", "wall_s": self.data["wall_s"],
                    "results": sorted(self.data["results"]), "skipped": self.data["skipped"],
                    "errors": self.data["errors"]})


# --- models from configs ---------------------------------------------------------------------------
def configs(dry: bool) -> dict[str, dict[str, Any]]:
    """U-Net, VAE and text-encoder configs: SD v1.4's, or (dry run) the tiny model's."""
    from ldmprobe.models import TINY_TEXT, TINY_UNET, TINY_VAE, sd_v1_4_config, tiny_tokenizer

    if dry:
        tok = tiny_tokenizer()
        text = dict(TINY_TEXT, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
        return {"unet": dict(TINY_UNET), "vae": dict(TINY_VAE), "text_encoder": text}
    drop = ("architectures", "model_type")
    return {c: {k: v for k, v in sd_v1_4_config(c).items() if not k.startswith("_") and k not in drop}
            for c in ("unet", "vae", "text_encoder")}


def build_unet(ctx: Context, device: torch.device | str | None = None):
    """The U-Net from its config with seeded random weights, built directly on the device."""
    from diffusers import UNet2DConditionModel

    from ldmprobe.models import attention_processor

    device = torch.device(device or ctx.device)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**configs(ctx.dry)["unet"])
    unet = (unet if unet.dtype == ctx.dtype else unet.to(ctx.dtype)).eval().requires_grad_(False)
    if device.type != "meta":
        unet.set_attn_processor(attention_processor("sdpa", device))
    return unet


def build_model(ctx: Context, device: torch.device | str | None = None):
    """An SDModel (U-Net, VAE, CLIP text encoder; the tiny offline tokenizer) from configs."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldmprobe.models import SDModel, sd_v1_4_config, tiny_tokenizer

    device = torch.device(device or ctx.device)
    cfg = configs(ctx.dry)
    unet = build_unet(ctx, device)
    torch.manual_seed(1)
    with torch.device(device):
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    vae, text = ((m if m.dtype == ctx.dtype else m.to(ctx.dtype)).eval().requires_grad_(False) for m in (vae, text))
    source = "tiny configs, random weights" if ctx.dry else "sd-v1-4 configs, random weights"
    return SDModel(unet, vae, text, tiny_tokenizer(), sd_v1_4_config("scheduler"), source, device, ctx.dtype, "sdpa")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.detach().float(), b.detach().float()
    return {"max_abs": float((a - b).abs().max()), "rel_norm": float((a - b).norm() / b.norm().clamp_min(1e-12))}


def png_b64(array) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_map(y: torch.Tensor) -> int:
    """What the service does with one probe map: stats, a grey PNG and a float16 array, base64."""
    lo, hi = float(y.min()), float(y.max())
    grey = (y - lo) / (hi - lo) if hi > lo else torch.zeros_like(y)
    png = png_b64((grey * 255).round().to(torch.uint8).numpy())
    arr = base64.b64encode(y.to(torch.float16).contiguous().numpy().astype("<f2").tobytes())
    return len(png) + len(arr) + len(str(float(y.mean())))


# --- sections --------------------------------------------------------------------------------------
def section_env(rep: Report, ctx: Context) -> None:
    def versions() -> dict[str, Any]:
        out = {}
        for name in PACKAGES:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = None
        return out

    def device() -> dict[str, Any]:
        from ldmprobe.kernels import triton_available

        info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                                "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                                "cpu_count": os.cpu_count(), "triton_kernel": triton_available(ctx.device)}
        if ctx.device.type == "cuda":
            props = torch.cuda.get_device_properties(ctx.device)
            info |= {"name": props.name, "capability": f"{props.major}.{props.minor}",
                     "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1)}
        spec = importlib.util.find_spec("diffusers")  # where it would be imported from (/tmp/site: the wheels)
        info["diffusers_from"] = str(Path(spec.origin).parent.parent) if spec and spec.origin else None
        return info

    def xformers() -> dict[str, Any]:
        try:
            import xformers.ops  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - not installed, or a build for another torch
            raise Skipped(f"xformers does not import: {type(exc).__name__}: {exc}") from None
        return {"version": metadata.version("xformers")}

    def smi() -> dict[str, Any]:
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                                   "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError) as exc:
            raise Skipped(f"nvidia-smi: {type(exc).__name__}") from None
        return {"query": done.stdout.strip(), "rc": done.returncode}

    rep.run("versions", versions)
    rep.run("device", device)
    rep.run("xformers", xformers)
    rep.run("nvidia_smi", smi)
    rep.finish()


def section_kernel(rep: Report, ctx: Context) -> None:
    """Triton (compiled; interpreter in a dry run) vs torch fallback through ProbeBank.apply."""
    from ldmprobe.layers import LayerRegistry
    from ldmprobe.models import config_identity
    from ldmprobe.probes import ProbeBank

    if ctx.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # read at each call by ldmprobe.kernels
    cfg = configs(ctx.dry)["unet"]
    registry = LayerRegistry.from_config(cfg)
    bank = ProbeBank.random(registry, PROPS, steps=(0,), seed=0, identity=config_identity(cfg))
    image = cfg["sample_size"] * 8

    def check(rows: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(rows)  # fresh random inputs for every check
        acts = {s.name: torch.randn(rows, s.tokens, s.channels, generator=gen).to(ctx.device, ctx.dtype)
                for s in registry}
        tri, ref = bank.apply(acts, 0, backend="triton"), bank.apply(acts, 0, backend="torch")
        diffs = [max_diff(tri[k], ref[k]) for k in ref]
        worst = max(d["max_abs"] for d in diffs)
        times = {"triton": ctx.ms(lambda: bank.apply(acts, 0, backend="triton")),
                 "torch": ctx.ms(lambda: bank.apply(acts, 0, backend="torch")),
                 "triton_upsampled": ctx.ms(lambda: bank.apply(acts, 0, size=image, backend="triton"))}
        return {"rows": rows, "probes": len(ref), "backend": tri.backend, "max_abs_diff": worst,
                "max_rel_norm_diff": max(d["rel_norm"] for d in diffs), "equal_1e-3": worst <= 1e-3,
                "ms": times, "speedup_vs_torch": round(times["torch"]["median_ms"] / times["triton"]["median_ms"], 3),
                "activation_mb": round(sum(a.numel() * a.element_size() for a in acts.values()) / 2**20, 2)}

    for rows in (1, 4):
        rep.run(f"rows_{rows}", lambda rows=rows: check(rows))
    rep.finish(shapes=[[s.name, s.height, s.width, s.channels] for s in registry], upsample_to=image)


def section_unet(rep: Report, ctx: Context) -> None:
    """U-Net calls at batch 2 (CFG), one call = one denoising step: eager / compiled / capture / graphs."""
    from diffusers import LMSDiscreteScheduler

    from ldmprobe.capture import CapturingUNet
    from ldmprobe.models import BackendUnavailableError, attention_processor, sd_v1_4_config

    t0 = time.monotonic()
    unet = build_unet(ctx)
    rep.data["build_s"] = round(time.monotonic() - t0, 2)
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen).to(ctx.device, ctx.dtype)
    text = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen).to(ctx.device, ctx.dtype)
    scheduler = LMSDiscreteScheduler.from_config(sd_v1_4_config("scheduler"))
    scheduler.set_timesteps(15, device=ctx.device)
    t = scheduler.timesteps[0]  # what the Sampler passes (same type: the compiled graph is shared)
    rep.data["inputs"] = {"sample": list(sample.shape), "text": list(text.shape), "image": cfg.sample_size * 8}

    def timed(fn: Callable[[], Any]) -> dict[str, Any]:
        out = ctx.ms(fn)
        return out | {"it_s": round(1e3 / out["median_ms"], 3)}

    with torch.inference_mode():
        plain = unet(sample, t, encoder_hidden_states=text, return_dict=False)[0].clone()
        rep.run("eager", lambda: timed(lambda: unet(sample, t, encoder_hidden_states=text, return_dict=False)))

        def xformers() -> dict[str, Any]:
            try:
                processor = attention_processor("xformers", ctx.device)
            except BackendUnavailableError as exc:
                raise Skipped(str(exc)) from None
            unet.set_attn_processor(processor)
            try:
                diff = max_diff(unet(sample, t, encoder_hidden_states=text, return_dict=False)[0], plain)
                return timed(lambda: unet(sample, t, encoder_hidden_states=text, return_dict=False)) | {"vs_sdpa": diff}
            finally:
                unet.set_attn_processor(attention_processor("sdpa", ctx.device))

        rep.run("eager_xformers", xformers)
        capturing = CapturingUNet(unet)
        names = capturing.select_layers("all")
        ref_noise, ref_acts = capturing(sample, t, text, capture=names)
        ref_noise, ref_acts = ref_noise.clone(), {k: v.clone() for k, v in ref_acts.items()}
        rep.run("eager_capture16", lambda: timed(lambda: capturing(sample, t, text, capture=names)))
        first_compile: list[float] = []

        def compiled_variant(fn, capture: tuple[str, ...], graphs: bool) -> dict[str, Any]:
            def call():
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous replay may be reused
                return fn(sample, t, text, capture=capture)

            start = time.monotonic()
            call()
            ctx.sync()
            first_s = time.monotonic() - start
            first_compile.append(first_s)
            noise, acts = call()
            result = {"first_call_s": round(first_s, 2), "noise_vs_eager": max_diff(noise, ref_noise)}
            if capture:
                assert sorted(acts) == sorted(names), sorted(acts)
                result["activations_vs_eager_max_abs"] = max(max_diff(acts[n], ref_acts[n])["max_abs"] for n in names)
            return timed(call) | result

        def need() -> float:  # a later compile reuses kernels: about half the first one, plus timing
            return 0.5 * first_compile[0] + 15 if first_compile else 0.0

        compiled = ctx.compile(capturing)
        rep.run("compiled_capture16", lambda: compiled_variant(compiled, names, False))
        rep.run("compiled", lambda: compiled_variant(compiled, (), False), need())
        if ctx.device.type == "cuda" or ctx.dry:  # dry run on CPU: the same calls, no graphs to capture
            graphs = ctx.compile(capturing, mode="reduce-overhead")
            graphs_on = ctx.device.type == "cuda"
            rep.run("cudagraphs_capture16", lambda: compiled_variant(graphs, names, graphs_on), need())
            rep.run("cudagraphs", lambda: compiled_variant(graphs, (), graphs_on), need())
    res = rep.data["results"]

    def ratio(a: str, b: str) -> float | None:
        return round(res[a]["median_ms"] / res[b]["median_ms"], 4) if a in res and b in res else None

    rep.finish(ratios={
        "capture_overhead_compiled": ratio("compiled_capture16", "compiled"),
        "capture_overhead_cudagraphs": ratio("cudagraphs_capture16", "cudagraphs"),
        "capture_overhead_eager": ratio("eager_capture16", "eager"),
        "speedup_compiled_vs_eager": ratio("eager", "compiled"),
        "speedup_cudagraphs_vs_compiled": ratio("compiled", "cudagraphs"),
        "speedup_compiled_capture_vs_eager_capture": ratio("eager_capture16", "compiled_capture16"),
        "speedup_xformers_vs_sdpa_eager": ratio("eager", "eager_xformers"),
    }, cudagraphs_note=None if ctx.device.type == "cuda" else "no CUDA: the graph variants ran without graphs")


def section_service(rep: Report, ctx: Context) -> None:
    """The probe endpoint's stages, in-process: the library's pieces with a random bank."""
    import numpy as np

    from ldmprobe.generate import GenerationSettings, Sampler, to_pil
    from ldmprobe.probes import ProbeBank

    t0 = time.monotonic()
    model = build_model(ctx)
    bank = ProbeBank.random(model, PROPS, steps=range(ctx.steps), seed=0)
    sampler = Sampler(model)
    sampler.unet_fn, sampler.compiled = ctx.compile(sampler.capturing), True  # = Sampler(model, compile=True)
    size = model.default_size
    rep.data |= {"build_s": round(time.monotonic() - t0, 2), "image": size, "steps": ctx.steps, "probes": len(bank),
                 "layer": SERVICE_LAYER, "properties": list(PROPS), "capture": "all 16 layers"}
    settings = GenerationSettings(steps=ctx.steps)

    with torch.inference_mode():
        rep.run("text_encode", lambda: ctx.ms(lambda: model.encode_prompts([PROMPT, ""])))  # cond + uncond

        def warm() -> dict[str, Any]:
            start = time.monotonic()
            sampler.generate([PROMPT], [1], GenerationSettings(steps=2), layers="all", keep_steps=False)
            return {"first_generation_s": round(time.monotonic() - start, 2)}

        rep.run("warm_up", warm)
        last: dict[str, Any] = {}

        def generation() -> dict[str, Any]:
            per: dict[str, list[float]] = {"probes": [], "map_encode": [], "probes_all_layers": []}
            backends = set()

            def on_step(step) -> None:
                ctx.sync()
                a = time.perf_counter()
                maps = bank.apply(step.activations, step.index, properties=PROPS, layers=[SERVICE_LAYER],
                                  size=(size, size))
                ys = [maps[(p, SERVICE_LAYER)][0].float().cpu() for p in PROPS]
                b = time.perf_counter()
                for y in ys:
                    encode_map(y)
                c = time.perf_counter()
                backends.add(bank.apply(step.activations, step.index).backend)  # all 48 probes, layer resolution
                ctx.sync()
                per["probes"].append(b - a)
                per["map_encode"].append(c - b)
                per["probes_all_layers"].append(time.perf_counter() - c)

            runs = []
            for r in range(1 if ctx.dry else 3):
                for v in per.values():
                    v.clear()
                result = sampler.generate([PROMPT], [5107435 + r], settings, layers="all", callback=on_step,
                                          keep_steps=False)
                inside = sum(sum(v) for v in per.values())
                runs.append({"denoise": (result.metadata["timings_s"]["denoise"] - inside) / ctx.steps * 1e3,
                             **{k: statistics.median(v) * 1e3 for k, v in per.items()}})
                last["result"] = result
            best = min(runs, key=lambda x: x["denoise"])
            return {"ms_per_step": {k: round(v, 3) for k, v in best.items()},
                    "denoise_ms_per_step_runs": [round(x["denoise"], 3) for x in runs],
                    "it_s": round(1e3 / best["denoise"], 3), "probe_backend": sorted(backends)}

        rep.run("generation", generation)
        if "result" in last:
            latents, images = last["result"].latents, last["result"].images
            rep.run("vae_decode", lambda: ctx.ms(lambda: sampler.decode(latents), repeats=min(ctx.repeats, 5)))
            rep.run("vae_encode", lambda: ctx.ms(lambda: sampler.encode(images), repeats=min(ctx.repeats, 5)))
            rep.run("image_png", lambda: ctx.ms(lambda: png_b64(np.asarray(to_pil(images)[0])),
                                                repeats=min(ctx.repeats, 5)))
    res = rep.data["results"]
    estimate = None
    if all(k in res for k in ("text_encode", "generation", "vae_decode", "image_png")):
        step = res["generation"]["ms_per_step"]
        estimate = round(res["text_encode"]["median_ms"] + ctx.steps * (step["denoise"] + step["probes"]
                         + step["map_encode"]) + res["vae_decode"]["median_ms"] + res["image_png"]["median_ms"], 1)
    rep.finish(request_ms_estimate=estimate,
               request_what=f"text encode + {ctx.steps} steps × (denoise + probes of 3 properties at {size}² + map "
                            "PNG/array) + VAE decode + image PNG; one request, batch 1 with CFG")


# --- summary ---------------------------------------------------------------------------------------
def summarize(out: Path, rcs: dict[str, str], dry: bool) -> int:
    """OUT/summary.json and one JSON line: status per section, errors, the headline figures."""
    data: dict[str, Any] = {}
    status: dict[str, str] = {}
    for name in SECTIONS:
        path = out / f"{name}.json"
        if not path.is_file():
            status[name] = f"missing (exit {rcs.get(name, '?')})"
            continue
        data[name] = loads_strict(path.read_text())
        status[name] = data[name]["status"]
        if status[name] == "running":
            status[name] = f"killed (exit {rcs.get(name, '?')}): partial results"
    res = {k: v.get("results", {}) for k, v in data.items()}
    kernel = {k: {"equal_1e-3": v["equal_1e-3"], "triton_ms": v["ms"]["triton"]["median_ms"],
                  "torch_ms": v["ms"]["torch"]["median_ms"], "speedup": v["speedup_vs_torch"], "backend": v["backend"]}
              for k, v in res.get("kernel", {}).items()}
    unet = {k: v["it_s"] for k, v in res.get("unet", {}).items() if "it_s" in v}
    gen = res.get("service", {}).get("generation", {})
    line = {
        "gpu_check": "dry-run" if dry else "gpu",
        "device": res.get("env", {}).get("device", {}).get("name", data.get("env", {}).get("device")),
        "sections": status,
        "errors": {k: v["errors"] for k, v in data.items() if v.get("errors")},
        "skipped": {k: v["skipped"] for k, v in data.items() if v.get("skipped")},
        "kernel": kernel,
        "unet_it_s": unet, "unet_ratios": data.get("unet", {}).get("ratios"),
        "service_ms_per_step": gen.get("ms_per_step"),
        "service_ms": {k: res.get("service", {}).get(k, {}).get("median_ms")
                       for k in ("text_encode", "vae_decode", "vae_encode", "image_png")},
        "service_request_ms_estimate": data.get("service", {}).get("request_ms_estimate"),
    }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(dumps(line, indent=2) + "\n")
    print_line(line)
    ok = all(s == "done" for s in status.values()) and not line["errors"]
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="bench/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=SECTIONS, default=None, help="the section to run (default: none; "
                   "required unless --summary)")
    p.add_argument("--summary", action="store_true",
                   help="read OUT's section files, write OUT/summary.json, print one line (default: off)")
    p.add_argument("--out", type=Path, required=True, help="output folder, created if missing (required)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes, 2 steps, Triton interpreter, dynamo's eager backend (default: off)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu or cuda (default: auto = cuda when present; cpu with --dry-run)")
    p.add_argument("--budget-s", type=float, default=600.0,
                   help="seconds this section may take: variants that would not fit are skipped (default: 600)")
    p.add_argument("--repeats", type=int, default=None, help="timed measurements per variant (default: 10; 2 dry)")
    p.add_argument("--steps", type=int, default=None, help="service: denoising steps (default: 15; 2 with --dry-run)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor, the library's; eager with --dry-run)")
    p.add_argument("--rc", action="append", default=[], metavar="SECTION=CODE",
                   help="summary: a section process's exit code, repeatable (default: none)")
    args = p.parse_args(argv)
    if args.summary == (args.section is not None):
        p.error("give exactly one of --section and --summary")
    for name, value in (("--repeats", args.repeats), ("--steps", args.steps), ("--budget-s", args.budget_s)):
        if value is not None and value <= 0:
            p.error(f"{name}: must be > 0, got {value}")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        p.error(f"--device: use auto, cpu or cuda, got {args.device!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summary:
        return summarize(args.out, dict(rc.partition("=")[::2] for rc in args.rc), args.dry_run)
    ctx = Context(args)
    rep = Report(args.out, args.section, ctx, args.budget_s)
    {"env": section_env, "kernel": section_kernel, "unet": section_unet, "service": section_service}[args.section](rep, ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
