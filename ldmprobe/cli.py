"""`ldmprobe …` command line. Bad input: a one-line message on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, ValidationError

from .intervene.spec import DEFAULT_ITERATIONS, DEFAULT_LR, DEFAULT_ORDER
from .schemas import MAX_PROMPT_CHARS, MAX_SEED, GenerationSettings, SchedulerName

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input detected after argument parsing (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _Help(argparse.HelpFormatter):
    """Every option's help line ends with its default (when it has one to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and not action.required and "%(default)" not in text
                and not any(action.default is v for v in (None, False, argparse.SUPPRESS))):  # 0 is a default
            text += " (default: %(default)s)"
        return text


class GenerateRequest(GenerationSettings):
    """One generation with capture: what `ldmprobe generate` accepts."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    layers: list[str] | str | None = None
    half: Literal["cond", "both"] = "cond"


def first_error(exc: ValidationError) -> tuple[str, str]:
    """(field, message) of a pydantic error, for one-line CLI errors."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err.get("loc", ())) or "request"
    return field, err.get("msg", str(exc))


# --- options shared by several commands: declared once, defaults from the pydantic models ---------
def _default(name: str):
    return GenerationSettings.model_fields[name].default


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="scenes",
                   help="`scenes` (built in, trained), `tiny` (random weights), a local diffusers SD folder, or a hub id")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 …")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"], help="attention backend")


def _add_size_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels, a multiple of 8 (default: the model's, 512 for SD v1.4, 128 for tiny)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--seed", type=int, default=GenerateRequest.model_fields["seed"].default,
                   help="seed of the initial noise (the study's convention)")
    p.add_argument("--steps", type=int, default=_default("steps"), help="denoising steps")
    p.add_argument("--guidance", type=float, default=_default("guidance"), help="classifier-free guidance scale")
    _add_size_args(p)
    p.add_argument("--scheduler", default=_default("scheduler"), help=f"one of {', '.join(get_args(SchedulerName))}")


def _add_run_args(p: argparse.ArgumentParser, compile_help: str | None = None) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder (must be new or empty)")
    if compile_help is not None:
        p.add_argument("--compile", action="store_true", help=compile_help)
        p.add_argument("--cache-dir", type=Path, default=None,
                       help="inductor cache folder for --compile (default: $TORCHINDUCTOR_CACHE_DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ldmprobe", description="Look inside Stable Diffusion while it generates.",
                     formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
        _add_model_args(p)
        return p

    g = command("generate", "generate an image and store its self-attention activations")
    _add_generation_args(g)
    g.add_argument("--layers", default="all", help="all, none, or comma-separated names / groups (e.g. dec4,mid.0)")
    g.add_argument("--half", default="cond", help="CFG half to store: cond or both")
    g.add_argument("--store-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the stored activations")
    g.add_argument("--previews", action="store_true", help="also decode and save every step's latent")
    g.add_argument("--protocol", default="ldmprobe", choices=["ldmprobe", "study"],
                   help="recorded in the outputs; sets the defaults of the two options below (README: Study protocol)")
    g.add_argument("--timestep-spacing", default=None, choices=["study", "config", "linspace", "leading", "trailing"],
                   help="study: LMS on the study's linspace timesteps whatever the model folder's scheduler config "
                        "says; config: the folder's own; or force one (default: study)")
    g.add_argument("--latent-dtype", default=None, choices=["float32", "model"],
                   help="dtype of the latents through the scheduler (default: float32, the study's; model: the U-Net's)")
    _add_run_args(g, "torch.compile the capturing U-Net (fullgraph)")

    c = command("classify", "classify every denoising step's decoded image with VGG-16 (table + figure)")
    _add_generation_args(c)
    c.add_argument("--decoder", default="vae", help="vae (the model's VAE) or tiny (AutoencoderTiny / TAESD)")
    c.add_argument("--tiny-decoder", default=None,
                   help="AutoencoderTiny folder or hub id, or `random` (tests only) (default: madebyollin/taesd)")
    c.add_argument("--decode", default="latent", help="latent (the current latent, as the study) or x0 (predicted)")
    c.add_argument("--classifier", default=None,
                   help="VGG-16 weights: safetensors / torchvision .pth file, folder or hub id, or `random` (tests "
                        "only); `scenes` or scenes:PATH: the scenes label models' colour × kind classifier "
                        "(default: scenes for --model scenes, else timm/vgg16.tv_in1k)")
    c.add_argument("--preprocessing", default="timm",
                   help="timm (the weights' own) or caffe (Keras' VGG-16 as the capstone: 8-bit, nearest resize, BGR, "
                        "ImageNet means in 0-255, no std; for Caffe-converted weights, not comparable with timm's)")
    c.add_argument("--top-k", type=int, default=5, help="classes reported per step")
    c.add_argument("--target", default=None,
                   help="target class: index, WordNet id or name, e.g. lemon (default: none, no target curve)")
    c.add_argument("--batch-size", type=int, default=8, help="images per decoder / classifier call")
    c.add_argument("--previews", action="store_true", help="also save every step's decoded image")
    _add_run_args(c)

    i = command("intervene", "move the foreground object by editing activations through the probes "
                             "(PNG panel; --sweep: GIF)")
    i.add_argument("--bank", required=True, type=Path, help="probe bank file (safetensors) fitted for this model")
    _add_generation_args(i)
    i.add_argument("--property", default="foreground", help="foreground or depth")
    i.add_argument("--dx", type=float, default=0.0, help="shift right by this many pixels (negative: left)")
    i.add_argument("--dy", type=float, default=0.0, help="shift down by this many pixels (negative: up)")
    i.add_argument("--target-mask", type=Path, default=None,
                   help="PNG target mask, the image's size, foreground only (default: none, the shifted mask)")
    i.add_argument("--layers", default=None, help="comma-separated layers / groups (default: all 16; "
                                                 "dec2–dec4 for foreground under --protocol study)")
    i.add_argument("--edit-steps", default=None, help="comma-separated step indices or ranges (default: 0-4, "
                                                     "0-2 for depth)")
    i.add_argument("--lr", type=float, default=DEFAULT_LR, help="Adam learning rate (the study's)")
    i.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help="Adam iterations per edited step")
    i.add_argument("--loss", default="auto", help="auto, bce, mse or huber")
    i.add_argument("--order", default=DEFAULT_ORDER,
                   help="sequential (the study's: each layer edited on an activation that already carries the "
                        "edits of the layers before it, one forward per layer) or joint (all layers of a step at "
                        "once, faster)")
    i.add_argument("--eval-layer", default=None,
                   help="layer whose probe scores the result (default: the bank's best for the property)")
    i.add_argument("--protocol", default="ldmprobe", choices=["ldmprobe", "study"],
                   help="study: the unset options take the study's behaviour (README: Study protocol)")
    i.add_argument("--depth-target", default=None, choices=["warp", "minmax"],
                   help="depth edits: warp (the warped map as is) or minmax (the study's: edge-filled, scaled "
                        "to [-9, 9]) (default: minmax under --protocol study, else warp)")
    i.add_argument("--metric", default=None, choices=["euclidean", "activation"],
                   help="how each activation moves to the probe outputs the optimiser decides: euclidean (Adam's own "
                        "path along the probe's read-out, the study's) or activation (the smallest move in the "
                        "activations' covariance metric) (default: euclidean under --protocol study, else activation)")
    i.add_argument("--sweep", default=None, metavar="START:STOP:STEP",
                   help="also run every dx in this range (pixels) and write sweep.gif + sweep.json (default: none)")
    _add_run_args(i, "torch.compile the U-Net and the Adam step")

    l_ = command("layers", "print the self-attention layer registry of a model")
    _add_size_args(l_)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from .atomic import save_image, write_json
    from .generate import Sampler, to_pil
    from .models import load_model
    from .store import ActivationWriter

    layers = None if args.layers in ("none", "") else args.layers
    try:
        req = GenerateRequest(prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                              height=args.height, width=args.width, scheduler=args.scheduler,
                              layers=layers, half=args.half)
    except ValidationError as exc:
        field, msg = first_error(exc)
        raise UsageError(f"--{field.replace('_', '-')}: {msg}") from None
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out: {out} exists and is not an empty folder (nothing was overwritten)")

    from .protocol import get_protocol

    protocol = get_protocol(args.protocol)
    model = load_model(args.model, device=args.device, dtype=args.dtype, attention=args.attention)
    sampler = Sampler(model, compile=args.compile, cache_dir=args.cache_dir,
                      timestep_spacing=args.timestep_spacing or protocol.timestep_spacing,
                      latent_dtype=args.latent_dtype or protocol.latent_dtype)
    names = sampler.select_layers(req.layers)
    gs = req.settings()
    run_reg = model.registry(gs.height, gs.width)
    out.mkdir(parents=True, exist_ok=True)
    writer = ActivationWriter(out / "activations", [run_reg[n] for n in names], {}, dtype=args.store_dtype) if names else None
    step_latents = []

    def on_step(step):
        if writer is not None:
            writer.add(step.index, step.timestep, step.activations)
        if args.previews:
            step_latents.append(step.latents)

    result = sampler.generate([req.prompt], [req.seed], gs, layers=names, half=req.half, callback=on_step,
                              keep_steps=False, progress=not args.no_progress)
    meta = result.metadata | {"protocol": protocol.name}
    if writer is not None:
        writer.metadata = {k: meta[k] for k in ("model", "model_identity", "protocol", "prompts", "seeds", "scheduler",
                                                "steps", "guidance", "height", "width", "half", "timestep_spacing",
                                                "init_noise_sigma", "latent_dtype", "compiled", "attention",
                                                "device")} | {"model_dtype": meta["dtype"]}
        writer.close()
    save_image(to_pil(result.images)[0], out / "image.png")
    if args.previews:
        import torch

        for i, img in enumerate(to_pil(sampler.decode(torch.cat(step_latents)))):
            save_image(img, out / "previews" / f"step_{i:03d}.png")
    write_json(out / "metadata.json", meta)
    print(f"wrote {out / 'image.png'}" + (f", activations of {len(names)} layers × {gs.steps} steps" if names else ""))
    return 0


_CLASSIFY_FLAGS = {"target_class": "target", "top_k": "top-k"}


def cmd_classify(args: argparse.Namespace) -> int:
    import csv

    from .atomic import atomic_path, save_image, write_json
    from .classify import (
        DEFAULT_CLASSIFIER,
        DEFAULT_TINY_DECODER,
        RANDOM,
        SCENES_CLASSIFIER,
        ClassifyError,
        StepClassifier,
        load_classifier,
        make_decoder,
        plot_classification,
    )
    from .generate import Sampler, to_pil
    from .models import load_model
    from .serve.schemas import ClassifyRequest

    try:
        req = ClassifyRequest(prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                              height=args.height, width=args.width, scheduler=args.scheduler,
                              decoder=args.decoder, decode=args.decode, top_k=args.top_k,
                              previews=args.previews)  # the target is checked against the classifier's classes below
    except ValidationError as exc:
        field, msg = first_error(exc)
        raise UsageError(f"--{_CLASSIFY_FLAGS.get(field, field.replace('_', '-'))}: {msg}") from None
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.target is not None and not str(args.target).strip():
        raise UsageError("--target: must not be empty")
    if args.preprocessing not in ("timm", "caffe"):
        raise UsageError(f"--preprocessing: use timm or caffe, got {args.preprocessing!r}")
    if args.tiny_decoder is not None and req.decoder != "tiny":
        raise UsageError("--tiny-decoder: only used with --decoder tiny")
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out: {out} exists and is not an empty folder (nothing was overwritten)")

    model = load_model(args.model, device=args.device, dtype=args.dtype, attention=args.attention)
    # weights before the generation: a missing file fails in seconds, not after the denoising loop
    decoder = make_decoder(model, req.decoder, args.tiny_decoder or DEFAULT_TINY_DECODER)
    default = SCENES_CLASSIFIER if args.model == "scenes" else DEFAULT_CLASSIFIER
    classifier = load_classifier(args.classifier or default, model.device, model.dtype,
                                 preprocessing=args.preprocessing)
    try:
        req = req.model_copy(update={"target_class": None if args.target is None else
                                     classifier.classes.resolve(args.target).index})
    except ClassifyError as exc:
        raise UsageError(f"--target: {exc}") from None
    runner = StepClassifier(decoder, classifier, batch_size=args.batch_size)
    result = runner.classify_generation(Sampler(model), [req.prompt], [req.seed], req.settings(), decode=req.decode,
                                        targets=req.target_class, top_k=req.top_k, keep_previews=True,
                                        progress=not args.no_progress)[0]

    out.mkdir(parents=True, exist_ok=True)
    rows = result.rows()
    with atomic_path(out / "steps.csv") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json(out / "steps.json", result.response().model_dump(mode="json"))
    plot_classification(result, out / "classification.png")
    save_image(to_pil(result.image[None])[0], out / "image.png")
    if args.previews:
        for i, img in enumerate(to_pil(result.previews)):
            save_image(img, out / "previews" / f"step_{i:03d}.png")
    stats = result.statistics()
    final = result.steps()[-1].top[0]
    line = f"wrote {out / 'classification.png'}; last step top-1: {final.name} ({final.probability:.3f})"
    if result.target is not None:
        line += (f"; target {result.target.name}: first top-1 at step {stats['first_top1_step']}, "
                 f"first > {result.threshold:.0%} at step {stats['first_confident_step']}")
    if RANDOM in (classifier.source, decoder.source):
        line += " [random weights: not a result]"
    print(line)
    return 0


def _steps_list(text: str | None) -> list[int] | None:
    """"0,1,2" or "0-4" (inclusive) or a mix → step indices."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise UsageError(f"--edit-steps: expected step indices like 0,1,2 or 0-4, got {text!r}") from None
    return out


def cmd_intervene(args: argparse.Namespace) -> int:
    import base64

    import torch

    from .atomic import save_image, write_json
    from .generate import Sampler, to_pil
    from .intervene import Intervention, InterventionError, shift_range
    from .intervene.figure import plot_panel, write_sweep_gif
    from .models import load_model
    from .probes import ProbeBank
    from .serve.schemas import InterveneRequest

    mask_b64 = None
    if args.target_mask is not None:
        if not args.target_mask.is_file():
            raise UsageError(f"--target-mask: {args.target_mask} is not a file")
        mask_b64 = base64.b64encode(args.target_mask.read_bytes()).decode("ascii")
    fields = {"prompt": args.prompt, "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
              "height": args.height, "width": args.width, "scheduler": args.scheduler, "property": args.property,
              "dx": args.dx, "dy": args.dy, "target_mask": mask_b64, "loss": args.loss, "eval_layer": args.eval_layer,
              "edit_steps": _steps_list(args.edit_steps),
              "layers": None if args.layers is None else [x.strip() for x in args.layers.split(",") if x.strip()],
              "lr": args.lr, "iterations": args.iterations, "order": args.order, "protocol": args.protocol,
              "depth_target": args.depth_target, "metric": args.metric}
    try:
        req = InterveneRequest(**fields)
    except ValidationError as exc:
        field, msg = first_error(exc)
        raise UsageError(f"--{field.replace('_', '-') if field != 'request' else 'dx/--dy/--target-mask'}: {msg}") from None
    shifts = shift_range(args.sweep) if args.sweep else []
    if shifts and req.target_mask is not None:
        raise UsageError("--sweep: shifts dx; it cannot be combined with --target-mask")
    if not args.bank.is_file():
        raise UsageError(f"--bank: {args.bank} is not a file")
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out: {out} exists and is not an empty folder (nothing was overwritten)")

    model = load_model(args.model, device=args.device, dtype=args.dtype, attention=args.attention)
    bank = ProbeBank.load(args.bank, model)
    runner = Intervention(Sampler(model, compile=args.compile, cache_dir=args.cache_dir), bank)
    spec, settings = req.spec(), req.settings()
    if spec.target_mask is not None:
        size = (settings.height or model.default_size, settings.width or model.default_size)
        if tuple(spec.target_mask.shape) != size:
            raise UsageError(f"--target-mask: must be {size[1]}×{size[0]} pixels (the image), got "
                             f"{spec.target_mask.shape[1]}×{spec.target_mask.shape[0]}")
    try:
        runner.resolve(spec, settings)
    except InterventionError as exc:
        raise UsageError(f"--{exc.field.replace('_', '-')}: {exc}") from None
    result = runner.run(req.prompt, req.seed, spec, settings, progress=not args.no_progress)

    out.mkdir(parents=True, exist_ok=True)
    original, edited = to_pil(torch.stack([result.original, result.edited]))
    save_image(original, out / "original.png")
    save_image(edited, out / "edited.png")
    for name, m in (("original", result.original_map), ("target", result.target_map), ("achieved", result.edited_map)):
        save_image(_map_image(m, spec.property), out / "masks" / f"{name}.png")
    plot_panel(result, out / "panel.png")
    write_json(out / "result.json", {"success": result.success, "layers": result.layers, "edit_steps": result.edit_steps,
                                     "losses": {str(k): v for k, v in result.losses.items()},
                                     "timings_s": result.timings_s, "metadata": result.metadata})
    line = f"wrote {out / 'panel.png'}; " + _summary(result.success)
    if shifts:
        frames, labels, rows = [], [], []
        for dx in shifts:
            spec.dx = dx
            r = runner.run(req.prompt, req.seed, spec, settings, progress=False)
            frames.append(r.edited)
            labels.append(f"dx = {dx:+g} px")
            rows.append({"dx": dx, "dy": spec.dy, **{k: r.success.get(k) for k in (
                "dice_to_target", "dice_baseline", "shift_achieved_px", "rmse_to_target", "rmse_baseline",
                "latent_change")}, "representation": {k: v for k, v in (r.success.get("representation") or {}).items()
                                                       if k != "layers"}})
        write_sweep_gif(frames, labels, out / "sweep.gif")
        write_json(out / "sweep.json", rows)
        line += f"; sweep of {len(shifts)} shifts → {out / 'sweep.gif'}"
    print(line)
    return 0


def _map_image(m, prop: str):
    from PIL import Image

    from .probes import grey_map

    return Image.fromarray(grey_map(m, "mask" if prop == "foreground" else "continuous")[0], mode="L")


def _summary(s: dict) -> str:
    rep = s.get("representation") or {}
    if s["property"] == "foreground":
        return (f"Dice to target {s['dice_to_target']} (unedited {s['dice_baseline']}), shift achieved "
                f"{s['shift_achieved_px']} of {s['shift_requested_px']} px; edited layers' probes: Dice "
                f"{rep.get('dice_to_target')} (unedited {rep.get('dice_baseline')})")
    return (f"RMSE to target {s['rmse_to_target']} (unedited {s['rmse_baseline']}); edited layers' probes: RMSE "
            f"{rep.get('rmse_to_target')} (unedited {rep.get('rmse_baseline')})")


def cmd_layers(args: argparse.Namespace) -> int:
    from .models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype, attention=args.attention)
    for s in model.registry(args.height, args.width):
        print(f"{s.name:8s} {s.block:11s} {s.height:>4d}x{s.width:<4d} {s.channels:>5d}  {s.module}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .classify import ClassifyError
    from .layers import UnknownLayerError
    from .models import BackendUnavailableError, ModelSourceError

    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "classify": cmd_classify, "intervene": cmd_intervene, "layers": cmd_layers}
    try:
        return handlers[args.command](args)
    except (UsageError, ModelSourceError, BackendUnavailableError, UnknownLayerError, ClassifyError,
            ValueError) as exc:
        print(f"ldmprobe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
