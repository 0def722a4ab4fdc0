"""ProbeBank: file round trip and validation, and apply() against a per-probe reference on real
activations of the tiny model (the Triton kernel itself is covered by test_kernels.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ldmprobe.layers import LayerRegistry
from ldmprobe.models import config_identity, sd_v1_4_config
from ldmprobe.probes import METADATA_KEY, ProbeBank, ProbeBankError
from ldmprobe.probes.format import _checksum
from ldmprobe.schemas import GenerationSettings


@pytest.fixture(scope="module")
def acts(sampler):
    """Step-0 attn1 outputs of all 16 layers, conditional half: {layer: [1, H·W, C]}."""
    run = sampler.start(["a red apple"], [0], GenerationSettings(steps=2), layers="all")
    _, activations = run.predict()
    return activations


def full_bank(tiny) -> ProbeBank:
    """Random standard probes on every layer for steps 0-1, plus multi-column probes on dec4.0
    (K=2 with per-column normalisation, and K=17 > MAX_K so the layer needs two kernel groups)."""
    bank = ProbeBank.random(tiny, steps=(0, 1), seed=3, scheduler="lms", num_steps=15,
                            label_sources={"foreground": "TRACER", "depth": "DPT", "shading": "Intrinsic"},
                            split={"train": 246, "test": 371, "source": "beyond_surface_statistics"},
                            fit={"method": "ridge", "lambda": 10.0}, extra={"note": "test"})
    gen = torch.Generator().manual_seed(1)
    bank.add("normals", "dec4.0", 0, torch.randn(32, 2, generator=gen), torch.randn(2, generator=gen), "continuous",
             mean=[0.1, -0.2], std=[2.0, 0.5], metrics={"spearman": 0.25, "n_images": 371}, fit={"lambda": 3.0})
    bank.add("features", "dec4.0", 0, torch.randn(32, 17, generator=gen), None, "continuous", std=1.5)
    bank.add("regmask", "mid.0", 0, torch.randn(128, generator=gen), torch.tensor([0.5]), "mask", sigmoid=False)
    return bank


def reference(bank: ProbeBank, acts, step, prop, layer, size=None, mode="nearest", registry=None):
    """One probe by hand: x @ w + b, then *std + mean, sigmoid when flagged, then upsample."""
    p = bank.probe(prop, layer, step)
    spec = (registry or bank.layer_shapes)[layer]
    x = acts[layer].float()
    y = (x @ p.weight + p.bias) * torch.tensor(p.std) + torch.tensor(p.mean)
    if p.sigmoid:
        y = torch.sigmoid(y)
    y = y.reshape(x.shape[0], spec.height, spec.width, p.k).permute(0, 3, 1, 2)
    if size is not None:
        y = F.interpolate(y, size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    return y[:, 0] if p.k == 1 else y


def assert_same_probe(a, b):
    for name in ("property", "layer", "step", "kind", "sigmoid", "mean", "std", "metrics", "fit"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("weight", "bias"):
        t, u = getattr(a, name), getattr(b, name)
        assert t.dtype == u.dtype and t.shape == u.shape and torch.equal(t, u), name


def test_round_trip_all_fields(tmp_path, tiny):
    bank = full_bank(tiny)
    path = bank.save(tmp_path / "bank.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]  # no temp file left behind
    loaded = ProbeBank.load(path, tiny)
    assert loaded.metadata() == bank.metadata()
    assert list(loaded.layer_shapes) == list(bank.layer_shapes) == tiny.registry().names
    assert loaded.identity == tiny.identity and loaded.image_size == (128, 128)
    assert loaded.properties == bank.properties and loaded.layers == bank.layers and loaded.steps == [0, 1]
    assert len(loaded) == len(bank) == 16 * 3 * 2 + 3
    for p in bank:
        assert_same_probe(p, loaded.probe(p.property, p.layer, p.step))
    assert loaded.has("normals", "dec4.0", 0) and not loaded.has("normals", "dec4.0", 1)
    # The header is readable JSON with the documented keys.
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(json.loads(f.read(n))["__metadata__"][METADATA_KEY])
    assert meta["format"] == "ldmprobe.probebank" and meta["version"] == 1
    assert meta["capture_point"] == "attn1.to_out (before residual)" and meta["checksum"].startswith("sha256:")
    assert meta["layers"]["dec4.0"] == {"channels": 32, "height": 16, "width": 16}
    entry = next(e for e in meta["probes"] if e["property"] == "normals")
    assert entry["weight"] == "normals/dec4.0/0/weight" and entry["k"] == 2 and entry["std"] == [2.0, 0.5]


@pytest.mark.parametrize("size, mode", [(None, "nearest"), ((128, 128), "nearest"), ((100, 60), "nearest"),
                                        ((96, 160), "bilinear")])
def test_apply_matches_per_probe_reference(tiny, acts, size, mode):
    bank = full_bank(tiny)
    out = bank.apply(acts, 0, size=size, mode=mode, backend="torch")
    assert out.backend == "torch" and out.step == 0
    expected = {(p.property, p.layer) for p in bank if p.step == 0}
    assert set(out) == expected and len(out) == 16 * 3 + 3
    for (prop, layer), got in out.items():
        ref = reference(bank, acts, 0, prop, layer, size, mode)
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    fg = out[("foreground", "dec4.0")]
    assert fg.shape == ((1, 16, 16) if size is None else (1, *size)) and 0 <= fg.min() and fg.max() <= 1
    assert out[("normals", "dec4.0")].shape[:2] == (1, 2) and out[("features", "dec4.0")].shape[:2] == (1, 17)
    assert out.metadata()["probe_backend"] == "torch"


def test_bank_upsampling_is_recorded_and_is_the_default(tmp_path, tiny, acts):
    """A bank records how its maps were scored (`upsample`, set by the fitting job's protocol);
    apply() draws image-size maps that way unless told otherwise. A file without the key (written
    before it existed) reads as nearest, and an unknown mode is refused."""
    bank = full_bank(tiny)
    assert bank.upsample == "nearest" and bank.metadata()["upsample"] == "nearest"
    bilinear = ProbeBank.random(tiny, steps=(0,), seed=3, upsample="bilinear")
    loaded = ProbeBank.load(bilinear.save(tmp_path / "bilinear.safetensors"), tiny)
    assert loaded.upsample == "bilinear" and loaded.metadata() == bilinear.metadata()
    out = loaded.apply(acts, 0, size=(128, 128), backend="torch")
    assert out.metadata()["probe_upsample"] == "bilinear"
    for (prop, layer), got in out.items():
        torch.testing.assert_close(got, reference(loaded, acts, 0, prop, layer, (128, 128), "bilinear"),
                                   rtol=1e-5, atol=1e-5)
    assert loaded.apply(acts, 0, size=(128, 128), mode="nearest").mode == "nearest"  # an explicit mode wins
    # A file written before the key existed: its metadata lacks it, its checksum covers what it holds.
    path = tmp_path / "old.safetensors"
    bilinear.save(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(json.loads(f.read(n))["__metadata__"][METADATA_KEY])
    del meta["upsample"]
    tensors = load_file(str(path))
    meta["checksum"] = _checksum(meta, tensors)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    assert ProbeBank.load(path, tiny).upsample == "nearest"
    with pytest.raises(ProbeBankError, match="upsample must be one of nearest, bilinear"):
        ProbeBank.random(tiny, steps=(0,), upsample="bicubic")


def test_subset_selection(tiny, acts):
    bank = full_bank(tiny)
    out = bank.apply(acts, 1, properties=["depth"], layers=["dec4.0", "mid.0"])
    assert list(out) == [("depth", "mid.0"), ("depth", "dec4.0")]  # layer (execution) order
    torch.testing.assert_close(out[("depth", "dec4.0")], reference(bank, acts, 1, "depth", "dec4.0"))
    out = bank.apply(acts, 0, properties="foreground,shading", layers="enc1.0")
    assert list(out) == [("foreground", "enc1.0"), ("shading", "enc1.0")]
    # Default layers: the bank's layers that the activations hold.
    out = bank.apply({"dec3.1": acts["dec3.1"]}, 0)
    assert out.layers == ["dec3.1"] and out.properties == ["foreground", "depth", "shading"]
    # Default properties on a layer: only the probes that exist there.
    out = bank.apply(acts, 0, layers=["mid.0"])
    assert out.properties == ["foreground", "depth", "shading", "regmask"]


def test_non_square_images_with_registry(tiny, sampler):
    run = sampler.start(["a red apple"], [0], GenerationSettings(steps=1, height=64, width=128), layers="dec4,mid")
    _, acts = run.predict()
    bank = ProbeBank.random(tiny, layers="dec4,mid", seed=5)
    with pytest.raises(ProbeBankError, match="registry="):
        bank.apply(acts, 0)
    registry = tiny.registry(64, 128)
    out = bank.apply(acts, 0, registry=registry, size=(64, 128))
    assert out[("depth", "dec4.0")].shape == (1, 64, 128)
    for (prop, layer), got in out.items():
        torch.testing.assert_close(got, reference(bank, acts, 0, prop, layer, (64, 128), registry=registry))
    assert bank.apply(acts, 0, registry=registry)[("depth", "dec4.0")].shape == (1, 8, 16)


def test_triton_interpreter_matches_torch(monkeypatch, tiny, acts):
    pytest.importorskip("triton")
    bank = full_bank(tiny)
    expected = bank.apply(acts, 0, size=64, backend="torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got = bank.apply(acts, 0, size=64)
    assert got.backend == "triton-interpret" and set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


def test_bank_for_another_model_is_refused(tmp_path, tiny):
    config = sd_v1_4_config("unet")
    sd_id = config_identity(config)
    bank = ProbeBank.random(LayerRegistry.from_config(config), identity=sd_id, layers="dec4.0")
    path = bank.save(tmp_path / "sd14.safetensors")
    assert ProbeBank.load(path).identity == sd_id  # fine without a model to check against
    with pytest.raises(ProbeBankError) as err:
        ProbeBank.load(path, tiny)
    msg = str(err.value)
    assert sd_id in msg and tiny.identity in msg and "dec4.0=320" in msg and "dec4.0=32" in msg
    # Same channels but another U-Net config is refused as well.
    with pytest.raises(ProbeBankError, match="different U-Net config"):
        ProbeBank.load(path, identity="0123456789abcdef", registry=LayerRegistry.from_config(config))


def _write_raw(path, bank: ProbeBank, edit=None):
    """Save a bank's tensors and metadata by hand, after `edit(tensors, meta)`."""
    tensors, meta = bank._tensors_and_metadata()
    if edit:
        edit(tensors, meta)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def test_missing_tensor_is_named(tmp_path, tiny):
    bank = ProbeBank.random(tiny, layers="dec4.0")
    path = _write_raw(tmp_path / "b.safetensors", bank, lambda t, m: t.pop("depth/dec4.0/0/bias"))
    with pytest.raises(ProbeBankError, match="missing tensor.*depth/dec4.0/0/bias"):
        ProbeBank.load(path)


def test_wrong_shape_and_version(tmp_path, tiny):
    bank = ProbeBank.random(tiny, layers="dec4.0")

    def widen(tensors, meta):
        tensors["depth/dec4.0/0/weight"] = torch.zeros(31, 1)

    with pytest.raises(ProbeBankError, match=r"depth/dec4.0/0/weight is \[31, 1\].*expected \[32, 1\]"):
        ProbeBank.load(_write_raw(tmp_path / "a.safetensors", bank, widen))
    with pytest.raises(ProbeBankError, match="version 2 is not supported"):
        ProbeBank.load(_write_raw(tmp_path / "b.safetensors", bank, lambda t, m: m.update(version=2)))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ProbeBankError, match="not a probe bank"):
        ProbeBank.load(tmp_path / "c.safetensors")
    with pytest.raises(ProbeBankError, match="does not exist"):
        ProbeBank.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.99, 4 / 1e9])
def test_truncated_file(tmp_path, tiny, keep):
    path = ProbeBank.random(tiny).save(tmp_path / "b.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ProbeBankError, match="truncated or corrupt"):
        ProbeBank.load(path)


def test_flipped_bytes_fail_the_checksum(tmp_path, tiny):
    path = ProbeBank.random(tiny, scheduler="lms").save(tmp_path / "b.safetensors")
    good = path.read_bytes()
    bad = bytearray(good)
    bad[-3] ^= 0x10  # inside the last tensor's data
    path.write_bytes(bytes(bad))
    with pytest.raises(ProbeBankError, match="checksum mismatch"):
        ProbeBank.load(path)
    tampered = good.replace(b'\\"lms\\"', b'\\"ddm\\"')  # the scheduler, inside the escaped JSON
    assert tampered != good and len(tampered) == len(good)
    path.write_bytes(tampered)
    with pytest.raises(ProbeBankError, match="checksum mismatch"):
        ProbeBank.load(path)


def test_unknown_requests_list_the_bank(tiny, acts):
    bank = full_bank(tiny)
    holds = "properties: foreground, depth, shading, normals, features, regmask; layers: enc1.0"
    for kwargs, what in [({"properties": ["albedo"]}, "unknown property 'albedo'"),
                         ({"layers": ["dec9.0"]}, "unknown layer 'dec9.0'"),
                         ({"step": 7}, "no probes for step 7"),
                         ({"properties": ["normals"], "layers": ["mid.0"]}, "no probe for property 'normals', layer 'mid.0'")]:
        kwargs = {"step": 0} | kwargs
        with pytest.raises(ProbeBankError) as err:
            bank.apply(acts, **kwargs)
        assert what in str(err.value) and holds in str(err.value) and "steps: 0, 1" in str(err.value)
    with pytest.raises(ProbeBankError, match="no probe for property 'depth', layer 'dec4.0', step 5; this bank holds"):
        bank.probe("depth", "dec4.0", 5)
    with pytest.raises(ProbeBankError, match="no activations given for layer"):
        bank.apply({"mid.0": acts["mid.0"]}, 0, layers=["dec4.0"])
    with pytest.raises(ProbeBankError, match="mode must be"):
        bank.apply(acts, 0, mode="bicubic")


def test_add_validation(tiny):
    bank = ProbeBank.for_model(tiny)
    with pytest.raises(ProbeBankError, match=r"weight must be \[32, K\]"):
        bank.add("depth", "dec4.0", 0, torch.zeros(31))
    with pytest.raises(ProbeBankError, match="not in this bank's layer table"):
        bank.add("depth", "dec5.0", 0, torch.zeros(32))
    with pytest.raises(ProbeBankError, match="kind must be"):
        bank.add("depth", "dec4.0", 0, torch.zeros(32), kind="binary")
    with pytest.raises(ProbeBankError, match="std must be non-zero"):
        bank.add("depth", "dec4.0", 0, torch.zeros(32), std=0)
    with pytest.raises(ProbeBankError, match="needs 1 or K=2"):
        bank.add("depth", "dec4.0", 0, torch.zeros(32, 2), mean=[1, 2, 3])
    with pytest.raises(ProbeBankError, match="must be finite"):
        bank.add("depth", "dec4.0", 0, torch.full((32,), float("nan")))
    weight = torch.zeros(32)
    bank.add("depth", "dec4.0", 0, weight)
    weight += 1  # the bank keeps its own copy
    assert bank.probe("depth", "dec4.0", 0).weight.sum() == 0
    with pytest.raises(ProbeBankError, match="already holds"):
        bank.add("depth", "dec4.0", 0, torch.zeros(32))
    bank.add("depth", "dec4.0", 0, torch.ones(32), replace=True)
    assert bank.probe("depth", "dec4.0", 0).weight.sum() == 32
