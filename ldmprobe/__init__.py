"""ldmprobe: look inside Stable Diffusion while it generates.

The public face::

    from ldmprobe import load_model, Sampler, ProbeBank, Intervention, GenerationSettings

The names are imported on first use (PEP 562), so `import ldmprobe.atomic` or `ldmprobe --help`
does not pay for torch and diffusers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "ldmprobe.models",
    "Sampler": "ldmprobe.generate",
    "ProbeBank": "ldmprobe.probes",
    "Intervention": "ldmprobe.intervene",
    "GenerationSettings": "ldmprobe.schemas",
}
__all__ = ["GenerationSettings", "Intervention", "ProbeBank", "Sampler", "__version__", "load_model"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from .generate import Sampler
    from .intervene import Intervention
    from .models import load_model
    from .probes import ProbeBank
    from .schemas import GenerationSettings


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ldmprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
