"""Atomic, pickle-free training checkpoints: module weights, optimizer moments and counters in one
safetensors file, so a killed job resumes exactly where its last checkpoint left it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldmprobe.atomic import atomic_path


def save(path: Path, modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
         optimizer: torch.optim.Optimizer | None, meta: dict) -> None:
    tensors = {}
    for name, module in modules.items():
        state = module.state_dict() if isinstance(module, torch.nn.Module) else module
        tensors.update({f"{name}/{k}": v.detach().contiguous().cpu() for k, v in state.items()})
    if optimizer is not None:
        for i, state in optimizer.state_dict()["state"].items():
            tensors.update({f"optim/{i}/{k}": torch.as_tensor(v).contiguous() for k, v in state.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})


def load(path: Path, modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
         optimizer: torch.optim.Optimizer | None) -> dict:
    from safetensors import safe_open

    tensors = load_file(str(path))
    for name, module in modules.items():
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}/")}
        if isinstance(module, torch.nn.Module):
            module.load_state_dict(state)
        else:
            for k, v in state.items():
                module[k].copy_(v)
    if optimizer is not None:
        sd = optimizer.state_dict()
        states: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, i, k = key.split("/", 2)
                states.setdefault(int(i), {})[k] = value
        sd["state"] = states
        optimizer.load_state_dict(sd)
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"])


def meta(path: Path) -> dict:
    """The counters of a checkpoint without loading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"])
