#!/usr/bin/env bash
# Start / stop the TorchServe service of the ldmprobe models (what `make serve` / `make stop` run).
#
#   scripts/serve.sh start      fit a tiny bank if needed, build the archives, start TorchServe on
#                               127.0.0.1 in the background, wait until every model is ready, print curls
#   scripts/serve.sh stop       stop it (by PID) and wait for it to exit
#   scripts/serve.sh archives   only fit the bank (if needed) and build model_store/<name>.mar
#   scripts/serve.sh models     print the --models arguments (probe=probe.mar classify=classify.mar intervene=intervene.mar)
#   scripts/serve.sh status
#
# Environment: ARCHIVES (the models, default "probe classify intervene"), MODEL (scenes | tiny | SD folder | hub id; default scenes),
# BANK (probe bank file; for scenes, the shipped one; for tiny, default runs/tiny-bank/bank.safetensors, fitted when absent),
# CLASSIFIER, TINY_DECODER, COMPILE, BATCH_SIZE, CONFIG_OVERRIDES, <NAME>_CONFIG_OVERRIDES (see
# build_archives.sh), STARTUP_WAIT (s, default 1200). State lives in runs/serve/: torchserve.pid,
# key_file.json (the tokens), logs/, tmp/ (TorchServe's temp dir: worker sockets, unpacked archives).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV_BIN=$ROOT/.venv/bin
STATE=$ROOT/runs/serve
PIDFILE=$STATE/torchserve.pid
ARCHIVES=${ARCHIVES:-probe classify intervene}
MODEL=${MODEL:-scenes}
BANK=${BANK:-}
TINY_BANK=$ROOT/runs/tiny-bank/bank.safetensors
SCENES_BANK=$ROOT/ldmprobe/weights/scenes/bank.safetensors  # shipped with the scenes model
CONFIG=$ROOT/config.properties
# Workers must run the venv's python; one inductor cache for the whole clone.
export PATH=$VENV_BIN:$PATH
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}

prop() { sed -n "s/^$1=//p" "$CONFIG" | tail -1; }
INFERENCE=$(prop inference_address)
MANAGEMENT=$(prop management_address)

running_pid() {
    [[ -f $PIDFILE ]] || return 1
    local pid
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q org.pytorch.serve.ModelServer; then
        echo "$pid"
    else
        return 1
    fi
}

key() {  # key <inference|management>
    "$VENV_BIN/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["key"])' \
        "$STATE/key_file.json" "$1"
}

needs_bank() {  # does an archive to build declare a handler.bank setting?
    local name
    for name in $ARCHIVES; do
        grep -q '^  bank:' "handlers/$name-config.yaml" 2>/dev/null && return 0
    done
    return 1
}

models() {  # the --models arguments: NAME=NAME.mar for every archive
    local name out=()
    for name in $ARCHIVES; do out+=("$name=$name.mar"); done
    echo "${out[@]}"
}

archives() {
    if [[ -z $BANK && $MODEL == scenes ]] && needs_bank; then
        BANK=$SCENES_BANK
    fi
    if [[ -z $BANK && $MODEL == tiny ]] && needs_bank; then
        BANK=$TINY_BANK
        if [[ ! -f $BANK ]]; then
            echo "serve: fitting a small probe bank for the tiny model (about a minute) → $BANK"
            "$VENV_BIN/python" -m training.fit --model tiny --scenes 48 --test-scenes 8 \
                --out "$(dirname "$BANK")" --no-progress
        fi
    fi
    ARCHIVES=$ARCHIVES MODEL=$MODEL BANK=$BANK PYTHON=$VENV_BIN/python scripts/build_archives.sh
}

example_body() {  # a request body worth trying on model $1 (scene captions for the scenes model)
    if [[ $MODEL == scenes ]]; then
        case $1 in
            probe) echo '{"prompt": "a red sphere on a grey floor", "seed": 3, "steps": 15, "return_steps": [3, 14]}' ;;
            classify) echo '{"prompt": "a red cube on a grey floor", "seed": 0, "steps": 15, "target_class": "red box", "top_k": 3}' ;;
            intervene) echo '{"prompt": "a red sphere on a grey floor", "seed": 3, "steps": 15, "dx": 24, "dy": 0}' ;;
            *) echo '{}' ;;
        esac
        return
    fi
    case $1 in
        probe) echo '{"prompt": "a red apple on a wooden table", "seed": 5107435, "steps": 15, "return_steps": [3, 14]}' ;;
        classify) echo '{"prompt": "a lemon", "seed": 0, "steps": 15, "target_class": "lemon", "top_k": 3}' ;;
        intervene) echo '{"prompt": "a red apple on a wooden table", "seed": 5107435, "steps": 15, "dx": 32, "dy": 0}' ;;
        *) echo '{}' ;;
    esac
}

example() {  # a curl per served model
    local name
    for name in $ARCHIVES; do
        echo "curl -s -H \"Authorization: Bearer $(key inference)\" -H \"Content-Type: application/json\" \\"
        echo "     $INFERENCE/predictions/$name \\"
        echo "     -d '$(example_body "$name")'"
    done
}

worker_status() {  # worker_status NAME: READY, another state, or empty
    curl -s -H "Authorization: Bearer $(key management)" "$MANAGEMENT/models/$1" |
        "$VENV_BIN/python" -c 'import json, sys
try: print(json.load(sys.stdin)[0]["workers"][0]["status"])
except Exception: print("")' || true
}

wait_ready() {  # until the worker of every model is READY
    local pid=$1 deadline=$((SECONDS + ${STARTUP_WAIT:-1200})) name waiting=$ARCHIVES still
    echo -n "serve: waiting for the workers of: $ARCHIVES (load, compile, warm-up)"
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo; echo "serve: TorchServe exited during start-up; last log lines:" >&2
            tail -n 40 "$STATE/logs/ts_log.log" >&2 || true
            return 1
        fi
        if [[ -f $STATE/key_file.json ]]; then
            still=""
            for name in $waiting; do
                if [[ $(worker_status "$name") == READY ]]; then echo -n " $name ready"; else still+="$name "; fi
            done
            waiting=$still
            if [[ -z $waiting ]]; then echo; return 0; fi
        fi
        echo -n "."
        sleep 3
    done
    echo; echo "serve: not ready after ${STARTUP_WAIT:-1200} s: $waiting; see $STATE/logs" >&2
    return 1
}

start() {
    local pid
    if pid=$(running_pid); then
        echo "serve: TorchServe already running (PID $pid); 'make stop' first to restart it. Try:"
        example
        return 0
    fi
    archives
    rm -rf "$STATE/tmp" "$STATE/key_file.json"
    mkdir -p "$STATE/logs" "$STATE/tmp"
    local -a registered
    read -ra registered <<<"$(models)"
    # TEMP/TMPDIR private to this instance: TorchServe keeps its PID file, worker sockets and
    # unpacked archives there, so another TorchServe on the machine does not collide with it.
    (cd "$STATE" && TEMP=$STATE/tmp TMPDIR=$STATE/tmp LOG_LOCATION=$STATE/logs METRICS_LOCATION=$STATE/logs \
        torchserve --start --ncs --ts-config "$CONFIG" --model-store "$ROOT/model_store" \
        --models "${registered[@]}" >"$STATE/logs/launcher.log" 2>&1)
    for _ in $(seq 50); do [[ -s $STATE/tmp/.model_server.pid ]] && break; sleep 0.2; done
    pid=$(cat "$STATE/tmp/.model_server.pid")
    echo "$pid" >"$PIDFILE"
    echo "serve: TorchServe started (PID $pid, logs in runs/serve/logs, tokens in runs/serve/key_file.json)"
    wait_ready "$pid" || { stop; return 1; }
    echo "serve: ready: $(for name in $ARCHIVES; do echo -n "$INFERENCE/predictions/$name "; done)"
    echo "Try:"
    example
    echo "serve: (the inference token expires after 60 min by default; 'make stop && make serve' issues new ones)"
}

stop() {
    local pid
    if ! pid=$(running_pid); then
        echo "serve: not running"
        rm -f "$PIDFILE"
        return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "serve: PID $pid did not stop within 60 s; sending SIGKILL" >&2
        kill -KILL "$pid"
    fi
    rm -f "$PIDFILE"
    echo "serve: stopped (PID $pid)"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    archives) archives ;;
    models) models ;;
    status) if pid=$(running_pid); then echo "running (PID $pid)"; else echo "not running"; exit 1; fi ;;
    *) echo "usage: $0 start|stop|archives|models|status" >&2; exit 2 ;;
esac
