import json

import pytest
import torch

from ldmprobe.models import (
    BackendUnavailableError,
    ModelSourceError,
    check_sd_folder,
    load_model,
    save_model,
    sd_v1_4_config,
)


def test_tiny_has_sd14_block_structure_and_is_deterministic(tiny):
    sd = sd_v1_4_config("unet")
    cfg = tiny.unet.config
    for key in ("down_block_types", "up_block_types", "layers_per_block", "in_channels", "out_channels"):
        assert list(cfg[key]) == list(sd[key]) if isinstance(sd[key], list) else cfg[key] == sd[key], key
    assert cfg["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert sum(1 for n, _ in tiny.unet.named_modules() if n.endswith(".attn1")) == 16
    again = load_model("tiny")
    for (name, a), (_, b) in zip(tiny.unet.state_dict().items(), again.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(tiny.encode_prompts(["a red apple"]), again.encode_prompts(["a red apple"]))
    assert again.identity == tiny.identity


def test_tiny_defaults_and_metadata(tiny):
    assert tiny.device.type == "cpu" and tiny.dtype == torch.float32  # fp32 on CPU by default
    assert tiny.default_size == 128 and tiny.vae_scale_factor == 8
    meta = tiny.metadata()
    assert meta == {"model": "tiny", "model_identity": tiny.identity, "attention": "sdpa", "dtype": "float32",
                    "device": "cpu"}
    # Different prompts give different text embeddings (the tokenizer is real, not a stub).
    a, b = tiny.encode_prompts(["a red apple", "a blue car"])
    assert not torch.allclose(a, b)
    assert tiny.tokenizer.decode(tiny.tokenizer("a red apple").input_ids, skip_special_tokens=True) == "a red apple"


def test_dtype_is_overridable():
    m = load_model("tiny", dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and next(m.unet.parameters()).dtype == torch.bfloat16
    assert m.metadata()["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("tiny", dtype="float8")


def test_local_diffusers_folder_round_trip(tiny, tmp_path):
    folder = save_model(tiny, tmp_path / "sd")
    check_sd_folder(folder)
    loaded = load_model(str(folder))
    assert loaded.identity == tiny.identity
    x = torch.randn(2, 4, 16, 16)
    emb = tiny.encode_prompts(["", "a dog"])
    assert torch.equal(loaded.encode_prompts(["", "a dog"]), emb)
    with torch.no_grad():
        want = tiny.unet(x, 500, encoder_hidden_states=emb).sample
        got = loaded.unet(x, 500, encoder_hidden_states=emb).sample
    assert torch.allclose(got, want, atol=1e-6)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a folder"):
        load_model(str(tmp_path / "file.bin"))


def test_folder_that_is_not_sd_names_what_is_missing(tiny, tmp_path):
    folder = save_model(tiny, tmp_path / "sd")
    (folder / "vae" / "config.json").unlink()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelSourceError) as err:
        load_model(str(folder))
    msg = str(err.value)
    assert "vae/config.json" in msg and "unet/diffusion_pytorch_model.safetensors" in msg
    assert "text_encoder" not in msg  # only what is really missing
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelSourceError, match="unet/config.json.*tokenizer"):
        load_model(str(empty))


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="could not download 'CompVis/stable-diffusion-v1-4'.*local"):
        load_model("CompVis/stable-diffusion-v1-4")


def test_xformers_on_cpu_says_why():
    with pytest.raises(BackendUnavailableError, match="no CPU kernels"):
        load_model("tiny", attention="xformers")
    with pytest.raises(BackendUnavailableError, match="unknown attention backend"):
        load_model("tiny", attention="flash9")


def test_shipped_sd14_configs_are_the_real_ones():
    unet = sd_v1_4_config("unet")
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    sched = sd_v1_4_config("scheduler")
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert json.loads(json.dumps(sd_v1_4_config("text_encoder")))["hidden_size"] == 768
