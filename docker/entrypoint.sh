#!/usr/bin/env bash
# Container entry point: build the archives of the served models (ARCHIVES, default "probe
# classify") for the mounted weights (MODEL, BANK, CLASSIFIER, TINY_DECODER; the built-in scenes model with
# its shipped bank and a random-init VGG-16 when unset), then run TorchServe in the foreground
# as PID 1 with docker/config.properties, every archive registered. Tokens are written to
# /app/runs/serve/key_file.json (read them with: docker exec CONTAINER cat /app/runs/serve/key_file.json).
set -euo pipefail
cd /app
export ARCHIVES=${ARCHIVES:-probe classify intervene} MODEL=${MODEL:-scenes} BANK=${BANK:-}
export CLASSIFIER=${CLASSIFIER:-} TINY_DECODER=${TINY_DECODER:-}
scripts/serve.sh archives
read -ra models <<<"$(scripts/serve.sh models)"   # probe=probe.mar classify=classify.mar intervene=intervene.mar
mkdir -p runs/serve/logs runs/serve/tmp
cd runs/serve
export TEMP=/app/runs/serve/tmp TMPDIR=/app/runs/serve/tmp LOG_LOCATION=/app/runs/serve/logs
exec torchserve --start --foreground --ncs --ts-config /app/docker/config.properties \
    --model-store /app/model_store --models "${models[@]}"
