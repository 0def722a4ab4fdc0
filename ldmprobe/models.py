"""Model sources: the built-in `scenes` (trained here) and `tiny` (random) models, a local diffusers
folder, or a hub id.

All of them produce the same `SDModel`: U-Net, VAE, CLIP text encoder + tokenizer, scheduler
config, device/dtype and the attention backend. Nothing here knows about capture; the
capturing wrapper (ldmprobe.capture) is built on top of `SDModel.unet`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .layers import LayerRegistry

CONFIG_DIR = Path(__file__).parent / "configs"
SD_V1_4_DIR = CONFIG_DIR / "sd-v1-4"
# The scenes model: SD v1.4's architecture scaled down, trained on rendered scenes (training.scenes_model),
# shipped as a diffusers folder with its model card; `world.json` names the scene distribution it learned.
WEIGHTS_DIR = Path(__file__).parent / "weights"
SCENES_DIR = WEIGHTS_DIR / "scenes"
BUILTIN_MODELS = ("scenes", "tiny")
ATTENTION_BACKENDS = ("sdpa", "xformers")

# The tiny model has exactly SD v1.4's block structure (CrossAttnDown×3 + Down, cross-attention
# mid block, Up + CrossAttnUp×3, two resnets per block → 16 attn1 layers) with small channels.
TINY_UNET = {
    "sample_size": 16,  # latent 16×16 → 128×128 images
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [32, 64, 128, 128],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 16, 32, 32],  # four blocks → ×8 down-sampling like SD's VAE
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": 128,
    # Chosen as SD chose 0.18215: 1 / std of the encoder's latents (here on rendered scenes), so
    # latents have unit variance and the noise schedule means what it means for SD.
    "scaling_factor": 2.46,
}
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
TINY_SEED = 0

# Files a diffusers-format SD folder must have (the layout of CompVis/stable-diffusion-v1-4).
REQUIRED_FILES = (
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"),
}
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


class ModelSourceError(ValueError):
    """The model source is missing, incomplete or unreachable; the message says what is missing."""


class BackendUnavailableError(RuntimeError):
    """The requested attention backend cannot run here."""


def sd_v1_4_config(component: str) -> dict[str, Any]:
    """The real SD v1.4 config of one component (unet, vae, text_encoder, scheduler)."""
    return json.loads((SD_V1_4_DIR / f"{component}.json").read_text())


def config_identity(config: dict[str, Any]) -> str:
    """A short hash of a U-Net config: two models with the same identity share layer shapes."""
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    blob = json.dumps(clean, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("device 'cuda' requested but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 on CPU unless asked otherwise."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(names))}")
    return names[dtype]


def attention_processor(backend: str, device: torch.device):
    """The diffusers processor that computes attention for `backend` (checked to run here)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    if backend == "sdpa":
        return AttnProcessor2_0()
    if backend == "xformers":
        if device.type != "cuda":
            raise BackendUnavailableError(
                "attention backend 'xformers' needs a CUDA device: xformers has no CPU kernels; "
                "use the default 'sdpa' backend on CPU")
        try:
            import xformers.ops  # noqa: F401
        except Exception as exc:  # ImportError or a broken build
            raise BackendUnavailableError(f"attention backend 'xformers' is not importable here: {exc}") from exc
        return XFormersAttnProcessor()
    raise BackendUnavailableError(f"unknown attention backend {backend!r}; use one of {', '.join(ATTENTION_BACKENDS)}")


@lru_cache(maxsize=1)
def _tiny_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary without merges: every character is a token (offline, exact)."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=dict(_tiny_vocab()), merges=[], model_max_length=77)


def _build_tiny():
    """Deterministic random-init components built from configs (CPU, fp32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = _tiny_vocab()
    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(TINY_SEED + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(TINY_SEED + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], **TINY_TEXT)
    text_encoder = CLIPTextModel(text_config)
    return unet, vae, text_encoder, tiny_tokenizer(), sd_v1_4_config("scheduler")


def check_sd_folder(path: Path) -> None:
    """Raise ModelSourceError naming every file the folder lacks to be an SD diffusers folder."""
    if not path.exists():
        raise ModelSourceError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelSourceError(f"model path {str(path)!r} is not a folder (expected a diffusers-format SD folder)")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    for comp, names in WEIGHT_NAMES.items():
        if (path / comp).is_dir() and not any((path / comp / n).is_file() for n in names):
            missing.append(f"{comp}/{names[0]} (or .bin)")
    if not any(all((path / "tokenizer" / f).is_file() for f in group) for group in TOKENIZER_FILES):
        missing.append("tokenizer/vocab.json + tokenizer/merges.txt (or tokenizer/tokenizer.json)")
    if missing:
        raise ModelSourceError(
            f"{str(path)!r} is not a Stable Diffusion folder in diffusers format; missing: {', '.join(missing)}")


def _quietly(load):
    """Run a transformers load without its "Loading weights" progress bar: a command's stderr stays
    its one-line error (CLI contract), and a few-MB model loads in milliseconds anyway."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load()
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _load_folder(path: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_sd_folder(path)
    variant = None
    if dtype == torch.float16 and not (path / "unet" / WEIGHT_NAMES["unet"][0]).is_file() and (
            path / "unet" / WEIGHT_NAMES["unet"][2]).is_file():
        variant = "fp16"
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, variant=variant)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, variant=variant)
    text_encoder = _quietly(lambda: CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype))
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return unet, vae, text_encoder, tokenizer, scheduler_config


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"],
            ignore_patterns=["*.ckpt", "*ema*", "safety_checker/*"])
    except Exception as exc:
        raise ModelSourceError(
            f"could not download {repo_id!r} from the hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "pass a local diffusers-format folder instead") from exc
    return Path(local)


@dataclass
class SDModel:
    """The loaded components plus what every output's metadata must record."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    source: str
    device: torch.device
    dtype: torch.dtype
    attention: str
    folder: Path | None = None  # where the weights were read from (None: built in code, e.g. tiny)
    identity: str = field(init=False)

    def __post_init__(self) -> None:
        self.identity = config_identity(self.unet.config)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """Image side in pixels the U-Net was trained at (512 for SD v1.4, 128 for tiny)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def registry(self, height: int | None = None, width: int | None = None) -> LayerRegistry:
        """Layer registry for images of height × width pixels (default size if omitted)."""
        h = (height or self.default_size) // self.vae_scale_factor
        w = (width or self.default_size) // self.vae_scale_factor
        return LayerRegistry.from_config(self.unet.config, (h, w))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP hidden states [N, 77, D] for a list of prompts (empty string = unconditional)."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def world(self) -> dict[str, Any] | None:
        """The scene distribution the model was trained on (`world.json` of its folder), if it says."""
        path = self.folder / "world.json" if self.folder else None
        return json.loads(path.read_text()) if path and path.is_file() else None

    def metadata(self) -> dict[str, Any]:
        return {"model": self.source, "model_identity": self.identity, "attention": self.attention,
                "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device)}


def scenes_folder() -> Path:
    """The shipped scenes model's folder; a clear error where this checkout lacks it."""
    if not (SCENES_DIR / "unet" / "config.json").is_file():
        raise ModelSourceError(
            f"the built-in scenes model is not in {SCENES_DIR}; train it with "
            "`python -m training.scenes_model train --out runs/scenes-model` and copy runs/scenes-model/model there")
    return SCENES_DIR


def load_model(source: str = "scenes", device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, attention: str = "sdpa") -> SDModel:
    """Load `scenes` (the shipped trained model), `tiny` (random weights), a local diffusers folder,
    or a hub id (downloaded when the network allows)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    processor = attention_processor(attention, dev)  # fail before loading gigabytes
    source = str(source)
    path = None
    if source == "tiny":
        parts = _build_tiny()
    else:
        path = scenes_folder() if source == "scenes" else Path(source).expanduser()
        looks_like_hub_id = (not path.exists() and source.count("/") == 1 and not source.startswith((".", "/", "~")))
        if looks_like_hub_id:
            path = _download(source)
        parts = _load_folder(path, dt)
    unet, vae, text_encoder, tokenizer, scheduler_config = parts
    for module in (unet, vae, text_encoder):
        if next(module.parameters()).dtype != dt:
            module.to(dtype=dt)
        module.to(device=dev).eval().requires_grad_(False)
    unet.set_attn_processor(processor)
    return SDModel(unet, vae, text_encoder, tokenizer, scheduler_config, source, dev, dt, attention, path)


def save_model(model: SDModel, path: str | Path) -> Path:
    """Write the model as a diffusers-format folder (the layout `load_model` reads)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(path / "unet")
    model.vae.save_pretrained(path / "vae")
    model.text_encoder.save_pretrained(path / "text_encoder")
    model.tokenizer.save_pretrained(path / "tokenizer")
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
