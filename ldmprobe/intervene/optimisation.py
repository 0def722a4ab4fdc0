"""The optimisation: exact Adam on the edited layers' activations through their linear probes,
all layers of a step in one batched loop (`optimise`), and the reference's one-layer-at-a-time
autograd loop kept as the benchmark baseline (`optimise_reference`)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..compiling import compile_function
from ..probes import Probe
from .spec import DEFAULT_ITERATIONS, DEFAULT_LR, EDIT_METRICS, EditMetric, InterventionError, LossName


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


def _step_outputs(step_fn, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, loss: str) -> torch.Tensor:
    """Raw outputs [n, HW] of x [n, HW, C] computed by `step_fn` itself, as a step with a zero
    learning rate (x is left as it is): the same rounding as the outputs of every Adam step, so
    eager and compiled steps each compare like with like."""
    zeros = torch.zeros(x.shape[:2], device=x.device)
    lr0, one = torch.tensor(0.0, device=x.device), torch.tensor(1.0, device=x.device)
    return step_fn(x.clone(), zeros, zeros.clone(), zeros.clone(), zeros, w, b, lr0, one, loss)


_compiled_step = None


def compiled_adam_step():
    """`adam_step` under torch.compile (one graph per group shape and loss; inductor cache)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = compile_function(adam_step)
    return _compiled_step


def activation_metric_edit(x0: torch.Tensor, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The smallest edit of x0 [n, HW, C] that changes the probe outputs (x·w) by `delta` [n, HW]
    in the metric of the activations' own covariance over the tokens (Mahalanobis), not the
    Euclidean one: each token moves along u = Σw / (wᵀΣw), the regression of the activation on
    the probe's reading (E[x | y] for Gaussian activations). For a foreground probe that is the
    direction in which this image's object tokens differ from its background tokens: the token
    takes on what the image's own object looks like, not only the probe's read-out direction.
    w·u = 1, so the outputs change by exactly `delta`. Σw needs no inverse: Σw = Xcᵀ(Xc w)/n."""
    xc = x0 - x0.mean(1, keepdim=True)  # [n, HW, C]
    sw = (xc.transpose(1, 2) @ (xc @ w[..., None])) / x0.shape[1]  # [n, C, 1]
    wsw = (w[:, None, :] @ sw)[..., 0]  # [n, 1]
    u = sw[..., 0] / wsw.clamp_min(1e-12)  # [n, C]
    flat = wsw[:, 0] <= 1e-12 * (w * w).sum(-1)  # a constant activation: no covariance to follow
    u = torch.where(flat[:, None], w / (w * w).sum(-1, keepdim=True).clamp_min(1e-30), u)
    return x0 + delta[..., None] * u[:, None, :]


def optimise(activations: Mapping[str, torch.Tensor], targets: Sequence[LayerTarget], lr: float = DEFAULT_LR,
             iterations: int = DEFAULT_ITERATIONS, compiled: bool = False,
             metric: EditMetric = "euclidean") -> Optimised:
    """All layers of one step in one loop of exact Adam (torch's defaults), batched.

    For a linear probe y_i = x_i · w + b and a per-pixel loss, the gradient is an outer product,
    ∂L/∂x_ij = (∂L/∂y_i) w_j; so Adam's moments factor exactly, m_ij = w_j M_i and
    v_ij = w_j² V_i, with M and V the moving averages of ∂L/∂y and its square: one number per
    pixel instead of two [H·W, C] tensors. Each iteration is then one pass over x that updates
    it and yields the next outputs — no autograd, no moment tensors. Layers of equal shape and
    loss are stacked ([n, H·W, C]); each layer's loss is its own, so every layer follows the
    trajectory of its own one-layer loop (`optimise_reference`), up to float rounding.
    compiled=True runs the step through torch.compile (one fused kernel on CPU; measured in
    bench/intervene.py).

    metric="activation": the loop decides the probe outputs to reach; the edit that reaches them
    is then the smallest in the activations' covariance metric (`activation_metric_edit`)
    instead of Adam's own path (the study's: sign(w)-shaped moves along the probe's read-out)."""
    if metric not in EDIT_METRICS:
        raise InterventionError(f"unknown edit metric {metric!r}; use {' or '.join(EDIT_METRICS)}", "metric")
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
            if all(m.own is not None for m in members):
                # The target is a row's own output: computed by the very expression the loop
                # computes outputs with, so a row equal to it has gradient exactly 0 and every
                # Adam step is exactly 0 (rounding noise would be rescaled to lr-sized steps).
                own = torch.stack([m.own.detach().float() for m in members])
                t = _step_outputs(step_fn, own, w, b, loss_name)
                t = torch.sigmoid(t) if loss_name == "bce" else t
            y = y_start = _step_outputs(step_fn, x, w, b, loss_name)
            initial = _loss(y, t, loss_name)
            m_, v_ = torch.zeros_like(y), torch.zeros_like(y)
            for k in range(1, int(iterations) + 1):
                lr_bc1 = torch.tensor(lr / (1 - b1**k), device=x.device)
                sqrt_bc2 = torch.tensor(math.sqrt(1 - b2**k), device=x.device)
                y = step_fn(x, y, m_, v_, t, w, b, lr_bc1, sqrt_bc2, loss_name)
            final = _loss(y, t, loss_name)
            if metric == "activation":
                x0 = torch.stack([activations[m.layer].detach().float() for m in members])
                x = activation_metric_edit(x0, w, y - y_start)  # both from step_fn: a zero move stays exactly 0
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
