"""Intervention: move the foreground object (or reshape depth) by editing activations through the probes.

`spec.py` what to edit (and the study's defaults), `target.py` the warp, `optimise.py` the exact
batched Adam, `run.py` the run (`Intervention`), `measures.py` success, `figure.py` the panel and
the sweep GIF.
"""

from .measures import centroid, is_translation, measure, representation_success
from .optimise import (
    ADAM_EPS,
    BETAS,
    LayerTarget,
    Optimised,
    adam_step,
    compiled_adam_step,
    optimise,
    optimise_reference,
    raw_output,
    resolve_loss,
    to_raw,
    to_units,
)
from .run import Intervention, InterventionResult
from .spec import (
    DEFAULT_ITERATIONS,
    DEFAULT_LAYERS,
    DEFAULT_LR,
    DEFAULT_STEPS,
    MASK_THRESHOLD,
    PROPERTIES,
    InterventionError,
    InterventionSpec,
    LossName,
    Property,
    shift_range,
    translation,
)
from .target import affine_theta, is_identity, resize_mask, transform_maps

__all__ = ["ADAM_EPS", "BETAS", "DEFAULT_ITERATIONS", "DEFAULT_LAYERS", "DEFAULT_LR", "DEFAULT_STEPS",
           "MASK_THRESHOLD", "PROPERTIES", "Intervention", "InterventionError", "InterventionResult",
           "InterventionSpec", "LayerTarget", "LossName", "Optimised", "Property", "adam_step", "affine_theta",
           "centroid", "compiled_adam_step", "is_identity", "is_translation", "measure", "optimise",
           "optimise_reference", "raw_output", "representation_success", "resize_mask", "resolve_loss",
           "shift_range", "to_raw", "to_units", "transform_maps", "translation"]
