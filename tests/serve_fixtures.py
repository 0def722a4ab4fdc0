"""A real TorchServe for the serving tests, isolated from anything else on the machine.

The archive is built by scripts/build_archives.sh (the same script `make serve` runs) into a
temp model store; config.properties is the committed one with its addresses, model store and
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

    def start(self, store: Path, timeout: float = 1200) -> None:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        config = self.root / "config.properties"
        config.write_text(server_config(ROOT / "config.properties", store, self.ports))
        with open(self.root / "logs" / "launcher.log", "w") as log:
            subprocess.run([str(VENV_BIN / "torchserve"), "--start", "--ncs", "--ts-config", str(config),
                            "--model-store", str(store), "--models", "probe=probe.mar"],
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
                    if self.describe()["workers"][0]["status"] == "READY":
                        return
                except (ValueError, KeyError, IndexError, requests.RequestException):
                    pass
            time.sleep(1)
        raise RuntimeError(f"probe worker not ready after {timeout} s\n" + self.logs())

    def describe(self) -> dict[str, Any]:
        """The management API's model description (needs the management token)."""
        r = requests.get(f"{self.management}/models/probe", timeout=10,
                         headers={"Authorization": f"Bearer {self.keys['management']}"})
        r.raise_for_status()
        return r.json()[0]

    def post(self, body: Any, token: str | None = "inference", timeout: float = 600, stream: bool = False,
             content_type: str = "application/json") -> requests.Response:
        """POST /predictions/probe; body: dict (sent as JSON), str or bytes (sent as is)."""
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.keys.get(token, token)}"
        data = json.dumps(body) if isinstance(body, dict) else body
        return requests.post(f"{self.inference}/predictions/probe", data=data, headers=headers, timeout=timeout,
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


def build_archive(store: Path, bank: Path, overrides: dict[str, Any]) -> Path:
    env = os.environ | {"MODEL": "tiny", "BANK": str(bank), "STORE": str(store), "BATCH_SIZE": "4",
                        "CONFIG_OVERRIDES": json.dumps(overrides), "PYTHON": str(VENV_BIN / "python")}
    subprocess.run([str(ROOT / "scripts" / "build_archives.sh")], env=env, check=True, capture_output=True,
                   timeout=300)
    return store / "probe.mar"


# --- decoding responses ---------------------------------------------------------------------
def png_array(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def map_array(entry: dict[str, Any]) -> np.ndarray:
    arr = entry["array"]
    assert arr["dtype"] == "float16"
    return np.frombuffer(base64.b64decode(arr["data"]), dtype="<f2").reshape(arr["shape"])
