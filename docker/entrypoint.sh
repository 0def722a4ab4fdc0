#!/usr/bin/env bash
# Container entry point: the same `make serve` as on a bare machine (MODEL, PROMPT, SEED… from
# the environment). Until the TorchServe service lands this runs the CLI demo into /app/runs.
set -euo pipefail
cd /app
exec make serve MODEL="${MODEL:-tiny}" COMPILE="${COMPILE:-1}" "$@"
