"""TorchServe handler of the `intervene` model: POST /predictions/intervene → the object moved.

A thin adapter, like probe_handler.py and classify_handler.py: settings from the `handler:`
section of the archive's model-config.yaml, an `ldmprobe.intervene_service.InterveneService`
built once (model + the packed probe bank; U-Net compiled and warmed with one short
intervention), and per TorchServe batch one service call whose outcomes become per-request
HTTP statuses and JSON bodies (ts_adapter.py, packed beside this file). Nothing raises out of
`handle`, so bad input never costs a worker restart.
"""

from __future__ import annotations

from typing import Any

from ts_adapter import ServiceHandler

DEFAULTS: dict[str, Any] = {
    "model": "tiny",  # "tiny", a diffusers SD folder (absolute, or relative to the archive), or a hub id
    "bank": "bank.safetensors",  # packed into the archive by build_archives.sh; required (no random fallback)
    "device": "auto",  # auto: the GPU TorchServe assigned to this worker, else CPU
    "dtype": "auto",
    "attention": "sdpa",
    "compile": True,  # the U-Net and the Adam step
    "cache_dir": "",  # inductor cache folder; "" = $TORCHINDUCTOR_CACHE_DIR
    "warm_batch_sizes": [1],  # unused beyond 1: interventions run one at a time
    "warm_settings": {},  # request fields of the warm-up intervention (e.g. height, width)
    "max_side": 0,  # largest height/width; 0 = twice the model's default size
    "max_steps": 50,
    "max_work": 16384,  # iterations × edited layers × edited steps per request (study default 5760)
}


class InterveneHandler(ServiceHandler):
    """initialize: load model + bank, compile, warm. handle: the requests of a batch in turn."""

    name = "intervene"
    DEFAULTS = DEFAULTS

    def load(self, cfg: dict[str, Any]):
        from ldmprobe.intervene_service import InterveneService

        return InterveneService.load(
            self.path(cfg["model"]), self.path(cfg["bank"]) or None, device=self.device, dtype=cfg["dtype"],
            attention=cfg["attention"], compile=bool(cfg["compile"]), cache_dir=cfg["cache_dir"] or None,
            max_side=int(cfg["max_side"]) or None, max_steps=int(cfg["max_steps"]), max_work=int(cfg["max_work"]))
