"""The TorchServe side without a server: handlers/ts_adapter.py with a stand-in context, each
handler's settings against its model-config.yaml, and what scripts/build_archives.sh packs."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from serve_fixtures import ROOT, VENV_BIN, build_archive

from ldmprobe.serve.base import Outcome

sys.path.insert(0, str(ROOT / "handlers"))  # where TorchServe's model folder puts them in a worker
import ts_adapter  # noqa: E402

HANDLERS = sorted(p.name.removesuffix("_handler.py") for p in (ROOT / "handlers").glob("*_handler.py"))


class Context:
    """What the adapter uses of TorchServe's Context, recording what it is told."""

    def __init__(self, handler_section=None, headers=None):
        self.model_yaml_config = {"handler": handler_section} if handler_section is not None else {}
        self.headers = headers or {}
        self.status: dict[int, tuple[int, str]] = {}
        self.types: dict[int, str] = {}

    def get_request_header(self, idx, key):
        return self.headers.get(idx)

    def set_response_status(self, code, phrase, idx):
        self.status[idx] = (code, phrase)

    def set_response_content_type(self, idx, value):
        self.types[idx] = value


def handler_class(name: str) -> type:
    """The ServiceHandler subclass a handler file defines."""
    module = __import__(f"{name}_handler")
    (cls,) = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, ts_adapter.ServiceHandler)
              and v is not ts_adapter.ServiceHandler]
    return cls


def test_every_handler_has_a_config_with_exactly_its_settings():
    assert {"probe", "classify", "intervene"} <= set(HANDLERS)
    for name in HANDLERS:
        config_model = handler_class(name).service.Config
        config = yaml.safe_load((ROOT / "handlers" / f"{name}-config.yaml").read_text())
        assert list(config["handler"]) == list(config_model.model_fields), name  # same keys, same order as documented
        assert config["batchSize"] >= 1 and config["maxBatchDelay"] > 0
        assert ts_adapter.handler_config(Context(config["handler"]), config_model).model_dump() == config["handler"]
        for field, info in config_model.model_fields.items():  # every setting documented once, in its model
            assert info.description, f"{name}: {field} has no description"


def test_handler_files_are_small():
    """A handler is its service class (and, for probe, the streaming hook): the work is elsewhere."""
    for name in HANDLERS:
        lines = (ROOT / "handlers" / f"{name}_handler.py").read_text().splitlines()
        assert len(lines) <= 40, (name, len(lines))


def test_classify_defaults_never_pick_random_weights_silently():
    config = handler_class("classify").service.Config()
    assert config.classifier == "timm/vgg16.tv_in1k"
    assert config.tiny_decoder == ""
    text = (ROOT / "handlers" / "classify-config.yaml").read_text()
    assert "classifier: random" in text and "timm/vgg16.tv_in1k" in text  # the demo says so, with the real id


def test_handler_config_refuses_unknown_keys():
    from ldmprobe.serve.base import ServiceConfig

    assert ts_adapter.handler_config(Context({"max_steps": 10}), ServiceConfig).max_steps == 10
    assert ts_adapter.handler_config(Context(), ServiceConfig) == ServiceConfig()
    with pytest.raises(ValueError, match="unknown key.s. max_stpes; known: model, device"):
        ts_adapter.handler_config(Context({"max_stpes": 10}), ServiceConfig)
    with pytest.raises(ValueError, match="handler section: max_steps: Input should be a valid integer"):
        ts_adapter.handler_config(Context({"max_steps": "ten"}), ServiceConfig)
    with pytest.raises(ValueError, match="handler section: compile: Input should be a valid boolean"):
        ts_adapter.handler_config(Context({"compile": "yes"}), ServiceConfig)


def test_paths_resolve_inside_the_archive(tmp_path):
    (tmp_path / "bank.safetensors").write_bytes(b"x")
    assert ts_adapter.resolve("bank.safetensors", str(tmp_path)) == str(tmp_path / "bank.safetensors")
    for passthrough in ("tiny", "random", "timm/vgg16.tv_in1k", "/abs/vgg16.safetensors", ""):
        assert ts_adapter.resolve(passthrough, str(tmp_path)) == passthrough


def test_request_bodies():
    ctx = Context(headers={0: {"content-type": "application/json"}, 1: {"content-type": "application/json"},
                           2: {"content-type": "text/plain"}})
    assert ts_adapter.request_body({"body": {"prompt": "a"}}, ctx, 0) == ({"prompt": "a"}, True)
    assert ts_adapter.request_body({"body": b"{bad"}, ctx, 1) == (b"{bad", False)  # TorchServe could not decode it
    assert ts_adapter.request_body({"data": '"text"'}, ctx, 2) == ('"text"', False)
    assert ts_adapter.request_body({"prompt": "a"}, ctx, 3) == (None, False)  # form fields
    assert ts_adapter.request_body(b"raw", ctx, 4) == (b"raw", False)


def test_json_answers_carry_each_status():
    ctx = Context()
    outcomes = [Outcome(200, {"ok": 1}), Outcome(400, {"error": "invalid_request", "field": "steps", "message": "m"}),
                Outcome(500, {"error": "internal", "field": "", "message": "m"})]
    answers = ts_adapter.json_answers(ctx, outcomes)
    assert [json.loads(a) for a in answers] == [o.body for o in outcomes]
    assert ctx.status == {1: (400, "Bad Request"), 2: (500, "Internal Server Error")}
    assert set(ctx.types.values()) == {"application/json"}
    failed = ts_adapter.failure_answers(Context(), 2, RuntimeError("adapter bug"))
    assert json.loads(failed[0]) == {"error": "internal", "field": "", "message": "RuntimeError: adapter bug"}


def test_handle_never_raises():
    """A service that raises (it should not) still gives every request a 500, not a dead worker."""
    class Broken:
        def handle(self, bodies, decoded=None):
            raise RuntimeError("service bug")

    handler = ts_adapter.ServiceHandler()
    handler.service = Broken()
    ctx = Context()
    answers = handler.handle([{"body": b"{}"}, {"body": b"{}"}], ctx)
    assert len(answers) == 2 and ctx.status == {0: (500, "Internal Server Error"), 1: (500, "Internal Server Error")}
    assert "service bug" in json.loads(answers[0])["message"]


# --- scripts/build_archives.sh --------------------------------------------------------------------
def _archive(path: Path) -> tuple[set[str], dict]:
    with zipfile.ZipFile(path) as z:
        return set(z.namelist()), yaml.safe_load(z.read("model-config.yaml"))


def test_build_archives_packs_each_archive_its_way(tmp_path, monkeypatch):
    bank = tmp_path / "my-bank.safetensors"
    bank.write_bytes(b"not really a bank")
    weights = tmp_path / "weights" / "vgg16.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"w")
    monkeypatch.chdir(tmp_path)
    store = build_archive(tmp_path / "store", bank, {"maxBatchDelay": 7}, archives=["probe", "classify"],
                          per_archive={"classify": {"handler": {"max_steps": 9}}},
                          env={"CLASSIFIER": "weights/vgg16.safetensors", "TINY_DECODER": "random"}).parent
    assert sorted(p.name for p in store.iterdir()) == ["classify.mar", "probe.mar"]  # nothing half-written left
    probe_files, probe = _archive(store / "probe.mar")
    classify_files, classify = _archive(store / "classify.mar")
    assert {"probe_handler.py", "ts_adapter.py", "bank.safetensors"} <= probe_files
    assert {"classify_handler.py", "ts_adapter.py"} <= classify_files and "bank.safetensors" not in classify_files
    assert probe["handler"]["bank"] == "bank.safetensors" and "classifier" not in probe["handler"]
    assert probe["maxBatchDelay"] == classify["maxBatchDelay"] == 7  # CONFIG_OVERRIDES: every archive
    assert classify["handler"]["max_steps"] == 9 and probe["handler"]["max_steps"] == 50  # CLASSIFY_…: its own
    assert classify["handler"]["classifier"] == str(weights)  # a relative path made absolute
    assert classify["handler"]["tiny_decoder"] == "random" and "bank" not in classify["handler"]
    assert probe["batchSize"] == classify["batchSize"] == 4


def test_build_archives_refuses_unknown_names_and_bad_overrides(tmp_path):
    with pytest.raises(RuntimeError, match="archive 'nope' needs handlers/nope_handler.py"):
        build_archive(tmp_path / "store", archives=["nope"])
    with pytest.raises(RuntimeError, match="classify: CLASSIFY_CONFIG_OVERRIDES is not JSON"):
        build_archive(tmp_path / "store", archives=["classify"], env={"CLASSIFY_CONFIG_OVERRIDES": "{not json"})


def test_serve_script_registers_every_archive():
    out = subprocess.run([str(ROOT / "scripts" / "serve.sh"), "models"], capture_output=True, text=True, check=True,
                         env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "ARCHIVES": "probe classify"})
    assert out.stdout.split() == ["probe=probe.mar", "classify=classify.mar"]
    default = subprocess.run([str(ROOT / "scripts" / "serve.sh"), "models"], capture_output=True, text=True,
                             check=True, env={"PATH": f"{VENV_BIN}:/usr/bin:/bin"})
    assert default.stdout.split() == ["probe=probe.mar", "classify=classify.mar", "intervene=intervene.mar"]


def test_build_archives_refuses_intervene_without_a_bank(tmp_path):
    """Random probes would move nothing real: the intervene archive needs a bank, and the
    script says so before building anything."""
    with pytest.raises(RuntimeError, match="the intervene model needs BANK"):
        build_archive(tmp_path / "store", archives=["probe", "intervene"])
    assert not (tmp_path / "store" / "probe.mar").exists()


# --- ldmprobe.serve.precompile --------------------------------------------------------------------
def _precompile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "python"), "-m", "ldmprobe.serve.precompile", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_precompile_refuses_what_it_cannot_compile(tmp_path):
    """A missing config file and a config that does not compile are exit 2 with one line, and
    no cache file is left behind."""
    out = tmp_path / "compile-cache.bin"
    missing = _precompile("probe", str(tmp_path / "nope.yaml"), "--out", str(out))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "no such config" in missing.stderr
    config = yaml.safe_load((ROOT / "handlers" / "probe-config.yaml").read_text())
    config["handler"] |= {"model": "tiny", "bank": "", "compile": False}
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(config))
    eager = _precompile("probe", str(tmp_path / "model-config.yaml"), "--out", str(out))
    assert eager.returncode == 2 and "handler.compile is false" in eager.stderr and not out.exists()


def test_a_service_refuses_a_named_compile_cache_that_is_missing(tiny, tmp_path):
    from ldmprobe.probes import ProbeBank
    from ldmprobe.serve.probe import ProbeService

    bank = ProbeBank.random(tiny, steps=range(2), scheduler="lms", num_steps=2)
    with pytest.raises(ValueError, match="compile_cache: no such file"):
        ProbeService(tiny, bank, compile=True, compile_cache=str(tmp_path / "compile-cache.bin"))
