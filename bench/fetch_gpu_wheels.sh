#!/usr/bin/env bash
# Download the wheels of bench/gpu_wheels.txt for the GPU machine (CPython 3.12, manylinux x86-64)
# into .whl/ (or DIR), with the pip command of the device notes, and check their total size.
#
#   bench/fetch_gpu_wheels.sh [DIR]      (default: .whl in the checkout; ignored by git)
#
# Then on the GPU machine: bench/gpu_check.sh --wheels .whl "$OUT". PYTHON picks the pip's
# interpreter (default: python3; any version: pip downloads for --python-version 3.12).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$ROOT/.whl}
PY=${PYTHON:-python3}
LIMIT_MIB=60
mkdir -p "$DIR"
mapfile -t PKGS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$ROOT/bench/gpu_wheels.txt")
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
    PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DIR" "${PKGS[@]}"
# one version of each package only (two stop the install on the machine)
dupes=$(ls "$DIR"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[[ -z $dupes ]] || { echo "fetch_gpu_wheels.sh: error: several versions of: $dupes (empty $DIR first)" >&2; exit 1; }
count=$(ls "$DIR"/*.whl | wc -l)
kib=$(du -ck "$DIR"/*.whl | tail -1 | cut -f1)
echo "fetch_gpu_wheels.sh: $count wheels, $((kib / 1024)) MiB in $DIR (limit $LIMIT_MIB MiB)"
((count == ${#PKGS[@]})) || { echo "fetch_gpu_wheels.sh: error: expected ${#PKGS[@]} wheels" >&2; exit 1; }
((kib < LIMIT_MIB * 1024)) || { echo "fetch_gpu_wheels.sh: error: over $LIMIT_MIB MiB" >&2; exit 1; }
