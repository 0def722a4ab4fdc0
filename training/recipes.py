"""Named probe-fitting recipes, and the job options a protocol and a recipe resolve to.

A recipe fixes how probes are fitted (method, learning rate, epochs, batch) and, for the
capstone's shading probe, also what (layer, property, split), so a published number can be
reproduced by name; the report names the recipe behind every figure. A protocol
(`ldmprobe.protocol`) fixes the study-vs-ours differences. Precedence: an explicit flag, then
the recipe, then the protocol, then the job's default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ldmprobe.protocol import Protocol, get_protocol


class RecipeError(ValueError):
    """Options that contradict each other or a recipe (exit code 2)."""


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str  # "ridge" (closed form) or "reference" (Adam on a bias-free linear layer)
    description: str
    lr: float | None = None
    epochs: int | None = None
    batch_images: int | None = None
    layers: str | None = None  # None: the job's --layers
    properties: str | None = None  # None: the job's --properties
    split: str | None = None  # None: the study's 246 / 371 CSVs; else training/splits/<name>.json


RECIPES: dict[str, Recipe] = {
    "ridge": Recipe("ridge", "ridge", "closed-form ridge with an unpenalised bias, λ chosen on held-out images (ours)"),
    "reference": Recipe("reference", "reference", "the study's probes: bias-free linear layer, Adam lr 1e-3, 30 epochs, "
                    "batch 4 images", lr=1e-3, epochs=30, batch_images=4),
    "capstone-shading": Recipe("capstone-shading", "reference", "the capstone's shading probe: dec4.0 only, Adam "
                               "lr 1e-2, 30 epochs, batch 4, its 500/117 split of the study's 617 images",
                               lr=1e-2, epochs=30, batch_images=4, layers="dec4.0", properties="shading",
                               split="capstone-shading"),
}
METHOD_RECIPE = {"ridge": "ridge", "reference": "reference"}


@dataclass(frozen=True)
class JobOptions:
    """Everything the protocol and recipe decided for one fitting job (recorded in job.json and the bank)."""

    protocol: str
    recipe: str
    method: str
    lr: float | None
    epochs: int | None
    batch_images: int | None
    layers: str
    properties: str
    split: str | None
    timestep_spacing: str
    latent_dtype: str
    mask_threshold: int
    prompt_encoding: str
    probe_init: str
    mask_head: str
    label_norm: str
    depth_norm: str
    upsample: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve(args) -> JobOptions:
    """Job options from parsed flags (None = not given) under args.protocol / args.recipe."""
    protocol: Protocol = get_protocol(args.protocol)
    name = args.recipe or (METHOD_RECIPE[args.method] if args.method else
                           METHOD_RECIPE[protocol.fit_method])
    if name not in RECIPES:
        raise RecipeError(f"--recipe: unknown recipe {name!r}; use one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    if args.method and args.method != recipe.method:
        raise RecipeError(f"--method {args.method} contradicts --recipe {name} (method {recipe.method})")
    reference = recipe.method == "reference"
    if not reference and (args.lr is not None or args.epochs is not None):
        raise RecipeError("--lr / --epochs: only for the reference method (ridge is closed-form)")
    if args.lr is not None and not args.lr > 0:
        raise RecipeError(f"--lr must be > 0, got {args.lr}")
    if args.epochs is not None and args.epochs < 1:
        raise RecipeError(f"--epochs must be ≥ 1, got {args.epochs}")
    return JobOptions(
        protocol=protocol.name, recipe=name, method=recipe.method,
        lr=(args.lr if args.lr is not None else recipe.lr) if reference else None,
        epochs=(args.epochs if args.epochs is not None else recipe.epochs) if reference else None,
        batch_images=recipe.batch_images if reference else None,
        layers=args.layers or recipe.layers or "all",
        properties=args.properties or recipe.properties or "foreground,depth,shading",
        split=recipe.split,
        timestep_spacing=args.timestep_spacing or protocol.timestep_spacing,
        latent_dtype=protocol.latent_dtype,
        mask_threshold=protocol.mask_threshold if args.mask_threshold is None else args.mask_threshold,
        prompt_encoding=args.prompt_encoding or protocol.prompt_encoding,
        probe_init=protocol.probe_init, mask_head=protocol.mask_head, label_norm=protocol.label_norm,
        depth_norm=args.depth_norm or protocol.depth_norm,
        upsample=args.upsample or protocol.upsample)
