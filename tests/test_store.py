import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ldmprobe.schemas import GenerationSettings
from ldmprobe.store import ActivationStore, ActivationWriter, StoreError


@pytest.fixture(scope="module")
def generated(sampler):
    return sampler.generate(["a red apple"], [2], GenerationSettings(steps=3), layers="all")


@pytest.fixture
def store(tiny, generated, tmp_path):
    specs = tiny.registry().select("all")
    writer = ActivationWriter(tmp_path / "acts", specs, {"model_identity": tiny.identity, "prompts": ["a red apple"]})
    for step in generated.steps:
        writer.add(step.index, step.timestep, step.activations)
    writer.close()
    return ActivationStore(tmp_path / "acts")


def test_round_trip(store, generated, tiny):
    assert store.layers == tiny.registry().names and store.steps == [0, 1, 2]
    assert store.manifest["model_identity"] == tiny.identity and store.manifest["dtype"] == "float16"
    for step in generated.steps:
        for name, value in step.activations.items():
            got = store.get(name, step.index)
            assert got.dtype == torch.float16 and got.shape == store.shape(name)
            assert torch.equal(got, value.to(torch.float16))
    assert store.manifest["shards"]["1"]["timestep"] == generated.steps[1].timestep


def test_feature_map_layout(store):
    tokens = store.get("enc2.0", 1)
    maps = store.get_map("enc2.0", 1)
    assert maps.shape == (1, 64, 8, 8)
    # token i is pixel (i // W, i % W)
    assert torch.equal(maps[0, :, 3, 5], tokens[0, 3 * 8 + 5])


def test_partial_reads_touch_only_what_is_asked(store):
    full = store.get("dec4.1", 2)
    assert torch.equal(store.get("dec4.1", 2, pixels=slice(10, 50)), full[:, 10:50])
    # Steps live in separate shards: reading step 2 needs neither step 0 nor step 1 on disk.
    for step in (0, 1):
        (store.path / f"step_{step:03d}.safetensors").unlink()
    assert torch.equal(store.get("dec4.1", 2), full)
    with pytest.raises(StoreError, match="missing"):
        store.get("dec4.1", 0)


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (/proc/self/io rchar); pages of
    a memory-mapped file are not read() and do not count."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def test_reads_are_memory_mapped(store, monkeypatch):
    """A read of one (layer, step) maps its shard and copies one tensor out of the mapping: the
    shard is in /proc/self/maps while it is read, and the read() calls of the whole `get` come
    to a fraction of the shard (a whole-file read would be all of it)."""
    from safetensors import safe_open

    import ldmprobe.store as store_module

    shard = store.path / "step_000.safetensors"
    # each layer is its own tensor of the shard, so one read is one byte range of the mapped file
    with safe_open(str(shard), framework="pt") as f:
        assert sorted(f.keys()) == sorted(store.layers)
        assert f.metadata()["step"] == "0"
    mapped = []
    real_open = store_module.safe_open

    @contextmanager
    def watching(path, *args, **kwargs):
        with real_open(path, *args, **kwargs) as f:
            yield f
            with open("/proc/self/maps") as maps:
                mapped.append(str(Path(path).resolve()) in maps.read())

    monkeypatch.setattr(store_module, "safe_open", watching)
    store.get("dec4.0", 0)
    assert mapped == [True]
    monkeypatch.undo()
    size = shard.stat().st_size
    first = _bytes_read()
    per_call = _bytes_read() - first  # what reading /proc/self/io itself costs
    before = _bytes_read()
    got = store.get("dec4.0", 0)
    read = _bytes_read() - before - per_call
    assert got.numel() * got.element_size() > 0.1 * size  # the layer is a sizeable part of the shard ...
    assert read < 0.05 * size, (read, size)  # ... yet next to nothing of the shard went through read()


def test_errors_name_what_is_wrong(store, tmp_path, tiny, generated):
    with pytest.raises(StoreError, match="layer 'dec9.0' not in this store; it holds enc1.0"):
        store.get("dec9.0", 0)
    with pytest.raises(StoreError, match=r"step 7 not in this store; it holds steps \[0, 1, 2\]"):
        store.get("mid.0", 7)
    with pytest.raises(StoreError, match="manifest.json is missing"):
        ActivationStore(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt manifest"):
        ActivationStore(tmp_path / "bad")
    specs = tiny.registry().select("dec4.0")
    writer = ActivationWriter(tmp_path / "w", specs, {})
    with pytest.raises(StoreError, match=r"dec4.0: expected \[rows, 256, 32\]"):
        writer.add(0, 999.0, {"dec4.0": torch.zeros(1, 64, 32)})
    with pytest.raises(StoreError, match="lacks activations for layers dec4.0"):
        writer.add(0, 999.0, {"mid.0": torch.zeros(1, 4, 128)})


def test_writes_leave_no_temp_files(store):
    names = {p.name for p in store.path.iterdir()}
    assert not [n for n in names if n.endswith(".tmp")]
    assert json.loads((store.path / "manifest.json").read_text())["format"] == "ldmprobe.activations"


def test_manifest_records_the_exact_timesteps(store, generated):
    """Item 2: the manifest lists every stored step's scheduler timestep, in step order, even when
    the writer's metadata says nothing about the schedule."""
    assert store.manifest["timesteps"] == [s.timestep for s in generated.steps] == store.timesteps
    assert store.timesteps == [999 * (1 - i / 2) for i in range(3)]  # LMS, 3 steps, the study's linspace spacing
