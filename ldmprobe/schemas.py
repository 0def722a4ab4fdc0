"""What the library needs validated: how to denoise (`GenerationSettings`) and its limits.

One definition of what is valid, so the CLI's exit-2 messages and the endpoints' HTTP 400
bodies (their request models, `ldmprobe.serve.schemas`, extend this one) name the same field
for the same mistake.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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

    def settings(self) -> GenerationSettings:
        """Just the generation settings (of a request model that extends these)."""
        return GenerationSettings(**self.model_dump(include=set(GenerationSettings.model_fields)))

    def shape_key(self) -> tuple:
        """Requests with equal keys can share one batched denoising loop."""
        return (self.steps, self.guidance, self.height, self.width, self.scheduler)
