"""What an intervention edits and how: the spec, its defaults (the study's), its error."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the spec is imported by the CLI to build its parser: it stays free of torch
    import torch

Property = Literal["foreground", "depth"]
LossName = Literal["auto", "bce", "mse", "huber"]
Order = Literal["sequential", "joint"]
ProtocolName = Literal["ldmprobe", "study"]
DepthTarget = Literal["warp", "minmax"]
EditMetric = Literal["euclidean", "activation"]
EDIT_METRICS = ("euclidean", "activation")
PROTOCOL_NAMES = ("ldmprobe", "study")
DEPTH_TARGETS = ("warp", "minmax")
# The study's depth target (norm_intervention_target, guide_scale 18): the translated depth
# min-max scaled to [-9, 9] in the probe's normalised units.
STUDY_DEPTH_HALF_RANGE = 9.0
PROPERTIES = ("foreground", "depth")
ORDERS = ("sequential", "joint")
DEFAULT_ORDER: Order = "sequential"
# The study's edited layers (its code: the decoder's nine for the foreground, all for depth) and
# ldmprobe's: all 16 for both. On the stage-4 scenes model (README: "Moving the object") editing all 16
# moves the object further (0.71 vs 0.55 of the request by the probe, 0.50 vs 0.41 by the
# segmenter, 32 captions) and the ideal edit says why (0.63 vs 0.35 when patching them).
STUDY_LAYERS = {
    "foreground": ("dec2.0", "dec2.1", "dec2.2", "dec3.0", "dec3.1", "dec3.2", "dec4.0", "dec4.1", "dec4.2"),
    "depth": "all",
}
DEFAULT_LAYERS = {"foreground": "all", "depth": "all"}
DEFAULT_STEPS = {"foreground": (0, 1, 2, 3, 4), "depth": (0, 1, 2)}
DEFAULT_LR = 5e-3
DEFAULT_ITERATIONS = 128
MASK_THRESHOLD = 0.5


class InterventionError(ValueError):
    """A request the intervention cannot run: names what is wrong (and `field`, the request field)."""

    def __init__(self, message: str, field: str = "request"):
        super().__init__(message)
        self.field = field


def translation(dx: float, dy: float) -> list[list[float]]:
    """The pixel affine of a shift by (dx, dy): right and down are positive."""
    return [[1.0, 0.0, float(dx)], [0.0, 1.0, float(dy)]]


@dataclass
class InterventionSpec:
    """What to edit and how. `affine` (2×3, image pixels, source → destination) overrides
    dx/dy; `target_mask` ([H, W] in [0, 1] at image size; foreground only) overrides both."""

    property: Property = "foreground"
    dx: float = 0.0
    dy: float = 0.0
    affine: list[list[float]] | None = None
    target_mask: torch.Tensor | None = None
    layers: str | Sequence[str] | None = None  # None: the protocol's default (`resolved_layers`)
    edit_steps: Sequence[int] | None = None  # None: the property's default (0–4 / 0–2)
    lr: float = DEFAULT_LR
    iterations: int = DEFAULT_ITERATIONS
    loss: LossName = "auto"
    eval_layer: str | None = None  # None: the bank's best layer for the property at its last step
    # "sequential" (the study's): at each edited step the layers are edited in the order the
    # forward reaches them, each optimised on an activation that already reflects the edits of
    # the layers before it (one forward per layer). "joint": all layers of a step optimised on
    # the step's unpatched forward in one batched loop (one forward; faster, not the study's).
    order: Order = DEFAULT_ORDER
    # Which protocol's behaviours the unset options take: "study" reproduces the study's code.
    protocol: ProtocolName = "ldmprobe"
    # Depth only. "warp": the warped map as it is (a zero shift is a no-op). "minmax" (the
    # study's): the warped map (uncovered pixels take the edge value) min-max scaled to
    # [-9, 9] in the probe's normalised units. None: "minmax" under the study protocol, else "warp".
    depth_target: DepthTarget | None = None
    # How the activation moves to reach the probe outputs the Adam loop decides: "euclidean" (the
    # study's: Adam's own path, along the probe's read-out) or "activation" (the smallest move in
    # the activations' covariance metric: toward what the image's own object tokens look like).
    # None: "euclidean" under the study protocol, else "activation".
    metric: EditMetric | None = None

    def resolved_depth_target(self) -> str:
        if self.depth_target is not None:
            return self.depth_target
        return "minmax" if self.protocol == "study" else "warp"

    def resolved_layers(self) -> str | Sequence[str]:
        """The edited layers: as given, else all 16 (ldmprobe) or the study's (decoder for foreground)."""
        if self.layers is not None:
            return self.layers
        return (STUDY_LAYERS if self.protocol == "study" else DEFAULT_LAYERS)[self.property]

    def resolved_metric(self) -> str:
        if self.metric is not None:
            return self.metric
        return "euclidean" if self.protocol == "study" else "activation"

    def pixel_affine(self) -> list[list[float]]:
        return [list(map(float, row)) for row in self.affine] if self.affine is not None else translation(self.dx, self.dy)

    def work(self, n_layers: int, n_steps: int) -> int:
        """Adam iterations × layers × steps: the bound the service validates up front."""
        return int(self.iterations) * n_layers * n_steps


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
