"""The README's first command for real: `make serve`, the curl it prints, then `make stop`.

Run in a copy of this checkout's tracked files (its own runs/, model_store/ and a config.properties
on free ports), sharing the venv and the inductor cache, with ARCHIVES=probe (the scenes model,
its shipped bank: the default main job, one of its three models) so it costs one precompile and
one worker start. What it proves: the script builds the archive, starts TorchServe, returns only
when the worker answers, prints a curl that works as printed, and `make stop` stops that PID.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest
import requests
from serve_fixtures import ROOT, free_port, png_array, server_config


def checkout_copy(dest):
    """The tracked files of this checkout (as they are now), the venv linked, the install stamp
    kept newer than what it depends on (make must not reinstall into the shared venv)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    stamps = sorted((ROOT / ".venv").glob(".installed-*"))
    assert stamps, "the venv has no install stamp: run `make install` first"
    older = stamps[-1].stat().st_mtime - 60
    for name in ("requirements.txt", "pyproject.toml"):
        os.utime(dest / name, (older, older))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_make_serve_answers_its_printed_curl_and_make_stop_stops_it(tmp_path):
    clone = tmp_path / "clone"
    checkout_copy(clone)
    ports = {k: free_port() for k in ("inference", "management", "metrics", "worker")}
    (clone / "config.properties").write_text(server_config(ROOT / "config.properties", clone / "model_store", ports))
    env = os.environ | {"ARCHIVES": "probe", "HF_HUB_OFFLINE": "1",
                        "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR",
                                                                  str(ROOT / ".cache" / "inductor"))}
    pid_file = clone / "runs" / "serve" / "torchserve.pid"
    pid = 0
    try:
        serve = subprocess.run(["make", "serve"], cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
        assert serve.returncode == 0, serve.stdout[-3000:] + serve.stderr[-3000:]
        assert "serve: ready" in serve.stdout and (clone / "model_store" / "probe.mar").is_file()
        pid = int(pid_file.read_text())
        assert alive(pid)
        # the curl as printed: its token, its address, its body — sent at once (no waiting: ready means ready)
        token = re.search(r'Authorization: Bearer ([^"]+)"', serve.stdout).group(1)
        url = re.search(r"(http://127\.0\.0\.1:\d+/predictions/probe)", serve.stdout).group(1)
        body = re.search(r"-d '(\{.*\})'", serve.stdout).group(1)
        assert url == f"http://127.0.0.1:{ports['inference']}/predictions/probe"
        answer = requests.post(url, data=body, timeout=600, headers={"Authorization": f"Bearer {token}",
                                                                      "Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text[:2000]
        out = answer.json()
        assert out["metadata"]["model"] == "scenes" and png_array(out["image"]["png"]).shape == (128, 128, 3)
        assert [s["step"] for s in out["steps"]] == [3, 14] and "sphere" in body
        assert out["metadata"]["worker"]["compile_cache"]["file"] == "compile-cache.bin"
    finally:
        stop = subprocess.run(["make", "stop"], cwd=clone, env=env, capture_output=True, text=True, timeout=180)
    assert stop.returncode == 0 and f"serve: stopped (PID {pid})" in stop.stdout, stop.stdout + stop.stderr
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(pid) and not pid_file.exists()
    with pytest.raises(requests.ConnectionError):
        requests.post(url, data=body, timeout=10)
