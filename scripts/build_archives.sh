#!/usr/bin/env bash
# Build the TorchServe archive of the `probe` model into the model store.
#
#   scripts/build_archives.sh                                  # tiny model, BANK as given
#   MODEL=/data/sd-v1-4 BANK=/data/bank.safetensors scripts/build_archives.sh
#
# Environment (all optional):
#   MODEL       tiny | diffusers SD folder (made absolute) | hub id            [tiny]
#   BANK        probe bank file, packed into the archive; empty = random demo probes
#   STORE       model store folder                                            [model_store]
#   BATCH_SIZE  TorchServe batchSize (empty = handlers/probe-config.yaml's)
#   COMPILE     1 | 0: torch.compile the U-Net in the worker (empty = the config's)
#   CONFIG_OVERRIDES  JSON merged into the model config (e.g. '{"maxBatchDelay": 300}')
#   PYTHON      interpreter with PyYAML (the venv's)                          [.venv/bin/python]
# The archive (STORE/probe.mar) holds the handler, model-config.yaml and the bank; the model
# weights stay where they are (a folder path is recorded, not copied).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODEL=${MODEL:-tiny}
BANK=${BANK:-}
STORE=${STORE:-model_store}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
ARCHIVER=${ARCHIVER:-$(dirname "$PYTHON")/torch-model-archiver}

if [[ "$MODEL" != tiny && -e "$MODEL" ]]; then MODEL=$(cd "$MODEL" && pwd); fi
if [[ -n "$BANK" && ! -f "$BANK" ]]; then echo "build_archives: BANK=$BANK is not a file" >&2; exit 2; fi
mkdir -p "$STORE"
BUILD=$(mktemp -d "${TMPDIR:-/tmp}/ldmprobe-archive.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT

extra=()
if [[ -n "$BANK" ]]; then
    cp "$BANK" "$BUILD/bank.safetensors"
    extra=(--extra-files "$BUILD/bank.safetensors")
else
    echo "build_archives: no BANK given: the probe model serves random demo probes" >&2
fi

MODEL="$MODEL" HAS_BANK="${BANK:+1}" BATCH_SIZE="${BATCH_SIZE:-}" COMPILE="${COMPILE:-}" \
CONFIG_OVERRIDES="${CONFIG_OVERRIDES:-}" "$PYTHON" - handlers/probe-config.yaml "$BUILD/model-config.yaml" <<'PY'
import json, os, sys

import yaml

src, dst = sys.argv[1], sys.argv[2]
config = yaml.safe_load(open(src))
config["handler"]["model"] = os.environ["MODEL"]
config["handler"]["bank"] = "bank.safetensors" if os.environ["HAS_BANK"] else ""
if os.environ["BATCH_SIZE"]:
    config["batchSize"] = int(os.environ["BATCH_SIZE"])
if os.environ["COMPILE"]:
    config["handler"]["compile"] = os.environ["COMPILE"] not in ("0", "false", "no")


def merge(into, new):
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


merge(config, json.loads(os.environ["CONFIG_OVERRIDES"] or "{}"))
yaml.safe_dump(config, open(dst, "w"), sort_keys=False)
PY

"$ARCHIVER" --model-name probe --version 1.0 --handler handlers/probe_handler.py \
    --config-file "$BUILD/model-config.yaml" "${extra[@]}" --export-path "$STORE" --force
echo "built $STORE/probe.mar (model: $MODEL, bank: ${BANK:-random demo probes})"
