"""The two protocols: `study` reproduces Chen et al.'s code exactly, `ldmprobe` keeps our choices.

One table so the jobs, the CLI and (later) the endpoints switch every difference with one name
and record which protocol produced an output. Each field is one audited difference; the README
("Study protocol") gives the two behaviours and their measured effect.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

# The study's fixed depth normalisation (probe_src/probe_depth_datasets.py: (d - mean) / std over
# MiDaS outputs); the capstone applied the same constants to its shading labels.
STUDY_DEPTH_MEAN = 15.740597
STUDY_DEPTH_STD = 9.281932

ProtocolName = Literal["ldmprobe", "study"]
TimestepSpacing = Literal["study", "config", "linspace", "leading", "trailing"]
LatentDtype = Literal["float32", "model"]


@dataclass(frozen=True)
class Protocol:
    """What differs between the study's code and ours (generation, labels, probe fitting)."""

    name: str
    timestep_spacing: str  # see generate.make_scheduler; "study" pins LMS to linspace
    latent_dtype: str  # "float32": latents through the scheduler in fp32 whatever the U-Net's dtype
    mask_threshold: int  # `files:` PNG masks: foreground where value > threshold
    prompt_encoding: str  # how prompt files are decoded
    fit_method: str  # default probe fit: closed-form ridge or the study's Adam recipe
    probe_init: str  # reference recipe: "zeros" or "linear-default" (nn.Linear's own init)
    mask_head: str  # reference recipe: "logit" (one logit, BCE) or "two-class" (2 outputs, CE)
    label_norm: str  # reference recipe targets: "fitted" (training z-score) or "study" (fixed constants)
    # Depth labels as fitted and scored: "image" standardises each image's map (zero mean, unit variance):
    # relative depth, free of scale and shift as MiDaS predicts it and as the per-image Spearman scores it;
    # "none" keeps the label source's values (the study: MiDaS's output under one fixed normalisation).
    depth_norm: str
    # How a probe's layer-resolution map is brought to image size, for scoring and for image-size maps:
    # "nearest" (the study: each layer pixel a block) or "bilinear" (the usual for linear probes of dense
    # features; +0.04 depth Spearman and Dice on the scenes model, README "Study protocol" item 14).
    # Probes are fitted at layer resolution either way.
    upsample: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    "ldmprobe": Protocol("ldmprobe", timestep_spacing="study", latent_dtype="float32", mask_threshold=127,
                         prompt_encoding="utf-8", fit_method="ridge", probe_init="zeros", mask_head="logit",
                         label_norm="fitted", depth_norm="image", upsample="bilinear"),
    "study": Protocol("study", timestep_spacing="study", latent_dtype="float32", mask_threshold=0,
                      prompt_encoding="iso-8859-1", fit_method="reference", probe_init="linear-default",
                      mask_head="two-class", label_norm="study", depth_norm="none", upsample="nearest"),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
