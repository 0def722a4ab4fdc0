"""The scenes model: its training job (determinism, kill and resume, torchrun), its data split, and the
shipped weights (sha256, deterministic sampling, a known answer for its probe bank)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from training.scenes import MODEL_SCENES, render_scene
from training.scenes_model.architecture import WORDS, build_tokenizer
from training.scenes_model.data import held_out_captions, held_out_scenes, is_held_out, triple

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--scenes", "24", "--size", "64", "--vae-steps", "4", "--vae-batch", "4", "--decoder-steps", "4", "--unet-steps", "6",
         "--batch", "4", "--checkpoint-every", "2", "--warmup", "2", "--no-progress"]


def _train(out: Path, *extra: str, env_extra: dict | None = None, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = [sys.executable, "-m", "training.scenes_model", "train", "--out", str(out), *SMALL, *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """Weights + EMA weights + optimizer moments of the final U-Net checkpoint, and the VAE's."""
    out = {f"unet:{k}": v for k, v in load_file(str(run / "unet.checkpoint.safetensors")).items()}
    out.update({f"vae:{k}": v for k, v in load_file(str(run / "vae.checkpoint.safetensors")).items()})
    out.update({f"decoder:{k}": v for k, v in load_file(str(run / "decoder.checkpoint.safetensors")).items()})
    return out


# ---------------------------------------------------------------- data


def test_held_out_captions_never_occur_in_training_renders():
    held = {c["caption"] for c in held_out_captions()}
    assert len(held) == 64
    seen = set()
    for seed in range(400):
        scene = render_scene(seed, 32, **MODEL_SCENES)
        if not is_held_out(*triple(scene.spec)):
            seen.add(scene.prompt)
    assert seen and not (seen & held)
    # each held-out caption is a new combination of a (colour, kind) pair that training does show
    pairs_seen = {(c.split()[1], c.split()[2]) for c in seen}
    assert any((c.split()[1], c.split()[2]) in pairs_seen for c in held)


def test_held_out_scenes_render_exactly_their_captions():
    scenes = held_out_scenes(10, 32)
    assert [s.prompt for s in scenes] == [c["caption"] for c in held_out_captions()[:10]]


def test_tokenizer_makes_every_caption_word_one_token():
    tok = build_tokenizer()
    for word in WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))  # BOS, the word, EOS
    pieces = tok.convert_ids_to_tokens(tok("a zebra").input_ids)[2:-1]
    assert len(pieces) > 1 and "".join(pieces).replace("</w>", "") == "zebra"  # unknown words: pieces, no error


# ---------------------------------------------------------------- the training job


@pytest.mark.slow
def test_training_is_deterministic_and_a_killed_run_resumes_to_the_same_weights(tmp_path):
    full = _train(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    line = json.loads(full.stdout.strip().splitlines()[-1])
    assert line["done"] and set(line["wall_s"]) == {"render", "vae", "decoder", "latents", "unet"}
    again = _train(tmp_path / "again")
    assert again.returncode == 0
    reference = _weights(tmp_path / "full")
    again_weights = _weights(tmp_path / "again")
    assert again_weights.keys() == reference.keys()
    assert all(torch.equal(v, again_weights[k]) for k, v in reference.items())

    # a real kill (SIGKILL) in the middle of the U-Net stage, then the same command again
    killed = tmp_path / "killed"
    proc = _train(killed, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "unet.checkpoint.safetensors").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()  # it died before finishing
    resumed = _train(killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = _weights(killed)
    assert got.keys() == reference.keys()
    assert all(torch.equal(v, got[k]) for k, v in reference.items())

    # the exported folder loads through the library and generates an image
    from ldmprobe.generate import Sampler
    from ldmprobe.models import load_model
    from ldmprobe.schemas import GenerationSettings

    model = load_model(str(killed / "model"))
    assert model.world()["render_options"]["max_objects"] == 1
    assert len(model.registry()) == 16
    img = Sampler(model).generate(["a red sphere on a grey floor"], [0], GenerationSettings(steps=2)).images
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    one = _train(tmp_path / "one")
    assert one.returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "training.scenes_model",
                          "train", "--out", str(tmp_path / "two"), *SMALL], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    weights = [k for k in a if "optim" not in k]
    # the same global batches and draws: equal up to the order of the gradient all-reduce. Adam divides
    # by sqrt(v), so where a weight's gradient is near zero a rounding difference can flip its sign and move
    # that weight by up to two learning-rate steps (lr 1e-3; 1.03e-3 measured once the world put objects
    # anywhere in the frame); a wrong sharding or draw moves every weight, which the mean catches.
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in weights])
    assert float(diffs.max()) < 2.5e-3 and float(diffs.mean()) < 1e-6, (float(diffs.max()), float(diffs.mean()))


@pytest.mark.parametrize("args, message", [
    (["train", "--out", "X", "--size", "100"], "--size"),
    (["train", "--out", "X", "--unet-steps", "0"], "--unet-steps"),
    (["train", "--out", "X", "--dtype", "int8"], "--dtype"),
    (["train", "--out", "X", "--cfg-dropout", "1.5"], "--cfg-dropout"),
    (["train", "--out", "X", "--snr-floor", "-1"], "--snr-floor"),
    (["train", "--out", "X", "--snr-floor", "6", "--snr-cap", "5"], "--snr-floor"),
    (["train", "--out", "X", "--guided-below", "2000"], "--guided-below"),
    (["train", "--out", "X", "--guided-weight", "-0.1"], "--guided-weight"),
    (["evaluate", "--captions", "0"], "--captions"),
    (["intervene", "--guidance", "-1"], "--guidance"),
    (["intervene", "--protocol", "theirs"], "--protocol"),
    (["intervene", "--layers", "dec9"], "--layers"),
    (["intervene", "--metric", "cosine"], "--metric"),
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    from training.scenes_model.__main__ import main

    args = [str(tmp_path / "o") if a == "X" else a for a in args]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_an_out_folder_of_other_settings_is_refused(tmp_path, capsys):
    from training.scenes_model.__main__ import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "job.json").write_text(json.dumps({"config": {"seed": 99}}))
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "run"), *SMALL])
    assert exc.value.code == 2 and "other settings" in capsys.readouterr().err


def test_timestep_weights_lift_the_noisy_steps_and_cap_the_clean_ones():
    """Known answer on SD's schedule: the epsilon MSE weighted by clamp(SNR, floor, cap) / SNR, mean 1."""
    from diffusers import DDPMScheduler

    from training.scenes_model.architecture import scheduler_config
    from training.scenes_model.train import timestep_weights

    ab = DDPMScheduler.from_config(scheduler_config()).alphas_cumprod
    snr = ab / (1 - ab)
    plain = timestep_weights(ab)
    assert torch.allclose(plain, torch.ones(1000))  # off: SD's plain epsilon MSE
    w = timestep_weights(ab, 0.05, 5.0)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    mid = (snr >= 0.05) & (snr <= 5)  # untouched band: one common weight
    assert torch.allclose(w[mid], w[mid][0].expand(int(mid.sum())), rtol=1e-5)
    # t = 999 (SNR 0.0047): the clean-latent error weighted as if SNR were 0.05, ~10.6× the band's
    assert (w[999] / w[mid][0]).item() == pytest.approx(0.05 / snr[999].item(), rel=1e-4)
    assert (w[0] / w[mid][0]).item() == pytest.approx(5.0 / snr[0].item(), rel=1e-4)  # min-SNR-γ at t = 0
    assert bool((w[1:] >= w[:-1] - 1e-6).all())  # never lighter as the noise grows


def test_weighted_loss_is_the_weighted_mean_of_per_sample_errors():
    from training.scenes_model.train import _DenoiseLoss

    class _Sched:
        @staticmethod
        def add_noise(x, n, t):
            return x + n

    class _Unet(torch.nn.Module):
        def forward(self, x, t, cond):
            return type("O", (), {"sample": torch.zeros_like(x)})()

    noise = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])  # per-sample MSE 1 and 4
    t = torch.tensor([0, 1])
    text = lambda ids: (torch.zeros(2, 1, 1),)  # noqa: E731
    plain = _DenoiseLoss(_Unet(), text, _Sched())
    weighted = _DenoiseLoss(_Unet(), text, _Sched(), torch.tensor([3.0, 0.5]))
    assert plain(torch.zeros_like(noise), None, noise, t).item() == pytest.approx(2.5)
    assert weighted(torch.zeros_like(noise), None, noise, t).item() == pytest.approx((3 * 1 + 0.5 * 4) / 2)


def test_guided_term_adds_the_guided_predictions_error_on_the_nearly_clean_samples_only():
    from training.scenes_model.train import _DenoiseLoss

    class _Sched:
        @staticmethod
        def add_noise(x, n, t):
            return x + n

    class _Unet(torch.nn.Module):  # predicts the caption's embedding everywhere: captions 1, the empty one 0
        def forward(self, x, t, cond):
            return type("O", (), {"sample": torch.zeros_like(x) + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)})()

    text = lambda ids: (ids.float()[..., None],)  # noqa: E731
    noise = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 3.0)])
    t, ids = torch.tensor([10, 400]), torch.ones(2, 1, dtype=torch.long)
    plain = _DenoiseLoss(_Unet(), text, _Sched())(torch.zeros_like(noise), ids, noise, t).item()
    assert plain == pytest.approx(((1 - 2) ** 2 + (1 - 3) ** 2) / 2)
    guided = _DenoiseLoss(_Unet(), text, _Sched(), empty_ids=torch.zeros(1, dtype=torch.long), guided_below=250,
                          guided_scale=7.5, guided_weight=0.1)(torch.zeros_like(noise), ids, noise, t).item()
    # only t = 10 is below 250: u + 7.5 (c - u) = 0 + 7.5 (1 - 0) against noise 2, averaged over the batch of 2
    assert guided == pytest.approx(plain + 0.1 * (7.5 - 2) ** 2 / 2)
    with pytest.raises(ValueError, match="empty caption"):
        _DenoiseLoss(_Unet(), text, _Sched(), guided_below=250, guided_weight=0.1)


# ---------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def scenes():
    from ldmprobe.models import load_model

    return load_model("scenes")


def test_shipped_files_match_their_card():
    from ldmprobe.models import SCENES_DIR
    from training.scenes_model.ship import file_hashes

    card = json.loads((SCENES_DIR / "card.json").read_text())
    assert file_hashes(SCENES_DIR) == card["sha256"]  # every file, nothing more, nothing less
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "bank.safetensors", "world.json"} <= set(card["sha256"])
    assert card["bytes_total"] <= 10 * 2**20
    assert "-m training.scenes_model train" in card["command"]
    # a model continued from an earlier one (--init) records every stage: commands and wall times that add up
    lineage = card["figures"].get("lineage")
    if lineage is not None:
        stages = [v for k, v in sorted(lineage.items()) if k.startswith("stage_")]
        # a stage is one run ("command") or several in a row ("commands", with "wall_min_each")
        assert all("-m training.scenes_model train" in c for st in stages for c in st.get("commands", [st.get("command")]))
        assert lineage["total_wall_min"] == pytest.approx(sum(st["wall_min"] for st in stages), abs=0.05)
        last = stages[-1]
        runs = list(last.get("wall_min_each", {"": last["wall_min"]}).values())
        assert len(runs) == len(last.get("commands", [None])) and sum(runs) == pytest.approx(last["wall_min"], abs=0.15)
        assert runs[-1] == pytest.approx(card["wall_min_total"], abs=0.15)  # the shipped run is the last one


def test_shipped_model_has_sd_structure_and_unit_variance_latents(scenes):
    registry = scenes.registry()
    assert len(registry) == 16 and registry["dec4.0"].height == 16  # 128² images, 16² latents
    assert scenes.unet.config.cross_attention_dim == scenes.text_encoder.config.hidden_size
    from ldmprobe.generate import Sampler

    scene_images = torch.stack([torch.from_numpy(render_scene(s, 128, **MODEL_SCENES).image).permute(2, 0, 1).float() / 255
                                for s in range(2_000_000, 2_000_016)])
    latents = Sampler(scenes).encode(scene_images)
    assert 0.7 < float(latents.std()) < 1.3  # scaling_factor = 1 / std, as SD's 0.18215


def test_same_seed_same_image(scenes):
    from ldmprobe.generate import Sampler
    from ldmprobe.schemas import GenerationSettings

    sampler, settings = Sampler(scenes), GenerationSettings(steps=6)
    a = sampler.generate(["a red sphere on a grey floor"] * 2, [7, 8], settings, layers=None).images
    b = sampler.generate(["a red sphere on a grey floor"] * 2, [7, 8], settings, layers=None).images
    alone = sampler.generate(["a red sphere on a grey floor"], [7], settings, layers=None).images
    assert torch.equal(a, b)  # same call, same bytes
    assert float((a[0] - a[1]).abs().mean()) > 0.01  # another seed, another image
    torch.testing.assert_close(alone[0], a[0], rtol=0, atol=1e-3)  # a batch changes float sums only


def test_shipped_bank_finds_the_object_on_rendered_scenes(scenes):
    """Known answer: the bank's best foreground probe at the last step, on 8 renders it was not fitted on
    (noised mode, exact masks), finds the object with Dice >= 0.8."""
    from ldmprobe.generate import Sampler
    from ldmprobe.metrics import dice
    from ldmprobe.models import SCENES_DIR
    from ldmprobe.probes import ProbeBank
    from ldmprobe.schemas import GenerationSettings

    bank = ProbeBank.load(SCENES_DIR / "bank.safetensors", scenes)
    last = max(bank.steps)
    best = max((p for p in bank if p.property == "foreground" and p.step == last), key=lambda p: p.metrics["dice"])
    renders = [render_scene(s, 128, **MODEL_SCENES) for s in range(3_000_000, 3_000_008)]
    images = torch.stack([torch.from_numpy(r.image).permute(2, 0, 1).float() / 255 for r in renders])
    acts = Sampler(scenes).noised_activations(images, [r.prompt for r in renders], list(range(8)),
                                              GenerationSettings(steps=len(bank.steps)), layers=best.layer, steps=[last])
    maps = bank.apply({best.layer: acts[best.layer][:, 0]}, last, properties="foreground", layers=best.layer,
                      size=(128, 128))
    masks = torch.stack([torch.from_numpy(r.mask).float() for r in renders])
    scores = dice(maps["foreground", best.layer], masks, 0.5)
    assert float(scores.mean()) >= 0.8, scores


def test_tokenizer_is_the_same_in_every_process():
    """The vocabulary (token ids) must not depend on the process: a model is trained on the ids of one."""
    code = "from training.scenes_model.architecture import build_tokenizer; import json; print(json.dumps(build_tokenizer().get_vocab(), sort_keys=True))"
    outs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": str(seed)}).stdout
            for seed in (1, 2, 3)}
    assert len(outs) == 1 and json.loads(outs.pop()) == build_tokenizer().get_vocab()


def test_shipped_tokenizer_gives_the_training_job_ids():
    """The shipped folder's tokenizer must map captions to the ids the model was trained on (an earlier
    shipped tokenizer.json, saved from a hash-ordered BPE, did not: 'sphere' and 'on' had other ids)."""
    from transformers import CLIPTokenizer

    from ldmprobe.models import SCENES_DIR

    shipped, training = CLIPTokenizer.from_pretrained(str(SCENES_DIR / "tokenizer")), build_tokenizer()
    captions = [c["caption"] for c in held_out_captions()] + [" ".join(WORDS), "a zebra", ""]
    kw = {"padding": "max_length", "max_length": 77, "truncation": True}
    assert shipped(captions, **kw).input_ids == training(captions, **kw).input_ids


@pytest.mark.slow
def test_activation_metric_intervention_moves_the_object_on_the_shipped_model(tmp_path, capsys):
    """`scenes_model intervene` on 4 held-out captions, dx ±24, guidance 7.5, ldmprobe's layers (all 16):
    the default edit (the activation metric) moves the object as the segmenter sees it in the images
    (stage 7, runs/iv32-m12-g7.5: 1.03 mean on these 4, 0.94 on 32), the study's Euclidean edit of the same
    layers far less (stage 4, runs/iv32-euclid-all-g7.5: 0.10 on these 4, 0.06 on 32)."""
    from training.scenes_model.__main__ import main

    seen = {}
    for metric in ("activation", "euclidean"):
        assert main(["intervene", "--captions", "4", "--dx", "24", "--dx", "-24", "--metric", metric,
                     "--out", str(tmp_path / metric)]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["metric"] == metric and line["summary"]["n_measured"] == 4
        seen[metric] = line["summary"]
    assert seen["activation"]["label_model_shift_fraction_mean"] >= 0.5, seen
    assert seen["activation"]["label_model_shift_fraction_mean"] > seen["euclidean"]["label_model_shift_fraction_mean"] + 0.2
    assert seen["activation"]["dice_better_fraction"] == 1.0
    rows = json.loads((tmp_path / "activation" / "intervene.json").read_text())["rows"]
    with Image.open(tmp_path / "activation" / "intervene.png") as im:
        assert im.format == "PNG" and im.width > 300
    assert [r["dx"] for r in rows] == [24.0, -24.0, 24.0, -24.0]


def test_card_keeps_summaries_not_long_tables():
    from training.scenes_model.ship import LONG_ROWS, compact_figures

    figures = {"probes": {"rows": [{"v": i} for i in range(LONG_ROWS + 1)], "summary": {"best": 0.9}},
               "evaluate": {"rows": [1, 2], "colour": 0.9}, "lineage": {"total_wall_min": 1.0},
               "samples": {"model_rows": list(range(64)), "renders_rows": [0], "colour": 1.0}}
    out = compact_figures(figures)
    assert "rows" not in out["probes"] and out["probes"]["summary"] == {"best": 0.9}
    assert out["probes"]["rows_omitted"].startswith(f"{LONG_ROWS + 1} rows")
    assert out["samples"] == {"renders_rows": [0], "colour": 1.0, "model_rows_omitted": out["samples"]["model_rows_omitted"]}
    assert out["samples"]["model_rows_omitted"].startswith("64 rows")
    assert out["evaluate"] == figures["evaluate"] and out["lineage"] == figures["lineage"]


def test_ship_replaces_the_weights_and_keeps_the_hand_written_readmes(tmp_path):
    """Shipping a new run swaps every weight file and rewrites the card, but the folder's summary
    README.md and the pointer READMEs beside the weights (written by hand) survive, outside the hashes."""
    from training.scenes_model.ship import sha256, ship

    run = tmp_path / "run"
    (run / "model" / "unet").mkdir(parents=True)
    (run / "model" / "unet" / "w.safetensors").write_bytes(b"new")
    (run / "job.json").write_text(json.dumps({"config": {"scenes": 8, "seed": 0}, "wall_s": {"unet": 60.0},
                                              "scaling_factor": 0.5}))
    to = tmp_path / "scenes"
    (to / "unet").mkdir(parents=True)
    (to / "unet" / "w.safetensors").write_bytes(b"old")
    (to / "stale.safetensors").write_bytes(b"gone")
    (to / "README.md").write_text("summary")
    (to / "unet" / "README.md").write_text("pointer")
    card = ship(run, to, "cmd", {"evaluate": {"colour": 1.0}})
    assert (to / "unet" / "w.safetensors").read_bytes() == b"new" and not (to / "stale.safetensors").exists()
    assert (to / "README.md").read_text() == "summary" and (to / "unet" / "README.md").read_text() == "pointer"
    assert card["sha256"] == {"unet/w.safetensors": sha256(to / "unet" / "w.safetensors")}
    assert json.loads((to / "card.json").read_text())["figures"]["evaluate"] == {"colour": 1.0}


def test_depth_region_oracles_on_known_maps():
    """The exact map scores 1 everywhere; a map right on the object and sky but flat on the floor scores the
    flat-floor ceiling and gains everything from the floor oracle; block-averaging a row gradient at the
    map's own resolution keeps it monotone (ties only)."""
    import numpy as np

    from training.scenes_model.depth_ceiling import region_oracles

    h = w = 16
    ids = np.zeros((h, w), int)
    ids[:4] = -1  # sky on top
    ids[8:12, 6:10] = 1  # an object
    inv = np.tile(np.linspace(0.1, 1.0, h)[:, None], (1, w))  # floor nearer towards the bottom
    inv[ids == -1] = 0.02
    inv[ids == 1] = 0.5
    exact = region_oracles(inv, inv, ids, grid=4)
    assert all(abs(v - 1.0) < 1e-9 for k, v in exact.items() if k != "ceiling_flat_floor" and k != "ceiling_block_average")
    assert exact["ceiling_flat_floor"] < 0.9
    flat = inv.copy()
    flat[ids == 0] = inv[ids == 0].mean()
    got = region_oracles(flat, inv, ids, grid=4)
    assert abs(got["probe"] - got["ceiling_flat_floor"]) < 1e-9 and abs(got["floor_exact"] - 1.0) < 1e-9
    assert got["probe"] < 0.9 and np.isnan(got["floor_only"])
    assert 0.9 < got["ceiling_block_average"] < 1.0
    # A probe fitted to relative depth (--depth-norm image) has other units: the oracles swap in the exact
    # map in those units, so every figure is the same for the map scaled and shifted.
    rng = np.random.default_rng(0)
    noisy = inv + 0.05 * rng.standard_normal(inv.shape)
    raw, scaled = region_oracles(noisy, inv, ids, grid=4), region_oracles(3.0 * noisy - 2.0, inv, ids, grid=4)
    assert raw.keys() == scaled.keys() and all(abs(raw[k] - scaled[k]) < 1e-9 for k in raw)
    assert raw["floor_exact"] > raw["probe"]  # the exact floor, in the noisy map's units, helps

