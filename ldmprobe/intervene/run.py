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
- Two orders (`spec.order`). "sequential" (default; the study's method, which edits inside the
  forward with hooks): at each edited step the layers are taken in the order the forward reaches
  them, and each is optimised on its activation from a forward that already carries the patches
  of the layers before it — one forward per edited layer plus the final one, through the same
  capture/patching path. "joint" (faster: one extra forward per step): all edited layers are
  optimised on the step's unpatched forward in ONE loop: layers of equal shape are stacked and
  go through one batched matmul. Adam is element-wise and the layers' losses are independent, so
  every layer follows exactly the trajectory of its own one-layer loop (`optimise_reference`).
  The two differ wherever a layer reads the output of an earlier edited one; with one edited
  layer they are the same computation.
- How the activation reaches the probe outputs the Adam loop decides (`spec.metric`): the study's
  Euclidean path (Adam's own: each channel by the same amount along sign(w)) or, by default, the
  smallest move in the activations' own covariance metric (`activation_metric_edit`: toward what the
  image's object tokens look like); and all 16 layers by default (the study: the decoder's nine).
  On the scenes model the two together move the object 0.71 of the request vs the study's 0.05.
- Losses live in the probe's raw output space: binary cross-entropy on logits for sigmoid mask
  probes (the study's choice), squared error for mask probes fitted by regression (the ridge
  banks of `training/`: the loss they were fitted with), Huber for continuous maps (depth).

Success is measured, not assumed (`measure`): the evaluation probe (the bank's best layer for the
property at its last step) is run on both rows at the last step; Dice to the target for the
edited row vs the unedited one, the centroid shift achieved vs requested, and how much the rest
of the image changed.

This module is the run (`Intervention`); the package: `spec.py` (what to edit), `target.py`
(the warp), `optimisation.py` (the Adam loop), `measures.py`, `figure.py`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generate import Sampler
from ..probes import ProbeBank, schedule_timesteps
from ..schemas import GenerationSettings
from .measures import measure, representation_success
from .optimisation import LayerTarget, optimise, raw_output, resolve_loss, to_raw, to_units
from .spec import (
    DEFAULT_STEPS,
    DEPTH_TARGETS,
    EDIT_METRICS,
    ORDERS,
    PROPERTIES,
    PROTOCOL_NAMES,
    STUDY_DEPTH_HALF_RANGE,
    InterventionError,
    InterventionSpec,
)
from .target import affine_theta, is_identity, minmax_scale, resize_mask, transform_maps


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


def _short(timesteps: list[float] | None) -> str:
    if not timesteps:
        return "(none recorded)"
    shown = ", ".join(f"{t:g}" for t in timesteps[:4])
    return f"[{shown}{', …' if len(timesteps) > 4 else ''}] ({len(timesteps)})"


# --- the run ------------------------------------------------------------------------------------
class Intervention:
    """Runs interventions for one sampler (model, compiled or not) and one probe bank."""

    def __init__(self, sampler: Sampler, bank: ProbeBank,
                 label_model: Callable[[torch.Tensor], torch.Tensor] | Mapping[str, Callable] | None = None,
                 compile_optimiser: bool | None = None):
        """label_model: images [N, 3, H, W] in [0, 1] → maps [N, H', W'] of the property (e.g. a
        saliency model), run on both images when given; or a mapping property → such a callable
        (e.g. the scenes label models' foreground and depth). compile_optimiser: torch.compile the
        Adam step (default: when the sampler is compiled)."""
        self.sampler, self.bank, self.label_model = sampler, bank, label_model
        self.compile_optimiser = sampler.compiled if compile_optimiser is None else bool(compile_optimiser)

    # validation that needs the bank and the model; a service calls it before any work
    def resolve(self, spec: InterventionSpec, settings: GenerationSettings) -> tuple[list[str], list[int], str, dict]:
        """(edited layers, edited steps, evaluation layer, bank step per request step), or
        InterventionError naming the field."""
        bank = self.bank
        prop = spec.property
        if prop not in PROPERTIES:
            raise InterventionError(f"unknown property {prop!r}; use foreground or depth", "property")
        if prop not in bank.properties:
            raise InterventionError(f"the probe bank has no {prop!r} probes; it holds {bank.describe()}", "property")
        if spec.target_mask is not None and prop != "foreground":
            raise InterventionError("target_mask is for the foreground property only", "target_mask")
        selection = spec.resolved_layers()
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
        bank_steps = self.bank_steps(settings, spec.protocol)
        for s in steps:
            for la in layers:
                if not bank.has(prop, la, bank_steps[s]):
                    raise InterventionError(f"no {prop} probe for layer {la} at bank step {bank_steps[s]} (request step "
                                            f"{s}); the bank holds {bank.describe()}", "layers")
        eval_layer = spec.eval_layer or bank.best_layers()[prop][0]
        if not bank.has(prop, eval_layer, bank_steps[settings.steps - 1]):
            raise InterventionError(f"no {prop} probe for the evaluation layer {eval_layer} at the last step", "eval_layer")
        if not (math.isfinite(spec.lr) and spec.lr > 0):
            raise InterventionError(f"lr must be a positive number, got {spec.lr}", "lr")
        if spec.order not in ORDERS:
            raise InterventionError(f"unknown order {spec.order!r}; use sequential or joint", "order")
        if spec.metric is not None and spec.metric not in EDIT_METRICS:
            raise InterventionError(f"unknown metric {spec.metric!r}; use {' or '.join(EDIT_METRICS)}", "metric")
        if spec.protocol not in PROTOCOL_NAMES:
            raise InterventionError(f"unknown protocol {spec.protocol!r}; use ldmprobe or study", "protocol")
        if spec.depth_target is not None and spec.depth_target not in DEPTH_TARGETS:
            raise InterventionError(f"unknown depth_target {spec.depth_target!r}; use warp or minmax", "depth_target")
        if spec.iterations < 0:
            raise InterventionError(f"iterations must be >= 0, got {spec.iterations}", "iterations")
        affine_theta(spec.pixel_affine(), settings.height or self.sampler.model.default_size,
                     settings.width or self.sampler.model.default_size)  # raises on a singular affine
        for layer in layers:
            resolve_loss(bank.probe(prop, layer, bank_steps[steps[0]]), spec.loss)
        return layers, steps, eval_layer, bank_steps

    def step_mapping(self, settings: GenerationSettings) -> dict[str, Any]:
        """The request's exact timesteps against the bank's (`ProbeBank.timestep_mapping`)."""
        ours = schedule_timesteps(self.sampler, settings.scheduler, settings.steps)
        return self.bank.timestep_mapping(ours, self.sampler.model)

    def bank_steps(self, settings: GenerationSettings, protocol: str = "ldmprobe") -> list[int]:
        """The bank step of each request step: the same step when the timesteps agree, else the
        bank's nearest timestep — which the study protocol refuses (its probes belong to the
        exact steps they were fitted at): InterventionError naming scheduler or steps."""
        mapping = self.step_mapping(settings)
        if mapping["exact"] is False and protocol == "study":
            field = "scheduler" if self.bank.scheduler and settings.scheduler != self.bank.scheduler else "steps"
            raise InterventionError(
                f"the request's timesteps {_short(mapping['request_timesteps'])} differ from the probe bank's "
                f"{_short(mapping['bank_timesteps'])}; the study protocol does not map steps (protocol 'ldmprobe' maps "
                "each step to the bank's nearest timestep)", field)
        return mapping["bank_steps"]

    def layer_targets(self, spec: InterventionSpec, layers: list[str], bank_step: int, unedited: Mapping[str, torch.Tensor],
                      theta: torch.Tensor | None, registry) -> list[LayerTarget]:
        """Per layer: the probe's own map of the unedited row, warped (or the user mask, resized)."""
        fill = 0.0 if spec.property == "foreground" else None
        minmax = spec.property == "depth" and spec.resolved_depth_target() == "minmax"
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
                if theta is None and not minmax:  # no warp: the probe's own output, recomputed exactly in optimise
                    units, target = own, (torch.sigmoid(raw) if loss == "bce" else raw)
                else:
                    units = own if theta is None else transform_maps(own.reshape(1, shape.height, shape.width),
                                                                     theta, fill).flatten()
                    target = to_raw(probe, units, loss)
                    if minmax:  # the study's: [-9, 9] in the probe's normalised units
                        target = minmax_scale(to_raw(probe, units, "huber"), STUDY_DEPTH_HALF_RANGE)
                        units = target * probe.std[0] + probe.mean[0]
            source = unedited[layer] if (theta is None and spec.target_mask is None and not minmax) else None
            out.append(LayerTarget(layer, probe, target.detach(), loss, units.detach(), source))
        return out

    def _sequential(self, run, acts: Mapping[str, torch.Tensor], targets: list[LayerTarget],
                    spec: InterventionSpec) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]], float]:
        """The study's order at one step: `targets` in execution order; layer k is optimised on
        its edited-row activation from a forward carrying the patches of layers 0…k-1 (the first
        on the step's unpatched forward, `acts`). Returns the patches, losses and optimiser time.
        The targets stay those of the unedited row (row 0, which no patch touches)."""
        patches: dict[str, torch.Tensor] = {}
        losses: dict[str, dict[str, float]] = {}
        seconds = 0.0
        for k, tgt in enumerate(targets):
            if k:
                _, acts = run.predict(patches)
            result = optimise({tgt.layer: acts[tgt.layer][1]}, [tgt], spec.lr, spec.iterations,
                              compiled=self.compile_optimiser, metric=spec.resolved_metric())
            seconds += result.seconds
            losses[tgt.layer] = {"initial": result.initial_loss[tgt.layer], "final": result.final_loss[tgt.layer]}
            patches[tgt.layer] = result.activations[tgt.layer][None].to(self.sampler.model.dtype)
        return patches, losses, seconds

    def run(self, prompt: str, seed: int, spec: InterventionSpec, settings: GenerationSettings | None = None,
            progress: bool = False) -> InterventionResult:
        from tqdm.auto import tqdm

        settings = settings or GenerationSettings()
        model = self.sampler.model
        height, width = settings.height or model.default_size, settings.width or model.default_size
        layers, steps, eval_layer, bank_steps = self.resolve(spec, settings)
        mapping = self.step_mapping(settings)
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
        next_record: tuple | None = None  # the same on the next step's forward, which no patch touched
        for _ in tqdm(range(len(run.timesteps)), desc="intervening", disable=not progress, unit="step"):
            index = run.index
            noise, acts = run.predict()
            if index == steps[-1] + 1:
                unedited = {la: acts[la][0] for la in layers}
                next_record = (index, self.layer_targets(spec, layers, bank_steps[index], unedited, theta, registry),
                               unedited, {la: acts[la][1] for la in layers})
            if index in steps:
                bank_step = bank_steps[index]
                unedited = {la: acts[la][0] for la in layers}
                targets = self.layer_targets(spec, layers, bank_step, unedited, theta, registry)
                if spec.order == "joint":
                    result = optimise({la: acts[la][1] for la in layers}, targets, spec.lr, spec.iterations,
                                      compiled=self.compile_optimiser, metric=spec.resolved_metric())
                    optimise_s += result.seconds
                    losses[index] = {la: {"initial": result.initial_loss[la], "final": result.final_loss[la]}
                                     for la in layers}
                    patches = {la: result.activations[la][None].to(model.dtype) for la in layers}
                else:
                    patches, losses[index], seconds = self._sequential(run, acts, targets, spec)
                    optimise_s += seconds
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
        if spec.property == "depth" and spec.resolved_depth_target() == "minmax":
            norm = (target_map - probe.mean[0]) / probe.std[0]
            target_map = minmax_scale(norm, STUDY_DEPTH_HALF_RANGE) * probe.std[0] + probe.mean[0]
        label_maps = None
        label_model = (self.label_model.get(spec.property) if isinstance(self.label_model, Mapping)
                       else self.label_model)
        if label_model is not None:
            with torch.no_grad():
                labelled = label_model(images).float().cpu()
            label_maps = {"original": labelled[0], "edited": labelled[1]}
        success = measure(spec.property, original_map, edited_map, target_map, images[0], images[1],
                          run.latents[0].float().cpu(), run.latents[1].float().cpu(), affine, probe,
                          label_maps=label_maps, target_is_mask=spec.target_mask is not None)
        if edit_record is not None:
            success["representation"] = representation_success(spec.property, *edit_record)
        success["representation_next_step"] = (None if next_record is None
                                               else representation_success(spec.property, *next_record))
        total_s = time.perf_counter() - started
        meta = self.sampler.metadata(run) | {
            "property": spec.property, "affine": affine, "lr": spec.lr, "iterations": spec.iterations,
            "loss": {la: resolve_loss(self.bank.probe(spec.property, la, bank_steps[steps[0]]), spec.loss)
                     for la in layers},
            "order": spec.order, "protocol": spec.protocol, "metric": spec.resolved_metric(),
            "step_mapping": {"exact": mapping["exact"], "bank_timesteps": mapping["bank_timesteps"],
                             "bank_steps": mapping["bank_steps"]},
            "depth_target": spec.resolved_depth_target() if spec.property == "depth" else None,
            "eval_layer": eval_layer, "eval_step": last, "bank_steps": [bank_steps[s] for s in steps],
            "target": "user mask" if spec.target_mask is not None else "own probe map of the unedited row, warped",
            "rows": "row 0 unedited, row 1 edited (one batch)",
        }
        return InterventionResult(images[0], images[1], original_map, edited_map, target_map,
                                  run.latents[0].float().cpu(), run.latents[1].float().cpu(), success, layers, steps,
                                  losses, {"denoise": round(denoise_s, 4), "optimise": round(optimise_s, 4),
                                           "decode": round(decode_s, 4), "total": round(total_s, 4)},
                                  meta, label_maps)
