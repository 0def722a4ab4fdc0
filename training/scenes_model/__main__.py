"""`python -m training.scenes_model train --out DIR` / `evaluate --model scenes`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from ldmprobe.jsonout import print_line

from .train import TrainConfig

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad input found once the model is loaded: exit 2 with one line, like the parser's errors."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m training.scenes_model",
                description="Train or evaluate the scenes model (SD v1.4's architecture, scaled down, on rendered scenes).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="VAE, latents, then U-Net + text encoder; resumable: rerun the same command")
    t.add_argument("--out", required=True, type=Path, help="run folder (new, empty, or a run of the same settings to resume)")
    defaults = TrainConfig()
    helps = {
        "seed": "seed of initialisation, data order and noise", "scenes": "training renders",
        "size": "image side in pixels (multiple of 64)", "vae_steps": "VAE optimisation steps",
        "vae_batch": "VAE batch size", "vae_crop": "side of the VAE's random training crops", "vae_lr": "VAE peak learning rate", "kl_weight": "VAE KL weight",
        "unet_steps": "U-Net + text encoder steps", "batch": "U-Net global batch size (split across ranks)",
        "lr": "U-Net peak learning rate (AdamW)", "decoder_steps": "decoder fine-tuning steps, encoder frozen (0: none)",
        "decoder_lr": "decoder fine-tuning peak learning rate", "warmup": "linear warm-up steps",
        "cfg_dropout": "probability of training on the empty caption",
        "snr_floor": "weight the clean-latent error at least this SNR's worth on the noisy steps, where the caption decides "
                     "colour and layout (0: SD's plain epsilon MSE)",
        "snr_cap": "cap the weight of nearly clean steps at this SNR, min-SNR-γ (0: no cap)", "ema_decay": "EMA decay of exported weights",
        "guided_below": "on samples with t below this, also train the guided prediction u + s(c - u) against the noise "
                        "(0: off, SD's training)", "guided_scale": "the guidance scale s of the guided term",
        "guided_weight": "weight of the guided term",
        "checkpoint_every": "steps between atomic checkpoints", "dtype": "dtype of the exported weights",
        "init": "continue from this diffusers folder of the same architecture ('scenes': the shipped model): "
                "its VAE and latent scale are kept, its U-Net and text encoder are the starting point",
    }
    for f in dataclasses.fields(TrainConfig):
        t.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"{helps[f.name]} (default: {getattr(defaults, f.name)})")
    t.add_argument("--stop-after", type=int, default=None, help="stop after the checkpoint at this step of the current stage (testing resumption; default: run to the end)")
    t.add_argument("--only", choices=["vae", "decoder", "unet"], default=None,
                   help="run just this stage and stop (the decoder and the U-Net can train side by side; default: all)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    e = sub.add_parser("evaluate", help="adherence of samples to held-out captions, judged by the label models")
    e.add_argument("--model", default="scenes", help="model to evaluate: scenes, tiny or a folder (default: scenes)")
    e.add_argument("--contrast", default="tiny", help="second model evaluated the same way, or 'none' (default: tiny)")
    e.add_argument("--captions", type=int, default=64, help="held-out captions to sample, one seed each (default: 64)")
    e.add_argument("--steps", type=int, default=15, help="LMS steps (default: 15, the study's)")
    e.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5, the study's)")
    e.add_argument("--out", type=Path, default=None, help="folder for evaluate.json and the PNG grid (default: none)")
    e.add_argument("--label-models", default=None, help="label-model folder (default: the shipped scenes label models)")
    v = sub.add_parser("intervene", help="move the object by editing activations on many held-out captions; the distribution")
    v.add_argument("--model", default="scenes", help="model (default: scenes)")
    v.add_argument("--bank", type=Path, default=None, help="probe bank (default: the scenes model's shipped bank)")
    v.add_argument("--captions", type=int, default=16, help="held-out captions, one seed each (default: 16)")
    v.add_argument("--dx", type=float, action="append", default=None,
                   help="horizontal shifts in pixels, repeatable; each caption gets them in turn (default: 24)")
    v.add_argument("--order", choices=["sequential", "joint"], default="sequential",
                   help="layer edit order: sequential (the study's) or joint (all layers of a step at once, faster) "
                        "(default: sequential)")
    v.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default: 7.5, the study's)")
    v.add_argument("--layers", default=None, help="edited layers: all, groups (dec3) or names, comma-separated "
                                                  "(default: all 16; the study's decoder layers dec2.0-dec4.2 under "
                                                  "--protocol study)")
    v.add_argument("--protocol", choices=["ldmprobe", "study"], default="ldmprobe",
                   help="whose behaviours the edit takes: ldmprobe or the study's code (default: ldmprobe)")
    v.add_argument("--label-models", default=None, help="label-model folder whose segmenter also scores each edit "
                                                        "(default: the shipped scenes label models)")
    v.add_argument("--metric", choices=["euclidean", "activation"], default=None,
                   help="how an activation moves to the probe outputs the optimiser decides: euclidean (Adam's own "
                        "path, the study's) or activation (the smallest move in the activations' covariance metric) "
                        "(default: euclidean under --protocol study, else activation)")
    v.add_argument("--out", type=Path, default=None,
                   help="folder for intervene.json and intervene.png (8 cases evenly spaced through the run) "
                        "(default: none)")
    c = sub.add_parser("patching", help="the ceiling of any attn1 edit: patch the layers with the unedited run's "
                                        "own outputs, shifted; how far does the object move?")
    c.add_argument("--model", default="scenes", help="model (default: scenes)")
    c.add_argument("--captions", type=int, default=16, help="held-out captions, one seed each (default: 16)")
    c.add_argument("--dx", type=float, default=24.0, help="horizontal shift in pixels (default: 24)")
    c.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default: 7.5, the study's)")
    c.add_argument("--label-models", default=None, help="label-model folder whose segmenter finds the object "
                                                        "(default: the shipped scenes label models)")
    c.add_argument("--out", type=Path, default=None, help="folder for patching.json (default: none)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    x = sub.add_parser("export", help="write out/model from the latest checkpoints of a run, finished or stopped "
                                      "early (the U-Net's EMA weights at its last checkpoint)")
    x.add_argument("--out", required=True, type=Path, help="the training run folder")
    s = sub.add_parser("ship", help="copy a finished run's model (+ its bank) into the package with a model card")
    s.add_argument("--run", required=True, type=Path, help="the finished training run folder")
    s.add_argument("--to", type=Path, default=None, help="destination (default: ldmprobe/weights/scenes)")
    s.add_argument("--bank", type=Path, default=None, help="probe bank fitted for the model, shipped as bank.safetensors (default: none)")
    s.add_argument("--figures", type=Path, action="append", default=[],
                   help="JSON files of evaluation figures to put in the card, as NAME=PATH (repeatable; default: none)")
    s.add_argument("--command", dest="train_command", default=None,
                   help="the exact training command for the card (default: the run's train.cmd file)")
    return p


def _check(p: argparse.ArgumentParser, args) -> None:
    if args.command == "train":
        for name in ("scenes", "vae_steps", "vae_batch", "vae_crop", "unet_steps", "batch", "checkpoint_every"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
        if args.init:
            from ldmprobe.models import SCENES_DIR

            args.init = str(SCENES_DIR) if args.init == "scenes" else args.init
            if not (Path(args.init) / "unet").is_dir():
                p.error(f"--init: {args.init} is not a diffusers model folder (no unet/)")
        if args.size % 64 or args.size < 64:
            p.error(f"--size: must be a multiple of 64, got {args.size}")
        if args.decoder_steps < 0:
            p.error(f"--decoder-steps: must be >= 0, got {args.decoder_steps}")
        if args.dtype not in ("float16", "float32", "bfloat16"):
            p.error(f"--dtype: use float16, float32 or bfloat16, got {args.dtype!r}")
        if args.snr_floor < 0 or args.snr_cap < 0 or (args.snr_cap and args.snr_floor > args.snr_cap):
            p.error(f"--snr-floor/--snr-cap: need 0 <= floor <= cap (0 = off), got {args.snr_floor}, {args.snr_cap}")
        if not 0 <= args.guided_below <= 1000 or args.guided_scale < 0 or args.guided_weight < 0:
            p.error(f"--guided-below/--guided-scale/--guided-weight: need 0 <= below <= 1000, scale >= 0, weight >= 0, "
                    f"got {args.guided_below}, {args.guided_scale}, {args.guided_weight}")
        if not 0 <= args.cfg_dropout < 1:
            p.error(f"--cfg-dropout: must be in [0, 1), got {args.cfg_dropout}")
    elif args.command == "export":
        for name in ("job.json", "vae.checkpoint.safetensors", "latents.safetensors", "unet.checkpoint.safetensors"):
            if not (args.out / name).is_file():
                p.error(f"--out: {args.out} has no {name}: not a run whose U-Net stage has started")
    elif args.command == "intervene":
        if args.captions < 1:
            p.error(f"--captions: must be >= 1, got {args.captions}")
        if args.bank is not None and not args.bank.is_file():
            p.error(f"--bank: {args.bank} is not a file")
        if not (math.isfinite(args.guidance) and 0 <= args.guidance <= 50):
            p.error(f"--guidance: a scale in 0…50, got {args.guidance}")
    elif args.command == "patching":
        if args.captions < 1:
            p.error(f"--captions: must be >= 1, got {args.captions}")
        if not (math.isfinite(args.dx) and args.dx != 0):
            p.error(f"--dx: a non-zero shift in pixels, got {args.dx}")
        if not (math.isfinite(args.guidance) and 0 <= args.guidance <= 50):
            p.error(f"--guidance: a scale in 0…50, got {args.guidance}")
    elif args.command == "evaluate":
        if args.captions < 1:
            p.error(f"--captions: must be >= 1, got {args.captions}")
        if args.steps < 1:
            p.error(f"--steps: must be >= 1, got {args.steps}")
    else:
        if not (args.run / "model").is_dir() or not (args.run / "job.json").is_file():
            p.error(f"--run: {args.run} is not a finished training run (no model/ or job.json)")
        for spec in args.figures:
            name, _, path = str(spec).partition("=")
            if not name or not Path(path).is_file():
                p.error(f"--figures: expected NAME=PATH of an existing JSON file, got {spec!r}")


def _intervene(args) -> dict:
    from ldmprobe.atomic import write_json
    from ldmprobe.generate import Sampler
    from ldmprobe.intervene import InterventionSpec
    from ldmprobe.label_models import load_label_models
    from ldmprobe.models import SCENES_DIR, load_model
    from ldmprobe.probes import ProbeBank
    from ldmprobe.schemas import GenerationSettings

    from .data import HELD_OUT_SEED_OFFSET, held_out_captions
    from .intervention_eval import intervention_grid, run_interventions

    model = load_model(args.model)
    bank = ProbeBank.load(args.bank or SCENES_DIR / "bank.safetensors", model)
    shifts = args.dx or [24.0]
    cases = [{"prompt": c["caption"], "seed": HELD_OUT_SEED_OFFSET + i, "dx": shifts[i % len(shifts)], "dy": 0.0}
             for i, c in enumerate(held_out_captions(args.captions))]
    settings = GenerationSettings(steps=bank.num_steps or 15, guidance=args.guidance)
    sampler = Sampler(model)
    layers = {"layers": args.layers if args.layers in (None, "all") else args.layers.split(",")}
    if args.layers is not None:
        try:
            sampler.select_layers(layers["layers"])
        except (KeyError, ValueError) as exc:  # an unknown layer name: the message lists the valid ones
            raise UsageError(f"--layers: {str(exc.args[0]).splitlines()[0]}") from exc
    labels = load_label_models(args.label_models)
    out = run_interventions(sampler, bank, cases, settings, label_model=labels.foreground, order=args.order,
                            protocol=args.protocol, metric=args.metric, **layers)
    rows = [{k: v for k, v in r.items() if k != "_result"} for r in out["rows"]]
    metric = InterventionSpec(protocol=args.protocol, metric=args.metric).resolved_metric()
    result = {"model": args.model, "order": args.order, "guidance": args.guidance, "layers": args.layers or "default",
              "protocol": args.protocol, "metric": metric, "label_models": labels.source, "cases": len(cases),
              "summary": out["summary"], "seconds": out["seconds"]}
    if args.out is not None:
        write_json(args.out / "intervene.json", {**result, "rows": rows})
        intervention_grid(out["rows"], args.out / "intervene.png")
    return result


def _patching(args) -> dict:
    from ldmprobe.atomic import write_json
    from ldmprobe.generate import Sampler
    from ldmprobe.label_models import load_label_models
    from ldmprobe.models import load_model
    from ldmprobe.schemas import GenerationSettings

    from .data import HELD_OUT_SEED_OFFSET, held_out_captions
    from .patching import patching_ceiling

    model = load_model(args.model)
    sampler = Sampler(model)
    labels = load_label_models(args.label_models)
    prompts = [c["caption"] for c in held_out_captions(args.captions)]
    seeds = [HELD_OUT_SEED_OFFSET + i for i in range(args.captions)]
    names = sampler.select_layers("all")
    layer_sets = {"all 16 layers": names, "decoder layers (the intervention's)": [n for n in names if n.startswith("dec")]}
    windows = {"0-4 (the study's)": range(5), "0-9": range(10), "0-14 (every step)": range(15)}
    out = patching_ceiling(sampler, prompts, seeds, GenerationSettings(guidance=args.guidance), args.dx, windows,
                           layer_sets, lambda images: labels.foreground(images) > 0.5, progress=not args.no_progress)
    result = {"model": args.model, "guidance": args.guidance, "label_models": labels.source, **out}
    if args.out is not None:
        write_json(args.out / "patching.json", result)
    return {**result, "configs": {k: {m: v[m] for m in v if m not in ("per_caption", "layers")} for k, v in out["configs"].items()}}


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    _check(p, args)
    if args.command == "train":
        from .train import Trainer

        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
        try:
            trainer = Trainer(args.out, cfg, progress=not args.no_progress, stop_after=args.stop_after, only=args.only)
        except ValueError as exc:
            p.error(f"--out: {exc}")
        job = trainer.run()
        if trainer.dist.main:
            print_line({"out": str(args.out), "wall_s": job["wall_s"], "loss": job.get("loss", {}),
                        "done": (args.out / "model").is_dir()})
        return 0
    if args.command == "export":
        from . import checkpoint
        from .train import Trainer

        config = json.loads((args.out / "job.json").read_text())["config"]
        trainer = Trainer(args.out, TrainConfig(**config), progress=False)
        step = checkpoint.meta(args.out / "unet.checkpoint.safetensors")["step"]
        print_line({"model": str(trainer.export()), "unet_step": step, "unet_steps": config["unet_steps"]})
        return 0
    if args.command == "intervene":
        try:
            print_line(_intervene(args))
        except UsageError as exc:
            p.error(str(exc))
        return 0
    if args.command == "patching":
        print_line(_patching(args))
        return 0
    if args.command == "ship":
        from ldmprobe.models import SCENES_DIR

        from .ship import ship

        figures = {}
        for spec in args.figures:
            name, _, path = str(spec).partition("=")
            figures[name] = json.loads(Path(path).read_text())
        command = args.train_command or (args.run / "train.cmd").read_text().strip()
        card = ship(args.run, args.to or SCENES_DIR, command, figures,
                    {"bank.safetensors": args.bank} if args.bank else None)
        print_line({"to": str(args.to or SCENES_DIR), "bytes_total": card["bytes_total"],
                    "files": len(card["sha256"])})
        return 0
    from .evaluate import run_evaluation

    print_line(run_evaluation(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
