"""No Docker engine runs here, so the image is checked statically: every file it copies exists,
its scripts parse, its ports agree with the TorchServe config it runs, and it keeps the security
settings of the bare-machine config."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _props(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_every_copied_path_exists():
    sources = []
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    assert sources, "the Dockerfile copies nothing?"
    for src in sources:
        assert (ROOT / src).exists(), src


def test_entrypoint_and_scripts_parse():
    entry = re.search(r'ENTRYPOINT \["([^"]+)"\]', DOCKERFILE).group(1)
    for script in (entry, "scripts/serve.sh", "scripts/build_archives.sh"):
        path = ROOT / script
        assert path.is_file() and path.stat().st_mode & 0o111, f"{script} missing or not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)
    text = (ROOT / entry).read_text()
    assert "docker/config.properties" in text and "--foreground" in text


def test_entrypoint_registers_every_archive():
    """The container serves what `make serve` serves: the archives named by ARCHIVES (default
    probe, classify and intervene), each registered by the --models list serve.sh prints."""
    text = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "ARCHIVES=${ARCHIVES:-probe classify intervene}" in text
    assert "scripts/serve.sh archives" in text and "$(scripts/serve.sh models)" in text
    assert '--models "${models[@]}"' in text
    for name in ("probe", "classify", "intervene"):
        assert (ROOT / "handlers" / f"{name}_handler.py").is_file() and (ROOT / "handlers" / f"{name}-config.yaml").is_file()


def test_ports_and_healthcheck_match_the_container_config():
    conf = _props(ROOT / "docker" / "config.properties")
    port = conf["inference_address"].rsplit(":", 1)[1]
    assert re.search(rf"^EXPOSE {port}$", DOCKERFILE, re.M)
    check = re.search(r'HEALTHCHECK .*CMD \["([^"]+)"\]', DOCKERFILE).group(1)
    text = (ROOT / check).read_text()
    subprocess.run(["bash", "-n", str(ROOT / check)], check=True)
    # TorchServe 0.12 answers /ping only with the inference token: the check must send it.
    assert f"127.0.0.1:{port}/ping" in text and "Authorization: Bearer" in text and "key_file.json" in text
    for key in ("management_address", "metrics_address"):
        assert conf[key].startswith("http://127.0.0.1:"), key  # never published


def test_container_keeps_the_security_settings():
    bare, container = _props(ROOT / "config.properties"), _props(ROOT / "docker" / "config.properties")
    for conf in (bare, container):
        assert conf["disable_token_authorization"] == "false"
        assert conf["enable_model_api"] == "false"
        assert conf["metrics_mode"] == "prometheus"
        assert "model_store" in conf["allowed_urls"]
    assert re.search(r"^USER (?!root)\w+", DOCKERFILE, re.M)  # not root
    assert "HEALTHCHECK" in DOCKERFILE and "nvidia/cuda" in DOCKERFILE
