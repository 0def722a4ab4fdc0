import pytest
import torch

from ldmprobe.capture import CapturingUNet, HookCapture


@pytest.fixture(scope="module")
def inputs(tiny):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    return x, torch.tensor(500.0), tiny.encode_prompts(["", "a red apple"])


@pytest.fixture(scope="module")
def cu(tiny):
    return CapturingUNet(tiny.unet)


def test_capture_point_is_attn1_output_before_residual(cu, inputs):
    """In-graph capture returns exactly what a forward hook on attn1 sees (the output of
    to_out, before BasicTransformerBlock adds the residual)."""
    names = cu.select_layers("all")
    hooks = HookCapture(cu.unet, names)
    try:
        with torch.no_grad():
            plain = cu.unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
            noise, acts = cu(*inputs, capture=names, half="both")
    finally:
        hooks.remove()
    assert torch.equal(noise, plain)  # capture does not change the computation
    assert list(acts) == list(names)
    for name in names:
        assert torch.equal(acts[name][1:], hooks.values[name]), name


def test_halves_and_cfg_rows(cu, inputs):
    with torch.no_grad():
        _, both = cu(*inputs, capture=("dec4.0",), half="both")
        _, cond = cu(*inputs, capture=("dec4.0",), half="cond")
        _, nocfg = cu(*inputs, capture=("dec4.0",), half="cond", cfg=False)
    assert both["dec4.0"].shape == (2, 256, 32)
    assert torch.equal(cond["dec4.0"], both["dec4.0"][1:])
    assert torch.equal(nocfg["dec4.0"], both["dec4.0"])


def test_patching_replaces_the_conditional_half_only(cu, inputs):
    with torch.no_grad():
        base, acts = cu(*inputs, capture=("dec3.1",))
        same, _ = cu(*inputs, patches={"dec3.1": acts["dec3.1"]})
        edited, after = cu(*inputs, capture=("dec3.1", "dec4.0"), patches={"dec3.1": torch.zeros_like(acts["dec3.1"])})
    assert torch.equal(same, base)  # patching a layer with its own value changes nothing
    assert torch.count_nonzero(after["dec3.1"]) == 0  # the capture sees the patched value
    assert torch.equal(edited[0], base[0])  # the unconditional row is untouched
    assert (edited[1] - base[1]).abs().max() > 1e-4  # the conditional row moved


def test_no_graph_breaks_with_capture_and_patches(cu, inputs):
    names = cu.select_layers("all")
    patches = {"dec4.1": torch.zeros(1, 256, 32), "mid.0": torch.ones(1, 4, 128)}
    with torch.no_grad():
        explained = torch._dynamo.explain(cu)(*inputs, capture=names, patches=patches)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_no_capture_requested_means_the_plain_unet_graph(cu, inputs):
    with torch.no_grad():
        ours = torch._dynamo.explain(cu)(*inputs)
        plain = torch._dynamo.explain(cu.unet)(inputs[0], inputs[1], encoder_hidden_states=inputs[2],
                                                 return_dict=False)
        capturing = torch._dynamo.explain(cu)(*inputs, capture=cu.select_layers("all"))
    assert ours.graph_break_count == 0
    assert ours.op_count == plain.op_count
    assert capturing.op_count > plain.op_count  # capture really adds to the graph when asked


def test_wrapping_twice_shares_processors(tiny, inputs):
    a = CapturingUNet(tiny.unet)
    b = CapturingUNet(tiny.unet)
    proc = dict(tiny.unet.named_modules())["up_blocks.3.attentions.0.transformer_blocks.0.attn1"].processor
    assert proc.session is a._session is b._session
    assert type(proc.inner).__name__ == "AttnProcessor2_0"  # not a capture processor inside another
    with torch.no_grad():
        _, from_a = a(*inputs, capture=("dec4.0",))
        _, from_b = b(*inputs, capture=("dec4.0",))
    assert torch.equal(from_a["dec4.0"], from_b["dec4.0"])


@pytest.mark.slow
def test_compiled_generation_matches_eager(tiny, sampler, tmp_path):
    """torch.compile(fullgraph=True) of the capturing U-Net: same captures and image as eager.
    Same configuration as the CLI's default so the inductor cache serves later compiles."""
    from ldmprobe.generate import Sampler
    from ldmprobe.schemas import GenerationSettings

    compiled = Sampler(tiny, compile=True)
    settings = GenerationSettings(steps=3)
    want = sampler.generate(["a red apple"], [7], settings, layers="all")
    got = compiled.generate(["a red apple"], [7], settings, layers="all")
    assert got.metadata["compiled"] is True and want.metadata["compiled"] is False
    for s_want, s_got in zip(want.steps, got.steps, strict=True):
        assert s_got.activations.keys() == s_want.activations.keys()
        for name in s_want.activations:
            torch.testing.assert_close(s_got.activations[name], s_want.activations[name], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(got.images, want.images, atol=2e-3, rtol=1e-3)


def test_a_failed_call_leaves_no_context_behind(cu, inputs):
    """A forward that raises half-way (here a patch of the wrong shape) clears its per-call
    context: a later call of the same U-Net (through any wrapper, or none) neither sees its
    patches nor records its captures."""
    with torch.no_grad():
        before = cu.unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
        with pytest.raises(RuntimeError):
            cu(*inputs, capture=("dec4.0",), patches={"dec3.1": torch.zeros(1, 5, 7)})
        assert cu._session.ctx is None
        after = cu.unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
        _, acts = cu(*inputs, capture=("mid.0",))
    assert torch.equal(after, before)
    assert list(acts) == ["mid.0"]
