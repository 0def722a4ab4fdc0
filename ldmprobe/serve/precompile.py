"""Compile a service once, before any worker starts: `python -m ldmprobe.serve.precompile`.

scripts/build_archives.sh runs this for every archive that compiles: it builds the service from
the archive's model-config.yaml (its `handler:` section and `batchSize`, exactly as a worker
would), warms it (every graph a request can reach is compiled), and writes the portable compile
cache of that process (`ldmprobe.compiling.save_cache_artifacts`) to a file the archive packs.
A worker then loads it before warming up instead of compiling (`ServiceConfig.compile_cache`),
and the inductor cache folder the build shares with the workers is filled on the way.

Prints one JSON line: the service, the file, its size and entries, the load / warm / save times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

SERVICES = {"probe": "ldmprobe.serve.probe:ProbeService",
            "classify": "ldmprobe.serve.classify:ClassifyService",
            "intervene": "ldmprobe.serve.intervene:InterveneService"}


def service_class(name: str):
    """The service class an archive name stands for (probe, classify, intervene)."""
    import importlib

    module, _, attr = SERVICES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def config_from_yaml(cls, path: Path) -> tuple[Any, int]:
    """(the service config, TorchServe batchSize) of a model-config.yaml; relative path settings
    name files beside it, as they name files inside the archive for a worker; device auto = CPU
    here unless CUDA is present."""
    import yaml

    from .base import path_settings, resolve

    raw = yaml.safe_load(path.read_text()) or {}
    section = dict(raw.get("handler") or {})
    section = section | {name: resolve(str(section[name]), str(path.parent))
                         for name in path_settings(cls.Config) if name in section}
    section.pop("compile_cache", None)  # the file this run writes
    if section.get("device", "auto") == "auto":
        import torch

        section["device"] = "cuda:0" if torch.cuda.is_available() else "cpu"
    return cls.Config.model_validate(section), int(raw.get("batchSize") or 1)


def precompile(name: str, config_file: Path, out: Path) -> dict[str, Any]:
    """Build, warm and save: the figures of one precompile run."""
    from ..compiling import save_cache_artifacts, use_cache_dir

    cls = service_class(name)
    config, batch_size = config_from_yaml(cls, config_file)
    if not config.compile:
        raise ValueError(f"{config_file}: handler.compile is false: nothing to precompile")
    use_cache_dir(config.cache_dir or None)
    started = time.perf_counter()
    service = cls.from_config(config, max_batch=batch_size)
    loaded = time.perf_counter()
    warm_s = service.warm()
    saved = time.perf_counter()
    info = save_cache_artifacts(out)
    return {"service": name, "file": str(out), "batch_size": batch_size, "load_s": round(loaded - started, 2),
            "warm_s": round(warm_s, 2), "save_s": round(time.perf_counter() - saved, 2),
            "mib": round(info.pop("bytes") / 2**20, 2), "entries": info,
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldmprobe.serve.precompile",
                                description="Compile a service once and write its portable compile cache.")
    p.add_argument("service", choices=sorted(SERVICES), help="which service the config is for")
    p.add_argument("config", type=Path, help="the archive's model-config.yaml (relative paths: files beside it)")
    p.add_argument("--out", type=Path, required=True, help="compile cache file to write (atomically)")
    args = p.parse_args(argv)
    if not args.config.is_file():
        print(f"precompile: no such config file: {args.config}", file=sys.stderr)
        return 2
    try:
        figures = precompile(args.service, args.config, args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"precompile: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
