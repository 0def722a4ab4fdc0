"""TorchServe handler of the `probe` model: POST /predictions/probe → probe maps per step.

A thin adapter: it reads its settings from the `handler:` section of the archive's
model-config.yaml, builds an `ldmprobe.service.ProbeService` (model + probe bank, U-Net compiled
once and warmed), and per TorchServe batch turns the raw bodies into the service's outcomes:
per-request HTTP status (400 bodies name the field), JSON or, for "stream": true, one
newline-delimited JSON chunk per denoising step via TorchServe's intermediate responses.
Nothing here raises out of `handle`, so bad input never costs a worker restart.
"""

from __future__ import annotations

import json
import logging
import os
from http import HTTPStatus
from pathlib import Path
from typing import Any

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

JSON = "application/json"
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


def handler_config(context) -> dict[str, Any]:
    """DEFAULTS updated by model-config.yaml's `handler:` section (unknown keys refused)."""
    section = dict((getattr(context, "model_yaml_config", None) or {}).get("handler") or {})
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"model-config.yaml handler section: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(DEFAULTS)}")
    return DEFAULTS | section


def _resolve(value: str, model_dir: str) -> str:
    """Relative paths name files inside the archive; `tiny` and hub ids pass through."""
    if not value or value == "tiny" or os.path.isabs(value):
        return value
    inside = Path(model_dir) / value
    return str(inside) if inside.exists() else value


def _body(row: Any, context, idx: int) -> tuple[Any, bool]:
    """(body, already decoded): TorchServe json-decodes an application/json body itself (and
    forwards the bytes when that fails); text/* arrives as str, anything else as bytes."""
    if not isinstance(row, dict):
        return row, False
    for key in ("body", "data"):
        if key in row:
            value = row[key]
            try:
                ctype = (context.get_request_header(idx, key) or {}).get("content-type", "")
            except (AttributeError, IndexError, TypeError):
                ctype = ""
            return value, ctype.startswith(JSON) and not isinstance(value, (bytes, bytearray))
    return None, False  # form fields or a multipart upload: not a JSON body


class ProbeHandler(BaseHandler):
    """initialize: load + compile + warm. handle: one service call per TorchServe batch."""

    def initialize(self, context) -> None:
        from ldmprobe.service import ProbeService

        self.context = context
        props = context.system_properties
        model_dir = props.get("model_dir") or "."
        cfg = handler_config(context)
        device = cfg["device"]
        if device == "auto":
            import torch

            gpu = props.get("gpu_id")
            device = f"cuda:{gpu}" if gpu is not None and torch.cuda.is_available() else "cpu"
        batch_size = int(props.get("batch_size") or 1)
        self.service = ProbeService.load(
            _resolve(str(cfg["model"]), model_dir), _resolve(str(cfg["bank"]), model_dir) or None,
            device=device, dtype=cfg["dtype"], attention=cfg["attention"], compile=bool(cfg["compile"]),
            cache_dir=cfg["cache_dir"] or None, max_batch=batch_size, max_side=int(cfg["max_side"]) or None,
            max_steps=int(cfg["max_steps"]))
        sizes = [s for s in cfg["warm_batch_sizes"] if s <= batch_size] or [1]
        warm_s = self.service.warm(sizes, cfg["warm_settings"])
        logger.info("probe handler ready: model %s, bank %s, device %s, compiled %s, batch %d, warm-up %.1f s",
                    cfg["model"], self.service.bank_info["checksum"], device, cfg["compile"], batch_size, warm_s)
        self.initialized = True

    def handle(self, data, context):
        self.context = context
        try:
            bodies, decoded = zip(*[_body(row, context, i) for i, row in enumerate(data)], strict=True)
            streamed: set[int] = set()

            def on_step(i: int, chunk: dict[str, Any]) -> None:
                streamed.add(i)
                context.set_response_content_type(i, NDJSON)
                send_intermediate_predict_response({i: json.dumps(chunk) + "\n"}, {i: context.request_ids[i]},
                                                   "Intermediate response", 200, context)

            outcomes = self.service.handle(bodies, on_step=on_step, decoded=decoded)
            answers = []
            for i, outcome in enumerate(outcomes):
                context.set_response_content_type(i, NDJSON if i in streamed else JSON)
                if outcome.status != 200:
                    context.set_response_status(outcome.status, HTTPStatus(outcome.status).phrase, i)
                answers.append(json.dumps(outcome.body) + ("\n" if i in streamed else ""))
            return answers
        except Exception as exc:  # the service never raises; this guards the adapter itself
            logger.exception("probe handler failed")
            body = json.dumps({"error": "internal", "field": "", "message": f"{type(exc).__name__}: {exc}"})
            for i in range(len(data)):
                context.set_response_status(500, "Internal Server Error", i)
                context.set_response_content_type(i, JSON)
            return [body] * len(data)
