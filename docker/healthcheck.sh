#!/usr/bin/env bash
# Docker HEALTHCHECK: TorchServe 0.12 answers /ping only with the inference token, so read it
# from the key file TorchServe wrote at start-up.
set -euo pipefail
key=$(/app/.venv/bin/python -c 'import json; print(json.load(open("/app/runs/serve/key_file.json"))["inference"]["key"])')
curl -fsS -H "Authorization: Bearer $key" http://127.0.0.1:8080/ping
