import json
import subprocess
import sys

import pytest
from PIL import Image

from ldmprobe.cli import main
from ldmprobe.store import ActivationStore


def test_generate_writes_image_previews_store_and_metadata(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["generate", "--prompt", "a red apple", "--seed", "3", "--steps", "3", "--out", str(out),
               "--layers", "dec4,mid.0", "--previews", "--no-progress"])
    assert rc == 0
    assert "activations of 4 layers" in capsys.readouterr().out
    assert Image.open(out / "image.png").size == (128, 128)
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step_000.png", "step_001.png", "step_002.png"]
    store = ActivationStore(out / "activations")
    assert store.layers == ["mid.0", "dec4.0", "dec4.1", "dec4.2"] and store.steps == [0, 1, 2]
    assert store.manifest["prompts"] == ["a red apple"] and store.manifest["seeds"] == [3]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["attention"] == "sdpa" and meta["compiled"] is False and meta["dtype"] == "float32"
    assert not list(out.rglob("*.tmp"))


def test_layers_none_writes_no_store(tmp_path):
    out = tmp_path / "run"
    assert main(["generate", "--prompt", "a", "--steps", "2", "--out", str(out), "--layers", "none",
                 "--no-progress"]) == 0
    assert (out / "image.png").is_file() and not (out / "activations").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "--steps: Input should be greater than or equal to 1"),
    (["--height", "100"], "--height: Value error, must be a multiple of 8"),
    (["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
    (["--scheduler", "magic"], "--scheduler: Input should be 'lms'"),
    (["--half", "uncond"], "--half: Input should be 'cond' or 'both'"),
    (["--layers", "dec9.9"], "unknown layer 'dec9.9'; valid layers: all"),
    (["--attention", "xformers"], "no CPU kernels"),
    (["--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
    (["--prompt", ""], "--prompt: String should have at least 1 character"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    base = ["generate", "--prompt", "a", "--out", str(out), "--no-progress"]
    rc = main(base + args)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and err.startswith("ldmprobe: error:")
    assert not out.exists()  # nothing half-written


def test_existing_output_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["generate", "--prompt", "a", "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_real_process_exit_codes(tmp_path):
    """The installed entry point: argparse errors and library errors both exit 2 in one line."""
    for args in (["generate", "--prompt", "a", "--seed", "abc", "--out", str(tmp_path / "a")],
                 ["generate", "--prompt", "a", "--layers", "bogus", "--out", str(tmp_path / "b")],
                 ["frobnicate"]):
        proc = subprocess.run([sys.executable, "-m", "ldmprobe.cli", *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "error:" in proc.stderr


def test_layers_command_prints_the_registry(capsys):
    assert main(["layers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 16 and lines[0].split()[:3] == ["enc1.0", "Encoder", "1"]


@pytest.mark.slow
def test_generate_with_compile(tmp_path):
    """--compile runs the fullgraph-compiled capturing U-Net (inductor cache shared with the
    compiled-vs-eager test) and records it in the metadata and the store."""
    out = tmp_path / "run"
    assert main(["generate", "--prompt", "a red apple", "--seed", "7", "--steps", "3", "--out", str(out),
                 "--compile", "--no-progress"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["compiled"] is True
    assert ActivationStore(out / "activations").manifest["compiled"] is True


def test_generate_uses_the_studys_timesteps_on_a_leading_folder(tmp_path, leading_folder):
    """Acceptance (issue 13, item 2): a model folder whose scheduler config says "leading";
    `ldmprobe generate` with default settings (15 LMS steps) runs 999 … 0 and says so in
    metadata.json and the activation manifest; `--timestep-spacing config` follows the folder."""
    import numpy as np

    out = tmp_path / "run"
    assert main(["generate", "--model", str(leading_folder), "--prompt", "a red apple", "--layers", "mid.0",
                 "--out", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["steps"] == 15 and meta["timesteps"][0] == 999.0 and meta["timesteps"][-1] == 0.0
    np.testing.assert_allclose(meta["timesteps"], np.linspace(0, 999, 15)[::-1], rtol=1e-6)
    assert meta["timestep_spacing"] == "linspace" and meta["protocol"] == "ldmprobe"
    assert abs(meta["init_noise_sigma"] - 14.6146) < 1e-3
    manifest = ActivationStore(out / "activations").manifest
    assert manifest["timesteps"] == meta["timesteps"] and manifest["protocol"] == "ldmprobe"
    folder = tmp_path / "folder"
    assert main(["generate", "--model", str(leading_folder), "--prompt", "a red apple", "--layers", "none",
                 "--timestep-spacing", "config", "--protocol", "study", "--out", str(folder), "--no-progress"]) == 0
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["timesteps"] == [float(t) for t in (np.arange(15) * 66 + 1)[::-1]]
    assert meta["timestep_spacing"] == "leading" and meta["protocol"] == "study"


def test_every_flag_has_a_help_line_with_its_default(capsys):
    """`ldmprobe <command> --help`: every option explained, and every option that takes a value
    says what it is when not given; the shared ones take their defaults from GenerationSettings."""
    import argparse

    from ldmprobe.cli import build_parser
    from ldmprobe.schemas import GenerationSettings

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"generate", "classify", "intervene", "layers"}
    for name, sub in commands.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.option_strings[0] in text, f"{name} {action.option_strings}: no help"
            line = sub._get_formatter()._expand_help(action)
            if action.nargs != 0 and not action.required:
                assert "default" in line, f"{name} {action.option_strings}: {line!r} says no default"
        for flag in ("steps", "guidance", "scheduler"):
            if name != "layers":
                action = next(a for a in sub._actions if f"--{flag}" in a.option_strings)
                default = GenerationSettings.model_fields[flag].default
                assert action.default == default and f"(default: {default})" in sub._get_formatter()._expand_help(action)
