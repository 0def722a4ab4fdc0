"""The registry of the U-Net's self-attention (attn1) layers: names, module paths, sizes.

Everything is derived from the U-Net config, so the same code serves the built-in `tiny`
model, SD v1.4/v1.5 and 2.x. Names follow the study: enc1.0 … enc3.1, mid.0, dec2.0 … dec4.2,
listed in execution order (encoder → mid → decoder), not in `named_modules()` order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any


class UnknownLayerError(KeyError):
    """A layer name or module path that the registry does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0])


@dataclass(frozen=True)
class LayerSpec:
    """One attn1 layer: where it lives and what it produces for a given latent size."""

    name: str  # e.g. "dec4.0"
    module: str  # diffusers module path of the attn1 Attention module
    block: str  # the study's block name, e.g. "Decoder 4", "Bottleneck"
    downsample: int  # latent size / layer size (1, 2, 4, 8 for SD)
    channels: int
    height: int  # layer height for the registry's latent size
    width: int

    @property
    def tokens(self) -> int:
        return self.height * self.width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _transformer_depths(config: Mapping[str, Any], n_blocks: int) -> list[int]:
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, int):
        return [depth] * n_blocks
    return [d if isinstance(d, int) else d[0] for d in depth]


def _attn1_paths(prefix: str, n_attn: int, depth: int) -> list[tuple[str, str]]:
    """(suffix, module path) of every attn1 of one block; suffix is ".i" or ".i.j" when deep."""
    out = []
    for i in range(n_attn):
        for j in range(depth):
            suffix = f"{i}" if depth == 1 else f"{i}.{j}"
            out.append((suffix, f"{prefix}.attentions.{i}.transformer_blocks.{j}.attn1"))
    return out


class LayerRegistry:
    """Ordered, addressable collection of LayerSpec for one U-Net config and latent size."""

    def __init__(self, specs: Iterable[LayerSpec]):
        self.specs: tuple[LayerSpec, ...] = tuple(specs)
        self._by_name = {s.name: s for s in self.specs}
        self._by_module = {s.module: s for s in self.specs}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], latent_size: int | tuple[int, int] | None = None) -> LayerRegistry:
        """Build the registry from a diffusers UNet2DConditionModel config.

        latent_size defaults to the config's sample_size (64 for SD v1.4 = 512 px images).
        """
        if latent_size is None:
            latent_size = config["sample_size"]
        lh, lw = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
        down = list(config["down_block_types"])
        up = list(config["up_block_types"])
        channels = list(config["block_out_channels"])
        n = len(down)
        layers_per_block = config["layers_per_block"]
        lpb = [layers_per_block] * n if isinstance(layers_per_block, int) else list(layers_per_block)
        depth_down = _transformer_depths(config, n)
        specs: list[LayerSpec] = []

        def add(name: str, module: str, block: str, factor: int, ch: int) -> None:
            # Stride-2 convs with padding 1 round up: ceil(latent / factor).
            specs.append(LayerSpec(name, module, block, factor, ch, -(-lh // factor), -(-lw // factor)))

        for i, kind in enumerate(down):
            if "CrossAttn" in kind:
                for suffix, path in _attn1_paths(f"down_blocks.{i}", lpb[i], depth_down[i]):
                    add(f"enc{i + 1}.{suffix}", path, f"Encoder {i + 1}", 2**i, channels[i])
        mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
        if "CrossAttn" in mid_type:
            for suffix, path in _attn1_paths("mid_block", 1, depth_down[-1]):
                add(f"mid.{suffix}", path, "Bottleneck", 2 ** (n - 1), channels[-1])
        rev_channels = channels[::-1]
        depth_up = config.get("reverse_transformer_layers_per_block") or depth_down[::-1]
        depth_up = _transformer_depths({"transformer_layers_per_block": depth_up}, n)
        for i, kind in enumerate(up):
            if "CrossAttn" in kind:
                # Up blocks have one more resnet/attention than down blocks.
                for suffix, path in _attn1_paths(f"up_blocks.{i}", lpb[::-1][i] + 1, depth_up[i]):
                    add(f"dec{i + 1}.{suffix}", path, f"Decoder {i + 1}", 2 ** (n - 1 - i), rev_channels[i])
        return cls(specs)

    # --- lookup ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self):
        return iter(self.specs)

    def __contains__(self, key: object) -> bool:
        return key in self._by_name or key in self._by_module

    def __getitem__(self, key: str) -> LayerSpec:
        """A layer by name ("dec4.0") or by diffusers module path."""
        spec = self._by_name.get(key) or self._by_module.get(key)
        if spec is None:
            raise UnknownLayerError(f"unknown layer {key!r}; valid layers: {', '.join(self.names)}")
        return spec

    def groups(self) -> list[str]:
        """Group prefixes ("enc1", "mid", "dec4", …) in execution order."""
        seen: dict[str, None] = {}
        for s in self.specs:
            seen.setdefault(s.name.split(".")[0], None)
        return list(seen)

    def select(self, selection: str | Iterable[str] | None) -> list[LayerSpec]:
        """Resolve "all", a comma-separated string, or names / module paths / group prefixes.

        Returned in execution order without duplicates; None or "" selects nothing.
        """
        if selection is None:
            return []
        if isinstance(selection, str):
            items = [p.strip() for p in selection.split(",") if p.strip()]
        else:
            items = [str(p).strip() for p in selection]
        chosen: set[str] = set()
        for item in items:
            if item == "all":
                chosen.update(self.names)
            elif item in self:
                chosen.add(self[item].name)
            elif item in self.groups():
                chosen.update(s.name for s in self.specs if s.name.split(".")[0] == item)
            else:
                raise UnknownLayerError(
                    f"unknown layer {item!r}; valid layers: all, {', '.join(self.groups())}, {', '.join(self.names)}"
                )
        return [s for s in self.specs if s.name in chosen]

    def table(self) -> list[tuple[str, int, int, int, int]]:
        """The poster's table: (block, number of layers, height, width, channels) per block."""
        rows: dict[str, list] = {}
        for s in self.specs:
            row = rows.setdefault(s.block, [s.block, 0, s.height, s.width, s.channels])
            row[1] += 1
        return [tuple(r) for r in rows.values()]
