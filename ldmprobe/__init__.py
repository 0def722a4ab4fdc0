"""ldmprobe: look inside Stable Diffusion while it generates."""

__version__ = "0.1.0"
