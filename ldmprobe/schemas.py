"""Pydantic request/response models shared by the CLI and the TorchServe handlers.

One definition of what is valid, so the CLI's exit-2 messages and the handlers' HTTP 400
bodies name the same field for the same mistake.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_SEED = 2**63 - 1
MAX_SIDE = 2048
MAX_STEPS = 200
MAX_PROMPT_CHARS = 1000

SchedulerName = Literal["lms", "ddim", "pndm", "euler", "euler_a", "dpm", "ddpm"]


class GenerationSettings(BaseModel):
    """How to denoise: the study's settings by default (LMS, 15 steps, guidance 7.5)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(15, ge=1, le=MAX_STEPS)
    guidance: float = Field(7.5, ge=0.0, le=50.0)
    height: int | None = Field(None, ge=8, le=MAX_SIDE, description="pixels; model default when omitted")
    width: int | None = Field(None, ge=8, le=MAX_SIDE, description="pixels; model default when omitted")
    scheduler: SchedulerName = "lms"

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError("must be a multiple of 8")
        return v

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance runs the [uncond, cond] batch only when guidance > 1."""
        return self.guidance > 1.0


class GenerateRequest(GenerationSettings):
    """One generation with capture: what `ldmprobe generate` and the handlers accept."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    layers: list[str] | str | None = None
    half: Literal["cond", "both"] = "cond"


def first_error(exc: ValidationError) -> tuple[str, str]:
    """(field, message) of a pydantic error, for one-line CLI errors and 400 bodies."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err.get("loc", ())) or "request"
    return field, err.get("msg", str(exc))
