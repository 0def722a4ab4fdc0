"""The scenes model's data: caption space, held-out captions, and the cached renders.

Captions are the renderer's own (`scene_prompt`): "a red sphere on a grey floor". In the model's
world (training.scenes.MODEL_SCENES) a caption is a (colour, kind, floor) triple; boxes are called
"cube" when near-cubic. 48 of the 120 triples (64 of the 160 captions) never occur in training:
held out for evaluation. The rule keeps every (colour, kind), (colour, floor) and (kind, floor) pair
in training, so a held-out caption is a new combination of things the model has seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ldmprobe.atomic import atomic_path, write_json

from ..scenes import GROUND_COLORS, MODEL_COLORS, MODEL_SCENES, SceneSpec, render_scene, scene_prompt

KINDS = ("sphere", "box", "cylinder")
NOUNS = {"sphere": ("sphere",), "box": ("box", "cube"), "cylinder": ("cylinder",)}
FLOORS = tuple(GROUND_COLORS)
HELD_OUT_SEED_OFFSET = 5_000_000  # evaluation draws seeds from here on; training seeds start at 0


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(colour: str, noun: str, floor: str) -> str:
    return f"{_article(f'{colour} {noun}')} on {_article(f'{floor} floor')}"


def triple(spec: SceneSpec) -> tuple[str, str, str]:
    """(colour, kind, floor) of a one-object scene."""
    (obj,) = spec.objects
    return obj.material.color, obj.kind, spec.ground.color


def is_held_out(colour: str, kind: str, floor: str) -> bool:
    c, k, f = MODEL_COLORS.index(colour), KINDS.index(kind), FLOORS.index(floor)
    return (c + 2 * k + f) % 5 in (0, 1)


def held_out_captions(count: int | None = None) -> list[dict]:
    """The 64 held-out captions with their parts, in a fixed order; with `count`, that many, cycling
    through them (the i-th sampled with seed HELD_OUT_SEED_OFFSET + i by the jobs that use them)."""
    out = []
    for colour in MODEL_COLORS:
        for kind in KINDS:
            for floor in FLOORS:
                if is_held_out(colour, kind, floor):
                    out += [{"caption": caption(colour, noun, floor), "colour": colour, "kind": kind, "floor": floor}
                            for noun in NOUNS[kind]]
    return out if count is None else [out[i % len(out)] for i in range(count)]


def scene_for(colour: str, kind: str, floor: str, noun: str, seed: int, size: int = 128):
    """A render of exactly this caption: geometry, camera and light drawn from the model's world
    (first seed from `seed` on whose box is named `noun`), colours set to the palette's."""
    import dataclasses

    from ..scenes import OBJECT_COLORS, render, sample_scene

    while True:
        spec = sample_scene(seed, **{**MODEL_SCENES, "kinds": (kind,)})
        seed += 1
        obj = spec.objects[0]
        obj.material = dataclasses.replace(obj.material, color=colour, rgb=OBJECT_COLORS[colour])
        spec.ground = dataclasses.replace(spec.ground, color=floor, rgb=GROUND_COLORS[floor])
        if scene_prompt(spec) == caption(colour, noun, floor):
            return render(spec, size), seed


def held_out_scenes(count: int, size: int = 128) -> list:
    """`count` renders of held-out captions, cycling through them in order (seeds from
    HELD_OUT_SEED_OFFSET on): the renders a sample of the same caption is compared with."""
    scenes, seed = [], HELD_OUT_SEED_OFFSET
    for c in held_out_captions(count):
        noun = c["caption"].split(" on ")[0].split()[-1]
        scene, seed = scene_for(c["colour"], c["kind"], c["floor"], noun, seed, size)
        scenes.append(scene)
    return scenes


def render_training_set(out: Path, count: int, size: int, progress: bool = True) -> dict:
    """Render `count` training scenes (held-out captions skipped) into `out/renders.safetensors` +
    `out/captions.json`, atomically; a finished cache is reused. Returns {"images": uint8 [N,H,W,3],
    "captions": [...], "seeds": [...]}."""
    from safetensors.numpy import load_file, save_file
    from tqdm.auto import tqdm

    tensors, meta = out / "renders.safetensors", out / "captions.json"
    if tensors.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        if info["count"] == count and info["size"] == size:
            return {"images": load_file(str(tensors))["images"], "captions": info["captions"], "seeds": info["seeds"]}
    images, captions, seeds, seed = [], [], [], 0
    with tqdm(total=count, desc="render scenes", unit="scene", disable=not progress) as bar:
        while len(images) < count:
            scene = render_scene(seed, size, **MODEL_SCENES)
            if not is_held_out(*triple(scene.spec)):
                images.append(scene.image)
                captions.append(scene_prompt(scene.spec))
                seeds.append(seed)
                bar.update()
            seed += 1
    array = np.stack(images)
    with atomic_path(tensors) as tmp:
        save_file({"images": array}, str(tmp))
    write_json(meta, {"count": count, "size": size, "captions": captions, "seeds": seeds})
    return {"images": array, "captions": captions, "seeds": seeds}


def world() -> dict:
    """What a model trained on this data learned, for the folder's world.json: the fit job's noised mode
    renders scenes from `render_options`, evaluation uses the held-out captions."""
    return {"render_options": {k: list(v) if isinstance(v, tuple) else v for k, v in MODEL_SCENES.items()},
            "captions": "training.scenes.scene_prompt", "held_out_captions": [c["caption"] for c in held_out_captions()]}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float [N, 3, H, W] in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
