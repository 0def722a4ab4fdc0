"""`ldmprobe …` command line. Bad input: a one-line message on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input detected after argument parsing (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="`tiny`, a local diffusers SD folder, or a hub id")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 …")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"], help="attention backend")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ldmprobe", description="Look inside Stable Diffusion while it generates.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate an image and store its self-attention activations")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=15)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--height", type=int, default=None, help="pixels (model default: 512 for SD v1.4, 128 for tiny)")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--scheduler", default="lms")
    g.add_argument("--layers", default="all", help="all, none, or comma-separated names / groups (e.g. dec4,mid.0)")
    g.add_argument("--half", default="cond", help="CFG half to store: cond (default) or both")
    g.add_argument("--store-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    g.add_argument("--out", required=True, type=Path, help="output folder (must be new or empty)")
    g.add_argument("--compile", action="store_true", help="torch.compile the capturing U-Net (fullgraph)")
    g.add_argument("--cache-dir", type=Path, default=None, help="inductor cache folder for --compile")
    g.add_argument("--previews", action="store_true", help="also decode and save every step's latent")
    g.add_argument("--no-progress", action="store_true")

    l_ = sub.add_parser("layers", help="print the self-attention layer registry of a model")
    _add_model_args(l_)
    l_.add_argument("--height", type=int, default=None)
    l_.add_argument("--width", type=int, default=None)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from .atomic import save_image, write_json
    from .generate import Sampler, to_pil
    from .models import load_model
    from .schemas import GenerateRequest, first_error
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

    model = load_model(args.model, device=args.device, dtype=args.dtype, attention=args.attention)
    sampler = Sampler(model, compile=args.compile, cache_dir=args.cache_dir)
    names = sampler.select_layers(req.layers)
    settings = req.model_dump(include={"steps", "guidance", "height", "width", "scheduler"})
    from .schemas import GenerationSettings

    gs = GenerationSettings(**settings)
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
    meta = result.metadata
    if writer is not None:
        writer.metadata = {k: meta[k] for k in ("model", "model_identity", "prompts", "seeds", "scheduler", "steps",
                                                "guidance", "height", "width", "half", "timesteps", "compiled",
                                                "attention", "device")} | {"model_dtype": meta["dtype"]}
        writer.close()
    save_image(to_pil(result.images)[0], out / "image.png")
    if args.previews:
        import torch

        for i, img in enumerate(to_pil(sampler.decode(torch.cat(step_latents)))):
            save_image(img, out / "previews" / f"step_{i:03d}.png")
    write_json(out / "metadata.json", meta)
    print(f"wrote {out / 'image.png'}" + (f", activations of {len(names)} layers × {gs.steps} steps" if names else ""))
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from .models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype, attention=args.attention)
    for s in model.registry(args.height, args.width):
        print(f"{s.name:8s} {s.block:11s} {s.height:>4d}x{s.width:<4d} {s.channels:>5d}  {s.module}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .layers import UnknownLayerError
    from .models import BackendUnavailableError, ModelSourceError

    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "layers": cmd_layers}
    try:
        return handlers[args.command](args)
    except (UsageError, ModelSourceError, BackendUnavailableError, UnknownLayerError, ValueError) as exc:
        print(f"ldmprobe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
