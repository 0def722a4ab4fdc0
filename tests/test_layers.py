import pytest
import torch

from ldmprobe.layers import LayerRegistry, UnknownLayerError

# The poster's table: block, number of attn1 layers, height, width, channels (SD v1.4, 512 px).
POSTER = [
    ("Encoder 1", 2, 64, 64, 320),
    ("Encoder 2", 2, 32, 32, 640),
    ("Encoder 3", 2, 16, 16, 1280),
    ("Bottleneck", 1, 8, 8, 1280),
    ("Decoder 2", 3, 16, 16, 1280),
    ("Decoder 3", 3, 32, 32, 640),
    ("Decoder 4", 3, 64, 64, 320),
]
NAMES = ["enc1.0", "enc1.1", "enc2.0", "enc2.1", "enc3.0", "enc3.1", "mid.0", "dec2.0", "dec2.1", "dec2.2",
         "dec3.0", "dec3.1", "dec3.2", "dec4.0", "dec4.1", "dec4.2"]


def test_registry_reproduces_the_poster_table_from_the_real_sd14_config(sd14_meta_unet):
    reg = LayerRegistry.from_config(sd14_meta_unet.config)
    assert sum(p.numel() for p in sd14_meta_unet.parameters()) == 859_520_964
    assert reg.table() == POSTER
    assert reg.names == NAMES
    modules = dict(sd14_meta_unet.named_modules())
    for spec in reg:
        attn = modules[spec.module]
        assert type(attn).__name__ == "Attention" and not attn.is_cross_attention
        assert attn.to_out[0].out_features == spec.channels


def test_every_attn1_of_the_unet_is_registered_in_execution_order(sd14_meta_unet):
    reg = LayerRegistry.from_config(sd14_meta_unet.config)
    attn1 = {n for n, _ in sd14_meta_unet.named_modules() if n.endswith(".attn1")}
    assert {s.module for s in reg} == attn1
    assert reg["mid.0"].module == "mid_block.attentions.0.transformer_blocks.0.attn1"
    # named_modules() lists the mid block last; the registry keeps execution order.
    assert reg.names.index("mid.0") == 6


def test_lookup_by_name_module_path_and_group(sd14_meta_unet):
    reg = LayerRegistry.from_config(sd14_meta_unet.config)
    assert reg["dec4.0"] is reg["up_blocks.3.attentions.0.transformer_blocks.0.attn1"]
    assert [s.name for s in reg.select("dec4,mid.0")] == ["mid.0", "dec4.0", "dec4.1", "dec4.2"]
    assert [s.name for s in reg.select(["all"])] == NAMES
    assert reg.select(None) == [] and reg.select("") == []


def test_unknown_layer_error_lists_the_valid_ones(sd14_meta_unet):
    reg = LayerRegistry.from_config(sd14_meta_unet.config)
    with pytest.raises(UnknownLayerError) as err:
        reg["dec1.0"]
    assert "dec1.0" in str(err.value) and "enc1.0" in str(err.value) and "dec4.2" in str(err.value)
    with pytest.raises(UnknownLayerError, match="valid layers"):
        reg.select("dec4.0,bogus")


def test_sizes_follow_the_latent_size(sd14_meta_unet):
    reg = LayerRegistry.from_config(sd14_meta_unet.config, (96, 64))  # 768 × 512 px
    assert (reg["enc1.0"].height, reg["enc1.0"].width) == (96, 64)
    assert (reg["mid.0"].height, reg["mid.0"].width) == (12, 8)


def test_tiny_model_has_the_same_layers_as_sd14(tiny, sd14_meta_unet):
    sd = LayerRegistry.from_config(sd14_meta_unet.config)
    reg = tiny.registry()
    assert reg.names == sd.names
    assert [s.module for s in reg] == [s.module for s in sd]
    assert [(b, n) for b, n, *_ in reg.table()] == [(b, n) for b, n, *_ in POSTER]


@pytest.mark.parametrize("size", [(128, 128), (128, 192), (136, 72)])
def test_registry_shapes_match_captured_shapes(sampler, tiny, size):
    from ldmprobe.schemas import GenerationSettings

    h, w = size
    run = sampler.start(["a"], [0], GenerationSettings(steps=1, height=h, width=w), layers="all")
    _, acts = run.predict()
    for spec in tiny.registry(h, w):
        assert tuple(acts[spec.name].shape) == (1, spec.tokens, spec.channels), spec.name
    assert torch.isfinite(acts["mid.0"]).all()
