"""TorchServe handler of the `classify` model: POST /predictions/classify → VGG-16 per step.

The service is `ldmprobe.serve.classify.ClassifyService` (its settings: `ClassifyConfig`, the
`handler:` section of classify-config.yaml); ts_adapter.py does the rest. Weights never appear
silently: `classifier` names VGG-16 weights or says `random`; `tiny_decoder` is empty (decoder
"tiny" is a 400), a TAESD folder / hub id, or `random`.
"""

from __future__ import annotations

from ts_adapter import ServiceHandler

from ldmprobe.serve.classify import ClassifyService


class ClassifyHandler(ServiceHandler):
    service = ClassifyService
