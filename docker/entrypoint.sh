#!/usr/bin/env bash
# Container entry point: build the probe archive for the mounted weights (MODEL, BANK; the tiny
# model and a freshly fitted bank when unset), then run TorchServe in the foreground as PID 1
# with docker/config.properties. Tokens are written to /app/runs/serve/key_file.json
# (read them with: docker exec CONTAINER cat /app/runs/serve/key_file.json).
set -euo pipefail
cd /app
export MODEL=${MODEL:-tiny} BANK=${BANK:-}
scripts/serve.sh archives
mkdir -p runs/serve/logs runs/serve/tmp
cd runs/serve
export TEMP=/app/runs/serve/tmp TMPDIR=/app/runs/serve/tmp LOG_LOCATION=/app/runs/serve/logs
exec torchserve --start --foreground --ncs --ts-config /app/docker/config.properties \
    --model-store /app/model_store --models probe=probe.mar
