"""The scenes world's label models: known answers of the shipped models on fresh renders, the loader's
contract, the `scenes:` label source of the fitting job, and a smoke run of the training job."""

import hashlib
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldmprobe.label_models import SCENES_LABELS_DIR, LabelModelError, LabelModels, load_label_models
from ldmprobe.metrics import dice, spearman
from training.label_models import TEST_SEED_OFFSET, TRAIN_SEED_OFFSET, gaussian_blur, main, render_set, to_float
from training.scenes import KINDS, MODEL_COLORS, MODEL_SCENES, render_scene

N_TEST = 32


@pytest.fixture(scope="module")
def shipped() -> LabelModels:
    return load_label_models()


@pytest.fixture(scope="module")
def renders():
    """Fresh renders of the scenes world, seeds the training job never uses (its training seeds start at
    TRAIN_SEED_OFFSET, its held-out evaluation at EVAL_SEED_OFFSET)."""
    return render_set(range(TEST_SEED_OFFSET, TEST_SEED_OFFSET + N_TEST))


def _figures(models: LabelModels, data, blur: float = 0.0) -> dict[str, float]:
    """Per-image figures through the public methods (not the job's evaluate), averaged."""
    x = to_float(data["image"])
    if blur:
        x = gaussian_blur(x, blur)
    fg, depth, shading = models.foreground(x), models.depth(x), models.shading(x)
    valid = torch.from_numpy(data["valid"])
    inv = torch.from_numpy(1.0 / data["depth"])
    sh = torch.from_numpy(data["shading"])
    d = dice(fg, torch.from_numpy(data["mask"]))
    rho_d = [float(spearman(depth[i][valid[i]][None], inv[i][valid[i]][None])[0]) for i in range(len(x))]
    rho_s = [float(spearman(shading[i][valid[i]][None], sh[i][valid[i]][None])[0]) for i in range(len(x))]
    pred = models.classify(x).argmax(1).tolist()
    return {"dice": float(d.mean()), "depth": float(np.nanmean(rho_d)), "shading": float(np.nanmean(rho_s)),
            "top1": float(np.mean([p == t for p, t in zip(pred, data["label"].tolist(), strict=True)]))}


def test_shipped_models_meet_their_targets_on_fresh_clean_renders(shipped, renders):
    """Targets: Dice ≥ 0.9, depth Spearman ≥ 0.9, shading Spearman ≥ 0.8 (over valid pixels, through
    the structure head's ties: test_shading_spearman_is_tie_bound says why the shading head alone cannot)."""
    f = _figures(shipped, renders)
    assert f["dice"] >= 0.9, f
    assert f["depth"] >= 0.9, f
    assert f["shading"] >= 0.8, f


def test_shipped_classifier_on_fresh_renders(shipped, renders):
    """The VGG-layout classifier (96 px input, card.md): top-1 0.953 on the card's 128 held-out renders of the
    world with the object anywhere in the frame; ≥ 0.9 on these 32 fresh renders too, the colour nearly always right."""
    pred = shipped.classify(to_float(renders["image"])).argmax(1).numpy()
    assert (pred == renders["label"]).mean() >= 0.9
    assert (pred // len(KINDS) == renders["label"] // len(KINDS)).mean() >= 0.95


def test_shading_spearman_is_tie_bound(renders):
    """Why the shading map ties (structured_shading): the exact label with a little noise loses most of the
    way to 0.8; any continuous map is ranked at random inside the label's ties (the evenly lit floor)."""
    t = torch.from_numpy(renders["shading"])
    valid = torch.from_numpy(renders["valid"])
    gen = torch.Generator().manual_seed(0)
    rho = [float(spearman((t[i][valid[i]] + 0.02 * torch.randn(int(valid[i].sum()), generator=gen))[None],
                          t[i][valid[i]][None])[0]) for i in range(len(t))]
    assert np.nanmean(rho) < 0.87


def test_shipped_models_are_robust_to_blur(shipped, renders):
    """Applied to blurry intermediate decodes: on renders blurred by σ = 1.5 px the figures stay close to
    the clean thresholds (relaxed by 0.05, since blur removes the edge and shading detail they are scored on)."""
    f = _figures(shipped, renders, blur=1.5)
    assert f["dice"] >= 0.85, f
    assert f["depth"] >= 0.85, f
    assert f["shading"] >= 0.75, f
    assert f["top1"] >= 0.35, f  # the classifier's clean level (see above), kept under blur


def test_classifier_names_the_rendered_object(shipped):
    """class_index(colour, kind) of each render's own object ranks high among the 24 logits (a cube
    counts as a box), and the argmax names the right colour in most renders."""
    ranks, colours = [], 0
    scenes = [render_scene(TEST_SEED_OFFSET + 100 + i, 128, **MODEL_SCENES) for i in range(16)]
    logits = shipped.classify(to_float(np.stack([s.image for s in scenes])))
    for s, row in zip(scenes, logits, strict=True):
        (obj,) = s.spec.objects
        target = shipped.class_index(obj.material.color, obj.kind)
        ranks.append(int((row > row[target]).sum()))
        colours += shipped.class_names[int(row.argmax())].split()[0] == obj.material.color
    assert np.mean([r < 3 for r in ranks]) >= 0.8 and colours >= 12, (ranks, colours)
    assert shipped.class_index("red", "cube") == shipped.class_index("red", "box")
    with pytest.raises(KeyError, match="white sphere"):
        shipped.class_index("white", "sphere")


def test_outputs_shapes_ranges_and_conventions(shipped, renders):
    assert shipped.class_names == [f"{c} {k}" for c in MODEL_COLORS for k in KINDS]
    assert set(shipped.modules) == {"dense", "classifier"} and all(not m.training for m in shipped.modules.values())
    assert str(SCENES_LABELS_DIR) == shipped.source
    x = to_float(renders["image"][:4])
    fg, depth, shading, logits = shipped.foreground(x), shipped.depth(x), shipped.shading(x), shipped.classify(x)
    assert fg.shape == depth.shape == shading.shape == (4, 128, 128) and logits.shape == (4, 24)
    assert all(t.dtype == torch.float32 for t in (fg, depth, shading, logits))
    assert 0 <= fg.min() and fg.max() <= 1 and 0 <= shading.min() and shading.max() <= 1 and depth.min() > 0
    assert torch.allclose(depth.log().flatten(1).mean(1), torch.zeros(4), atol=1e-4)  # geometric mean 1
    # larger = nearer: the object (in front of the floor behind it) is nearer than the sky / far floor
    inv = torch.from_numpy(1.0 / renders["depth"][:4])
    assert all(float(spearman(depth[i][None], inv[i][None])[0]) > 0.8 for i in range(4))
    # other sizes (multiples of 8) are resized in and out
    small = torch.nn.functional.interpolate(x, size=(64, 96), mode="bilinear", antialias=True)
    assert shipped.foreground(small).shape == (4, 64, 96) and shipped.classify(small).shape == (4, 24)
    # batching does not change answers (eval-mode batch norm)
    one = torch.cat([shipped.foreground(x[i:i + 1]) for i in range(4)])
    assert torch.allclose(one, fg, atol=1e-5)
    maps = shipped.maps(x)
    assert torch.allclose(maps["foreground"], fg) and torch.allclose(maps["depth"], depth)
    for bad in (torch.rand(1, 3, 60, 64), torch.rand(1, 1, 64, 64), (torch.rand(1, 3, 64, 64) * 255).byte()):
        with pytest.raises(ValueError):
            shipped.foreground(bad)


def test_shipped_card_matches_the_files():
    card = json.loads((SCENES_LABELS_DIR / "card.json").read_text())
    for name, entry in card["files"].items():
        path = SCENES_LABELS_DIR / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], name
        assert path.stat().st_size == entry["bytes"]
    weights = sum((SCENES_LABELS_DIR / n).stat().st_size for n in card["files"] if n.endswith(".safetensors"))
    assert weights <= 3 * 2**20
    clean = card["figures"]["clean"]
    assert card["meets_targets"] == {k: clean[k] >= v for k, v in card["targets"].items()}
    assert clean["images"] == card["eval_scenes"] and card["eval_seeds"][0] > card["train_seeds"][1]
    # The shading head alone sits under what a tie-free map can reach against exact (tied) shading; the
    # structured map ties where the label does and passes that ceiling, with a lower RMSE, not only better ranks.
    ceiling, head = clean["ceiling"], clean["shading_head"]
    assert ceiling["shading_spearman"] < 0.85 and head["shading_spearman"] <= ceiling["shading_spearman"]
    assert head["shading_spearman_all_pixels"] <= ceiling["shading_spearman_all_pixels"] < 0.9
    assert clean["shading_spearman"] > ceiling["shading_spearman"] and clean["shading_rmse"] < head["shading_rmse"]
    md = (SCENES_LABELS_DIR / "card.md").read_text()
    assert "ceiling: the exact labels, ties broken" in md and "clean: shading head alone" in md


def test_loader_names_what_is_missing_or_wrong(tmp_path):
    with pytest.raises(LabelModelError, match="no-such-folder.*does not exist"):
        load_label_models(tmp_path / "no-such-folder")
    assert issubclass(LabelModelError, ValueError)
    folder = tmp_path / "copy"
    shutil.copytree(SCENES_LABELS_DIR, folder)
    (folder / "dense.safetensors").unlink()
    with pytest.raises(LabelModelError, match="missing weight file .*dense.safetensors"):
        load_label_models(folder)
    shutil.copy(SCENES_LABELS_DIR / "dense.safetensors", folder / "dense.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["dense"]["widths"] = [w * 2 for w in config["dense"]["widths"]]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LabelModelError, match="dense.safetensors does not match its config"):
        load_label_models(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(LabelModelError, match="unreadable .*config.json"):
        load_label_models(folder)
    (folder / "config.json").unlink()
    with pytest.raises(LabelModelError, match="missing .*config.json"):
        load_label_models(folder)


def test_scenes_label_source(shipped, renders):
    from training.labels import LabelError, SceneLabelModels, merge_labels

    x = to_float(renders["image"][:6])
    source = SceneLabelModels()
    out = source(x, [str(i) for i in range(6)])
    assert set(out) == set(source.properties) == {"foreground", "depth", "shading"}
    assert all(v.shape == (6, 128, 128) and v.dtype == torch.float32 for v in out.values())
    assert set(out["foreground"].unique().tolist()) <= {0.0, 1.0}
    p = shipped.foreground(x)
    assert torch.equal(out["foreground"], ((p * 255).round() > 127).float())  # PNG-mask rule, P ≥ 0.5
    assert torch.allclose(out["depth"], shipped.depth(x)) and torch.allclose(out["shading"], shipped.shading(x))
    study = SceneLabelModels(mask_threshold=0)(x, [])  # the study's rule for TRACER: any salient pixel
    assert (study["foreground"] >= out["foreground"]).all() and study["foreground"].sum() >= out["foreground"].sum()
    assert float(dice(out["foreground"], torch.from_numpy(renders["mask"][:6])).mean()) > 0.85
    merge_labels(out)  # one source, three properties
    with pytest.raises(LabelError, match="no/such/labels"):
        SceneLabelModels("/no/such/labels")


def test_fit_and_report_accept_scenes_labels(tmp_path):
    from training.data import DepthPerImage
    from training.fit import _sources, build_parser
    from training.labels import LabelError, SceneLabelModels
    from training.recipes import resolve
    from training.report import ReportError, curve_target

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red sphere on a grey floor\n")
    sampler = SimpleNamespace(model=SimpleNamespace(device=torch.device("cpu")))
    base = ["--mode", "generated", "--prompts", str(prompts), "--test-prompts", str(prompts), "--out", str(tmp_path / "o")]
    seen = {}
    for spec, protocol in (("scenes:", "ldmprobe"), ("scenes", "study"), (f"scenes:{SCENES_LABELS_DIR}", "ldmprobe")):
        args = build_parser().parse_args([*base, "--labels", spec, "--protocol", protocol])
        train, test = _sources(args, resolve(args), sampler, None, ("mid.0",))
        assert isinstance(train, DepthPerImage) == (protocol == "ldmprobe")  # --depth-norm image wraps it
        (src,) = (train.source if isinstance(train, DepthPerImage) else train).sources
        assert isinstance(src, SceneLabelModels) and src.source == str(SCENES_LABELS_DIR)
        seen[spec] = src.mask_threshold
    assert seen == {"scenes:": 127, "scenes": 0, f"scenes:{SCENES_LABELS_DIR}": 127}
    args = build_parser().parse_args([*base, "--labels", f"scenes:{tmp_path / 'none'}"])
    with pytest.raises(LabelError, match="none"):
        _sources(args, resolve(args), sampler, None, ("mid.0",))
    assert curve_target("scenes:") == ("scenes", "") and curve_target("dpt:x") == ("dpt", "x")
    with pytest.raises(ReportError, match="scenes:DIR"):
        curve_target("magic:x")


def test_augmentation_helpers():
    from training.label_models import augment

    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(gaussian_blur(x, 0.0), x)
    blurred = gaussian_blur(x, torch.tensor([0.0, 1.0, 3.0]))
    assert torch.allclose(blurred[0], x[0]) and blurred[1].std() > blurred[2].std()
    images = (np.random.default_rng(0).random((4, 32, 32, 3)) * 255).astype(np.uint8)
    a = augment(images.copy(), np.random.default_rng(5))
    b = augment(images.copy(), np.random.default_rng(5))
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, augment(images.copy(), np.random.default_rng(6)))


def test_gradient_matching_asks_for_flat_where_the_label_is_flat():
    """Known answers: zero for the label plus a constant (shift-free, like Spearman); a wobble on a flat
    region costs more than a constant offset of the same RMSE; a step where the label has none costs."""
    from training.label_models import dense_loss, gradient_matching

    t = torch.zeros(2, 16, 16)
    t[:, 4:12, 4:12] = 0.8  # an object on a flat floor
    assert float(gradient_matching(t + 0.3, t)) == pytest.approx(0.0, abs=1e-6)
    wobble = t + 0.05 * torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    offset = t + float((wobble - t).square().mean().sqrt())
    assert float(gradient_matching(wobble, t)) > 0.01 > float(gradient_matching(offset, t))
    stepped = t.clone()
    stepped[:, :, 12:] += 0.2
    assert float(gradient_matching(stepped, t)) > 0
    # in the dense loss it is the shading term's partner, off at weight 0
    out = torch.zeros(2, 3, 16, 16, requires_grad=True)
    ones = torch.ones(2, 16, 16)
    on = dense_loss(out, ones * 0, ones, ones * 5, t, grad_weight=4.0)
    off = dense_loss(out, ones * 0, ones, ones * 5, t, grad_weight=0.0)
    assert float(on["shading_grad"]) > 0 and float(off["shading_grad"]) == 0
    assert float(on["total"] - off["total"]) == pytest.approx(4.0 * float(on["shading_grad"]), rel=1e-5)


def test_tie_variance_asks_for_one_value_wherever_the_label_has_one():
    """Known answers: zero for a prediction constant on each tie at any level; a slow drift across the
    tied floor costs its variance times the floor's share; a value held by too few pixels is no tie; gradients reach the prediction; weight 0 switches it off."""
    from training.label_models import dense_loss, tie_variance

    t = torch.full((1, 16, 16), 0.6)  # the evenly lit floor
    t[:, 4:8, 4:8] = torch.linspace(0.1, 0.9, 16).reshape(4, 4)  # an object's varying shading (no ties)
    assert float(tie_variance(t + 0.2, t)) == pytest.approx(0.0, abs=1e-9)
    drift = t + torch.where(t == 0.6, torch.linspace(-0.05, 0.05, 16)[:, None].expand(16, 16), torch.zeros(16, 16))
    floor = (t == 0.6)[0]
    expected = float(drift[0][floor].var(unbiased=False)) * float(floor.float().mean())
    assert float(tie_variance(drift, t)) == pytest.approx(expected, rel=1e-5)
    assert float(tie_variance(drift, t, min_fraction=0.95)) == 0.0  # the floor is 94 % of the pixels
    p = drift.clone().requires_grad_()
    tie_variance(p, t).backward()
    assert p.grad[0][floor].abs().sum() > 0 and p.grad[0][~floor].abs().sum() == 0
    out = torch.zeros(1, 3, 16, 16)
    out[:, 2] = torch.logit(drift.clamp(0.01, 0.99))
    ones = torch.ones(1, 16, 16)
    on = dense_loss(out, ones * 0, ones, ones * 5, t, grad_weight=0.0, tie_weight=50.0)
    off = dense_loss(out, ones * 0, ones, ones * 5, t, grad_weight=0.0, tie_weight=0.0)
    assert float(on["shading_tie"]) > 0 and float(off["shading_tie"]) == 0
    assert float(on["total"] - off["total"]) == pytest.approx(50.0 * float(on["shading_tie"]), rel=1e-4)


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    """--init-from: zero training steps' worth of change (lr 0) leaves the shipped weights as they were,
    and the card names where the run started."""
    from ldmprobe.label_models import SCENES_LABELS_DIR as shipped_dir

    out = tmp_path / "ft"
    assert main(["--out", str(out), "--init-from", str(shipped_dir), "--shading-structure", "--scenes", "8", "--eval-scenes", "2",
                 "--dense-steps", "1", "--classifier-steps", "1", "--batch", "4", "--lr", "0", "--classifier-size",
                 "64", "--eval-blur", "2", "--no-progress"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["init_from"]["folder"] == str(shipped_dir) and card["init_from"]["command"]
    a, b = load_label_models(out), load_label_models()
    for name in ("dense", "classifier"):
        for (k, v), (k2, v2) in zip(a.modules[name].state_dict().items(), b.modules[name].state_dict().items(), strict=True):
            if v.is_floating_point() and "running" not in k:  # BN statistics move in train mode even at lr 0
                assert k == k2 and torch.allclose(v.float(), v2.float(), atol=1e-3), k


def test_global_context_starts_as_a_no_op_and_then_reads_the_whole_image():
    """DenseLabelNet(global_context=True) loaded with the weights of one without it computes the same
    function (its MLP's last layer is zero); once that layer is not zero, a change at one corner of the
    image reaches the opposite corner's outputs, beyond the trunk's receptive field."""
    from ldmprobe.label_models import DenseLabelNet

    torch.manual_seed(0)
    plain, ctx = DenseLabelNet(widths=(8, 8, 8)).eval(), DenseLabelNet(widths=(8, 8, 8), global_context=True).eval()
    ctx.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(ctx(x), plain(x))
        torch.nn.init.normal_(ctx.context[0].weight, std=100.0)  # fresh batch norms leave tiny features
        torch.nn.init.normal_(ctx.context[2].weight)
        y = x.clone()
        y[:, :, :16, :16] = 1 - y[:, :, :16, :16]
        far = (slice(None), slice(None), slice(-16, None), slice(-16, None))
        assert torch.equal(plain(x)[far], plain(y)[far])  # out of the plain trunk's reach
        assert (ctx(x)[far] - ctx(y)[far]).abs().max() > 0  # the same trunk: only the context carries it


def test_fine_tuning_may_add_global_context(tmp_path):
    """--init-from a model without global context + --dense-global-context: the run starts from those
    weights (the new part at zero), its config says so, and the folder loads with it."""
    from ldmprobe.label_models import SCENES_LABELS_DIR as shipped_dir

    out = tmp_path / "ctx"
    assert main(["--out", str(out), "--init-from", str(shipped_dir), "--classifier-from", str(shipped_dir),
                 "--dense-global-context", "--shading-structure", "--scenes", "8", "--eval-scenes", "2", "--dense-steps", "1", "--batch", "4",
                 "--lr", "0", "--classifier-size", str(load_label_models().config["classifier"].get("input_size", 96)),
                 "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["dense"]["global_context"] is True
    loaded = load_label_models(out)
    assert loaded.modules["dense"].context is not None
    assert float(loaded.modules["dense"].context[2].weight.abs().max()) == 0.0  # lr 0: still the no-op start


def test_structured_shading_ties_where_the_structure_head_is_sure():
    """Known answer: zero-shading p > 0.5 reads 0; the rest of the floor (p > 0.5) reads the shading
    head's median over it, one value per image; every other pixel keeps the head's sigmoid; without the
    structure channels the map is the sigmoid alone."""
    from ldmprobe.label_models import structured_shading

    logit = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, -2.0, 0.5, 4.0]])
    floor = torch.tensor([[5.0, 5.0, 5.0, -5.0], [-5.0, 5.0, 5.0, -5.0]])
    zero = torch.tensor([[-5.0, -5.0, -5.0, -5.0], [-5.0, 5.0, -5.0, 5.0]])
    raw = torch.stack([torch.zeros(2, 4), torch.zeros(2, 4), logit, floor, zero])[None]
    out = structured_shading(raw)[0]
    s = torch.sigmoid(logit)
    floor_value = torch.sigmoid(torch.tensor([0.0, 1.0, 2.0, 0.5])).median()  # floor, not zero: 4 pixels
    expected = torch.tensor([[floor_value] * 3 + [s[0, 3]], [s[1, 0], 0.0, floor_value, 0.0]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(structured_shading(raw[:, :3]), s[None])


def test_structure_head_trains_alone(tmp_path):
    """--shading-structure --dense-train structure from the shipped models: the structure head's weights
    move, every other output (foreground, depth, the shading head) stays bit-identical, and the config
    and card say so."""
    from ldmprobe.label_models import SCENES_LABELS_DIR as shipped_dir

    out = tmp_path / "structure"
    assert main(["--out", str(out), "--init-from", str(shipped_dir), "--classifier-from", str(shipped_dir),
                 "--shading-structure", "--dense-train", "structure", "--scenes", "8", "--eval-scenes", "2",
                 "--dense-steps", "2", "--batch", "4", "--lr", "1e-2", "--eval-blur", "2",
                 "--classifier-size", str(load_label_models().config["classifier"].get("input_size", 96)),
                 "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dense"]["shading_structure"] is True and len(config["dense_channels"]) == 5
    mine, theirs = load_label_models(out), load_label_models()
    x = to_float(render_set([TEST_SEED_OFFSET, TEST_SEED_OFFSET + 1])["image"])
    a, b = mine.raw(x), theirs.raw(x)
    assert a.shape == (2, 5, 128, 128) and torch.equal(a[:, :3], b[:, :3])
    assert not torch.equal(a[:, 3:], b[:, 3:])
    card = json.loads((out / "card.json").read_text())
    assert "shading_head" in card["figures"]["clean"] and "shading structure" in card["architecture"]["dense"]
    assert "shading head alone" in (out / "card.md").read_text()


def test_training_job_smoke(tmp_path, capsys):
    out = tmp_path / "labels"
    argv = ["--out", str(out), "--scenes", "12", "--eval-scenes", "4", "--dense-steps", "2", "--classifier-steps", "2",
            "--batch", "4", "--dense-widths", "8,8,8", "--vgg-widths", "4,4,8,8,8", "--vgg-hidden", "8",
            "--eval-blur", "2", "--no-progress"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    card = json.loads((out / "card.json").read_text())
    assert card["command"] == "python -m training.label_models " + " ".join(argv)
    assert card["seed"] == 0 and card["train_seeds"] == [TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + 11]
    assert set(card["wall_s"]) == {"render", "dense", "classifier", "evaluate"}
    assert set(card["figures"]) == {"clean", "blur σ=2"}
    assert set(card["figures"]["clean"]) >= {"dice", "depth_spearman", "shading_spearman", "top1"}
    assert set(card["files"]) == {"config.json", "dense.safetensors", "classifier.safetensors"}
    for name, entry in card["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    assert "## Held-out figures" in (out / "card.md").read_text()
    ceiling = card["figures"]["clean"]["ceiling"]  # exact shading ties (lit floor, shadows); depth does not
    assert ceiling["shading_spearman"] < 0.95 and ceiling["depth_spearman"] > 0.99
    assert "ceiling: the exact labels, ties broken" in (out / "card.md").read_text()
    models = load_label_models(out)
    assert models.source == str(out) and models.modules["dense"].widths == (8, 8, 8)
    x = to_float(render_set([TEST_SEED_OFFSET])["image"])
    assert models.depth(x).shape == (1, 128, 128) and models.classify(x).shape == (1, 24)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize("args", [["--vgg-widths", "4,4,4"], ["--shading-grad-weight", "-1"],
                                  ["--shading-tie-weight", "nan"],
                                  ["--init-from", "no/such/folder"], ["--classifier-from", "no/such/folder"],
                                  ["--init-from", "SHIPPED", "--dense-widths", "8,8,8"],
                                  ["--classifier-from", "SHIPPED", "--classifier-size", "128"],
                                  ["--init-from", "SHIPPED", "--dense-train", "structure"],
                                  ["--shading-structure", "--dense-train", "structure"]])
def test_training_job_rejects_bad_input(tmp_path, args):
    """Bad values, missing folders, and weights that do not fit the asked architecture (the shipped
    dense model is 16…64 wide, its classifier reads 64 px): exit 2, nothing written."""
    args = [str(SCENES_LABELS_DIR) if a == "SHIPPED" else a for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x"), *args, "--scenes", "4", "--batch", "2", "--eval-scenes", "1"])
    assert exc.value.code == 2
    assert not (tmp_path / "x").exists()
