"""Intervention: the warp, the exact batched Adam, the success measures, and the known answer on
the tiny model with a bank fitted on rendered scenes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SCENE_BANK_STEPS

from ldmprobe import intervene as iv
from ldmprobe.probes import Probe, ProbeBank
from ldmprobe.schemas import GenerationSettings

PROMPT, SEED = "a red apple on a wooden table", 5107435


# --- the target warp -------------------------------------------------------------------------------
def _square(h=32, w=32, top=8, left=6, size=10):
    m = torch.zeros(h, w)
    m[top:top + size, left:left + size] = 1
    return m


@pytest.mark.parametrize(("dx", "dy"), [(4, 0), (0, -3), (5, 7), (-6, 2)])
def test_integer_translation_moves_the_mask_and_fills_background(dx, dy):
    mask = _square()
    theta = iv.affine_theta(iv.translation(dx, dy), 32, 32)
    moved = iv.transform_maps(mask[None], theta, fill=0.0)[0]
    expected = _square(top=8 + dy, left=6 + dx)
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=0)


def test_translation_is_resolution_independent():
    """One theta serves every layer: a 16 px shift at 128 px is a 2-cell shift at 16×16."""
    theta = iv.affine_theta(iv.translation(16, 0), 128, 128)
    coarse = torch.zeros(16, 16)
    coarse[4:8, 3:7] = 1
    moved = iv.transform_maps(coarse[None], theta, fill=0.0)[0]
    expected = torch.zeros(16, 16)
    expected[4:8, 5:9] = 1
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=0)


def test_border_fill_for_depth_and_identity_and_singular_affine():
    depth = torch.linspace(0, 1, 16).repeat(16, 1)
    theta = iv.affine_theta(iv.translation(4, 0), 16, 16)
    moved = iv.transform_maps(depth[None], theta, fill=None)[0]
    assert torch.allclose(moved[:, :4], depth[:, :1].expand(16, 4))  # uncovered: nearest border value
    torch.testing.assert_close(moved[:, 4:], depth[:, :12])
    same = iv.transform_maps(depth[None], iv.affine_theta(iv.translation(0, 0), 16, 16), fill=0.0)[0]
    torch.testing.assert_close(same, depth)
    assert iv.is_identity(iv.translation(0, 0)) and not iv.is_identity(iv.translation(1, 0))
    with pytest.raises(iv.InterventionError, match="singular"):
        iv.affine_theta([[0, 0, 1], [0, 0, 1]], 16, 16)


def test_resize_mask_area_averages_when_shrinking():
    mask = torch.zeros(8, 8)
    mask[:4, :2] = 1
    small = iv.resize_mask(mask, 2, 2)
    torch.testing.assert_close(small, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))


# --- the optimiser ----------------------------------------------------------------------------------
def _targets(loss: str, shapes: dict[str, tuple[int, int]], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    acts, targets = {}, []
    for layer, (hw, c) in shapes.items():
        acts[layer] = torch.randn(hw, c, generator=gen)
        sig = loss == "bce"
        probe = Probe("foreground", layer, 0, torch.randn(c, 1, generator=gen) / c**0.5, torch.randn(1, generator=gen),
                      "mask" if loss != "huber" else "continuous", sig, (0.0,), (1.0,))
        goal = (torch.rand(hw, generator=gen) > 0.5).float() if sig else torch.randn(hw, generator=gen) * 2
        targets.append(iv.LayerTarget(layer, probe, goal, loss))
    return acts, targets


SHAPES = {"dec2.0": (16, 48), "dec2.1": (16, 48), "dec3.0": (64, 24), "dec4.0": (256, 12), "dec4.1": (256, 12)}


@pytest.mark.parametrize("loss", ["bce", "mse", "huber"])
def test_batched_exact_adam_equals_the_one_layer_at_a_time_reference(loss):
    """The factored-moment Adam over stacked layers follows torch.optim.Adam on each layer alone."""
    acts, targets = _targets(loss, SHAPES)
    ours = iv.optimise(acts, targets, lr=5e-3, iterations=64)
    ref = iv.optimise_reference(acts, targets, lr=5e-3, iterations=64)
    for layer in SHAPES:
        torch.testing.assert_close(ours.activations[layer], ref.activations[layer], atol=2e-5, rtol=1e-5)
        assert ours.final_loss[layer] == pytest.approx(ref.final_loss[layer], rel=1e-4, abs=1e-7)
        assert ours.initial_loss[layer] == pytest.approx(ref.initial_loss[layer], rel=1e-6)
        assert ours.final_loss[layer] < ours.initial_loss[layer]
    for layer, value in acts.items():  # inputs untouched
        assert not torch.equal(value, ours.activations[layer])


@pytest.mark.slow
def test_compiled_adam_step_equals_eager():
    acts, targets = _targets("bce", SHAPES, seed=3)
    eager = iv.optimise(acts, targets, iterations=16)
    compiled = iv.optimise(acts, targets, iterations=16, compiled=True)
    for layer in SHAPES:
        torch.testing.assert_close(compiled.activations[layer], eager.activations[layer], atol=1e-5, rtol=1e-5)


def test_own_target_is_an_exact_no_op():
    acts, targets = _targets("mse", {"dec4.0": (64, 8)})
    own = [iv.LayerTarget(t.layer, t.probe, t.target, t.loss, own=acts[t.layer]) for t in targets]
    out = iv.optimise(acts, own, iterations=32)
    assert torch.equal(out.activations["dec4.0"], acts["dec4.0"])
    assert out.final_loss["dec4.0"] == 0.0


# --- the activation-metric edit -------------------------------------------------------------------
def test_activation_metric_edit_turns_a_background_token_into_the_images_object_token():
    """Two kinds of token (object μ1, background μ0) plus small noise, a probe w that is not along
    μ1 − μ0: moving a background token to the object's reading along Σw/(wᵀΣw) makes it (nearly)
    the object token, while the Euclidean minimal move (along w) does not; the reading changes by
    exactly the requested amount either way."""
    gen = torch.Generator().manual_seed(0)
    c = 32
    mu0, mu1 = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    is_fg = torch.arange(64) < 20
    x0 = torch.where(is_fg[:, None], mu1, mu0) + 0.01 * torch.randn(64, c, generator=gen)
    w = (mu1 - mu0) + torch.randn(c, generator=gen)  # a probe that also reads other directions
    delta = torch.zeros(64)
    delta[~is_fg] = float(w @ (mu1 - mu0))  # every background token to the object's reading
    edited = iv.activation_metric_edit(x0[None], w[None], delta[None])[0]
    torch.testing.assert_close(edited @ w - x0 @ w, delta, atol=1e-3, rtol=1e-4)
    assert (edited[~is_fg] - mu1).norm(dim=-1).max() < 0.1 * (mu1 - mu0).norm()
    euclid = x0 + delta[:, None] * w / (w @ w)
    assert (euclid[~is_fg] - mu1).norm(dim=-1).min() > 0.5 * (mu1 - mu0).norm()
    torch.testing.assert_close(edited[is_fg], x0[is_fg])  # a zero request is no move


def test_activation_metric_edit_of_constant_activations_is_the_euclidean_one():
    x0 = torch.ones(1, 16, 8)
    w = torch.arange(1.0, 9.0)[None]
    delta = torch.full((1, 16), 2.0)
    edited = iv.activation_metric_edit(x0, w, delta)
    assert torch.isfinite(edited).all()
    torch.testing.assert_close(edited, x0 + 2.0 * w[:, None, :] / (w * w).sum())


@pytest.mark.parametrize("loss", ["bce", "mse", "huber"])
def test_activation_metric_reaches_the_same_probe_outputs_as_adam(loss):
    acts, targets = _targets(loss, SHAPES, seed=5)
    euclid = iv.optimise(acts, targets, iterations=32)
    act = iv.optimise(acts, targets, iterations=32, metric="activation")
    for t in targets:
        torch.testing.assert_close(iv.raw_output(t.probe, act.activations[t.layer]),
                                   iv.raw_output(t.probe, euclid.activations[t.layer]), atol=2e-4, rtol=1e-4)
        assert act.final_loss[t.layer] == euclid.final_loss[t.layer]
        assert not torch.allclose(act.activations[t.layer], euclid.activations[t.layer])  # another path
    with pytest.raises(iv.InterventionError) as err:
        iv.optimise(acts, targets, iterations=1, metric="cosine")
    assert err.value.field == "metric"


def test_own_target_is_an_exact_no_op_in_the_activation_metric_too():
    acts, targets = _targets("bce", {"dec4.0": (64, 8)})
    own = [iv.LayerTarget(t.layer, t.probe, t.target, t.loss, own=acts[t.layer]) for t in targets]
    out = iv.optimise(acts, own, iterations=32, metric="activation")
    assert torch.equal(out.activations["dec4.0"], acts["dec4.0"])


def test_metric_and_layers_default_by_protocol():
    assert iv.InterventionSpec().resolved_layers() == "all"
    assert iv.InterventionSpec(protocol="study").resolved_layers() == iv.STUDY_LAYERS["foreground"]
    assert iv.InterventionSpec(protocol="study", property="depth").resolved_layers() == "all"
    assert iv.InterventionSpec(layers=["dec3.0"]).resolved_layers() == ["dec3.0"]
    assert iv.InterventionSpec().resolved_metric() == "activation"
    assert iv.InterventionSpec(protocol="study").resolved_metric() == "euclidean"
    assert iv.InterventionSpec(protocol="study", metric="activation").resolved_metric() == "activation"


def test_bce_needs_a_sigmoid_probe():
    probe = Probe("foreground", "dec4.0", 0, torch.zeros(4, 1), torch.zeros(1), "mask", False, (0.0,), (1.0,))
    assert iv.resolve_loss(probe) == "mse"
    with pytest.raises(iv.InterventionError, match="sigmoid") as err:
        iv.resolve_loss(probe, "bce")
    assert err.value.field == "loss"


# --- measuring ----------------------------------------------------------------------------------------
def test_measure_known_shift():
    """A mask moved exactly as asked: Dice 1 to the target, the full shift achieved, and pixels
    outside both masks untouched."""
    original = _square(64, 64, top=20, left=10, size=12)
    target = _square(64, 64, top=24, left=18, size=12)
    img0 = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    img1 = img0.clone()
    region = (original + target) > 0
    img1[:, region] = 1 - img1[:, region]
    lat = torch.randn(4, 8, 8)
    out = iv.measure("foreground", original, target.clone(), target, img0, img1, lat, lat + 0.1,
                     iv.translation(8, 4))
    assert out["dice_to_target"] == 1.0
    assert out["dice_baseline"] == pytest.approx(2 * 8 * 4 / (2 * 144), abs=1e-3)  # overlap 8×4 of two 12×12
    assert out["shift_requested_px"] == [8.0, 4.0] and out["shift_achieved_px"] == [8.0, 4.0]
    assert out["shift_fraction"] == 1.0
    assert out["pixel_change"]["outside"] == 0.0 and out["pixel_change"]["inside"] > 0.2
    assert out["latent_change"] == pytest.approx(float(0.1 * 16 / lat.norm()), rel=1e-3)


def test_shift_range():
    assert iv.shift_range("-8:8:4") == [-8, -4, 0, 4, 8]
    for bad in ("1:2", "a:b:c", "4:0:1", "0:4:0", "0:1000:1"):
        with pytest.raises(iv.InterventionError):
            iv.shift_range(bad)


# --- the run on the tiny model ------------------------------------------------------------------------
SETTINGS = GenerationSettings(steps=SCENE_BANK_STEPS)
EDIT_STEPS = [0, 1, 2]


@pytest.fixture(scope="module")
def runner(sampler, scene_bank, tiny):
    return iv.Intervention(sampler, ProbeBank.load(scene_bank, tiny))


@pytest.fixture(scope="module")
def shifted(runner):
    return runner.run(PROMPT, SEED, iv.InterventionSpec(dx=32, dy=0, edit_steps=EDIT_STEPS), SETTINGS)


def test_known_answer_probe_mask_moves_toward_the_target(shifted, runner):
    """Tiny model, bank fitted on rendered scenes: after the edit, the edited layers' own probes
    read the target from the representation the forward used, far closer to it than the
    unedited row's. (The random-weight U-Net's probe masks of a generation are nearly all or
    nothing, so the shift is scored by RMSE; the user mask, a square, by Dice.)"""
    rep = shifted.success["representation"]
    assert rep["step"] == EDIT_STEPS[-1]
    assert rep["rmse_to_target"] < 0.25 * rep["rmse_baseline"]
    assert rep["dice_to_target"] > rep["dice_baseline"]
    for layer, values in rep["layers"].items():
        assert values["rmse_to_target"] < values["rmse_baseline"], layer
    for step, per_layer in shifted.losses.items():
        assert all(v["final"] < v["initial"] for v in per_layer.values()), step
    assert shifted.layers == [spec.name for spec in runner.sampler.model.registry()]  # ldmprobe's default: all 16
    assert shifted.edit_steps == EDIT_STEPS

    square = torch.zeros(128, 128)
    square[16:64, 64:112] = 1
    out = runner.run(PROMPT, SEED, iv.InterventionSpec(target_mask=square, edit_steps=EDIT_STEPS), SETTINGS)
    rep = out.success["representation"]
    assert rep["dice_to_target"] > rep["dice_baseline"] + 0.3
    assert rep["rmse_to_target"] < 0.5 * rep["rmse_baseline"]
    torch.testing.assert_close(out.target_map, square)


def test_shift_changes_the_image_and_reports_the_measures(shifted):
    s = shifted.success
    assert s["latent_change"] > 1e-3  # the edit reached the latents
    assert float((shifted.edited - shifted.original).abs().max()) > 1e-3
    assert 0 <= s["dice_to_target"] <= 1 and 0 <= s["dice_baseline"] <= 1
    assert s["shift_requested_px"] is None or len(s["shift_requested_px"]) == 2
    assert set(s["pixel_change"]) == {"outside", "inside", "all", "outside_fraction_of_image"}
    assert shifted.original.shape == shifted.edited.shape == (3, 128, 128)
    assert shifted.target_map.shape == shifted.original_map.shape == (128, 128)
    # the target is the unedited final mask moved right by 32 px
    expected = iv.transform_maps(shifted.original_map[None], iv.affine_theta(iv.translation(32, 0), 128, 128), 0.0)[0]
    torch.testing.assert_close(shifted.target_map, expected)


@pytest.mark.parametrize("order", ["joint", "sequential"])
def test_zero_shift_leaves_the_image_unchanged(runner, monkeypatch, tiny, order):
    """A zero shift asks each layer for its own probe output: the gradient is exactly 0, so the
    real optimiser (every Adam iteration run, counted here) leaves the activations, and so the
    image, bit for bit as they were — in both orders (joint stacks layers of one shape into one
    loop; sequential runs one loop per layer, each after a forward carrying the previous patches)."""
    import ldmprobe.intervene.optimisation as optimisation

    steps_run = []
    real_step = optimisation.adam_step

    def counting(x, y, m, v, t, w, b, lr_bc1, *rest):
        if float(lr_bc1) > 0:  # an Adam iteration (lr 0: the outputs the targets are measured with)
            steps_run.append(x.shape[0])
        return real_step(x, y, m, v, t, w, b, lr_bc1, *rest)

    monkeypatch.setattr(optimisation, "adam_step", counting)
    out = runner.run(PROMPT, SEED, iv.InterventionSpec(dx=0, dy=0, edit_steps=EDIT_STEPS, iterations=16, order=order),
                     SETTINGS)
    groups = {(s.height, s.width, s.channels) for s in tiny.registry().select(out.layers)}  # layers stacked by shape
    n = len(out.layers)  # the default: all 16
    loops = len(groups) if order == "joint" else n
    assert n == 16 and len(steps_run) == 16 * loops * len(EDIT_STEPS) and sum(steps_run) == 16 * n * len(EDIT_STEPS)
    assert out.metadata["order"] == order
    assert torch.equal(out.edited, out.original)
    assert out.success["latent_change"] == 0.0
    assert out.success["dice_to_target"] in (1.0, None)
    assert all(v["final"] == v["initial"] == 0.0 for d in out.losses.values() for v in d.values())
    fresh = out.success["representation_next_step"]  # both rows identical on the next forward too
    assert fresh["rmse_to_target"] == fresh["rmse_baseline"] == 0.0


def test_representation_on_a_fresh_forward_pass(shifted):
    """Not what the optimiser wrote: the edited layers' probes on the forward pass of the step
    after the last edit, which no patch touched and the network computed itself from the edited
    latents. On the tiny model's random weights the edit does not survive that pass (the U-Net
    does not read its own attention outputs as layout): the probes read the edited row as far
    from the target as the unedited one, while the patched forward read it 20× closer. A
    measure taken again on the optimiser's tensors would show the 20× here too."""
    patched = shifted.success["representation"]
    fresh = shifted.success["representation_next_step"]
    assert fresh["step"] == EDIT_STEPS[-1] + 1 and set(fresh["layers"]) == set(shifted.layers)
    assert patched["rmse_to_target"] < 0.1 * patched["rmse_baseline"]
    assert abs(fresh["rmse_to_target"] - fresh["rmse_baseline"]) < 0.05 * fresh["rmse_baseline"]
    assert fresh["rmse_to_target"] > 10 * patched["rmse_to_target"]
    assert shifted.success["latent_change"] > 1e-3  # yet the latents the fresh pass started from had moved


@pytest.fixture(scope="module")
def both_orders(runner):
    """One shift, both orders, one edited step (the study's sequential order is the default)."""
    spec = {"dx": 32, "edit_steps": [0], "iterations": 32, "layers": iv.STUDY_LAYERS["foreground"]}
    return {order: runner.run(PROMPT, SEED, iv.InterventionSpec(**spec, order=order), SETTINGS)
            for order in ("sequential", "joint")}


def test_sequential_is_the_default_order():
    assert iv.InterventionSpec().order == "sequential" == iv.DEFAULT_ORDER


def test_sequential_layers_see_the_edits_of_the_layers_before_them(both_orders, runner, monkeypatch):
    """Sequential (the study's order): each layer is optimised on an activation from a forward
    that carries the patches of the layers the forward reached before it. The first layer
    (dec2.0) starts from the same activation in both orders, so its loss trajectory is the same;
    every later decoder layer reads its predecessors' output, so it starts from a different
    activation (a different initial loss) — and the image and latents differ between orders."""
    seq, joint = both_orders["sequential"], both_orders["joint"]
    assert seq.layers == joint.layers == list(iv.STUDY_LAYERS["foreground"])
    first, *later = seq.layers
    torch.testing.assert_close(seq.losses[0][first]["initial"], joint.losses[0][first]["initial"])
    torch.testing.assert_close(seq.losses[0][first]["final"], joint.losses[0][first]["final"])
    moved = [la for la in later if abs(seq.losses[0][la]["initial"] - joint.losses[0][la]["initial"])
             > 1e-4 * abs(joint.losses[0][la]["initial"])]
    assert moved == later
    assert float((seq.edited_latents - joint.edited_latents).abs().max()) > 1e-3
    assert float((seq.edited - joint.edited).abs().max()) > 1e-3
    torch.testing.assert_close(seq.original, joint.original, rtol=0, atol=0)  # the unedited row is untouched
    assert (seq.metadata["order"], joint.metadata["order"]) == ("sequential", "joint")

    # one forward per edited layer at the edited step (plus the unpatched one before it)
    import ldmprobe.generate as generate

    calls = []
    real = generate.Denoising.predict

    def counting(self, patches=None):
        calls.append(tuple(patches or ()))
        return real(self, patches)

    monkeypatch.setattr(generate.Denoising, "predict", counting)
    runner.run(PROMPT, SEED, iv.InterventionSpec(dx=32, edit_steps=[0], iterations=1, protocol="study"), SETTINGS)
    layers = list(iv.STUDY_LAYERS["foreground"])  # the study protocol's default: the decoder's nine
    assert calls[:len(layers) + 1] == [(), *[tuple(layers[:k]) for k in range(1, len(layers) + 1)]]
    assert len(calls) == SCENE_BANK_STEPS + len(layers)


def test_one_layer_sequential_equals_joint(runner):
    """With one edited layer there is nothing before it: the two orders are the same computation."""
    spec = {"dx": 32, "edit_steps": [0, 1], "iterations": 16, "layers": ["dec3.1"]}
    seq, joint = (runner.run(PROMPT, SEED, iv.InterventionSpec(**spec, order=o), SETTINGS)
                  for o in ("sequential", "joint"))
    assert torch.equal(seq.edited_latents, joint.edited_latents) and torch.equal(seq.edited, joint.edited)
    assert seq.losses == joint.losses
    assert float((seq.edited - seq.original).abs().max()) > 1e-3  # and it did edit


def test_compiled_own_target_is_an_exact_no_op():
    """The no-op holds for the compiled Adam step too: the targets are measured with the step's
    own output expression, so compile rounding cannot leave a residual gradient."""
    acts, targets = _targets("bce", {"dec4.0": (64, 8), "dec4.1": (64, 8)})
    own = [iv.LayerTarget(t.layer, t.probe, t.target, t.loss, own=acts[t.layer]) for t in targets]
    out = iv.optimise(acts, own, iterations=8, compiled=True)
    for layer in acts:
        assert torch.equal(out.activations[layer], acts[layer])


def test_depth_variant(runner):
    # The default 128 iterations: Adam's momentum overshoots early on when earlier layers' edits at the same
    # step have moved this layer's target (relative-depth bank: 5 of 48 losses end higher after 32
    # iterations, 1 after 64, none after 128).
    depth = runner.run(PROMPT, SEED, iv.InterventionSpec(property="depth", dx=-24), SETTINGS)
    rep = depth.success["representation"]
    assert len(depth.layers) == 16 and depth.edit_steps == [0, 1, 2]
    assert rep["rmse_to_target"] < rep["rmse_baseline"]
    assert set(depth.success) >= {"rmse_to_target", "rmse_baseline", "pearson_to_target", "pearson_baseline"}
    assert all(v["final"] < v["initial"] for d in depth.losses.values() for v in d.values())
    assert set(depth.metadata["loss"].values()) == {"huber"}


def test_label_model_is_run_on_both_images(sampler, scene_bank, tiny):
    seen = []

    def saliency(images):
        seen.append(images.shape)
        return images.mean(1)  # any map in [0, 1]

    runner = iv.Intervention(sampler, ProbeBank.load(scene_bank, tiny), label_model=saliency)
    out = runner.run(PROMPT, SEED, iv.InterventionSpec(dx=16, edit_steps=[0], iterations=8), SETTINGS)
    assert seen == [(2, 3, 128, 128)]
    assert set(out.success["label_model"]) == {"dice_to_target", "dice_baseline", "shift_achieved_px", "shift_fraction"}


def test_label_model_shift_is_read_from_its_own_masks():
    """The segmenter's masks moved right by 8 px (of a 16 px request): its shift fraction is 0.5,
    whatever the probe maps say; a mask at half the image's resolution is scaled back to pixels."""
    zeros = torch.zeros(32, 32)
    tgt = torch.zeros(32, 32)
    tgt[8:16, 20:28] = 1
    orig = torch.zeros(32, 32)
    orig[8:16, 4:12] = 1
    before, after = torch.zeros(16, 16), torch.zeros(16, 16)
    before[4:8, 2:6] = 1
    after[4:8, 6:10] = 1
    img = torch.zeros(3, 32, 32)
    out = iv.measure("foreground", orig, orig, tgt, img, img, zeros, zeros + 1, iv.translation(16, 0),
                     label_maps={"original": before, "edited": after})
    assert out["shift_fraction"] == 0.0  # the probe's maps did not move
    assert out["label_model"]["shift_achieved_px"] == [8.0, 0.0]
    assert out["label_model"]["shift_fraction"] == 0.5


@pytest.mark.parametrize(("spec", "field"), [
    (iv.InterventionSpec(layers=["dec9.9"]), "layers"),
    (iv.InterventionSpec(edit_steps=[0, SCENE_BANK_STEPS]), "edit_steps"),
    (iv.InterventionSpec(edit_steps=[]), "edit_steps"),
    (iv.InterventionSpec(property="depth", target_mask=torch.zeros(128, 128)), "target_mask"),
    (iv.InterventionSpec(property="shading"), "property"),
    (iv.InterventionSpec(loss="bce"), "loss"),
    (iv.InterventionSpec(lr=-1.0), "lr"),
    (iv.InterventionSpec(lr=math.nan), "lr"),
    (iv.InterventionSpec(affine=[[0, 0, 0], [0, 0, 0]]), "affine"),
    (iv.InterventionSpec(eval_layer="dec9.9"), "eval_layer"),
    (iv.InterventionSpec(order="parallel"), "order"),
    (iv.InterventionSpec(metric="cosine"), "metric"),
])
def test_bad_specs_name_the_field(runner, spec, field):
    with pytest.raises(iv.InterventionError) as err:
        runner.resolve(spec, SETTINGS)
    assert err.value.field == field


# --- CLI -------------------------------------------------------------------------------------------------
def test_cli_writes_panel_masks_result_and_sweep_gif(scene_bank, tmp_path, capsys):
    import json

    from PIL import Image

    from ldmprobe.cli import main

    out = tmp_path / "run"
    rc = main(["intervene", "--model", "tiny", "--bank", str(scene_bank), "--prompt", PROMPT, "--seed", str(SEED), "--steps",
               str(SCENE_BANK_STEPS), "--dx", "24", "--edit-steps", "0-1", "--iterations", "16", "--sweep=-16:16:32",
               "--order", "joint", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    assert Image.open(out / "panel.png").format == "PNG"
    for name in ("original", "edited"):
        assert Image.open(out / f"{name}.png").size == (128, 128)
    for name in ("original", "target", "achieved"):
        assert Image.open(out / "masks" / f"{name}.png").mode == "L"
    result = json.loads((out / "result.json").read_text())
    assert result["edit_steps"] == [0, 1] and result["metadata"]["affine"] == [[1, 0, 24], [0, 1, 0]]
    assert set(result["losses"]) == {"0", "1"}
    assert result["metadata"]["order"] == "joint"
    gif = Image.open(out / "sweep.gif")
    assert gif.n_frames == 2
    sweep = json.loads((out / "sweep.json").read_text())
    assert [row["dx"] for row in sweep] == [-16, 16]


@pytest.mark.parametrize(("extra", "message"), [
    (["--lr", "0"], "--lr"),
    (["--iterations", "5000"], "--iterations"),
    (["--edit-steps", "0,x"], "--edit-steps"),
    (["--edit-steps", "0,99"], "--edit-steps"),
    (["--layers", "dec9.9"], "--layers"),
    (["--property", "shading"], "--property"),
    (["--sweep", "1:2"], "sweep"),
    (["--order", "sideways"], "--order"),
])
def test_cli_bad_input_is_exit_2_with_one_line(scene_bank, tmp_path, capsys, extra, message):
    from ldmprobe.cli import main

    out = tmp_path / "run"
    rc = main(["intervene", "--model", "tiny", "--bank", str(scene_bank), "--prompt", PROMPT, "--steps", str(SCENE_BANK_STEPS),
               "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


# --- the study's depth target (issue 13, item 7) ----------------------------------------------------
def _depth_targets(runner, tiny, spec):
    torch.manual_seed(3)
    registry = tiny.registry(128, 128)
    layers = ["enc1.0", "dec3.1"]
    unedited = {la: torch.randn(registry[la].height * registry[la].width, registry[la].channels) for la in layers}
    theta = iv.affine_theta(spec.pixel_affine(), 128, 128) if (spec.dx or spec.dy) else None
    return registry, runner.layer_targets(spec, layers, 0, unedited, theta, registry), unedited


def test_study_depth_target_is_minmax_scaled_to_nine_with_edge_fill(runner, tiny):
    """protocol="study": the depth target is the warped map min-max scaled to [-9, 9] in the
    probe's normalised units (the study's norm_intervention_target), uncovered pixels taking the
    edge value; the ldmprobe protocol keeps the warped map's own scale; depth_target overrides."""
    from ldmprobe.intervene.optimisation import raw_output

    registry, study, unedited = _depth_targets(runner, tiny, iv.InterventionSpec(property="depth", dx=32,
                                                                                 protocol="study"))
    _, ours, _ = _depth_targets(runner, tiny, iv.InterventionSpec(property="depth", dx=32))
    _, override, _ = _depth_targets(runner, tiny, iv.InterventionSpec(property="depth", dx=32, protocol="study",
                                                                      depth_target="warp"))
    for s, o, w in zip(study, ours, override, strict=True):
        assert float(s.target.min()) == pytest.approx(-9.0) and float(s.target.max()) == pytest.approx(9.0)
        h, wd = registry[s.layer].height, registry[s.layer].width
        warped = o.target.reshape(h, wd)
        lo, hi = warped.min(), warped.max()
        torch.testing.assert_close(s.target.reshape(h, wd), (warped - lo) / (hi - lo) * 18 - 9)
        # the uncovered left quarter (32 of 128 px) repeats the edge column of the shifted map
        edge = wd // 4
        torch.testing.assert_close(warped[:, :edge], warped[:, edge:edge + 1].expand(h, edge), atol=0.2, rtol=0)
        assert float((o.target - s.target).abs().max()) > 1.0  # ours is not rescaled
        torch.testing.assert_close(w.target, o.target)
        own = raw_output(s.probe, unedited[s.layer])
        # the covered part is the unedited map shifted (float32 rounding relative to outputs of up to ~300)
        torch.testing.assert_close(o.target.reshape(h, wd)[:, edge + 1:], own.reshape(h, wd)[:, 1:wd - edge],
                                   atol=1e-4, rtol=1e-5)

    # a zero shift is then not a no-op (the rescale changes the map), as in the study
    _, zero, _ = _depth_targets(runner, tiny, iv.InterventionSpec(property="depth", protocol="study"))
    assert all(t.own is None and float(t.target.max()) == pytest.approx(9.0) for t in zero)


def test_study_protocol_is_recorded_and_bad_values_name_the_field(runner):
    out = runner.run(PROMPT, SEED, iv.InterventionSpec(property="depth", dx=16, protocol="study", edit_steps=[0],
                                                       iterations=2, layers=["dec4.0"]), SETTINGS)
    assert (out.metadata["protocol"], out.metadata["depth_target"]) == ("study", "minmax")
    assert float(out.target_map.max() - out.target_map.min()) == pytest.approx(18 * float(
        runner.bank.probe("depth", out.metadata["eval_layer"], out.metadata["eval_step"]).std[0]), rel=1e-4)
    for spec, field in ((iv.InterventionSpec(protocol="paper"), "protocol"),
                        (iv.InterventionSpec(depth_target="clip"), "depth_target")):
        with pytest.raises(iv.InterventionError) as err:
            runner.resolve(spec, SETTINGS)
        assert err.value.field == field


def test_study_protocol_refuses_a_schedule_the_bank_was_not_fitted_at(sampler, scene_bank, tiny):
    """Bank steps follow exact timesteps: equal → the same step; different (fewer steps here, or
    a recorded schedule that differs) → the nearest bank timestep under ldmprobe, recorded in the
    metadata, and refused under the study protocol (InterventionError naming steps)."""
    runner = iv.Intervention(sampler, ProbeBank.load(scene_bank, tiny))
    exact = runner.step_mapping(SETTINGS)
    assert exact["exact"] is True and exact["bank_steps"] == list(range(SCENE_BANK_STEPS))
    fewer = GenerationSettings(steps=3)
    with pytest.raises(iv.InterventionError) as err:
        runner.resolve(iv.InterventionSpec(protocol="study", edit_steps=[0]), fewer)
    assert err.value.field == "steps"
    layers, steps, _, bank_steps = runner.resolve(iv.InterventionSpec(edit_steps=[0]), fewer)
    assert bank_steps[0] == 0 and bank_steps[-1] == SCENE_BANK_STEPS - 1
    out = runner.run(PROMPT, SEED, iv.InterventionSpec(edit_steps=[0], iterations=2, layers=["dec4.0"]), fewer)
    assert out.metadata["step_mapping"]["exact"] is False and out.metadata["step_mapping"]["bank_steps"] == bank_steps
    shifted = ProbeBank.load(scene_bank, tiny)
    shifted.extra["timesteps"] = [t - 1.0 for t in exact["request_timesteps"]]  # recorded, and not ours
    with pytest.raises(iv.InterventionError) as err:
        iv.Intervention(sampler, shifted).resolve(iv.InterventionSpec(protocol="study"), SETTINGS)
    assert err.value.field == "steps" and "differ" in str(err.value)


def test_cli_protocol_and_depth_target_reach_the_result(scene_bank, tmp_path, capsys):
    import json

    from ldmprobe.cli import main

    out = tmp_path / "run"
    rc = main(["intervene", "--model", "tiny", "--bank", str(scene_bank), "--prompt", PROMPT, "--seed", str(SEED),
               "--steps", str(SCENE_BANK_STEPS), "--property", "depth", "--dx", "16", "--edit-steps", "0",
               "--iterations", "2", "--order", "joint", "--protocol", "study", "--depth-target", "warp",
               "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "result.json").read_text())["metadata"]
    assert meta["protocol"] == "study" and meta["depth_target"] == "warp"  # the explicit option wins over the protocol's
    with pytest.raises(SystemExit) as exc:  # argparse's choices: exit code 2, one line
        main(["intervene", "--model", "tiny", "--bank", str(scene_bank), "--prompt", PROMPT, "--out",
              str(tmp_path / "bad"), "--depth-target", "stretch"])
    assert exc.value.code == 2 and "--depth-target" in capsys.readouterr().err
