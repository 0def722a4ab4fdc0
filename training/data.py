"""Where the fitting job's examples come from: activations of every step + labels at image size.

Two modes (DESIGN.md):
- generated: the study's protocol — generate each image from (prompt, seed), capture every step,
  label the final image with the configured label sources;
- noised: encode a labelled image with the VAE, noise it to each step's timestep, run the U-Net,
  capture. Here on procedurally rendered scenes, whose labels are exact.
Both yield `Batch`es; the job never needs to know which mode produced them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ldmprobe.generate import Sampler
from ldmprobe.schemas import GenerationSettings

from .labels import LabelSource, merge_labels, scene_labels
from .prompts import PromptItem


@dataclass
class Batch:
    ids: list[str]
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]: the final (generated) or clean (noised) image
    labels: dict[str, torch.Tensor]  # property → [N, H, W] float32 at image size
    activations: dict[str, torch.Tensor]  # layer → [N, S, H·W, C], conditional half, every step


class ExampleSource(Protocol):
    mode: str
    ids: list[str]

    def batch(self, ids: list[str]) -> Batch: ...

    def describe(self) -> dict: ...


class SceneSource:
    """Noised mode on rendered scenes: scene `seed` is rendered, captioned and noised with the
    study's noise for that seed."""

    mode = "noised"

    def __init__(self, sampler: Sampler, settings: GenerationSettings, layers: tuple[str, ...], seeds: list[int],
                 render_options: dict | None = None):
        self.sampler, self.settings, self.layers = sampler, settings, layers
        self.ids = [str(s) for s in seeds]
        # The scene distribution: the model's own world (world.json of a trained model) or the full renderer.
        self.render_options = dict(render_options or {})

    def batch(self, ids: list[str]) -> Batch:
        from .scenes import render_scene

        h = self.settings.height or self.sampler.model.default_size
        w = self.settings.width or self.sampler.model.default_size
        scenes = [render_scene(int(i), (h, w), **self.render_options) for i in ids]
        images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in scenes])
        acts = self.sampler.noised_activations(images, [s.prompt for s in scenes], [int(i) for i in ids],
                                               self.settings, self.layers)
        return Batch(list(ids), images, scene_labels(scenes), acts)

    def describe(self) -> dict:
        return {"mode": self.mode, "data": "procedural scenes (training.scenes)", "labels": "exact (rendered)",
                "seeds": [int(self.ids[0]), int(self.ids[-1])] if self.ids else [],
                "render_options": self.render_options}


class DepthPerImage:
    """A source whose depth labels are standardised per image (`--depth-norm image`, the ldmprobe
    protocol): probes are fitted to, and scored on, relative depth. Everything else passes through."""

    def __init__(self, source: ExampleSource):
        self.source, self.mode, self.ids = source, source.mode, source.ids

    def batch(self, ids: list[str]) -> Batch:
        from .labels import standardise_per_image

        b = self.source.batch(ids)
        labels = {k: standardise_per_image(v) if k == "depth" else v for k, v in b.labels.items()}
        return Batch(b.ids, b.images, labels, b.activations)

    def describe(self) -> dict:
        return {**self.source.describe(), "depth_norm": "image"}


class PromptSource:
    """Generated mode: the study's protocol on (prompt, seed) pairs, labelled by label sources."""

    mode = "generated"

    def __init__(self, sampler: Sampler, settings: GenerationSettings, layers: tuple[str, ...],
                 items: list[PromptItem], sources: list[LabelSource], source_names: list[str]):
        self.sampler, self.settings, self.layers, self.sources = sampler, settings, layers, sources
        self.items = {it.id: it for it in items}
        self.ids = [it.id for it in items]
        self.source_names = source_names

    def batch(self, ids: list[str]) -> Batch:
        items = [self.items[i] for i in ids]
        steps: list[dict[str, torch.Tensor]] = []
        result = self.sampler.generate([it.prompt for it in items], [it.seed for it in items], self.settings,
                                       layers=self.layers, keep_steps=False,
                                       callback=lambda s: steps.append({k: v.cpu() for k, v in s.activations.items()}))
        acts = {n: torch.stack([s[n] for s in steps], dim=1) for n in self.layers}
        labels = merge_labels(*(src(result.images, list(ids)) for src in self.sources))
        return Batch(list(ids), result.images, labels, acts)

    def describe(self) -> dict:
        return {"mode": self.mode, "labels": self.source_names, "prompts": len(self.ids)}
