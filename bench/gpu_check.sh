#!/usr/bin/env bash
# GPU check of ldmprobe (bench/gpu_check.py): the Triton probe kernel, the SD v1.4 U-Net eager /
# compiled / capture / CUDA graphs / xformers, and the probe service's stages, in ≤ 8 minutes on
# one GPU. Each section runs in its own process under its own timeout, so one failure or hang
# does not lose the others; each writes OUT/<section>.json as it goes; the end writes
# OUT/summary.json, OUT/log.txt (stderr of everything) and prints one summary JSON line.
#
#   bench/gpu_check.sh [--dry-run] [--wheels DIR] [OUT]
#
# OUT: the output folder (default: $OUT, else runs/gpu-check). --wheels DIR: pip-install DIR/*.whl
# with --no-index --no-deps into /tmp/site first and put it on PYTHONPATH (a machine without
# diffusers & co.: bench/fetch_gpu_wheels.sh prepares .whl/). --dry-run: the same code paths on
# CPU at tiny shapes (about a minute). PYTHON picks the interpreter (default: the checkout's
# .venv/bin/python when there is one, else python3).
# Exit status: 0 when every section finished without an error, 1 otherwise, 2 for bad arguments.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
[[ -n ${PYTHON:-} || ! -x $ROOT/.venv/bin/python ]] || PY=$ROOT/.venv/bin/python  # a `make` checkout
DRY=()
WHEELS=""
DEST=""
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }  # the header
die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }
while (($#)); do
    case $1 in
        --dry-run) DRY=(--dry-run) ;;
        --wheels) [[ $# -ge 2 ]] || die "--wheels needs a folder"; WHEELS=$2; shift ;;
        --wheels=*) WHEELS=${1#--wheels=} ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z $DEST ]] || die "one output folder only, got $DEST and $1"; DEST=$1 ;;
    esac
    shift
done
DEST=${DEST:-${OUT:-$ROOT/runs/gpu-check}}
mkdir -p "$DEST" || die "cannot create $DEST"
LOG=$DEST/log.txt
: >"$LOG"
START=$SECONDS

if [[ -n $WHEELS ]]; then
    compgen -G "$WHEELS/*.whl" >/dev/null || die "no wheels in $WHEELS"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$WHEELS"/*.whl >>"$LOG" 2>&1; then
        echo "gpu_check.sh: the wheel install failed; see $LOG" >&2
        exit 1
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    echo "gpu_check.sh: installed $(ls "$WHEELS"/*.whl | wc -l) wheels into /tmp/site in $((SECONDS - START)) s" >>"$LOG"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ldmprobe-inductor}  # shared by unet and service

# section:timeout seconds (the section's own budget is 15 s less). Sum with install and start-up
# ≤ 8 min; the unet section compiles first (cold), the service then reuses its inductor cache.
# A dry run (CPU, not bound by the device's minutes) gets twice as long: shared CPUs are slow.
SECTIONS=(env:20 kernel:40 unet:270 service:120)
SCALE=$(( ${#DRY[@]} ? 2 : 1 ))
RCS=()
for entry in "${SECTIONS[@]}"; do
    name=${entry%%:*} limit=$(( ${entry##*:} * SCALE ))
    echo "=== $name (timeout ${limit} s) at $((SECONDS - START)) s" >>"$LOG"
    timeout -k 10 "$limit" "$PY" "$ROOT/bench/gpu_check.py" --section "$name" --out "$DEST" \
        --budget-s $((limit - 15)) "${DRY[@]}" 2>>"$LOG" >"$DEST/.$name.line"
    rc=$?
    RCS+=(--rc "$name=$rc")
    cat "$DEST/.$name.line" >>"$LOG"
    rm -f "$DEST/.$name.line"
    ((rc == 0)) || echo "gpu_check.sh: section $name exited $rc$( ((rc == 124 || rc == 137)) && echo ' (timeout)')" >&2
done
echo "=== summary at $((SECONDS - START)) s" >>"$LOG"
"$PY" "$ROOT/bench/gpu_check.py" --summary --out "$DEST" "${RCS[@]}" "${DRY[@]}" 2>>"$LOG"
