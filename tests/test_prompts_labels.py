import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from training.labels import DepthModel, LabelError, LabelFiles, merge_labels, scene_labels, standardise_per_image
from training.prompts import PromptFileError, load_prompts, study_split


def test_study_splits_load_as_is():
    train, test = load_prompts(study_split("train")), load_prompts(study_split("test"))
    assert (len(train), len(test)) == (246, 371)
    assert train[0].seed == 5107435 and train[0].id == "5229800" and train[0].prompt.startswith("Elle Fanning")
    assert not {i.id for i in train} & {i.id for i in test}
    assert len(load_prompts(study_split("train"), limit=5)) == 5


def test_text_file_with_base_seed(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a lemon\n\n# not a prompt\nan orange\n")
    items = load_prompts(f, base_seed=100)
    assert [(i.id, i.prompt, i.seed) for i in items] == [("0", "a lemon", 100), ("1", "an orange", 101)]


def test_any_csv_with_the_columns(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("seeds,prompts\n3,a cat\n4,a dog\n")
    assert [(i.id, i.seed) for i in load_prompts(f)] == [("0", 3), ("1", 4)]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("a.csv", "prompt,seed\nx,1\n", "missing column(s) prompts, seeds"),
    ("b.csv", "prompts,seeds\nx,one\n", "b.csv:2: seed 'one' is not an integer"),
    ("c.csv", "prompts,seeds\nx,1\n,2\n", "c.csv:3: empty prompt"),
    ("d.csv", "prompts,seeds\nx,-4\n", "d.csv:2: seed -4 out of range"),
    ("e.csv", "prompts,seeds,prompt_inds\nx,1,7\ny,2,7\n", "duplicate prompt id '7'"),
    ("f.txt", "\n# only comments\n", "f.txt: no prompts"),
])
def test_bad_prompt_files_name_file_and_line(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(PromptFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_prompts(f)


def test_missing_and_binary_prompt_files(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "nope.csv")
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_prompts(bad)


def test_label_files_in_every_format(tmp_path):
    (tmp_path / "foreground").mkdir()
    (tmp_path / "depth").mkdir()
    (tmp_path / "shading").mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 30:50] = 255
    Image.fromarray(mask).save(tmp_path / "foreground" / "img1.png")
    depth = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    np.save(tmp_path / "depth" / "img1.npy", depth)
    save_file({"label": torch.full((64, 64), 0.25)}, str(tmp_path / "shading" / "img1.safetensors"))
    source = LabelFiles(tmp_path)
    assert source.properties == ("depth", "foreground", "shading")
    out = source(torch.zeros(1, 3, 64, 64), ["img1"])
    assert out["foreground"].shape == (1, 64, 64) and out["foreground"].sum() == 200
    assert out["depth"].shape == (1, 64, 64) and abs(float(out["depth"].mean()) - 0.5) < 0.02  # resized to 64²
    assert torch.all(out["shading"] == 0.25)
    with pytest.raises(LabelError, match=r"no depth label for image 'img2': expected .*depth/img2.png"):
        source(torch.zeros(1, 3, 64, 64), ["img2"])
    (tmp_path / "depth" / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(LabelError, match="bad.npy: unreadable label file"):
        LabelFiles(tmp_path, ("depth",))(torch.zeros(1, 3, 64, 64), ["bad"])
    with pytest.raises(LabelError, match="unknown property 'albedo'"):
        LabelFiles(tmp_path, ("albedo",))
    with pytest.raises(LabelError, match="does not exist"):
        LabelFiles(tmp_path / "nowhere")


def test_depth_model_from_a_local_folder(dpt_dir):
    model = DepthModel(dpt_dir)
    images = torch.rand(2, 3, 96, 80)
    out = model(images, ["a", "b"])
    assert out["depth"].shape == (2, 96, 80) and torch.isfinite(out["depth"]).all()
    a, b = out["depth"]
    assert (a - b).abs().max() > 1e-3 * a.abs().max() > 0  # it looks at the image (random weights: tiny values)
    with pytest.raises(LabelError, match="cannot load depth model"):
        DepthModel("/no/such/dpt")


def test_scene_labels_conventions():
    from training.scenes import render_scene

    scene = render_scene(3, (64, 64))
    labels = scene_labels([scene])
    assert torch.equal(labels["foreground"][0].bool(), torch.from_numpy(scene.mask))
    # depth is inverse z-depth like MiDaS/DPT output: larger = nearer
    np.testing.assert_allclose(labels["depth"][0].numpy(), 1.0 / scene.depth, rtol=1e-6)
    assert torch.equal(labels["shading"][0], torch.from_numpy(scene.shading))
    with pytest.raises(LabelError, match="comes from two label sources"):
        merge_labels({"depth": labels["depth"]}, {"depth": labels["depth"]})


def _soft_disk(size=64, radius=15.0, softness=1.5):
    """A TRACER-like soft saliency map: 255 · sigmoid((radius - r) / softness), as uint8."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 0.5)
    return (255 / (1 + np.exp(-(radius - r) / softness))).astype(np.uint8)


def test_standardise_per_image_known_answers():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]],  # mean 2.5, population std √1.25
                         [[7.0, 7.0], [7.0, 7.0]],  # constant: no shape to keep → zeros
                         [[2.0, float("nan")], [4.0, 6.0]]])  # NaN ignored and kept
    out = standardise_per_image(maps)
    assert torch.allclose(out[0].flatten(), (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / 1.25 ** 0.5)
    assert torch.equal(out[1], torch.zeros(2, 2))
    # [2, 4, 6]: mean 4, population std √(8/3)
    assert torch.isnan(out[2, 0, 1])
    assert torch.allclose(out[2].flatten()[[0, 2, 3]], torch.tensor([-2.0, 0.0, 2.0]) / (8 / 3) ** 0.5)
    # A depth map and the same map scaled and shifted are the same relative depth.
    assert torch.allclose(standardise_per_image(maps[:1] * 3 + 5), out[:1], atol=1e-6)


def test_mask_threshold_of_label_files(tmp_path):
    """Item 1: PNG masks are foreground at ≥ 128 by default; the study's rule (> 0, on TRACER's
    soft maps) is the option mask_threshold=0 and counts every faintly salient pixel."""
    (tmp_path / "foreground").mkdir()
    soft = _soft_disk()
    Image.fromarray(soft).save(tmp_path / "foreground" / "a.png")
    images = torch.zeros(1, 3, 64, 64)
    ours = LabelFiles(tmp_path)(images, ["a"])["foreground"][0]
    study = LabelFiles(tmp_path, mask_threshold=0)(images, ["a"])["foreground"][0]
    assert torch.equal(ours.bool(), torch.from_numpy(soft >= 128))
    assert torch.equal(study.bool(), torch.from_numpy(soft > 0))
    assert bool((study >= ours).all())  # the study's mask contains ours
    fractions = float(study.mean()), float(ours.mean())
    assert 0.38 < fractions[0] < 0.46 and 0.15 < fractions[1] < 0.19, fractions  # ~0.42 vs ~0.17
    with pytest.raises(LabelError, match="mask threshold must be 0…254"):
        LabelFiles(tmp_path, mask_threshold=255)


def test_study_csvs_read_as_iso_8859_1():
    """Item 10: the study read its UTF-8 CSVs as ISO-8859-1: 39 of the 617 prompts change, ids
    and seeds do not."""
    changed = 0
    for split in ("train", "test"):
        utf8 = load_prompts(study_split(split))
        latin = load_prompts(study_split(split), encoding="iso-8859-1")
        assert [(i.id, i.seed) for i in utf8] == [(i.id, i.seed) for i in latin]
        changed += sum(a.prompt != b.prompt for a, b in zip(utf8, latin, strict=True))
        for a, b in zip(utf8, latin, strict=True):
            assert b.prompt == a.prompt.encode("utf-8").decode("iso-8859-1")
    assert changed == 39
    choice = next(i for i in load_prompts(study_split("train"), encoding="iso-8859-1") if "TC3300" in i.prompt)
    assert "ChoiceÂ®" in choice.prompt


def test_the_study_protocol_wires_its_label_rule_and_encoding_into_the_job(tmp_path):
    """The job's label sources and prompt reading follow --protocol (explicit flags win)."""
    from training.data import DepthPerImage
    from training.fit import _sources, build_parser
    from training.recipes import resolve

    prompts = tmp_path / "p.csv"
    prompts.write_text("prompts,seeds,prompt_inds\nTraveler's Choice® TC3300,1,7\n", encoding="utf-8")
    (tmp_path / "labels" / "foreground").mkdir(parents=True)
    base = ["--mode", "generated", "--prompts", str(prompts), "--test-prompts", str(prompts),
            "--labels", f"files:{tmp_path / 'labels'}", "--out", str(tmp_path / "o")]
    seen = {}
    for protocol, extra in (("ldmprobe", []), ("study", []), ("study", ["--mask-threshold", "50",
                                                                        "--prompt-encoding", "utf-8"])):
        args = build_parser().parse_args([*base, "--protocol", protocol, *extra])
        train, _ = _sources(args, resolve(args), None, None, ("mid.0",))
        assert isinstance(train, DepthPerImage) == (protocol == "ldmprobe")  # the study keeps MiDaS's values
        train = train.source if isinstance(train, DepthPerImage) else train
        seen[(protocol, bool(extra))] = (train.items["7"].prompt, train.sources[0].mask_threshold)
    assert seen[("ldmprobe", False)] == ("Traveler's Choice® TC3300", 127)
    assert seen[("study", False)] == ("Traveler's ChoiceÂ® TC3300", 0)
    assert seen[("study", True)] == ("Traveler's Choice® TC3300", 50)


def test_capstone_shading_split_is_500_and_117_of_the_studys_617():
    """Item 5's data: the capstone's split, mapped back to prompt ids, covers the study's 617
    prompts exactly once (its 500 training images hold all 246 of the study's training split)."""
    from training.prompts import named_split

    train, test = named_split("capstone-shading", "train"), named_split("capstone-shading", "test")
    assert (len(train), len(test)) == (500, 117)
    study = {s: {i.id for i in load_prompts(study_split(s))} for s in ("train", "test")}
    ids_train, ids_test = {i.id for i in train}, {i.id for i in test}
    assert not ids_train & ids_test and ids_train | ids_test == study["train"] | study["test"]
    assert study["train"] <= ids_train and ids_test <= study["test"]
    with pytest.raises(PromptFileError, match="no split named 'nope'"):
        named_split("nope", "train")
