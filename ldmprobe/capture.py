"""In-graph capture and patching of the attn1 outputs (after to_out, before the residual add).

A `CaptureProcessor` wraps each attn1's attention processor. It reads a per-call context set
by `CapturingUNet.forward`, records its output there (or replaces it with a patch), and the
wrapper returns the recorded tensors alongside the noise prediction. Everything is plain
tensor code inside the U-Net's forward, so `torch.compile(fullgraph=True)` traces capture and
patching into the graph with zero graph breaks; the layer selection and CFG half are Python
constants, guarded by dynamo (a new selection compiles a new graph, the same one is reused).
With no capture and no patch the processors only delegate, so the graph is the plain U-Net's.

The idea is diffusers' attention processors (swap behaviour with a small object); the API
follows baukit's TraceDict / nnsight (name the layers, get their values, optionally edit them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from .layers import LayerRegistry

Half = Literal["cond", "both"]
HALVES = ("cond", "both")


class CaptureProcessor:
    """Delegates to the backend processor, then records or replaces the layer's output."""

    def __init__(self, name: str, inner: Any, session: _Session):
        self.name = name
        self.inner = inner
        self.session = session

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, temb=temb, **kwargs)
        ctx = self.session.ctx
        if ctx is None:
            return out
        patch = ctx["patches"].get(self.name)
        if patch is not None:
            patch = patch.to(out.dtype)
            # A patch covers the whole CFG batch or its last rows (the conditional half).
            out = patch if patch.shape[0] == out.shape[0] else torch.cat([out[: out.shape[0] - patch.shape[0]], patch])
        if self.name in ctx["capture"]:
            ctx["out"][self.name] = out[ctx["first_row"]:] if ctx["first_row"] else out
        return out


class _Session:
    """Holds the context of the forward call in progress (None outside a call)."""

    def __init__(self) -> None:
        self.ctx: dict[str, Any] | None = None


class CapturingUNet(torch.nn.Module):
    """A diffusers UNet2DConditionModel whose forward also returns chosen attn1 outputs.

    forward(sample, timestep, encoder_hidden_states, capture=(), half="cond", cfg=True,
    patches=None) -> (noise_pred, {layer name: [rows, H·W, C]}).
    - capture: layer names to return (resolve user input with `select_layers` first).
    - half: "cond" returns the conditional half of a classifier-free-guidance batch laid out
      [uncond…, cond…]; "both" returns all rows. With cfg=False every row is returned.
    - patches: {layer name: tensor} replacing the layer's output; a tensor with fewer rows than
      the batch replaces its last rows (the conditional half), the rest is left as computed.
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.registry = LayerRegistry.from_config(unet.config)
        # One session per U-Net: several wrappers of the same U-Net (eager and compiled, say)
        # share its processors instead of stealing them from each other.
        session = getattr(unet, "_ldmprobe_session", None)
        if session is None:
            session = _Session()
            unet._ldmprobe_session = session
        self._session = session
        modules = dict(unet.named_modules())
        for spec in self.registry:
            attn = modules[spec.module]
            if not isinstance(attn.processor, CaptureProcessor):
                attn.set_processor(CaptureProcessor(spec.name, attn.processor, session))

    @property
    def layer_names(self) -> list[str]:
        return self.registry.names

    def select_layers(self, selection: str | Iterable[str] | None) -> tuple[str, ...]:
        """Names for "all", group prefixes, names or module paths (errors list the valid ones)."""
        return tuple(s.name for s in self.registry.select(selection))

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                capture: tuple[str, ...] = (), half: Half = "cond", cfg: bool = True,
                patches: Mapping[str, torch.Tensor] | None = None):
        if not capture and not patches:
            self._session.ctx = None
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0], {}
        first_row = sample.shape[0] // 2 if (cfg and half == "cond") else 0
        ctx = {"capture": frozenset(capture), "patches": dict(patches or {}), "first_row": first_row, "out": {}}
        self._session.ctx = ctx
        try:
            noise = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        finally:  # a failed call (a bad patch, out of memory) must not leave its context to the next one
            self._session.ctx = None
        return noise, ctx["out"]


def validate_half(half: str) -> Half:
    if half not in HALVES:
        raise ValueError(f"unknown CFG half {half!r}; use one of {', '.join(HALVES)}")
    return half  # type: ignore[return-value]


class HookCapture:
    """The reference study's way, kept as a benchmark baseline: forward hooks that copy each
    attn1 output (conditional half) to CPU in Python. Not used by the library itself."""

    def __init__(self, unet: torch.nn.Module, names: Iterable[str]):
        registry = LayerRegistry.from_config(unet.config)
        modules = dict(unet.named_modules())
        self.values: dict[str, torch.Tensor] = {}
        self._handles = [modules[registry[n].module].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.values[name] = output[output.shape[0] // 2:].detach().cpu()
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
