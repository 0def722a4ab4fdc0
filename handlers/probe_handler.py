"""TorchServe handler of the `probe` model: POST /predictions/probe → probe maps per step.

The service is `ldmprobe.serve.probe.ProbeService` (its settings: `ProbeConfig`, the `handler:`
section of probe-config.yaml); ts_adapter.py does the rest. This file adds streaming: with
"stream": true a request is answered one newline-delimited JSON chunk per denoising step, via
TorchServe's intermediate responses.
"""

from __future__ import annotations

import json
from typing import Any

from ts.handler_utils.utils import send_intermediate_predict_response
from ts_adapter import ServiceHandler

from ldmprobe.serve.probe import ProbeService

NDJSON = "application/x-ndjson"


class ProbeHandler(ServiceHandler):
    service = ProbeService
    stream_type = NDJSON

    def respond(self, bodies, decoded, context):
        streamed: set[int] = set()

        def on_step(i: int, chunk: dict[str, Any]) -> None:
            streamed.add(i)
            context.set_response_content_type(i, NDJSON)
            send_intermediate_predict_response({i: json.dumps(chunk) + "\n"}, {i: context.request_ids[i]},
                                               "Intermediate response", 200, context)

        return self.service.handle(bodies, decoded=decoded, on_step=on_step), streamed
