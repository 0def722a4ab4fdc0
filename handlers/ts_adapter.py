"""What every ldmprobe TorchServe handler shares: config, paths, bodies, device, JSON answers.

scripts/build_archives.sh packs this file into every archive (--extra-files); TorchServe
unpacks it next to the handler in the model folder, which is on the worker's sys.path, so a
handler imports it as `ts_adapter`. A handler subclasses `ServiceHandler`, names its DEFAULTS
(the keys its model-config.yaml `handler:` section may set) and builds its service in `load`;
everything else (the config check, per-request HTTP status, the JSON answers, the guard that
keeps a worker alive when the adapter itself fails) lives here once.

The services (ldmprobe.service, ldmprobe.classify_service) take raw bodies and return
Outcome(status, body) without raising; this module only translates between them and TorchServe.
"""

from __future__ import annotations

import json
import logging
import os
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

JSON = "application/json"


def handler_config(context, defaults: dict[str, Any]) -> dict[str, Any]:
    """`defaults` updated by model-config.yaml's `handler:` section (unknown keys refused: a
    misspelt setting must fail the worker's start, not be silently ignored)."""
    section = dict((getattr(context, "model_yaml_config", None) or {}).get("handler") or {})
    unknown = sorted(set(section) - set(defaults))
    if unknown:
        raise ValueError(f"model-config.yaml handler section: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(defaults)}")
    return defaults | section


def resolve(value: str, model_dir: str) -> str:
    """Relative paths name files inside the archive; `tiny`, `random`, hub ids and absolute
    paths pass through."""
    if not value or value == "tiny" or os.path.isabs(value):
        return value
    inside = Path(model_dir) / value
    return str(inside) if inside.exists() else value


def request_body(row: Any, context, idx: int) -> tuple[Any, bool]:
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


def pick_device(setting: str, gpu_id: Any) -> str:
    """`auto`: the GPU TorchServe assigned to this worker when CUDA is there, else the CPU."""
    if setting != "auto":
        return setting
    import torch

    return f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"


def json_answers(context, outcomes, streamed: set[int] | frozenset[int] = frozenset(),
                 stream_type: str = JSON) -> list[str]:
    """One JSON text per request, with its own HTTP status and content type (a streamed
    request's final chunk keeps the stream's content type and ends its line)."""
    answers = []
    for i, outcome in enumerate(outcomes):
        context.set_response_content_type(i, stream_type if i in streamed else JSON)
        if outcome.status != 200:
            context.set_response_status(outcome.status, HTTPStatus(outcome.status).phrase, i)
        answers.append(json.dumps(outcome.body) + ("\n" if i in streamed else ""))
    return answers


def failure_answers(context, count: int, exc: BaseException) -> list[str]:
    """A 500 with an ErrorBody for every request of the batch."""
    body = json.dumps({"error": "internal", "field": "", "message": f"{type(exc).__name__}: {exc}"})
    for i in range(count):
        context.set_response_status(500, "Internal Server Error", i)
        context.set_response_content_type(i, JSON)
    return [body] * count


class ServiceHandler(BaseHandler):
    """initialize: handler config → `load` (the service: model loaded, compiled, warmed).
    handle: one service call per TorchServe batch → per-request status and JSON.

    Subclasses set `name` and DEFAULTS and implement `load(cfg)`; a handler that streams
    overrides `respond`."""

    name = "model"
    DEFAULTS: dict[str, Any] = {}

    def initialize(self, context) -> None:
        started = time.perf_counter()
        self.context = context
        props = context.system_properties
        self.model_dir = props.get("model_dir") or "."
        self.batch_size = int(props.get("batch_size") or 1)
        self.config = handler_config(context, self.DEFAULTS)
        self.device = pick_device(str(self.config.get("device", "auto")), props.get("gpu_id"))
        self.service = self.load(self.config)
        sizes = [s for s in self.config.get("warm_batch_sizes", [1]) if s <= self.batch_size] or [1]
        warm_s = self.service.warm(sizes, self.config.get("warm_settings") or {})
        logger.info("%s handler ready: device %s, batch %d, warm-up %.1f s, start %.1f s; config %s", self.name,
                    self.device, self.batch_size, warm_s, time.perf_counter() - started, json.dumps(self.config))
        self.initialized = True

    def load(self, cfg: dict[str, Any]):
        raise NotImplementedError

    def path(self, value: Any) -> str:
        """A config value naming a file or folder: inside the archive when it is there."""
        return resolve(str(value or ""), self.model_dir)

    def respond(self, bodies, decoded, context) -> tuple[list, set[int]]:
        """(outcomes, indices of requests answered as a stream)."""
        return self.service.handle(bodies, decoded=decoded), set()

    def handle(self, data, context):
        self.context = context
        try:
            bodies, decoded = zip(*[request_body(row, context, i) for i, row in enumerate(data)], strict=True)
            outcomes, streamed = self.respond(list(bodies), list(decoded), context)
            return json_answers(context, outcomes, streamed, getattr(self, "stream_type", JSON))
        except Exception as exc:  # the services never raise; this guards the adapter itself
            logger.exception("%s handler failed", self.name)
            return failure_answers(context, len(data), exc)
