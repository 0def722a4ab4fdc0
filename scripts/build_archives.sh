#!/usr/bin/env bash
# Build the TorchServe archives (model_store/<name>.mar) of the models listed in ARCHIVES.
#
#   scripts/build_archives.sh                                  # tiny model: probe.mar + classify.mar
#   MODEL=/data/sd-v1-4 BANK=/data/bank.safetensors CLASSIFIER=/data/vgg16.safetensors \
#       TINY_DECODER=/data/taesd scripts/build_archives.sh
#   ARCHIVES=classify scripts/build_archives.sh                # only classify.mar
#
# By convention archive NAME is handlers/NAME_handler.py + handlers/NAME-config.yaml (its
# model-config.yaml), with handlers/ts_adapter.py packed beside the handler. Adding a model is
# adding those two files and its name to ARCHIVES. Settings reach an archive only when its
# config's `handler:` section declares the key:
#   MODEL         -> handler.model        scenes | tiny | diffusers SD folder (made absolute) | hub id   [scenes]
#   BANK          -> handler.bank         probe bank file, PACKED into the archive; empty = random demo probes
#   CLASSIFIER    -> handler.classifier   VGG-16 weights file / folder (made absolute) | hub id | random
#                                         [empty: the config's, `random` for the tiny demo]
#   TINY_DECODER  -> handler.tiny_decoder AutoencoderTiny (TAESD) folder (made absolute) | hub id | random
#                                         [empty: the config's, none]
# Environment (all optional):
#   ARCHIVES      names to build                                              ["probe classify intervene"]
#   STORE         model store folder                                          [the clone's model_store]
#   BATCH_SIZE    TorchServe batchSize of every archive (empty = each config's)
#   COMPILE       1 | 0: torch.compile the U-Net in the workers (empty = each config's)
#   PRECOMPILE    1 | 0: compile each compiling archive's service once here (python -m
#                 ldmprobe.serve.precompile) and pack its portable compile cache as
#                 compile-cache.bin: workers load it instead of compiling                   [1]
#   CONFIG_OVERRIDES        JSON merged into every archive's config (e.g. '{"maxBatchDelay": 300}')
#   <NAME>_CONFIG_OVERRIDES JSON merged into archive NAME's only, after it (CLASSIFY_CONFIG_OVERRIDES=…)
#   PYTHON        interpreter with PyYAML (the venv's)                        [.venv/bin/python]
# Relative paths are taken from where the script is called.
# Model, classifier and decoder weights stay where they are (a path is recorded, not copied);
# only the bank, which is small and must match the archive it was fitted for, is packed.
set -euo pipefail
CALLER=$PWD  # relative paths in the settings are relative to where the script was called from
cd "$(dirname "$0")/.."
ROOT=$PWD
ARCHIVES=${ARCHIVES:-probe classify intervene}
MODEL=${MODEL:-scenes}
BANK=${BANK:-}
CLASSIFIER=${CLASSIFIER:-}
TINY_DECODER=${TINY_DECODER:-}
STORE=${STORE:-$ROOT/model_store}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
PRECOMPILE=${PRECOMPILE:-1}
# the precompile runs fill the inductor cache the workers of this clone read (serve.sh exports the same)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}
ARCHIVER=${ARCHIVER:-$(dirname "$PYTHON")/torch-model-archiver}

absolute() {  # an existing path made absolute; anything else (tiny, random, a hub id) as is
    (
        cd "$CALLER"
        if [[ -n "$1" && "$1" != tiny && "$1" != scenes && "$1" != random && -e "$1" ]]; then
            if [[ -d "$1" ]]; then cd "$1" && pwd; else echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; fi
        else
            echo "$1"
        fi
    )
}
MODEL=$(absolute "$MODEL")
CLASSIFIER=$(absolute "$CLASSIFIER")
TINY_DECODER=$(absolute "$TINY_DECODER")
BANK=$(absolute "$BANK")
STORE=$(cd "$CALLER" && mkdir -p "$STORE" && cd "$STORE" && pwd)
if [[ -n "$BANK" && ! -f "$BANK" ]]; then echo "build_archives: BANK=$BANK is not a file" >&2; exit 2; fi
for name in $ARCHIVES; do
    for file in "handlers/${name}_handler.py" "handlers/${name}-config.yaml"; do
        [[ -f $file ]] || { echo "build_archives: archive '$name' needs $file" >&2; exit 2; }
    done
    if [[ -z $BANK ]] && grep -q '^  bank:.*required' "handlers/${name}-config.yaml"; then
        echo "build_archives: the $name model needs BANK (a probe bank fitted for MODEL); leave it out of" \
             "ARCHIVES to build the others without one" >&2
        exit 2
    fi
done
declare -A WANTS EXTRA PIDS
BUILD=$(mktemp -d "${TMPDIR:-/tmp}/ldmprobe-archive.XXXXXX")
# archives are written here, then renamed into the store: a running server never sees half a .mar
STAGE=$(mktemp -d "$STORE/.build.XXXXXX")
trap 'rm -rf "$BUILD" "$STAGE"' EXIT

for name in $ARCHIVES; do
    mkdir -p "$BUILD/$name"
    upper=$(echo "$name" | tr '[:lower:]-' '[:upper:]_')
    overrides_var="${upper}_CONFIG_OVERRIDES"
    # Fills the handler keys this config declares; prints "bank" when the archive packs the bank.
    wants=$(NAME="$name" MODEL="$MODEL" BANK="$BANK" CLASSIFIER="$CLASSIFIER" TINY_DECODER="$TINY_DECODER" \
        BATCH_SIZE="${BATCH_SIZE:-}" COMPILE="${COMPILE:-}" CONFIG_OVERRIDES="${CONFIG_OVERRIDES:-}" \
        OWN_OVERRIDES="${!overrides_var:-}" OWN_VAR="$overrides_var" \
        "$PYTHON" - "handlers/$name-config.yaml" "$BUILD/$name/model-config.yaml" <<'PY'
import json, os, sys

import yaml

src, dst = sys.argv[1], sys.argv[2]
env = os.environ
config = yaml.safe_load(open(src))
handler = config.setdefault("handler", {})
if "model" in handler:
    handler["model"] = env["MODEL"]
if "bank" in handler:
    handler["bank"] = "bank.safetensors" if env["BANK"] else ""
    print("bank")
for key, var in (("classifier", "CLASSIFIER"), ("tiny_decoder", "TINY_DECODER")):
    if key in handler and env[var]:
        handler[key] = env[var]
# the built-in scenes model comes with its label models: its colour × kind classifier classifies,
# its foreground / depth models score interventions beside the probe
if env["MODEL"] == "scenes":
    if "classifier" in handler and not env["CLASSIFIER"]:
        handler["classifier"] = "scenes"
    if "label_models" in handler and not handler["label_models"]:
        handler["label_models"] = "scenes"
if env["BATCH_SIZE"]:
    config["batchSize"] = int(env["BATCH_SIZE"])
if env["COMPILE"]:
    handler["compile"] = env["COMPILE"] not in ("0", "false", "no")


def merge(into, new):
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


for var, name in (("CONFIG_OVERRIDES", "CONFIG_OVERRIDES"), ("OWN_OVERRIDES", env["OWN_VAR"])):
    try:
        merge(config, json.loads(env[var] or "{}"))
    except ValueError as exc:
        sys.exit(f"build_archives: {env['NAME']}: {name} is not JSON: {exc}")
if handler.get("compile"):
    print("compile")
if handler.get("classifier") == "random":
    print(f"build_archives: {env['NAME']}.mar classifies with a RANDOM-init VGG-16 (predictions are "
          "meaningless); set CLASSIFIER=/path/to/vgg16 weights for real use", file=sys.stderr)
tmp = dst + ".tmp"
with open(tmp, "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
os.replace(tmp, dst)
PY
)
    extra="handlers/ts_adapter.py"
    if [[ $wants == *bank* ]]; then
        if [[ -n "$BANK" ]]; then
            cp "$BANK" "$BUILD/$name/bank.safetensors"
            extra+=",$BUILD/$name/bank.safetensors"
        else
            echo "build_archives: no BANK given: the $name model serves random demo probes" >&2
        fi
    fi
    WANTS[$name]=$wants
    EXTRA[$name]=$extra
    if [[ $wants == *compile* && $PRECOMPILE != 0 ]]; then
        # the services compile side by side (each compile is mostly one busy thread)
        echo "build_archives: compiling the $name service once for its workers (ldmprobe.serve.precompile)"
        "$PYTHON" -m ldmprobe.serve.precompile "$name" "$BUILD/$name/model-config.yaml" \
            --out "$BUILD/$name/compile-cache.bin" >"$BUILD/$name/precompile.log" 2>&1 &
        PIDS[$name]=$!
    fi
done

for name in "${!PIDS[@]}"; do
    if ! wait "${PIDS[$name]}"; then
        echo "build_archives: precompiling the $name service failed:" >&2
        tail -n 30 "$BUILD/$name/precompile.log" >&2
        kill "${PIDS[@]}" 2>/dev/null || true
        wait || true
        exit 2
    fi
    grep '^{"service"' "$BUILD/$name/precompile.log" || true
done

for name in $ARCHIVES; do
    extra=${EXTRA[$name]}
    if [[ -n ${PIDS[$name]:-} ]]; then
        "$PYTHON" - "$BUILD/$name/model-config.yaml" <<'PY'
import os, sys

import yaml

path = sys.argv[1]
config = yaml.safe_load(open(path))
config["handler"]["compile_cache"] = "compile-cache.bin"
with open(path + ".tmp", "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
os.replace(path + ".tmp", path)
PY
        extra+=",$BUILD/$name/compile-cache.bin"
    fi
    "$ARCHIVER" --model-name "$name" --version 1.0 --handler "handlers/${name}_handler.py" \
        --config-file "$BUILD/$name/model-config.yaml" --extra-files "$extra" --export-path "$STAGE" --force
    mv -f "$STAGE/$name.mar" "$STORE/$name.mar"
    echo "built $STORE/$name.mar (model: $MODEL$([[ ${WANTS[$name]} == *bank* ]] && echo ", bank: ${BANK:-random demo probes}"))"
done
