"""training.ridge: streaming statistics, the one-eigh λ path and area-averaged labels, against numpy."""

import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from training import ridge
from training.ridge import DEFAULT_GRID, RidgeStats, area_average, fit, sse, to_tokens

TOL = dict(rtol=1e-8, atol=1e-8)


def _data(n=300, C=12, K=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # Offsets and uneven channel scales: centring and the variance unit must both matter.
    X = (torch.randn(n, C, generator=g, dtype=torch.float64) * torch.linspace(0.2, 5, C) + 3).to(dtype)
    W = torch.randn(C, K, generator=g, dtype=torch.float64)
    Y = X.double() @ W + 0.5 * torch.randn(n, K, generator=g, dtype=torch.float64) - 2
    return X, Y


def _stats(X, Y, chunks=(None,)):
    s = RidgeStats(X.shape[1], Y.shape[1])
    bounds = [0, *[c for c in chunks if c is not None], X.shape[0]]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        s.add(X[a:b], Y[a:b])
    return s


def _numpy_ridge(X, Y, lam, relative=True):
    """Reference: solve the augmented normal equations [w; b] with the penalty on w only."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    n, C = X.shape
    scale = X.var(axis=0).mean() if relative else 1.0
    A = np.hstack([X, np.ones((n, 1))])
    P = np.zeros((C + 1, C + 1))
    P[:C, :C] = lam * n * scale * np.eye(C)
    sol = np.linalg.solve(A.T @ A + P, A.T @ Y)
    return sol[:C], sol[C]


def _assert_stats_equal(a, b, **tol):
    assert a.n == b.n
    for name in ("sum_x", "sum_y", "xtx", "xty", "yty"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **(tol or TOL))


@pytest.mark.parametrize("relative", [True, False])
def test_streaming_equals_batch_equals_numpy(relative):
    X, Y = _data()
    whole = _stats(X, Y)
    chunked = _stats(X, Y, chunks=(1, 17, 18, 200))
    _assert_stats_equal(whole, chunked)
    for lam in (1e-4, 1e-2, 1.0, 10.0):
        w_ref, b_ref = _numpy_ridge(X.double().numpy(), Y.numpy(), lam, relative)
        for s in (whole, chunked):
            f = fit(s, lambdas=lam, relative=relative)
            np.testing.assert_allclose(f.weight.numpy(), w_ref, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(f.bias.numpy(), b_ref, rtol=1e-8, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(0, 60), max_size=5).map(sorted))
def test_any_chunking_gives_the_same_statistics(cuts):
    X, Y = _data(n=60, C=5, K=2)
    _assert_stats_equal(_stats(X, Y), _stats(X, Y, chunks=tuple(cuts)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_and_small_blocks(dtype, monkeypatch):
    X, Y = _data(dtype=dtype)
    monkeypatch.setattr(ridge, "_BLOCK_ELEMENTS", 7 * X.shape[1])  # 7-row float64 blocks
    _assert_stats_equal(_stats(X, Y), _stats(X.double(), Y))


def test_known_linear_model_is_recovered_with_small_lambda():
    g = torch.Generator().manual_seed(1)
    C, K = 8, 2
    w_true = torch.randn(C, K, generator=g, dtype=torch.float64)
    b_true = torch.tensor([0.7, -1.3], dtype=torch.float64)

    def make(n):
        X = torch.randn(n, C, generator=g, dtype=torch.float64) + 1
        return X, X @ w_true + b_true + 0.01 * torch.randn(n, K, generator=g, dtype=torch.float64)

    f = fit(_stats(*make(2000)), _stats(*make(500)))
    torch.testing.assert_close(f.weight, w_true, rtol=0, atol=3e-3)
    torch.testing.assert_close(f.bias, b_true, rtol=0, atol=3e-3)
    assert (f.lam <= 1e-3).all(), f.lam
    assert f.val_mse.shape == (len(DEFAULT_GRID), K)
    assert (f.train_mse < 2e-4).all() and (f.val_mse.min(0).values < 2e-4).all()
    assert f.info()["lambda"] == f.lam.tolist()


def test_pure_noise_targets_prefer_shrinkage():
    g = torch.Generator().manual_seed(2)
    C, K = 20, 4

    def make(n):
        return torch.randn(n, C, generator=g), torch.randn(n, K, generator=g)

    f = fit(_stats(*make(200)), _stats(*make(2000)))
    assert (f.lam >= 1.0).all(), f.lam
    assert f.weight.abs().max() < 0.05


def test_merge_equals_concatenated_data_and_state_dict_round_trips(tmp_path):
    from safetensors.torch import load_file, save_file

    X, Y = _data()
    a, b = _stats(X[:120], Y[:120]), _stats(X[120:], Y[120:])
    merged = _stats(X[:120], Y[:120]).merge(b)
    _assert_stats_equal(merged, _stats(X, Y))
    a += b
    _assert_stats_equal(a, merged)

    save_file(a.state_dict(), tmp_path / "stats.safetensors")
    back = RidgeStats.from_state_dict(load_file(tmp_path / "stats.safetensors"))
    assert (back.C, back.K) == (a.C, a.K)
    _assert_stats_equal(back, a, rtol=0, atol=0)


def _allreduce_worker(rank, world, port):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        X, Y = _data(n=250, C=6, K=2)
        cut = 70  # unequal shares
        mine = _stats(X[:cut], Y[:cut]) if rank == 0 else _stats(X[cut:], Y[cut:])
        mine.all_reduce()
        _assert_stats_equal(mine, _stats(X, Y))
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_processes():
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_allreduce_worker, args=(2, port), nprocs=2, join=True)


def test_eigen_path_equals_direct_solve_for_every_lambda():
    X, Y = _data(dtype=torch.float64)
    s = _stats(X, Y)
    mx, my, xx, xy, _ = s.centred()
    unit = xx.diagonal().sum() / (s.n * s.C)
    for lam in DEFAULT_GRID:
        w = torch.linalg.solve(xx + lam * s.n * unit * torch.eye(s.C, dtype=torch.float64), xy)
        f = fit(s, lambdas=lam)
        torch.testing.assert_close(f.weight, w, **TOL)
        torch.testing.assert_close(f.bias, my - mx @ w, **TOL)


@pytest.mark.parametrize("n", [50, 8])  # n > C, and C > n
def test_lambda_zero_with_singular_gram_is_the_min_norm_solution(n):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, 6, generator=g, dtype=torch.float64)
    X = torch.cat([base, base[:, :2], torch.full((n, 1), 4.0, dtype=torch.float64)], 1)  # duplicates + constant
    Y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    f = fit(_stats(X, Y), lambdas=0.0)
    assert torch.isfinite(f.weight).all() and torch.isfinite(f.bias).all()
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    w_ref = np.linalg.pinv(Xc.numpy()) @ Yc.numpy()
    np.testing.assert_allclose(f.weight.numpy(), w_ref, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(f.bias.numpy(), (Y.mean(0) - X.mean(0) @ torch.from_numpy(w_ref)).numpy(), atol=1e-8)


def test_validation_error_from_statistics_equals_direct():
    X, Y = _data(seed=4)
    Xv, Yv = _data(n=137, seed=5)
    val = _stats(Xv, Yv, chunks=(40,))
    g = torch.Generator().manual_seed(6)
    W = torch.randn(4, X.shape[1], Y.shape[1], generator=g, dtype=torch.float64)
    b = torch.randn(4, Y.shape[1], generator=g, dtype=torch.float64)
    direct = ((Yv - Xv.double() @ W - b.unsqueeze(1)) ** 2).sum(1)
    torch.testing.assert_close(sse(val, W, b), direct, **TOL)

    f = fit(_stats(X, Y), val)
    chosen = ((Yv - Xv.double() @ f.weight - f.bias) ** 2).mean(0)
    torch.testing.assert_close(f.val_mse.min(0).values, chosen, **TOL)
    train = ((Y - X.double() @ f.weight - f.bias) ** 2).mean(0)
    torch.testing.assert_close(f.train_mse, train, **TOL)


def test_area_averaged_labels_give_the_full_resolution_fit():
    """Layer resolution + area-averaged labels == image resolution + nearest-upsampled features."""
    g = torch.Generator().manual_seed(7)
    N, C, K, h, s = 3, 5, 2, 4, 4
    H = h * s

    def sets(n_img):
        feats = torch.randn(n_img, C, h, h, generator=g, dtype=torch.float64) + 1
        labels = torch.randn(n_img, K, H, H, generator=g, dtype=torch.float64)
        labels += F.interpolate(feats[:, :K], scale_factor=s, mode="nearest")  # learnable part
        layer = _stats(to_tokens(feats), to_tokens(area_average(labels, (h, h))))
        image = _stats(to_tokens(F.interpolate(feats, scale_factor=s, mode="nearest")), to_tokens(labels))
        return layer, image

    train_l, train_i = sets(N)
    val_l, val_i = sets(2)
    fl, fi = fit(train_l, val_l), fit(train_i, val_i)
    torch.testing.assert_close(fl.weight, fi.weight, **TOL)
    torch.testing.assert_close(fl.bias, fi.bias, **TOL)
    assert torch.equal(fl.lam, fi.lam)
    # Per λ, image-level val MSE = layer-level val MSE + the within-block variance (probe-independent).
    gap = fi.val_mse - fl.val_mse
    torch.testing.assert_close(gap, gap[:1].expand_as(gap), **TOL)
    for lam in (0.0, 3.0):
        a, b = fit(train_l, lambdas=lam, relative=False), fit(train_i, lambdas=lam, relative=False)
        torch.testing.assert_close(a.weight, b.weight, **TOL)


def test_area_average_shapes_and_dtypes():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, :4, :4] = True
    out = area_average(masks, (2, 2))
    assert out.shape == (2, 1, 2, 2) and out.dtype == torch.float32
    assert out[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert area_average(torch.rand(1, 3, 10, 10), (4, 4)).shape == (1, 3, 4, 4)  # non-divisible
    with pytest.raises(ValueError, match=r"\[N, H, W\] or \[N, K, H, W\]"):
        area_average(torch.rand(8, 8), (2, 2))


def test_token_order_matches_captured_activations():
    N, K, h, w = 2, 3, 4, 5
    maps = torch.arange(N * K * h * w, dtype=torch.float32).reshape(N, K, h, w)
    rows = to_tokens(maps)
    assert rows.shape == (N * h * w, K)
    for n in range(N):
        for i in range(h * w):
            assert torch.equal(rows[n * h * w + i], maps[n, :, i // w, i % w])
    # diffusers flattens a [N, C, h, w] map into tokens [N, h·w, C] the same way.
    acts = maps.flatten(2).transpose(1, 2)
    assert torch.equal(rows, acts.reshape(-1, K))


def test_inputs_are_validated(monkeypatch):
    monkeypatch.setattr(ridge, "_BLOCK_ELEMENTS", 40)  # 10-row blocks: a bad last row must still add nothing
    s = RidgeStats(4, 2)
    with pytest.raises(ValueError, match=r"X must have shape \[n, 4\]"):
        s.add(torch.zeros(3, 5), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"Y must have shape \[n, 2\]"):
        s.add(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="same number of rows"):
        s.add(torch.zeros(3, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="floating-point"):
        s.add(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 2))
    bad = torch.zeros(300, 4)
    bad[-1, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        s.add(bad, torch.zeros(300, 2))
    with pytest.raises(ValueError, match="non-finite"):
        s.add(torch.zeros(3, 4), torch.full((3, 2), float("nan")))
    assert s.n == 0
    with pytest.raises(ValueError, match=r"\(C, K\) = \(4, 2\)"):
        s.merge(RidgeStats(4, 3))
    state = s.state_dict()
    state["xtx"] = torch.zeros(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'xtx' must have shape \[4, 4\]"):
        RidgeStats.from_state_dict(state)
    with pytest.raises(ValueError, match="no rows"):
        fit(s, lambdas=1.0)
    X, Y = _data(C=4, K=2)
    s.add(X, Y)
    with pytest.raises(ValueError, match="single lambda"):
        fit(s)
    with pytest.raises(ValueError, match=r"\(C, K\) = \(4, 2\)"):
        fit(s, RidgeStats(4, 1))
    with pytest.raises(ValueError, match="non-negative"):
        fit(s, lambdas=-1.0)


def test_fit_at_gives_each_column_its_own_lambda():
    from training.ridge import fit_at

    gen = torch.Generator().manual_seed(3)
    X = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    Y = X @ torch.randn(6, 3, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(400, 3, generator=gen,
                                                                                       dtype=torch.float64)
    stats = RidgeStats(6, 3).add(X, Y)
    lams = [1e-3, 10.0, 1e-3]
    weight, bias = fit_at(stats, lams)
    for k, lam in enumerate(lams):
        single = fit(stats, None, lam)
        torch.testing.assert_close(weight[:, k], single.weight[:, k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bias[k], single.bias[k], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="one lambda per column"):
        fit_at(stats, [1.0])
