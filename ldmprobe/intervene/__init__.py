"""Intervention: move the foreground object (or reshape depth) by editing activations through the probes.

`spec.py` what to edit (and the study's defaults), `target.py` the warp, `optimisation.py` the exact
batched Adam, `run.py` the run (`Intervention`), `measures.py` success, `figure.py` the panel and
the sweep GIF. The names below are imported on first use (PEP 562): the CLI reads the defaults
of `spec.py` to build its parser without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_WHERE = {
    "measures": ("centroid", "is_translation", "measure", "representation_success"),
    "optimisation": ("ADAM_EPS", "BETAS", "activation_metric_edit", "LayerTarget", "Optimised", "adam_step", "compiled_adam_step", "optimise",
                 "optimise_reference", "raw_output", "resolve_loss", "to_raw", "to_units"),
    "run": ("Intervention", "InterventionResult"),
    "spec": ("DEFAULT_ITERATIONS", "DEFAULT_LAYERS", "DEFAULT_LR", "DEFAULT_ORDER", "DEFAULT_STEPS", "DEPTH_TARGETS",
             "EDIT_METRICS", "MASK_THRESHOLD", "ORDERS", "PROPERTIES", "PROTOCOL_NAMES", "STUDY_DEPTH_HALF_RANGE", "STUDY_LAYERS", "DepthTarget", "EditMetric",
             "InterventionError", "InterventionSpec", "LossName", "Order", "Property", "ProtocolName",
             "shift_range", "translation"),
    "target": ("affine_theta", "is_identity", "minmax_scale", "resize_mask", "transform_maps"),
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)

if TYPE_CHECKING:
    from .measures import centroid, is_translation, measure, representation_success  # noqa: F401
    from .optimisation import (  # noqa: F401
        ADAM_EPS,
        BETAS,
        LayerTarget,
        Optimised,
        activation_metric_edit,
        adam_step,
        compiled_adam_step,
        optimise,
        optimise_reference,
        raw_output,
        resolve_loss,
        to_raw,
        to_units,
    )
    from .run import Intervention, InterventionResult  # noqa: F401
    from .spec import (  # noqa: F401
        DEFAULT_ITERATIONS,
        DEFAULT_LAYERS,
        DEFAULT_LR,
        DEFAULT_ORDER,
        DEFAULT_STEPS,
        DEPTH_TARGETS,
        EDIT_METRICS,
        MASK_THRESHOLD,
        ORDERS,
        PROPERTIES,
        PROTOCOL_NAMES,
        STUDY_DEPTH_HALF_RANGE,
        STUDY_LAYERS,
        DepthTarget,
        EditMetric,
        InterventionError,
        InterventionSpec,
        LossName,
        Order,
        Property,
        ProtocolName,
        shift_range,
        translation,
    )
    from .target import affine_theta, is_identity, minmax_scale, resize_mask, transform_maps  # noqa: F401


def __getattr__(name: str):
    if name in _MODULE:
        value = getattr(import_module(f"{__name__}.{_MODULE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE))
