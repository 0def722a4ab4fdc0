"""What every ldmprobe TorchServe handler shares: config, paths, bodies, device, JSON answers.

scripts/build_archives.sh packs this file into every archive (--extra-files); TorchServe
unpacks it next to the handler in the model folder, which is on the worker's sys.path, so a
handler imports it as `ts_adapter`. A handler subclasses `ServiceHandler` and names its service
class (`ldmprobe.serve.*`); the service's `Config` (a pydantic model) declares the keys its
model-config.yaml `handler:` section may set, with their defaults. Everything else (validating
that section, paths inside the archive, the device, per-request HTTP status, the JSON answers,
the guard that keeps a worker alive when the adapter itself fails) lives here once.

The services take raw bodies and return Outcome(status, body) without raising; this module only
translates between them and TorchServe.
"""

from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from typing import Any

from ts.torch_handler.base_handler import BaseHandler

from ldmprobe.serve.base import path_settings, resolve

logger = logging.getLogger(__name__)

JSON = "application/json"


def handler_config(context, config_model):
    """model-config.yaml's `handler:` section validated into the service's config model (unknown
    keys refused: a misspelt setting must fail the worker's start, not be silently ignored)."""
    from pydantic import ValidationError

    section = dict((getattr(context, "model_yaml_config", None) or {}).get("handler") or {})
    unknown = sorted(set(section) - set(config_model.model_fields))
    if unknown:
        raise ValueError(f"model-config.yaml handler section: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(config_model.model_fields)}")
    try:
        return config_model.model_validate(section)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"model-config.yaml handler section: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


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
    """initialize: handler config → the service (model loaded, compiled, warmed).
    handle: one service call per TorchServe batch → per-request status and JSON.

    Subclasses set `service` (an `ldmprobe.serve` service class); a handler that streams
    overrides `respond`."""

    service: Any = None  # the service class; an instance replaces it once initialised
    stream_type = JSON

    @property
    def name(self) -> str:
        return type(self).__name__.removesuffix("Handler").lower()

    def initialize(self, context) -> None:
        started = time.perf_counter()
        self.context = context
        props = context.system_properties
        model_dir = props.get("model_dir") or "."
        self.batch_size = int(props.get("batch_size") or 1)
        service_class = type(self).service
        config = handler_config(context, service_class.Config)
        resolved = {name: resolve(str(getattr(config, name)), model_dir) for name in path_settings(service_class.Config)}
        self.device = pick_device(config.device, props.get("gpu_id"))
        self.config = config.model_copy(update=resolved | {"device": self.device})
        self.service = service_class.from_config(self.config, max_batch=self.batch_size)
        warm_s = self.service.warm()
        logger.info("%s handler ready: device %s, batch %d, warm-up %.1f s, start %.1f s; config %s", self.name,
                    self.device, self.batch_size, warm_s, time.perf_counter() - started, self.config.model_dump_json())
        self.initialized = True

    def respond(self, bodies, decoded, context) -> tuple[list, set[int]]:
        """(outcomes, indices of requests answered as a stream)."""
        return self.service.handle(bodies, decoded=decoded), set()

    def handle(self, data, context):
        self.context = context
        try:
            bodies, decoded = zip(*[request_body(row, context, i) for i, row in enumerate(data)], strict=True)
            outcomes, streamed = self.respond(list(bodies), list(decoded), context)
            return json_answers(context, outcomes, streamed, self.stream_type)
        except Exception as exc:  # the services never raise; this guards the adapter itself
            logger.exception("%s handler failed", self.name)
            return failure_answers(context, len(data), exc)
