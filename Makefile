# ldmprobe — two commands on a fresh machine:
#   make serve   set everything up, run the main job on the built-in `scenes` model
#   make test    set everything up, run the test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-10)
# One inductor cache inside the clone, shared by tests, benches and the demo.
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor

MODEL ?= scenes
PROMPT ?= a red apple on a wooden table
SEED ?= 5107435
STEPS ?= 15
OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
COMPILE ?=
BANK ?=
BATCH_SIZE ?=
# the served models (handlers/<name>_handler.py + handlers/<name>-config.yaml each)
ARCHIVES ?= probe classify intervene
# classify: VGG-16 weights (file, folder, hub id; empty = the config's `random` demo classifier)
# and a TAESD folder for decoder "tiny" (empty = none)
CLASSIFIER ?=
TINY_DECODER ?=
SERVE_ENV = ARCHIVES="$(ARCHIVES)" MODEL="$(MODEL)" BANK="$(BANK)" COMPILE="$(COMPILE)" BATCH_SIZE="$(BATCH_SIZE)" \
	CLASSIFIER="$(CLASSIFIER)" TINY_DECODER="$(TINY_DECODER)"

.PHONY: install serve stop archives demo test test-fast bench lint clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# TorchServe on 127.0.0.1 with the probe and classify models (scripts/serve.sh): fits a small
# bank for `tiny` when none exists (`scenes` ships its bank), builds model_store/probe.mar and classify.mar, starts in the
# background, waits until every worker is ready, prints a curl per model with the token. Real
# weights: make serve MODEL=/path BANK=/path CLASSIFIER=/path/vgg16.safetensors TINY_DECODER=/path/taesd
serve: install
	$(SERVE_ENV) scripts/serve.sh start

stop:
	scripts/serve.sh stop

archives: install
	$(SERVE_ENV) scripts/serve.sh archives

# The CLI demo: one generation with in-graph capture of all 16 self-attention layers, per-step
# previews and the activation store (PROMPT, SEED, STEPS, OUT, COMPILE=1).
demo: install
	$(BIN)/ldmprobe generate --model "$(MODEL)" --prompt "$(PROMPT)" --seed $(SEED) --steps $(STEPS) \
		--layers all --previews --out "$(OUT)" $(if $(COMPILE),--compile --cache-dir .cache/inductor)

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python bench/capture.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache runs model_store/*.mar .pytest_cache
