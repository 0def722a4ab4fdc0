"""bench/gpu_check.sh: its dry run (the GPU check's code paths on CPU at tiny shapes), its
arguments, the summary of a killed section, the full SD v1.4 build, the wheel list."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ldmprobe.jsonout import loads_strict

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
UNET_VARIANTS = {"eager", "eager_capture16", "compiled_capture16", "compiled", "cudagraphs_capture16", "cudagraphs"}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


@pytest.mark.slow
def test_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=900)
    log = (out / "log.txt").read_text() if (out / "log.txt").is_file() else ""
    assert done.returncode == 0, done.stderr[-2000:] + log[-4000:]
    summary = loads_strict(done.stdout.strip().splitlines()[-1])
    assert summary == loads_strict((out / "summary.json").read_text())
    assert summary["gpu_check"] == "dry-run" and summary["errors"] == {}
    assert summary["sections"] == {"env": "done", "kernel": "done", "unet": "done", "service": "done"}
    assert sorted(p.name for p in out.iterdir()) == ["env.json", "kernel.json", "log.txt", "service.json",
                                                     "summary.json", "unet.json"]  # ≤ 8 files come back
    sections = {name: loads_strict((out / f"{name}.json").read_text()) for name in summary["sections"]}

    for rows in ("rows_1", "rows_4"):  # the Triton kernel (interpreter) against the torch fallback
        k = sections["kernel"]["results"][rows]
        assert k["backend"] == "triton-interpret" and k["equal_1e-3"] and k["probes"] == 48
    unet = sections["unet"]["results"]
    assert set(unet) == UNET_VARIANTS and "eager_xformers" in sections["unet"]["skipped"]  # no CUDA here
    for name, v in unet.items():
        assert v["it_s"] > 0 and len(v["runs_ms"]) == 2, name
        if "first_call_s" in v:  # compiled variants: dynamo's eager backend runs the same kernels
            assert v["noise_vs_eager"]["max_abs"] < 1e-5, name
        if name.endswith("capture16") and name != "eager_capture16":
            assert v["activations_vs_eager_max_abs"] < 1e-5, name
    assert sections["unet"]["ratios"]["capture_overhead_compiled"] > 0
    service = sections["service"]
    assert set(service["results"]["generation"]["ms_per_step"]) == {"denoise", "probes", "map_encode",
                                                                    "probes_all_layers"}
    assert service["probes"] == 16 * 3 * 2 and service["request_ms_estimate"] > 0  # 2 steps in a dry run
    for stage in ("text_encode", "vae_decode", "vae_encode", "image_png"):
        assert summary["service_ms"][stage] > 0, stage


def test_summary_reports_a_killed_section(tmp_path):
    (tmp_path / "unet.json").write_text(json.dumps({"section": "unet", "status": "running", "errors": {},
                                                    "skipped": {}, "results": {"eager": {"it_s": 2.0}}}))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--summary", "--out", str(tmp_path),
                           "--rc", "unet=124"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    line = loads_strict(done.stdout)
    assert line["sections"]["unet"] == "killed (exit 124): partial results"
    assert line["sections"]["kernel"].startswith("missing") and line["unet_it_s"] == {"eager": 2.0}


@pytest.mark.parametrize("args, message", [
    (["--out", "x"], "give exactly one of --section and --summary"),
    (["--section", "gpu", "--out", "x"], "invalid choice"),
    (["--section", "unet", "--out", "x", "--steps", "0"], "--steps: must be > 0"),
])
def test_python_bad_arguments_exit_2_with_one_line(args, message, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [(["--bogus"], "unknown option --bogus"),
                                           (["a", "b"], "one output folder only"),
                                           (["--wheels"], "--wheels needs a folder")])
def test_script_bad_arguments_exit_2_with_one_line(args, message, tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_script_refuses_an_empty_wheel_folder(tmp_path):
    (tmp_path / "wheels").mkdir()
    done = subprocess.run(["bash", str(SCRIPT), "--wheels", str(tmp_path / "wheels"), str(tmp_path / "out")],
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no wheels in" in done.stderr


def test_full_sd_v1_4_builds_from_its_configs():
    """The real run's model, built on the meta device (shapes only): SD v1.4's U-Net, VAE, text encoder."""
    gc = _module()
    ctx = gc.Context(SimpleNamespace(dry_run=False, device="cpu", compile_backend=None, repeats=None, steps=None))
    assert ctx.backend == "inductor" and ctx.steps == 15
    model = gc.build_model(ctx, device="meta")
    assert sum(p.numel() for p in model.unet.parameters()) == 859_520_964
    assert model.default_size == 512 and model.text_encoder.config.hidden_size == 768
    registry = model.registry()
    assert len(registry.names) == 16 and registry["dec4.0"].channels == 320 and registry["dec4.0"].height == 64


def test_wheel_list_pins_what_requirements_pin():
    def pins(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.]*)", line)
                assert m, line
                name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
                assert name not in out, f"{name} twice"
                out[name] = m.group(2)
        return out

    wheels, required = pins(ROOT / "bench" / "gpu_wheels.txt"), pins(ROOT / "requirements.txt")
    for name in ("diffusers", "transformers", "huggingface-hub", "safetensors", "pydantic"):
        assert wheels[name] == required[name], name
    assert {"tokenizers", "pydantic-core"} <= set(wheels)
    assert ".whl/" in (ROOT / ".gitignore").read_text().split()
