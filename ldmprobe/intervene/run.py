"""Intervention: move the foreground object (or reshape depth) by editing activations through the probes.

The study's causal test. At each edited step, the captured conditional-half output of each edited
attn1 layer is copied to float32 and optimised with Adam until the layer's probe outputs the
target map; the optimised tensors are patched into the forward (the core's patching path) and
denoising resumes. Prompt, seed and weights never change.

Choices that differ from the reference code, and why:
- The unedited generation runs in the same batch (row 0 unedited, row 1 edited), so the
  baseline shares every number with the edited row until the first patch, and the target of each
  layer at each edited step is *that layer's own probe prediction on the unedited row*,
  translated. A zero shift is therefore an exact no-op (gradient 0), and the target follows the
  probe as its prediction sharpens over the steps instead of freezing an early, blurry one.
  A user mask replaces it (area-averaged to each layer's resolution).
- All edited layers of a step are optimised together in ONE loop: layers of equal shape are
  stacked and go through one batched matmul, and the per-layer losses are summed. Adam is
  element-wise and the layers' losses are independent, so every layer follows exactly the
  trajectory of its own one-layer loop (`optimise_reference`), at a fraction of the launches.
- Losses live in the probe's raw output space: binary cross-entropy on logits for sigmoid mask
  probes (the study's choice), squared error for mask probes fitted by regression (the ridge
  banks of `training/`: the loss they were fitted with), Huber for continuous maps (depth).

Success is measured, not assumed (`measure`): the evaluation probe (the bank's best layer for the
property at its last step) is run on both rows at the last step; Dice to the target for the
edited row vs the unedited one, the centroid shift achieved vs requested, and how much the rest
of the image changed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .generate import Sampler
from .metrics import dice, pearson, rmse
from .probes import Probe, ProbeBank
from .schemas import GenerationSettings

Property = Literal["foreground", "depth"]
LossName = Literal["auto", "bce", "mse", "huber"]
PROPERTIES = ("foreground", "depth")
DEFAULT_LAYERS = {
    "foreground": ("dec2.0", "dec2.1", "dec2.2", "dec3.0", "dec3.1", "dec3.2", "dec4.0", "dec4.1", "dec4.2"),
    "depth": "all",
}
DEFAULT_STEPS = {"foreground": (0, 1, 2, 3, 4), "depth": (0, 1, 2)}
DEFAULT_LR = 5e-3
DEFAULT_ITERATIONS = 128
MASK_THRESHOLD = 0.5


class InterventionError(ValueError):
    """A request the intervention cannot run: names what is wrong (and `field`, the request field)."""

    def __init__(self, message: str, field: str = "request"):
        super().__init__(message)
        self.field = field


# --- the target ---------------------------------------------------------------------------------
def affine_theta(affine: Sequence[Sequence[float]], height: int, width: int) -> torch.Tensor:
    """A 2×3 affine in image pixels (source → destination, pixel centres at i + 0.5) as the
    2×3 `grid_sample` matrix (destination → source, normalised coordinates). Normalised
    coordinates do not depend on resolution, so one matrix serves every layer."""
    m = torch.eye(3, dtype=torch.float64)
    m[:2] = torch.tensor(affine, dtype=torch.float64)
    if abs(float(torch.linalg.det(m))) < 1e-9:
        raise InterventionError("the affine is singular (it collapses the image)", "affine")
    to_norm = torch.tensor([[2.0 / width, 0, -1], [0, 2.0 / height, -1], [0, 0, 1]], dtype=torch.float64)
    theta = to_norm @ torch.linalg.inv(m) @ torch.linalg.inv(to_norm)
    return theta[:2].float()


def translation(dx: float, dy: float) -> list[list[float]]:
    """The pixel affine of a shift by (dx, dy): right and down are positive."""
    return [[1.0, 0.0, float(dx)], [0.0, 1.0, float(dy)]]


def is_identity(affine: Sequence[Sequence[float]]) -> bool:
    return all(abs(float(affine[i][j]) - (1.0 if i == j else 0.0)) < 1e-12 for i in range(2) for j in range(3))


def transform_maps(maps: torch.Tensor, theta: torch.Tensor, fill: float | None) -> torch.Tensor:
    """Warp [N, H, W] maps by a grid_sample theta. Uncovered pixels get `fill` (the background
    value: 0 for masks) or, with fill=None, the nearest border value (depth)."""
    x = maps.unsqueeze(1).float()
    grid = F.affine_grid(theta.to(x.device).expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    if fill is None:
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:
        out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return out.squeeze(1)


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[H, W] mask → [height, width], area-averaged when shrinking (the fraction of each cell
    the mask covers), bilinear when growing."""
    x = mask.float()[None, None]
    if height <= mask.shape[0] and width <= mask.shape[1]:
        return F.interpolate(x, size=(height, width), mode="area")[0, 0]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[0, 0]


# --- the optimisation ---------------------------------------------------------------------------
@dataclass
class LayerTarget:
    """What one layer's activation is optimised toward: the probe (raw output = x @ w + b) and
    the target in the probe's raw space ([H·W]); `loss` is the loss name resolved for it."""

    layer: str
    probe: Probe
    target: torch.Tensor  # [H·W] float32, raw space (logit space: probabilities for bce)
    loss: str
    units: torch.Tensor | None = None  # [H·W] the same target in the probe's output units
    # Identity warp: the target is the probe's output on this (unedited) activation, computed
    # inside `optimise` with the very op it optimises with, so a row equal to it gets gradient 0
    # exactly (a matvec's rounding differs from a batched matmul's, and Adam rescales even 1e-9
    # gradients to lr-sized steps).
    own: torch.Tensor | None = None

    def units_map(self) -> torch.Tensor:
        if self.units is not None:
            return self.units
        return self.target if self.loss == "bce" else self.target * self.probe.std[0] + self.probe.mean[0]


def resolve_loss(probe: Probe, loss: LossName = "auto") -> str:
    if loss == "auto":
        if probe.kind == "mask":
            return "bce" if probe.sigmoid else "mse"
        return "huber"
    if loss == "bce" and not probe.sigmoid:
        raise InterventionError(f"loss 'bce' needs a sigmoid probe; {probe.property}/{probe.layer} is a regression "
                                "probe (use mse or auto)", "loss")
    return loss


def _loss(y: torch.Tensor, t: torch.Tensor, name: str) -> torch.Tensor:
    """Per-row mean loss of raw outputs y against targets t ([n, HW] → [n])."""
    if name == "bce":
        return F.binary_cross_entropy_with_logits(y, t, reduction="none").mean(-1)
    if name == "mse":
        return (y - t).square().mean(-1)
    if name == "huber":
        return F.huber_loss(y, t, reduction="none", delta=1.0).mean(-1)
    raise InterventionError(f"unknown loss {name!r}; use auto, bce, mse or huber", "loss")


def raw_output(probe: Probe, x: torch.Tensor) -> torch.Tensor:
    """The probe's raw output (before normalisation and sigmoid) of [..., HW, C] → [..., HW]."""
    return (x @ probe.weight[:, 0].to(x.device, x.dtype)) + probe.bias[0].to(x.device, x.dtype)


def to_raw(probe: Probe, values: torch.Tensor, loss: str) -> torch.Tensor:
    """A target in the probe's output units (probability, depth…) → the space the loss compares in."""
    if loss == "bce":
        return values.clamp(0, 1)  # bce compares logits with probabilities
    return (values - probe.mean[0]) / probe.std[0]


def to_units(probe: Probe, raw: torch.Tensor) -> torch.Tensor:
    """Raw probe output → the map in target units (probability for sigmoid probes)."""
    y = raw * probe.std[0] + probe.mean[0]
    return torch.sigmoid(y) if probe.sigmoid else y


@dataclass
class Optimised:
    """Optimised activations per layer ([HW, C], float32) and the loss trajectory ends."""

    activations: dict[str, torch.Tensor]
    initial_loss: dict[str, float]
    final_loss: dict[str, float]
    seconds: float


BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as the reference uses
ADAM_EPS = 1e-8


def _dloss(y: torch.Tensor, t: torch.Tensor, name: str) -> torch.Tensor:
    """d(per-row mean loss)/dy for [n, HW] raw outputs."""
    hw = y.shape[-1]
    if name == "bce":
        return (torch.sigmoid(y) - t) / hw
    if name == "mse":
        return 2 * (y - t) / hw
    if name == "huber":
        return (y - t).clamp(-1.0, 1.0) / hw
    raise InterventionError(f"unknown loss {name!r}; use auto, bce, mse or huber", "loss")


def adam_step(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: torch.Tensor, w: torch.Tensor,
              b: torch.Tensor, lr_bc1: torch.Tensor, sqrt_bc2: torch.Tensor, loss: str) -> torch.Tensor:
    """One exact Adam step on x [n, HW, C] for linear probes (w [n, C], b [n]); returns x's new
    raw outputs [n, HW]. m and v [n, HW] are the per-pixel factors of Adam's moments (see
    `optimise`); x, m, v are updated in place. Written so inductor fuses the update of x and the
    next outputs into one pass over x."""
    b1, b2 = BETAS
    g = _dloss(y, t, loss)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v.sqrt() / sqrt_bc2)[..., None] * w.abs()[:, None, :] + ADAM_EPS
    x_new = x - lr_bc1 * (m[..., None] * w[:, None, :]) / denom
    x.copy_(x_new)
    return _outputs(x_new, w, b)


def _outputs(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Raw outputs [n, HW] of stacked activations [n, HW, C] — the expression adam_step uses."""
    return (x * w[:, None, :]).sum(-1) + b[:, None]


_compiled_step = None


def compiled_adam_step():
    """`adam_step` under torch.compile (one graph per group shape and loss; inductor cache)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(adam_step, dynamic=False, fullgraph=True)
    return _compiled_step


def optimise(activations: Mapping[str, torch.Tensor], targets: Sequence[LayerTarget], lr: float = DEFAULT_LR,
             iterations: int = DEFAULT_ITERATIONS, compiled: bool = False) -> Optimised:
    """All layers of one step in one loop of exact Adam (torch's defaults), batched.

    For a linear probe y_i = x_i · w + b and a per-pixel loss, the gradient is an outer product,
    ∂L/∂x_ij = (∂L/∂y_i) w_j; so Adam's moments factor exactly, m_ij = w_j M_i and
    v_ij = w_j² V_i, with M and V the moving averages of ∂L/∂y and its square: one number per
    pixel instead of two [H·W, C] tensors. Each iteration is then one pass over x that updates
    it and yields the next outputs — no autograd, no moment tensors. Layers of equal shape and
    loss are stacked ([n, H·W, C]); each layer's loss is its own, so every layer follows the
    trajectory of its own one-layer loop (`optimise_reference`), up to float rounding.
    compiled=True runs the step through torch.compile (one fused kernel on CPU; measured in
    bench/intervene.py)."""
    started = time.perf_counter()
    step_fn = compiled_adam_step() if compiled else adam_step
    groups: dict[tuple, list[LayerTarget]] = {}
    for tgt in targets:
        groups.setdefault((tuple(activations[tgt.layer].shape), tgt.loss), []).append(tgt)
    out, first, last = {}, {}, {}
    b1, b2 = BETAS
    with torch.no_grad():
        for (_, loss_name), members in groups.items():
            x = torch.stack([activations[m.layer].detach().float() for m in members]).clone()  # [n, HW, C]
            w = torch.stack([m.probe.weight[:, 0].to(x.device, torch.float32) for m in members])  # [n, C]
            b = torch.stack([m.probe.bias[0].to(x.device, torch.float32) for m in members])  # [n]
            t = torch.stack([m.target.to(x.device, torch.float32) for m in members])  # [n, HW]
            iters = int(iterations)
            if all(m.own is not None for m in members):
                own = torch.stack([m.own.detach().float() for m in members])
                t = _outputs(own, w, b)
                t = torch.sigmoid(t) if loss_name == "bce" else t
                if torch.equal(own, x):  # the target is x's own output: gradient exactly 0, Adam a no-op
                    iters = 0  # (not left to rounding noise, which Adam would rescale to lr-sized steps)
            y = _outputs(x, w, b)
            initial = _loss(y, t, loss_name)
            m_, v_ = torch.zeros_like(y), torch.zeros_like(y)
            for k in range(1, iters + 1):
                lr_bc1 = torch.tensor(lr / (1 - b1**k), device=x.device)
                sqrt_bc2 = torch.tensor(math.sqrt(1 - b2**k), device=x.device)
                y = step_fn(x, y, m_, v_, t, w, b, lr_bc1, sqrt_bc2, loss_name)
            final = _loss(_outputs(x, w, b), t, loss_name)
            for i, m in enumerate(members):
                out[m.layer] = x[i]
                first[m.layer], last[m.layer] = float(initial[i]), float(final[i])
    return Optimised(out, first, last, time.perf_counter() - started)


def optimise_reference(activations: Mapping[str, torch.Tensor], targets: Sequence[LayerTarget],
                       lr: float = DEFAULT_LR, iterations: int = DEFAULT_ITERATIONS) -> Optimised:
    """The reference code's way, kept as the benchmark baseline: one layer after another, each
    with its own Adam loop over its own [H·W, C] tensor."""
    started = time.perf_counter()
    out, first, last = {}, {}, {}
    with torch.enable_grad():
        for tgt in targets:
            x = activations[tgt.layer].detach().float().clone().requires_grad_(True)
            w = tgt.probe.weight[:, 0].to(x.device, torch.float32)
            b = tgt.probe.bias[0].to(x.device, torch.float32)
            t = tgt.target.to(x.device, torch.float32)
            opt = torch.optim.Adam([x], lr=lr)
            with torch.no_grad():
                first[tgt.layer] = float(_loss((x @ w + b)[None], t[None], tgt.loss)[0])
            for _ in range(iterations):
                opt.zero_grad(set_to_none=True)
                _loss((x @ w + b)[None], t[None], tgt.loss)[0].backward()
                opt.step()
            with torch.no_grad():
                last[tgt.layer] = float(_loss((x @ w + b)[None], t[None], tgt.loss)[0])
            out[tgt.layer] = x.detach()
    return Optimised(out, first, last, time.perf_counter() - started)


# --- the specification --------------------------------------------------------------------------
@dataclass
class InterventionSpec:
    """What to edit and how. `affine` (2×3, image pixels, source → destination) overrides
    dx/dy; `target_mask` ([H, W] in [0, 1] at image size; foreground only) overrides both."""

    property: Property = "foreground"
    dx: float = 0.0
    dy: float = 0.0
    affine: list[list[float]] | None = None
    target_mask: torch.Tensor | None = None
    layers: str | Sequence[str] | None = None  # None: the property's default (decoder layers / all)
    edit_steps: Sequence[int] | None = None  # None: the property's default (0–4 / 0–2)
    lr: float = DEFAULT_LR
    iterations: int = DEFAULT_ITERATIONS
    loss: LossName = "auto"
    eval_layer: str | None = None  # None: the bank's best layer for the property at its last step

    def pixel_affine(self) -> list[list[float]]:
        return [list(map(float, row)) for row in self.affine] if self.affine is not None else translation(self.dx, self.dy)

    def work(self, n_layers: int, n_steps: int) -> int:
        """Adam iterations × layers × steps: the bound the service validates up front."""
        return int(self.iterations) * n_layers * n_steps


@dataclass
class InterventionResult:
    """Both rows of the run and what was measured on them."""

    original: torch.Tensor  # [3, H, W] in [0, 1], CPU
    edited: torch.Tensor
    original_map: torch.Tensor  # [H, W] evaluation probe's map of the unedited row (target units)
    edited_map: torch.Tensor  # the same on the edited row ("achieved")
    target_map: torch.Tensor  # [H, W]: what the edited row should show
    original_latents: torch.Tensor
    edited_latents: torch.Tensor
    success: dict[str, Any]
    layers: list[str]
    edit_steps: list[int]
    losses: dict[int, dict[str, dict[str, float]]]  # step → layer → {initial, final}
    timings_s: dict[str, float]
    metadata: dict[str, Any] = field(default_factory=dict)
    label_maps: dict[str, torch.Tensor] | None = None  # label model's maps of both images, when configured


# --- the run ------------------------------------------------------------------------------------
class Intervention:
    """Runs interventions for one sampler (model, compiled or not) and one probe bank."""

    def __init__(self, sampler: Sampler, bank: ProbeBank,
                 label_model: Callable[[torch.Tensor], torch.Tensor] | None = None, compile_optimiser: bool | None = None):
        """label_model: images [N, 3, H, W] in [0, 1] → maps [N, H', W'] of the property (e.g. a
        saliency model), run on both images when given. compile_optimiser: torch.compile the
        Adam step (default: when the sampler is compiled)."""
        self.sampler, self.bank, self.label_model = sampler, bank, label_model
        self.compile_optimiser = sampler.compiled if compile_optimiser is None else bool(compile_optimiser)

    # validation that needs the bank and the model; a service calls it before any work
    def resolve(self, spec: InterventionSpec, settings: GenerationSettings) -> tuple[list[str], list[int], str, dict]:
        """(edited layers, edited steps, evaluation layer, bank step per request step), or
        InterventionError naming the field."""
        from .service import best_layers

        bank = self.bank
        prop = spec.property
        if prop not in PROPERTIES:
            raise InterventionError(f"unknown property {prop!r}; use foreground or depth", "property")
        if prop not in bank.properties:
            raise InterventionError(f"the probe bank has no {prop!r} probes; it holds {bank.describe()}", "property")
        if spec.target_mask is not None and prop != "foreground":
            raise InterventionError("target_mask is for the foreground property only", "target_mask")
        selection = DEFAULT_LAYERS[prop] if spec.layers is None else spec.layers
        try:
            layers = list(self.sampler.select_layers(selection))
        except (KeyError, ValueError) as exc:
            raise InterventionError(str(exc).strip("'\""), "layers") from None
        layers = [la for la in layers if any(bank.has(prop, la, s) for s in bank.steps)] if spec.layers is None else layers
        if not layers:
            raise InterventionError(f"no {prop} probes on the selected layers; the bank holds {bank.describe()}", "layers")
        steps = list(DEFAULT_STEPS[prop] if spec.edit_steps is None else spec.edit_steps)
        if not steps:
            raise InterventionError("edit_steps is empty", "edit_steps")
        bad = [s for s in steps if not 0 <= int(s) < settings.steps]
        if bad:
            raise InterventionError(f"edit step(s) {bad} outside 0–{settings.steps - 1}", "edit_steps")
        steps = sorted({int(s) for s in steps})
        bank_steps = self.bank_steps(settings)
        for s in steps:
            for la in layers:
                if not bank.has(prop, la, bank_steps[s]):
                    raise InterventionError(f"no {prop} probe for layer {la} at bank step {bank_steps[s]} (request step "
                                            f"{s}); the bank holds {bank.describe()}", "layers")
        eval_layer = spec.eval_layer or best_layers(bank)[prop][0]
        if not bank.has(prop, eval_layer, bank_steps[settings.steps - 1]):
            raise InterventionError(f"no {prop} probe for the evaluation layer {eval_layer} at the last step", "eval_layer")
        if not (math.isfinite(spec.lr) and spec.lr > 0):
            raise InterventionError(f"lr must be a positive number, got {spec.lr}", "lr")
        if spec.iterations < 0:
            raise InterventionError(f"iterations must be >= 0, got {spec.iterations}", "iterations")
        affine_theta(spec.pixel_affine(), settings.height or self.sampler.model.default_size,
                     settings.width or self.sampler.model.default_size)  # raises on a singular affine
        for layer in layers:
            resolve_loss(bank.probe(prop, layer, bank_steps[steps[0]]), spec.loss)
        return layers, steps, eval_layer, bank_steps

    def bank_steps(self, settings: GenerationSettings) -> list[int]:
        """The bank step of each request step: equal schedules map 1:1, others by nearest timestep."""
        bank = self.bank
        if not bank.scheduler or not bank.num_steps or (settings.scheduler, settings.steps) == (bank.scheduler,
                                                                                               bank.num_steps):
            return list(range(settings.steps))
        from .generate import make_scheduler

        def times(name: str, n: int) -> list[float]:
            sched = make_scheduler(self.sampler.model, name)
            sched.set_timesteps(n)
            return [float(t) for t in sched.timesteps]

        ours, theirs = times(settings.scheduler, settings.steps), times(bank.scheduler, bank.num_steps)
        return [min(range(len(theirs)), key=lambda j: (abs(theirs[j] - t), j)) for t in ours]

    def layer_targets(self, spec: InterventionSpec, layers: list[str], bank_step: int, unedited: Mapping[str, torch.Tensor],
                      theta: torch.Tensor | None, registry) -> list[LayerTarget]:
        """Per layer: the probe's own map of the unedited row, warped (or the user mask, resized)."""
        fill = 0.0 if spec.property == "foreground" else None
        out = []
        for layer in layers:
            probe = self.bank.probe(spec.property, layer, bank_step)
            loss = resolve_loss(probe, spec.loss)
            shape = registry[layer]
            if spec.target_mask is not None:
                units = resize_mask(spec.target_mask, shape.height, shape.width).to(unedited[layer].device).flatten()
                target = to_raw(probe, units, loss)
            else:
                raw = raw_output(probe, unedited[layer].float())  # [HW]
                own = to_units(probe, raw)
                if theta is None:  # no warp: the probe's own output, recomputed exactly in optimise
                    units, target = own, (torch.sigmoid(raw) if loss == "bce" else raw)
                else:
                    units = transform_maps(own.reshape(1, shape.height, shape.width), theta, fill).flatten()
                    target = to_raw(probe, units, loss)
            source = unedited[layer] if (theta is None and spec.target_mask is None) else None
            out.append(LayerTarget(layer, probe, target.detach(), loss, units.detach(), source))
        return out

    def run(self, prompt: str, seed: int, spec: InterventionSpec, settings: GenerationSettings | None = None,
            progress: bool = False) -> InterventionResult:
        from tqdm.auto import tqdm

        settings = settings or GenerationSettings()
        model = self.sampler.model
        height, width = settings.height or model.default_size, settings.width or model.default_size
        layers, steps, eval_layer, bank_steps = self.resolve(spec, settings)
        affine = spec.pixel_affine()
        theta = None if (spec.target_mask is not None or is_identity(affine)) else affine_theta(affine, height, width)
        registry = model.registry(height, width)
        capture = tuple(dict.fromkeys([*layers, eval_layer]))
        started = time.perf_counter()
        run = self.sampler.start([prompt, prompt], [seed, seed], settings, layers=capture)
        losses: dict[int, dict[str, dict[str, float]]] = {}
        optimise_s = 0.0
        last_acts: dict[str, torch.Tensor] = {}
        edit_record: tuple | None = None  # the last edited step's targets, unedited and patched activations
        for _ in tqdm(range(len(run.timesteps)), desc="intervening", disable=not progress, unit="step"):
            index = run.index
            noise, acts = run.predict()
            if index in steps:
                bank_step = bank_steps[index]
                unedited = {la: acts[la][0] for la in layers}
                targets = self.layer_targets(spec, layers, bank_step, unedited, theta, registry)
                result = optimise({la: acts[la][1] for la in layers}, targets, spec.lr, spec.iterations,
                                  compiled=self.compile_optimiser)
                optimise_s += result.seconds
                losses[index] = {la: {"initial": result.initial_loss[la], "final": result.final_loss[la]}
                                 for la in layers}
                patches = {la: result.activations[la][None].to(model.dtype) for la in layers}
                noise, acts = run.predict(patches)
                # what the probes read from the representation actually used (captured after patching)
                edit_record = (index, targets, unedited, {la: acts[la][1] for la in layers})
            last_acts = acts
            run.advance(noise, acts)
        denoise_s = time.perf_counter() - started - optimise_s
        decode_started = time.perf_counter()
        images = self.sampler.decode(run.latents)
        decode_s = time.perf_counter() - decode_started
        last = bank_steps[settings.steps - 1]
        probe = self.bank.probe(spec.property, eval_layer, last)
        maps = self.bank.apply({eval_layer: last_acts[eval_layer]}, last, properties=[spec.property],
                               layers=[eval_layer], size=(height, width), mode="bilinear", registry=registry)
        original_map, edited_map = (m.float().cpu() for m in maps[(spec.property, eval_layer)])
        if spec.target_mask is not None:
            target_map = resize_mask(spec.target_mask.float().cpu(), height, width)
        elif theta is None:
            target_map = original_map.clone()
        else:
            target_map = transform_maps(original_map[None], theta, 0.0 if spec.property == "foreground" else None)[0]
        label_maps = None
        if self.label_model is not None:
            with torch.no_grad():
                labelled = self.label_model(images).float().cpu()
            label_maps = {"original": labelled[0], "edited": labelled[1]}
        success = measure(spec.property, original_map, edited_map, target_map, images[0], images[1],
                          run.latents[0].float().cpu(), run.latents[1].float().cpu(), affine, probe,
                          label_maps=label_maps, target_is_mask=spec.target_mask is not None)
        if edit_record is not None:
            success["representation"] = representation_success(spec.property, *edit_record)
        total_s = time.perf_counter() - started
        meta = self.sampler.metadata(run) | {
            "property": spec.property, "affine": affine, "lr": spec.lr, "iterations": spec.iterations,
            "loss": {la: resolve_loss(self.bank.probe(spec.property, la, bank_steps[steps[0]]), spec.loss)
                     for la in layers},
            "eval_layer": eval_layer, "eval_step": last, "bank_steps": [bank_steps[s] for s in steps],
            "target": "user mask" if spec.target_mask is not None else "own probe map of the unedited row, warped",
            "rows": "row 0 unedited, row 1 edited (one batch)",
        }
        return InterventionResult(images[0], images[1], original_map, edited_map, target_map,
                                  run.latents[0].float().cpu(), run.latents[1].float().cpu(), success, layers, steps,
                                  losses, {"denoise": round(denoise_s, 4), "optimise": round(optimise_s, 4),
                                           "decode": round(decode_s, 4), "total": round(total_s, 4)},
                                  meta, label_maps)


# --- measuring success ---------------------------------------------------------------------------
def centroid(mask: torch.Tensor) -> tuple[float, float] | None:
    """(x, y) pixel centroid of a binary [H, W] mask (pixel centres at i + 0.5); None when empty."""
    m = mask.float()
    total = float(m.sum())
    if total <= 0:
        return None
    ys = torch.arange(m.shape[0], dtype=torch.float32) + 0.5
    xs = torch.arange(m.shape[1], dtype=torch.float32) + 0.5
    return float((m.sum(0) * xs).sum() / total), float((m.sum(1) * ys).sum() / total)


def _r(v: float | None, digits: int = 4) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), digits)


def measure(prop: str, original_map: torch.Tensor, edited_map: torch.Tensor, target_map: torch.Tensor,
            original_image: torch.Tensor, edited_image: torch.Tensor, original_latent: torch.Tensor,
            edited_latent: torch.Tensor, affine: Sequence[Sequence[float]], probe: Probe | None = None,
            label_maps: Mapping[str, torch.Tensor] | None = None, target_is_mask: bool = False,
            threshold: float = MASK_THRESHOLD) -> dict[str, Any]:
    """Did the edit do what was asked, and what else did it change?

    foreground: Dice(edited mask, target) vs Dice(unedited mask, target) (the baseline), the
    centroid shift achieved (edited − unedited) vs requested (target − unedited), and its
    projection on the requested direction. depth: RMSE and Pearson to the target map for both.
    Both: mean absolute pixel change outside the union of the unedited and target masks (the
    "rest of the image") and inside it, and the relative latent distance."""
    out: dict[str, Any] = {"property": prop}
    if prop == "foreground":
        orig_m, edit_m, tgt_m = original_map > threshold, edited_map > threshold, target_map > threshold
        out["dice_to_target"] = _r(float(dice(edited_map[None], tgt_m.float()[None], threshold)[0]))
        out["dice_baseline"] = _r(float(dice(original_map[None], tgt_m.float()[None], threshold)[0]))
        out["mask_fraction"] = {"original": _r(float(orig_m.float().mean())), "edited": _r(float(edit_m.float().mean())),
                                "target": _r(float(tgt_m.float().mean()))}
        c0, c1, ct = centroid(orig_m), centroid(edit_m), centroid(tgt_m)
        requested = None if c0 is None or ct is None else (ct[0] - c0[0], ct[1] - c0[1])
        if requested is None and not target_is_mask and affine is not None:
            requested = (float(affine[0][2]), float(affine[1][2])) if is_translation(affine) else None
        achieved = None if c0 is None or c1 is None else (c1[0] - c0[0], c1[1] - c0[1])
        out["centroid"] = {"original": _pair(c0), "edited": _pair(c1), "target": _pair(ct)}
        out["shift_requested_px"] = _pair(requested)
        out["shift_achieved_px"] = _pair(achieved)
        norm2 = None if requested is None else requested[0] ** 2 + requested[1] ** 2
        out["shift_fraction"] = (_r((achieved[0] * requested[0] + achieved[1] * requested[1]) / norm2)
                                 if achieved is not None and norm2 else None)
        region = orig_m | tgt_m
    else:
        out["rmse_to_target"] = _r(float(rmse(edited_map[None], target_map[None])[0]))
        out["rmse_baseline"] = _r(float(rmse(original_map[None], target_map[None])[0]))
        out["pearson_to_target"] = _r(float(pearson(edited_map[None], target_map[None])[0]))
        out["pearson_baseline"] = _r(float(pearson(original_map[None], target_map[None])[0]))
        region = torch.zeros_like(original_map, dtype=torch.bool)
    diff = (edited_image.float() - original_image.float()).abs().mean(0)  # [H, W]
    outside = ~region
    out["pixel_change"] = {
        "outside": _r(float(diff[outside].mean())) if outside.any() else None,
        "inside": _r(float(diff[region].mean())) if region.any() else None,
        "all": _r(float(diff.mean())),
        "outside_fraction_of_image": _r(float(outside.float().mean())),
    }
    out["latent_change"] = _r(float((edited_latent - original_latent).norm() / original_latent.norm().clamp_min(1e-12)))
    if label_maps is not None:
        lo, le = label_maps["original"], label_maps["edited"]
        tgt = resize_mask(target_map, *lo.shape[-2:])
        if prop == "foreground":
            out["label_model"] = {"dice_to_target": _r(float(dice(le[None], (tgt > threshold).float()[None])[0])),
                                  "dice_baseline": _r(float(dice(lo[None], (tgt > threshold).float()[None])[0]))}
        else:
            out["label_model"] = {"pearson_to_target": _r(float(pearson(le[None], tgt[None])[0])),
                                  "pearson_baseline": _r(float(pearson(lo[None], tgt[None])[0]))}
    if probe is not None:
        out["eval_probe"] = f"{probe.property}/{probe.layer}/{probe.step}"
    return out


def representation_success(prop: str, step: int, targets: Sequence[LayerTarget], unedited: Mapping[str, torch.Tensor],
                           patched: Mapping[str, torch.Tensor], threshold: float = MASK_THRESHOLD) -> dict[str, Any]:
    """What the edited layers' own probes read at the last edited step, from the activations the
    patched forward actually used vs from the unedited row: the probe's own mask vs the target
    (mean over layers; per layer too). This is where an edit must show first; whether it carries
    on to the image depends on the model (`measure`)."""
    per_layer: dict[str, dict[str, float | None]] = {}
    for tgt in targets:
        goal = tgt.units_map().float().cpu()
        edited = to_units(tgt.probe, raw_output(tgt.probe, patched[tgt.layer].float())).cpu()
        before = to_units(tgt.probe, raw_output(tgt.probe, unedited[tgt.layer].float())).cpu()
        if prop == "foreground":
            mask = (goal > threshold).float()[None]
            per_layer[tgt.layer] = {"dice_to_target": _r(float(dice(edited[None], mask, threshold)[0])),
                                    "dice_baseline": _r(float(dice(before[None], mask, threshold)[0])),
                                    # soft: also informative when a weak probe's mask is all or nothing
                                    "rmse_to_target": _r(float(rmse(edited[None], goal[None])[0])),
                                    "rmse_baseline": _r(float(rmse(before[None], goal[None])[0]))}
        else:
            per_layer[tgt.layer] = {"rmse_to_target": _r(float(rmse(edited[None], goal[None])[0])),
                                    "rmse_baseline": _r(float(rmse(before[None], goal[None])[0]))}
    keys = next(iter(per_layer.values())).keys() if per_layer else ()
    mean = {k: _r(sum(v[k] for v in per_layer.values() if v[k] is not None)
                  / max(1, sum(v[k] is not None for v in per_layer.values()))) for k in keys}
    return {"step": step, **mean, "layers": per_layer}


def is_translation(affine: Sequence[Sequence[float]]) -> bool:
    return all(abs(float(affine[i][j]) - (1.0 if i == j else 0.0)) < 1e-12 for i in range(2) for j in range(2))


def _pair(p: tuple[float, float] | None) -> list[float] | None:
    return None if p is None else [round(p[0], 3), round(p[1], 3)]


def shift_range(spec: str) -> list[float]:
    """"-32:32:8" → [-32, -24, …, 32] (start:stop:step, stop included), for sweeps."""
    try:
        parts = [float(v) for v in spec.split(":")]
    except ValueError:
        raise InterventionError(f"a sweep is start:stop:step in pixels, got {spec!r}", "sweep") from None
    if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
        raise InterventionError(f"a sweep is start:stop:step with step > 0 and stop >= start, got {spec!r}", "sweep")
    n = int(math.floor((parts[1] - parts[0]) / parts[2] + 1e-9)) + 1
    if n > 64:
        raise InterventionError(f"a sweep of {n} shifts is too long (at most 64)", "sweep")
    return [parts[0] + i * parts[2] for i in range(n)]
