import numpy as np
import pytest
import torch

from ldmprobe.generate import SCHEDULERS, study_noise
from ldmprobe.schemas import GenerationSettings

FAST = GenerationSettings(steps=4)


def test_same_seed_same_image_and_activations_other_seed_differs(sampler):
    a = sampler.generate(["a red apple"], [11], FAST, layers="all")
    b = sampler.generate(["a red apple"], [11], FAST, layers="all")
    c = sampler.generate(["a red apple"], [12], FAST, layers="all")
    assert torch.equal(a.images, b.images)
    for sa, sb in zip(a.steps, b.steps, strict=True):
        for name in sa.activations:
            assert torch.equal(sa.activations[name], sb.activations[name])
    assert (a.images - c.images).abs().max() > 1e-3
    assert (a.steps[0].activations["dec4.0"] - c.steps[0].activations["dec4.0"]).abs().max() > 1e-3


def test_initial_noise_is_the_studys_convention(sampler):
    """torch.manual_seed(seed); torch.randn(1, 4, H/8, W/8) on CPU, times the initial sigma,
    which for LMS with SD's scaled-linear betas and linspace spacing is sigma_max =
    sqrt((1 - ᾱ_999) / ᾱ_999) (the study's `latents * scheduler.sigmas[0]`), computed here directly."""
    seed = 5107435  # the first seed of the study's train split
    torch.manual_seed(seed)
    direct = torch.randn(1, 4, 16, 16)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    sigma_max = np.sqrt((1 - alphas_cumprod[-1]) / alphas_cumprod[-1])
    init_sigma = float(sigma_max)
    run = sampler.start(["Herders with a yak team."], [seed], GenerationSettings())
    torch.testing.assert_close(run.latents, direct * init_sigma, rtol=1e-5, atol=1e-5)
    assert torch.equal(study_noise(seed, (4, 16, 16)), direct)
    assert run.scheduler.__class__.__name__ == "LMSDiscreteScheduler" and len(run.timesteps) == 15
    assert float(run.timesteps[0]) == 999.0 and float(run.timesteps[-1]) == 0.0


def test_global_rng_is_left_alone(sampler):
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    sampler.start(["x"], [99], FAST)
    assert torch.equal(torch.rand(3), expected)


def test_batch_matches_one_by_one(sampler):
    both = sampler.generate(["a red apple", "a dog on grass"], [3, 4], FAST, layers="dec4.0,mid.0")
    for i, (prompt, seed) in enumerate([("a red apple", 3), ("a dog on grass", 4)]):
        one = sampler.generate([prompt], [seed], FAST, layers="dec4.0,mid.0")
        torch.testing.assert_close(both.images[i:i + 1], one.images, atol=1e-4, rtol=1e-4)
        for s_both, s_one in zip(both.steps, one.steps, strict=True):
            torch.testing.assert_close(s_both.activations["dec4.0"][i:i + 1], s_one.activations["dec4.0"],
                                       atol=1e-4, rtol=1e-4)


def test_per_step_outputs_and_callback(sampler):
    seen = []
    result = sampler.generate(["a red apple"], [0], FAST, layers="dec4", half="both", callback=seen.append)
    assert [s.index for s in seen] == [0, 1, 2, 3] and len(result.steps) == 4
    step = result.steps[-1]
    assert step.latents.shape == step.x0.shape == (1, 4, 16, 16)
    assert set(step.activations) == {"dec4.0", "dec4.1", "dec4.2"}
    assert step.activations["dec4.0"].shape == (2, 256, 32)  # both CFG halves
    assert torch.equal(result.latents, step.latents)
    # LMS: the last step's x0 prediction is the final latent (sigma reaches 0).
    torch.testing.assert_close(step.x0, step.latents, atol=1e-4, rtol=1e-3)
    assert result.images.shape == (1, 3, 128, 128) and 0 <= result.images.min() <= result.images.max() <= 1
    meta = result.metadata
    for key in ("model_identity", "attention", "dtype", "device", "compiled", "scheduler", "timesteps", "layers"):
        assert key in meta
    assert meta["attention"] == "sdpa" and meta["compiled"] is False and meta["steps"] == 4


def test_no_guidance_means_no_cfg_batch(sampler):
    result = sampler.generate(["a"], [0], GenerationSettings(steps=2, guidance=1.0), layers="mid.0", half="cond")
    assert result.steps[0].activations["mid.0"].shape[0] == 1


def test_no_capture_requested_returns_no_activations(sampler):
    result = sampler.generate(["a"], [0], GenerationSettings(steps=2))
    assert all(s.activations == {} for s in result.steps)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_runs(sampler, name):
    result = sampler.generate(["a"], [0], GenerationSettings(steps=3, scheduler=name), layers="mid.0")
    # One output per U-Net evaluation: PNDM's PLMS warm-up evaluates one timestep twice.
    assert len(result.steps) == len(result.metadata["timesteps"]) in (3, 4)
    assert torch.isfinite(result.images).all()
    assert all(torch.isfinite(s.x0).all() for s in result.steps)


def test_bad_arguments(sampler):
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        sampler.start(["a", "b"], [1], FAST)
    with pytest.raises(ValueError, match="height must be a multiple of 8"):
        sampler.start(["a"], [1], GenerationSettings.model_construct(steps=2, guidance=7.5, height=132, width=None,
                                                                      scheduler="lms"))
    with pytest.raises(ValueError, match="unknown CFG half"):
        sampler.start(["a"], [1], FAST, half="uncond")


def _leading(tiny):
    """The tiny model with the scheduler config of a folder re-saved by current diffusers."""
    import dataclasses

    return dataclasses.replace(tiny, scheduler_config=tiny.scheduler_config | {"timestep_spacing": "leading"})


def test_lms_is_pinned_to_the_studys_timesteps_whatever_the_config_says(tiny):
    """Item 2: SD's schedule at 15 steps, linspace spacing (the study's diffusers): timesteps
    linspace(0, 999, 15) reversed and sigma_max from the betas; "config" keeps the folder's
    "leading" spacing (arange(15) · (1000 // 15) + steps_offset, reversed), on request only."""
    from ldmprobe.generate import Sampler, make_scheduler

    model = _leading(tiny)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ab = np.cumprod(1.0 - betas)
    sigma_max = float(np.sqrt((1 - ab[-1]) / ab[-1]))
    pinned = make_scheduler(model, "lms")
    pinned.set_timesteps(15)
    np.testing.assert_allclose(pinned.timesteps.numpy(), np.linspace(0, 999, 15)[::-1], rtol=1e-6)
    assert abs(float(pinned.init_noise_sigma) - sigma_max) < 1e-3
    folder = make_scheduler(model, "lms", "config")
    folder.set_timesteps(15)
    np.testing.assert_array_equal(folder.timesteps.numpy(), (np.arange(15) * (1000 // 15) + 1)[::-1])
    assert float(folder.init_noise_sigma) < sigma_max - 4  # 9.60 vs 14.61: a different start
    # Other schedulers were not the study's: they keep the folder's spacing unless forced.
    assert make_scheduler(model, "ddim").config.timestep_spacing == "leading"
    assert make_scheduler(model, "ddim", "trailing").config.timestep_spacing == "trailing"
    run = Sampler(model).start(["a"], [1], GenerationSettings())
    assert float(run.timesteps[0]) == 999.0 and float(run.timesteps[-1]) == 0.0
    meta = Sampler(model).metadata(run)
    assert meta["timestep_spacing"] == "linspace" and abs(meta["init_noise_sigma"] - sigma_max) < 1e-3
    with pytest.raises(ValueError, match="unknown timestep spacing 'sideways'"):
        Sampler(model, timestep_spacing="sideways")


def test_latents_stay_float32_through_the_scheduler_under_a_half_precision_unet(tiny):
    """Item 9: with the U-Net in bfloat16 (CPU's half type here; fp16 on CUDA) the latents, the
    scheduler's arithmetic and x0 stay float32, only the U-Net's input is cast — as the study's
    fp32 latents under autocast. Measured against the float32 model, the float32 latents end
    closer than latents kept in the U-Net's dtype (the old behaviour, still on request)."""
    from ldmprobe.generate import Sampler
    from ldmprobe.models import load_model

    half = load_model("tiny", dtype="bfloat16")
    prompts, seeds, settings = ["a red apple", "a blue car"], [3, 4], GenerationSettings(steps=15)
    sampler = Sampler(half)
    seen = []
    inner = sampler.unet_fn

    def spy(sample, *args, **kwargs):
        seen.append(sample.dtype)
        return inner(sample, *args, **kwargs)

    sampler.unet_fn = spy
    run = sampler.start(prompts, seeds, settings)
    assert run.latents.dtype == torch.float32
    step = run.advance(*run.predict())
    assert seen == [torch.bfloat16] and step.latents.dtype == step.x0.dtype == torch.float32
    reference = Sampler(tiny).generate(prompts, seeds, settings).latents
    errors = {}
    for latent_dtype in ("float32", "model"):
        result = Sampler(half, latent_dtype=latent_dtype).generate(prompts, seeds, settings)
        assert result.metadata["latent_dtype"] == ("float32" if latent_dtype == "float32" else "bfloat16")
        errors[latent_dtype] = float((result.latents.float() - reference).norm() / reference.norm())
    assert errors["float32"] < 0.9 * errors["model"], errors


def test_trace_reads_each_step_like_generate(sampler):
    """`with sampler.trace(...) as run: for step in run: step.activations[...]` (the README's
    library section) sees exactly what `generate` records, and ends where it ends."""
    settings = GenerationSettings(steps=3)
    ref = sampler.generate(["a red apple"], [1], settings, layers="dec4")
    seen = []
    with sampler.trace(["a red apple"], [1], settings, layers="dec4") as run:
        for step in run:
            seen.append((step.index, step.timestep, step.activations["dec4.0"]))
    assert [(i, t) for i, t, _ in seen] == [(s.index, s.timestep) for s in ref.steps]
    for (_, _, acts), expected in zip(seen, ref.steps, strict=True):
        assert torch.equal(acts, expected.activations["dec4.0"])
    assert torch.equal(run.latents, ref.latents) and torch.equal(run.images(), ref.images)


def test_trace_patch_is_the_step_apis_patch(sampler):
    """step.patch(layer, value) re-runs that step's forward with the layer replaced, exactly as
    Denoising.predict(patches=…) does, and the rest of the loop follows from it."""
    settings = GenerationSettings(steps=3)
    manual = sampler.start(["a red apple"], [1], settings, layers="dec4.0")
    for k in range(3):
        noise, acts = manual.predict()
        if k == 1:
            noise, acts = manual.predict({"dec4.0": torch.zeros_like(acts["dec4.0"])})
        manual.advance(noise, acts)
    with sampler.trace(["a red apple"], [1], settings, layers="dec4.0") as run:
        for step in run:
            if step.index == 1:
                step.patch("dec4.0", torch.zeros_like(step.activations["dec4.0"]))
                patched = step
    assert torch.equal(run.latents, manual.latents)
    assert torch.count_nonzero(patched.patched["dec4.0"]) == 0  # what the patched forward captured
    plain = sampler.generate(["a red apple"], [1], settings, layers=None)
    assert not torch.equal(run.latents, plain.latents)  # the patch changed the generation
    with pytest.raises(RuntimeError, match="already been advanced"):
        patched.patch("dec4.0", torch.zeros(1))
    with pytest.raises(KeyError, match="unknown layer"):
        with sampler.trace(["a red apple"], [1], settings) as run:
            for step in run:
                step.patch("dec9.9", torch.zeros(1))


def test_generate_pads_and_drops_the_padding(sampler):
    """pad_to runs the loop at a bucket size; every output is the unpadded generation's."""
    settings = GenerationSettings(steps=2)
    alone = sampler.generate(["a red apple", "a tree"], [1, 2], settings, layers="dec4.0")
    seen = []
    padded = sampler.generate(["a red apple", "a tree"], [1, 2], settings, layers="dec4.0", pad_to=4,
                              callback=seen.append)
    assert padded.images.shape[0] == padded.latents.shape[0] == 2 and padded.metadata["prompts"] == ["a red apple",
                                                                                                      "a tree"]
    torch.testing.assert_close(padded.images, alone.images, rtol=1e-4, atol=1e-5)
    for got, want in zip(seen, alone.steps, strict=True):
        assert got.activations["dec4.0"].shape == want.activations["dec4.0"].shape
        torch.testing.assert_close(got.activations["dec4.0"], want.activations["dec4.0"], rtol=1e-4, atol=1e-5)

