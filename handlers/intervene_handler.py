"""TorchServe handler of the `intervene` model: POST /predictions/intervene → the object moved.

The service is `ldmprobe.serve.intervene.InterveneService` (its settings: `InterveneConfig`, the
`handler:` section of intervene-config.yaml, a probe bank required); ts_adapter.py does the
rest. The requests of a batch run one after the other.
"""

from __future__ import annotations

from ts_adapter import ServiceHandler

from ldmprobe.serve.intervene import InterveneService


class InterveneHandler(ServiceHandler):
    service = InterveneService
