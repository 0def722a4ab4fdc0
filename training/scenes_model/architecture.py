"""Component configs of the scenes model and its tokenizer.

The U-Net has SD v1.4's block structure (CrossAttnDown ×3 + Down, a cross-attention mid block,
Up + CrossAttnUp ×3, two resnets per block), so the layer registry finds the same 16 attn1 layers
(`enc1.0 … dec4.2`). Widths were chosen by measured training speed on 2 CPU cores at batch 32:
(32, 64, 64, 64) costs 0.76 s/step (3.3 M parameters); (48, 64, 96, 96) cost 4× more. The VAE
down-samples ×8 to 4 latent channels like SD's; its narrow first block (16 channels at 128²)
keeps a training step under a second; it trains on random 64² crops (a convolutional autoencoder
is local), 4× cheaper per sample than whole images. The text encoder is a 2-layer CLIP text transformer over a
word-level BPE vocabulary: every caption word is one token, as in CLIP for common words.
The noise schedule is SD's (scaled_linear 0.00085–0.012, 1000 steps, epsilon prediction).
"""

from __future__ import annotations

from ldmprobe.models import sd_v1_4_config

UNET = {
    "sample_size": 16,  # 16×16 latents → 128×128 images
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [32, 64, 64, 64],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,  # diffusers' name for the number of heads in SD-style configs
    "norm_num_groups": 8,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 32, 64, 64],  # four blocks → ×8 down-sampling, as SD's VAE
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    # 4 groups, not 16: with one channel per group GroupNorm is an instance norm, which removes each
    # channel's mean over the image (a flat colour) — measured: a 16-group VAE kept colour so poorly
    # that a nearest-centroid read-out of the object's colour from its latents was right 31 % of the time.
    "norm_num_groups": 4,
    "sample_size": 128,
    "scaling_factor": 1.0,  # replaced after VAE training by 1 / std of the latents, as SD's 0.18215
}
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
# Every word the renderer's captions use (training.scenes.scene_prompt), even outside the model's world.
WORDS = ("a an and on floor sphere box cube cylinder checkered striped red green blue yellow orange purple pink "
         "cyan white black grey beige brown light dark").split()


def scheduler_config() -> dict:
    """SD v1.4's scheduler config: the study's noise schedule and LMS settings apply unchanged."""
    return sd_v1_4_config("scheduler")


def bpe_merges(words) -> list[tuple[str, str]]:
    """BPE merges that build every word (with CLIP's "</w>" end marker) into one symbol: the most
    frequent adjacent pair first, ties broken by the pair itself, so the same words always give the
    same merges (a trainer that breaks ties by hash order gives other ids in another process)."""
    from collections import Counter

    pieces = [[*w[:-1], w[-1] + "</w>"] for w in sorted(set(words))]
    merges = []
    while True:
        pairs = Counter(p for w in pieces for p in zip(w, w[1:], strict=False))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w in pieces:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [w[i] + w[i + 1]]
                i += 1


def build_tokenizer():
    """A CLIPTokenizer whose BPE merges build each caption word into one token; other text falls back
    to byte-level characters (never an error). Deterministic: merges come from a fixed word list."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    merges = bpe_merges(WORDS)
    vocab: dict[str, int] = {}
    for symbol in [*alphabet, *(ch + "</w>" for ch in alphabet), *(a + b for a, b in merges)]:
        vocab.setdefault(symbol, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_components(seed: int, size: int = 128):
    """Fresh (untrained) U-Net, VAE and text encoder, deterministic for a seed, plus the tokenizer.
    ``size`` (pixels) only sets the configs' sample sizes, so the exported folder's default image
    size is the one it was trained at; the weights do not depend on it."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**UNET, "sample_size": size // 8})
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**{**VAE, "sample_size": size})
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                                 eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **TEXT)
    text_encoder = CLIPTextModel(text_config)
    return unet, vae, text_encoder, tokenizer
