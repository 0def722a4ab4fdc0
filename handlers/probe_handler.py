"""TorchServe handler of the `probe` model: POST /predictions/probe → probe maps per step.

A thin adapter: it reads its settings from the `handler:` section of the archive's
model-config.yaml, builds an `ldmprobe.service.ProbeService` (model + probe bank, U-Net compiled
once and warmed), and per TorchServe batch turns the raw bodies into the service's outcomes:
per-request HTTP status (400 bodies name the field), JSON or, for "stream": true, one
newline-delimited JSON chunk per denoising step via TorchServe's intermediate responses.
The generic parts (config, bodies, status, the 500 guard) are `ts_adapter.py`, packed beside
this file; nothing raises out of `handle`, so bad input never costs a worker restart.
"""

from __future__ import annotations

import json
from typing import Any

from ts.handler_utils.utils import send_intermediate_predict_response
from ts_adapter import ServiceHandler

NDJSON = "application/x-ndjson"
DEFAULTS: dict[str, Any] = {
    "model": "tiny",  # "tiny", a diffusers SD folder (absolute, or relative to the archive), or a hub id
    "bank": "bank.safetensors",  # relative to the archive (an --extra-files entry) or absolute; "" = random demo bank
    "device": "auto",  # auto: the GPU TorchServe assigned to this worker, else CPU
    "dtype": "auto",
    "attention": "sdpa",
    "compile": True,
    "cache_dir": "",  # inductor cache folder; "" = $TORCHINDUCTOR_CACHE_DIR (the Makefile exports it)
    "warm_batch_sizes": [1],  # padded batch sizes compiled at start-up
    "warm_settings": {},  # request fields of the warm-up request (shape: height, width, guidance)
    "max_side": 0,  # largest height/width served; 0 = twice the model's default size
    "max_steps": 50,
}


class ProbeHandler(ServiceHandler):
    """initialize: load + compile + warm. handle: one service call per TorchServe batch,
    streamed requests answered chunk by chunk."""

    name = "probe"
    DEFAULTS = DEFAULTS
    stream_type = NDJSON

    def load(self, cfg: dict[str, Any]):
        from ldmprobe.service import ProbeService

        return ProbeService.load(
            self.path(cfg["model"]), self.path(cfg["bank"]) or None, device=self.device, dtype=cfg["dtype"],
            attention=cfg["attention"], compile=bool(cfg["compile"]), cache_dir=cfg["cache_dir"] or None,
            max_batch=self.batch_size, max_side=int(cfg["max_side"]) or None, max_steps=int(cfg["max_steps"]))

    def respond(self, bodies, decoded, context):
        streamed: set[int] = set()

        def on_step(i: int, chunk: dict[str, Any]) -> None:
            streamed.add(i)
            context.set_response_content_type(i, NDJSON)
            send_intermediate_predict_response({i: json.dumps(chunk) + "\n"}, {i: context.request_ids[i]},
                                               "Intermediate response", 200, context)

        return self.service.handle(bodies, on_step=on_step, decoded=decoded), streamed
