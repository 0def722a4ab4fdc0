"""Probe banks: the bank and its policy (`bank.py`), its file format (`format.py`), the heads
that apply it in one grouped call (`heads.py`)."""

from .bank import (
    DEFAULT_LAYER,
    KINDS,
    PRIMARY_METRIC,
    STANDARD_PROPERTIES,
    Probe,
    ProbeBank,
    schedule_timesteps,
    tensor_name,
)
from .format import CAPTURE_POINT, FORMAT, METADATA_KEY, VERSION, LayerShape, ProbeBankError
from .heads import MODES, ProbeMaps, grey_map

__all__ = ["CAPTURE_POINT", "DEFAULT_LAYER", "FORMAT", "KINDS", "METADATA_KEY", "MODES", "PRIMARY_METRIC",
           "STANDARD_PROPERTIES", "VERSION", "LayerShape", "Probe", "ProbeBank", "ProbeBankError", "ProbeMaps",
           "grey_map", "schedule_timesteps", "tensor_name"]
