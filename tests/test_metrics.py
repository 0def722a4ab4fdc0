"""ldmprobe.metrics checked against scipy/numpy references, image by image."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from ldmprobe import metrics as M


def _ref_rows(fn, p, t):
    """Apply a scalar reference fn per image (flattened) -> np array [N]."""
    p = np.asarray(p, dtype=np.float64).reshape(len(p), -1)
    t = np.asarray(t, dtype=np.float64).reshape(len(t), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's ConstantInputWarning
        return np.array([fn(a, b) for a, b in zip(p, t, strict=True)], dtype=np.float64)


def _spearman_ref(a, b):
    return stats.spearmanr(a, b).statistic


def _pearson_ref(a, b):
    return stats.pearsonr(a, b).statistic


def _dice_ref(a, b, thr=0.5):
    A = set(np.flatnonzero(a > thr))
    B = set(np.flatnonzero(b > 0.5))
    if not A and not B:
        return 1.0
    return 2 * len(A & B) / (len(A) + len(B))


def assert_same(got, ref, atol=1e-10):
    got = got.numpy()
    assert got.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, atol=atol, rtol=0, equal_nan=True)


# --------------------------------------------------------------------------- #
# rankdata
# --------------------------------------------------------------------------- #
def test_rankdata_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (3, 5, 40), generator=g)  # heavy ties, 3-D batch
    got = M.rankdata(x).numpy()
    ref = stats.rankdata(x.numpy(), method="average", axis=-1)
    np.testing.assert_array_equal(got, ref)  # average ranks are exact halves


def test_rankdata_known_values_and_nan_row():
    x = torch.tensor([[10.0, 20.0, 10.0, 30.0], [1.0, math.nan, 2.0, 3.0]])
    r = M.rankdata(x)
    assert r[0].tolist() == [1.5, 3.0, 1.5, 4.0]
    assert torch.isnan(r[1]).all()  # scipy propagates NaN to the whole row
    assert np.isnan(stats.rankdata(x[1].numpy())).all()


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=1, max_dims=2, max_side=12),
        elements=st.integers(-3, 3).map(float) | st.floats(-1e6, 1e6),
    )
)
def test_rankdata_property(x):
    np.testing.assert_array_equal(
        M.rankdata(torch.from_numpy(x)).numpy(), stats.rankdata(x, axis=-1)
    )


# --------------------------------------------------------------------------- #
# correlations
# --------------------------------------------------------------------------- #
def _batch(seed, n=16, shape=(6, 7), ints=False):
    g = torch.Generator().manual_seed(seed)
    if ints:  # small integer range -> many ties
        p = torch.randint(0, 3, (n, *shape), generator=g).float()
        t = torch.randint(0, 4, (n, *shape), generator=g).float()
    else:
        p = torch.randn(n, *shape, generator=g)
        t = p * 0.5 + torch.randn(n, *shape, generator=g)
    p[0] = 1.0  # constant prediction
    t[1] = -2.0  # constant target
    p[2] = 0.0
    t[2] = 0.0  # both constant
    return p, t


@pytest.mark.parametrize("ints", [False, True])
def test_spearman_matches_scipy(ints):
    p, t = _batch(1, ints=ints)
    ref = _ref_rows(_spearman_ref, p, t)
    assert np.isnan(ref[:3]).all() and not np.isnan(ref[3:]).any()
    assert_same(M.spearman(p, t), ref)


@pytest.mark.parametrize("ints", [False, True])
def test_pearson_matches_scipy(ints):
    p, t = _batch(2, ints=ints)
    assert_same(M.pearson(p, t), _ref_rows(_pearson_ref, p, t))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda n: st.tuples(
            *[hnp.arrays(np.float64, (n, 9), elements=st.integers(-2, 2).map(float))]
            * 2
        )
    )
)
def test_spearman_pearson_property_ties(pt):
    p, t = (torch.from_numpy(a) for a in pt)
    assert_same(M.spearman(p, t), _ref_rows(_spearman_ref, p, t))
    assert_same(M.pearson(p, t), _ref_rows(_pearson_ref, p, t))


def test_spearman_ceiling_known_values():
    """[0, 0, 1]: ordinal ranks 1, 2, 3 against average ranks 1.5, 1.5, 3 give 1.5 / sqrt(2 * 1.5)."""
    t = torch.tensor([[0.0, 0.0, 1.0], [3.0, 1.0, 2.0], [2.0, 2.0, 2.0], [0.0, math.nan, 1.0]])
    c = M.spearman_ceiling(t)
    assert c[0].item() == pytest.approx(1.5 / math.sqrt(3.0), abs=1e-12)
    assert c[1].item() == pytest.approx(1.0, abs=1e-12)  # no ties: a perfect map reaches 1
    assert math.isnan(c[2].item()) and math.isnan(c[3].item())  # constant, NaN: undefined, as spearman


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, (3, 12), elements=st.integers(-2, 2).map(float)),
       hnp.arrays(np.float64, (3, 12), elements=st.floats(-1, 1)))
def test_spearman_ceiling_bounds_every_tie_free_map(target, noise):
    """The ceiling equals scipy's rho of the target with its ties broken by any jitter, and no map
    without ties (the jittered target, or noise) scores above it."""
    t = torch.from_numpy(target)
    ceiling = M.spearman_ceiling(t).numpy()
    jittered = target + 1e-6 * np.argsort(np.argsort(noise, axis=1), axis=1)
    assert_same(torch.from_numpy(ceiling), _ref_rows(_spearman_ref, jittered, target))
    distinct = np.array([len(set(row)) == len(row) for row in noise])
    rho = _ref_rows(_spearman_ref, noise, target)
    ok = np.isnan(ceiling) | ~distinct | (rho <= ceiling + 1e-12)
    assert ok.all()


def test_nan_pixel_gives_nan_image():
    p, t = _batch(3)
    p[5, 0, 0] = math.nan
    t[6, 1, 1] = math.nan
    for fn in (M.spearman, M.pearson, M.rmse, M.dice):
        out = fn(p, t)
        assert torch.isnan(out[5]) and torch.isnan(out[6]), fn.__name__
        assert not torch.isnan(out[7:]).any(), fn.__name__


# --------------------------------------------------------------------------- #
# rmse / dice
# --------------------------------------------------------------------------- #
def test_rmse_matches_numpy():
    p, t = _batch(4)
    ref = np.sqrt(((p.double() - t.double()).numpy().reshape(len(p), -1) ** 2).mean(1))
    assert_same(M.rmse(p, t), ref)
    assert torch.equal(M.rmse(t, t), torch.zeros(len(t), dtype=torch.float64))


def test_dice_matches_set_reference_incl_empty():
    g = torch.Generator().manual_seed(5)
    p = torch.rand(10, 8, 8, generator=g)
    t = (torch.rand(10, 8, 8, generator=g) > 0.6).float()
    p[0], t[0] = 0.0, 0.0  # both empty -> 1.0
    p[1], t[1] = 0.0, 1.0  # empty pred -> 0.0
    p[2], t[2] = 0.9, 0.0  # empty target -> 0.0
    p[3], t[3] = 0.9, 1.0  # both full -> 1.0
    for thr in (0.3, 0.5, 0.8):
        got = M.dice(p, t, threshold=thr)
        assert_same(got, _ref_rows(lambda a, b, thr=thr: _dice_ref(a, b, thr), p, t))
    assert M.dice(p, t)[:4].tolist() == [1.0, 0.0, 0.0, 1.0]


def test_dice_accepts_bool_and_int_targets():
    g = torch.Generator().manual_seed(6)
    p = torch.rand(4, 16, generator=g)
    t = torch.rand(4, 16, generator=g) > 0.5
    ref = M.dice(p, t.float())
    assert torch.equal(M.dice(p, t), ref)
    assert torch.equal(M.dice(p, t.to(torch.uint8)), ref)


# --------------------------------------------------------------------------- #
# batching, dtypes, shapes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("fn", [M.spearman, M.pearson, M.rmse, M.dice])
def test_batched_equals_per_image_and_shape_agnostic(fn):
    p, t = _batch(7, ints=True)
    batched = fn(p, t)
    single = torch.cat([fn(p[i : i + 1], t[i : i + 1]) for i in range(len(p))])
    assert_same(batched, single.numpy(), atol=1e-12)
    flat = fn(p.reshape(len(p), -1), t.reshape(len(t), -1))  # [N, H*W] layout
    assert_same(flat, batched.numpy(), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype):
    p, t = _batch(8)
    p, t = p.to(dtype), t.to(dtype)
    p64, t64 = p.double(), t.double()  # same values, so results must agree exactly
    for fn in (M.spearman, M.pearson, M.rmse, M.dice):
        out = fn(p, t)
        assert out.dtype == torch.float64 and out.shape == (len(p),)
        assert_same(out, fn(p64, t64).numpy(), atol=0)
    assert_same(M.spearman(p, t), _ref_rows(_spearman_ref, p.float(), t.float()))


# --------------------------------------------------------------------------- #
# aggregation
# --------------------------------------------------------------------------- #
def test_summarize_ignores_nan_and_counts():
    s = M.summarize(torch.tensor([0.5, math.nan, 1.0, math.nan]))
    assert s == {"mean": 0.75, "n_images": 4, "n_nan": 2}
    s = M.summarize(torch.tensor([math.nan]))
    assert math.isnan(s["mean"]) and s["n_nan"] == 1


def test_compute_all():
    p, t = _batch(9)
    c = M.compute_all(p, t, kind="continuous")
    assert set(c) == {
        "n_images",
        "spearman",
        "spearman_n_nan",
        "pearson",
        "pearson_n_nan",
        "rmse",
        "rmse_n_nan",
    }
    assert c["n_images"] == 16 and c["spearman_n_nan"] == 3 and c["rmse_n_nan"] == 0
    ref = np.nanmean(_ref_rows(_spearman_ref, p, t))
    assert c["spearman"] == pytest.approx(ref, abs=1e-12)
    m = M.compute_all(p.sigmoid(), (t > 0).float(), kind="mask")
    assert set(m) == {"n_images", "dice", "dice_n_nan", "pearson", "pearson_n_nan"}
    assert m["dice"] == pytest.approx(M.dice(p.sigmoid(), t > 0).mean().item())
    with pytest.raises(ValueError, match="kind"):
        M.compute_all(p, t, kind="depth")


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("fn", [M.spearman, M.pearson, M.rmse, M.dice])
def test_validation_errors(fn):
    p = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        fn(p, torch.rand(2, 16))
    with pytest.raises(ValueError, match="N=0"):
        fn(torch.rand(0, 4), torch.rand(0, 4))
    with pytest.raises(ValueError, match="no pixels"):
        fn(torch.rand(2, 0), torch.rand(2, 0))
    with pytest.raises(ValueError, match="at least one spatial dim"):
        fn(torch.rand(4), torch.rand(4))
    with pytest.raises(ValueError, match="floating-point"):
        fn(torch.ones(2, 4, dtype=torch.int64), torch.rand(2, 4))
    with pytest.raises(ValueError, match="real-valued"):
        fn(p, torch.rand(2, 4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="Tensor"):
        fn(p.numpy(), p)


def test_summarize_validation():
    with pytest.raises(ValueError):
        M.summarize(torch.empty(0))
    with pytest.raises(ValueError):
        M.summarize(torch.zeros(2, 2))
