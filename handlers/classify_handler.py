"""TorchServe handler of the `classify` model: POST /predictions/classify → VGG-16 per step.

A thin adapter, like probe_handler.py: settings from the `handler:` section of the archive's
model-config.yaml, an `ldmprobe.classify_service.ClassifyService` built once (model, VGG-16,
optional tiny decoder; U-Net compiled and warmed), and per TorchServe batch one service call
whose outcomes become per-request HTTP statuses and JSON bodies (ts_adapter.py, packed beside
this file). Nothing raises out of `handle`, so bad input never costs a worker restart.

Weights never appear silently: `classifier` must name VGG-16 weights (a file, a folder, a hub
id) or say `random`; `tiny_decoder` is empty (no tiny decoder: decoder "tiny" is a 400), a
folder / hub id of TAESD weights, or `random`.
"""

from __future__ import annotations

from typing import Any

from ts_adapter import ServiceHandler

DEFAULTS: dict[str, Any] = {
    "model": "tiny",  # "tiny", a diffusers SD folder (absolute, or relative to the archive), or a hub id
    "classifier": "timm/vgg16.tv_in1k",  # VGG-16 weights: file, folder or hub id; "random" only when asked
    "tiny_decoder": "",  # AutoencoderTiny (TAESD) folder or hub id, "random", or "" = none configured
    "input_size": 0,  # classifier input side; 0 = the weights' own (224). Smaller only for cheap tests
    "chunk_size": 8,  # images per decoder + VGG-16 call
    "device": "auto",  # auto: the GPU TorchServe assigned to this worker, else CPU
    "dtype": "auto",
    "attention": "sdpa",
    "compile": True,
    "cache_dir": "",  # inductor cache folder; "" = $TORCHINDUCTOR_CACHE_DIR
    "warm_batch_sizes": [1],  # padded batch sizes compiled at start-up
    "warm_settings": {},  # request fields of the warm-up request (shape: height, width, guidance)
    "max_side": 0,  # largest height/width generated; 0 = twice the model's default size
    "max_steps": 50,
    "max_image_bytes": 0,  # largest real image (decoded bytes); 0 = the library's 20 MiB
    "max_image_pixels": 0,  # largest real image (width × height); 0 = the library's 4096²
}


class ClassifyHandler(ServiceHandler):
    """initialize: load model + classifier (+ tiny decoder), compile, warm. handle: one
    service call per TorchServe batch."""

    name = "classify"
    DEFAULTS = DEFAULTS

    def load(self, cfg: dict[str, Any]):
        from ldmprobe.classify_service import ClassifyService

        return ClassifyService.load(
            self.path(cfg["model"]), self.path(cfg["classifier"]), self.path(cfg["tiny_decoder"]) or None,
            device=self.device, dtype=cfg["dtype"], attention=cfg["attention"],
            input_size=int(cfg["input_size"]) or None, compile=bool(cfg["compile"]),
            cache_dir=cfg["cache_dir"] or None, max_batch=self.batch_size, max_side=int(cfg["max_side"]) or None,
            max_steps=int(cfg["max_steps"]), max_image_bytes=int(cfg["max_image_bytes"]) or None,
            max_image_pixels=int(cfg["max_image_pixels"]) or None, chunk_size=int(cfg["chunk_size"]))
