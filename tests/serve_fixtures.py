"""A real TorchServe for the serving tests, isolated from anything else on the machine.

The archives are built by scripts/build_archives.sh (the same script `make serve` runs) into a
temp model store, and the server registers the models a test module asks for; config.properties is the committed one with its addresses, model store and
worker port replaced by free ones; TEMP/TMPDIR point into the temp dir so TorchServe's PID
file, worker sockets and unpacked archives are private to this instance. It is stopped by PID.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
STEPS = 4  # the test bank's schedule: LMS, 4 steps, probes at steps 0, 1, 3 (2 is missing on purpose)
BANK_STEPS = (0, 1, 3)
MISSING_LAYER = "enc1.0"  # no probes at all on this layer
BEST = {"foreground": "dec3.1", "depth": "dec4.1"}  # what the stored test metrics make best; shading: none


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_test_bank(model, path: Path) -> Path:
    """Random probes for the tiny model with a known shape: no probes on MISSING_LAYER or at step
    2, Dice/Spearman metrics making BEST the best layers, none for shading (→ dec4.0)."""
    from ldmprobe.probes import ProbeBank

    layers = [n for n in model.registry().names if n != MISSING_LAYER]
    bank = ProbeBank.random(model, layers=layers, steps=BANK_STEPS, scheduler="lms", num_steps=STEPS)
    for probe in bank:
        probe.metrics.clear()
        if probe.step == BANK_STEPS[-1] and probe.property in BEST:
            metric = "dice" if probe.kind == "mask" else "spearman"
            probe.metrics[metric] = 0.9 if probe.layer == BEST[probe.property] else 0.1
    return bank.save(path)


def server_config(committed: Path, store: Path, ports: dict[str, int]) -> str:
    """The committed config with this instance's addresses, store and worker port."""
    override = {"inference_address": f"http://127.0.0.1:{ports['inference']}",
                "management_address": f"http://127.0.0.1:{ports['management']}",
                "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
                "model_store": str(store), "initial_worker_port": str(ports["worker"]),
                # gRPC is unused but always bound: free ports, or two servers collide on 7070/7071.
                "grpc_inference_port": str(ports.get("grpc_inference") or free_port()),
                "grpc_management_port": str(ports.get("grpc_management") or free_port())}
    lines = []
    for line in committed.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in override and not line.lstrip().startswith("#"):
            line = f"{key}={override.pop(key)}"
        lines.append(line)
    lines += [f"{k}={v}" for k, v in override.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Server:
    root: Path
    ports: dict[str, int]
    pid: int = 0
    keys: dict[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ("probe",)

    @property
    def inference(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}"

    def env(self) -> dict[str, str]:
        tmp = self.root / "tmp"
        return os.environ | {
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",  # workers run the venv's python
            # ... and import the ldmprobe of this checkout (a worktree's, not the editable install's)
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
            "TEMP": str(tmp), "TMPDIR": str(tmp),
            "LOG_LOCATION": str(self.root / "logs"), "METRICS_LOCATION": str(self.root / "logs"),
            "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor")),
            "HF_HUB_OFFLINE": "1",
        }

    def start(self, store: Path, timeout: float = 1200, models: Sequence[str] = ("probe",)) -> None:
        """Start TorchServe with `models` (NAME.mar each, from `store`) registered; return when
        the worker of every one is READY."""
        self.models = tuple(models)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        config = self.root / "config.properties"
        config.write_text(server_config(ROOT / "config.properties", store, self.ports))
        with open(self.root / "logs" / "launcher.log", "w") as log:
            subprocess.run([str(VENV_BIN / "torchserve"), "--start", "--ncs", "--ts-config", str(config),
                            "--model-store", str(store), "--models", *[f"{m}={m}.mar" for m in self.models]],
                           cwd=self.root, env=self.env(), stdout=log, stderr=subprocess.STDOUT, check=True, timeout=60)
        pid_file = self.root / "tmp" / ".model_server.pid"
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError("TorchServe wrote no PID file\n" + self.logs())
            time.sleep(0.2)
        self.pid = int(pid_file.read_text())
        self.wait_ready(timeout)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return True

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError("TorchServe exited during start-up\n" + self.logs())
            key_file = self.root / "key_file.json"
            if key_file.exists():
                try:
                    data = json.loads(key_file.read_text())
                    self.keys = {k: data[k]["key"] for k in ("inference", "management")}
                    if all(self.describe(m)["workers"][0]["status"] == "READY" for m in self.models):
                        return
                except (ValueError, KeyError, IndexError, requests.RequestException):
                    pass
            time.sleep(1)
        raise RuntimeError(f"workers of {', '.join(self.models)} not ready after {timeout} s\n" + self.logs())

    def describe(self, model: str = "probe") -> dict[str, Any]:
        """The management API's model description (needs the management token)."""
        r = requests.get(f"{self.management}/models/{model}", timeout=10,
                         headers={"Authorization": f"Bearer {self.keys['management']}"})
        r.raise_for_status()
        return r.json()[0]

    def post(self, body: Any, token: str | None = "inference", timeout: float = 600, stream: bool = False,
             content_type: str = "application/json", model: str = "probe") -> requests.Response:
        """POST /predictions/<model>; body: dict (sent as JSON), str or bytes (sent as is)."""
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.keys.get(token, token)}"
        data = json.dumps(body) if isinstance(body, dict) else body
        return requests.post(f"{self.inference}/predictions/{model}", data=data, headers=headers, timeout=timeout,
                             stream=stream)

    def children(self) -> list[int]:
        """PIDs of the frontend's child processes (the workers)."""
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.pid:
                kids.append(int(stat.parent.name))
        return kids

    def stop(self) -> None:
        if not self.pid or not self.alive():
            return
        workers = self.children()
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        for pid in workers:  # the workers exit when the frontend goes; make sure of it
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.2)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)

    def logs(self, lines: int = 80) -> str:
        out = []
        for name in ("launcher.log", "ts_log.log", "model_log.log"):
            path = self.root / "logs" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(out) or f"(no logs under {self.root / 'logs'})"


@contextmanager
def running_server(root: Path, store: Path, models: Sequence[str]) -> Iterator[Server]:
    """A started Server with `models` registered, free ports, logs printed if the start fails;
    stopped by PID (and checked gone) on exit. `first_worker` is the first model's worker as it
    started, to prove later that no request cost a restart."""
    srv = Server(root, {k: free_port() for k in ("inference", "management", "metrics", "worker")})
    try:
        srv.start(store, models=models)
    except BaseException:
        print(srv.logs())
        srv.stop()
        raise
    srv.first_worker = srv.describe(models[0])["workers"][0]
    try:
        yield srv
    finally:
        srv.stop()
    assert not srv.alive()


def build_archive(store: Path, bank: Path | None = None, overrides: dict[str, Any] | None = None,
                  archives: Sequence[str] = ("probe",), per_archive: dict[str, dict[str, Any]] | None = None,
                  env: dict[str, str] | None = None) -> Path:
    """Build `archives` into `store` with scripts/build_archives.sh; `overrides` go to every
    archive (CONFIG_OVERRIDES), per_archive[name] to that one (<NAME>_CONFIG_OVERRIDES).
    Without env PRECOMPILE=1 the workers compile at warm-up (from the clone's inductor cache).
    Returns the path of the first archive."""
    full = os.environ | {"ARCHIVES": " ".join(archives), "MODEL": "tiny", "BANK": str(bank or ""), "PRECOMPILE": "0",
                         "STORE": str(store), "BATCH_SIZE": "4", "CONFIG_OVERRIDES": json.dumps(overrides or {}),
                         "PYTHON": str(VENV_BIN / "python")}
    for name, values in (per_archive or {}).items():
        full[f"{name.upper()}_CONFIG_OVERRIDES"] = json.dumps(values)
    done = subprocess.run([str(ROOT / "scripts" / "build_archives.sh")], env=full | (env or {}), capture_output=True,
                          text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"build_archives.sh failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return store / f"{archives[0]}.mar"


# --- fuzzing --------------------------------------------------------------------------------
FUZZ_SETTINGS = {"deadline": None, "database": None, "derandomize": True}


def fuzz_post(server: Server, model: str, session: requests.Session, case: tuple[Any, str | None],
              timeout: float = 60) -> tuple[requests.Response, str | None, Any]:
    """Send one fuzz case (body, field at fault) → (response, the field to expect, what was sent).
    Random bytes that happen to be a JSON object expect no particular field."""
    body, field = case
    data = json.dumps(body) if isinstance(body, dict) else body
    if isinstance(body, bytes):
        try:
            if isinstance(json.loads(body), dict):
                field = None
        except ValueError:
            pass
    headers = {"Authorization": f"Bearer {server.keys['inference']}", "Content-Type": "application/json"}
    r = session.post(f"{server.inference}/predictions/{model}", data=data, headers=headers, timeout=timeout)
    return r, field, data


def assert_worker_kept(server: Server, model: str) -> None:
    """The model's worker is the one that started the module: no request cost a restart."""
    worker = server.describe(model)["workers"][0]
    assert (worker["pid"], worker["startTime"], worker["status"]) == \
        (server.first_worker["pid"], server.first_worker["startTime"], "READY")


# --- decoding responses ---------------------------------------------------------------------
def png_array(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def map_array(entry: dict[str, Any]) -> np.ndarray:
    arr = entry["array"]
    assert arr["dtype"] == "float16"
    return np.frombuffer(base64.b64decode(arr["data"]), dtype="<f2").reshape(arr["shape"])


def answer_bytes(body: dict[str, Any]) -> bytes:
    """An answer as bytes without its metadata (timings, batch, worker: what may differ)."""
    return json.dumps({k: v for k, v in body.items() if k != "metadata"}, sort_keys=True).encode()


def alone_and_batched(service: Any, body: dict[str, Any], others: Sequence[dict[str, Any]]
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`body` answered alone (row 0), then in one batch with 1, 2 and 3 of `others` before it
    (rows 1, 2, 3): (alone, [the three batched answers])."""
    (alone,) = service.handle([body])
    assert alone.status == 200, alone.body
    batched = []
    for k in (1, 2, 3):
        out = service.handle([*others[:k], body])
        assert [o.status for o in out] == [200] * (k + 1), [o.body for o in out if o.status != 200]
        batched.append(out[k].body)
    return alone.body, batched


def assert_batch_invariant(service: Any, body: dict[str, Any], others: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Alone vs batched with 1, 2 and 3 other requests: byte-identical answers (images, maps,
    arrays, numbers). Returns the answer alone."""
    alone, batched = alone_and_batched(service, body, others)
    reference = answer_bytes(alone)
    for k, together in enumerate(batched, start=1):
        assert answer_bytes(together) == reference, f"alone vs batched with {k} other(s): the bytes differ"
    return alone


def png_b64_of(array: np.ndarray) -> str:
    """uint8 [H, W, 3] → base64 PNG (what a client sends as `image`)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --- the classify endpoint: shared by tests/test_classify_service.py (in process) and
# tests/test_serve_classify.py (through TorchServe), so both prove the same table -----------------
CLASSIFY_BASE = {"prompt": "a lemon on a table", "seed": 7, "steps": 3, "height": 64, "width": 64}
CLASSIFY_LIMITS = {"max_side": 256, "max_steps": 50}  # the service / handler settings the table assumes
CLASSIFY_INPUT_SIZE = 64  # VGG-16 fed 64×64: 12× cheaper than 224 with random weights (see test_classify.py)
SMALL_IMAGE = png_b64_of((np.random.default_rng(3).random((40, 56, 3)) * 255).astype(np.uint8))
NOT_AN_IMAGE = base64.b64encode(b"hello, this is not a picture").decode("ascii")

CLASSIFY_BAD = [  # (id, body, error, field, text the message must contain)
    ("malformed_json", b'{"prompt": "a", ', "invalid_json", "request", "malformed JSON"),
    ("array_body", b"[1, 2, 3]", "invalid_request", "request", "got an array"),
    ("empty_body", b"", "invalid_json", "request", "empty body"),
    ("not_utf8", b'{"prompt": "\xff\xfe"}', "invalid_json", "request", "not UTF-8"),
    ("json_string_body", json.dumps(json.dumps(CLASSIFY_BASE)).encode(), "invalid_request", "request", "string"),
    ("unknown_field", CLASSIFY_BASE | {"colour": "red"}, "invalid_request", "colour", "Extra inputs"),
    ("prompt_wrong_type", {"prompt": 5}, "invalid_request", "prompt", "string"),
    ("empty_prompt", {"prompt": ""}, "invalid_request", "prompt", "at least 1"),
    ("steps_as_string", CLASSIFY_BASE | {"steps": "3"}, "invalid_request", "steps", "integer"),
    ("seed_as_float", CLASSIFY_BASE | {"seed": 1.0}, "invalid_request", "seed", "integer"),
    ("guidance_as_string", CLASSIFY_BASE | {"guidance": "7.5"}, "invalid_request", "guidance", "number"),
    ("previews_as_int", CLASSIFY_BASE | {"previews": 1}, "invalid_request", "previews", "boolean"),
    ("top_k_zero", CLASSIFY_BASE | {"top_k": 0}, "invalid_request", "top_k", "greater than or equal to 1"),
    ("top_k_too_large", CLASSIFY_BASE | {"top_k": 101}, "invalid_request", "top_k", "less than or equal to 100"),
    ("top_k_as_string", CLASSIFY_BASE | {"top_k": "5"}, "invalid_request", "top_k", "integer"),
    ("target_class_unknown", CLASSIFY_BASE | {"target_class": "lemmon"}, "invalid_request", "target_class",
     "unknown ImageNet class 'lemmon'; close matches: lemon (951)"),
    ("target_class_ambiguous", CLASSIFY_BASE | {"target_class": "crane"}, "invalid_request", "target_class",
     "ambiguous"),
    ("target_class_out_of_range", CLASSIFY_BASE | {"target_class": 1000}, "invalid_request", "target_class",
     "out of range 0-999"),
    ("target_class_float", CLASSIFY_BASE | {"target_class": 9.5}, "invalid_request", "target_class", ""),
    ("target_class_bool", CLASSIFY_BASE | {"target_class": True}, "invalid_request", "target_class", ""),
    ("both_prompt_and_image", CLASSIFY_BASE | {"image": SMALL_IMAGE}, "invalid_request", "request",
     "either a prompt"),
    ("neither_prompt_nor_image", {"top_k": 3}, "invalid_request", "request", "either a prompt"),
    ("bad_base64", {"image": "not base64!"}, "invalid_request", "image", "not valid base64"),
    ("not_an_image", {"image": NOT_AN_IMAGE}, "invalid_request", "image", "not a readable image"),
    ("image_wrong_type", {"image": [1, 2]}, "invalid_request", "image", "string"),
    ("image_with_generation_field", {"image": SMALL_IMAGE, "steps": 3}, "invalid_request", "steps",
     "only applies to a generation"),
    ("steps_zero", CLASSIFY_BASE | {"steps": 0}, "invalid_request", "steps", "greater than or equal to 1"),
    ("steps_over_service_limit", CLASSIFY_BASE | {"steps": 60}, "invalid_request", "steps", "at most 50 steps"),
    ("steps_too_many", CLASSIFY_BASE | {"steps": 1000}, "invalid_request", "steps", "less than or equal to 100"),
    ("height_not_multiple_of_8", CLASSIFY_BASE | {"height": 100}, "invalid_request", "height", "multiple of 8"),
    ("width_over_service_limit", CLASSIFY_BASE | {"width": 512}, "invalid_request", "width", "between 8 and 256"),
    ("negative_seed", CLASSIFY_BASE | {"seed": -1}, "invalid_request", "seed", "greater than or equal to 0"),
    ("unknown_scheduler", CLASSIFY_BASE | {"scheduler": "magic"}, "invalid_request", "scheduler", "lms"),
    ("unknown_decoder", CLASSIFY_BASE | {"decoder": "big"}, "invalid_request", "decoder", "'vae' or 'tiny'"),
    ("decoder_tiny_not_configured", CLASSIFY_BASE | {"decoder": "tiny"}, "invalid_request", "decoder",
     "no tiny decoder is configured"),
    ("unknown_decode", CLASSIFY_BASE | {"decode": "noise"}, "invalid_request", "decode", "'latent' or 'x0'"),
]
