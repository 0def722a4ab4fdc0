"""Grouped probe linear: the Triton kernel (run for real under the Triton CPU interpreter) and the
torch fallback against a float64 reference.

The interpreter is enabled per test with ``monkeypatch.setenv("TRITON_INTERPRET", "1")``: the
launcher builds its interpreted kernel explicitly and reads the variable at call time, so it does
not matter whether triton was imported before, and nothing leaks into other test modules.
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("triton")

from ldmprobe.kernels import MAX_K, GroupedLinearResult, grouped_linear, triton_available  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The kernel upcasts X exactly to fp32 and the reference uses those same rounded values in
# float64, so every dtype is compared at fp32-accumulation accuracy. (Against unrounded data,
# fp16/bf16 would need ~1e-3 / ~1e-2: that is input rounding, not kernel error.)
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-5),
}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_groups(shapes, dtype=torch.float32, seed=0):
    """shapes: (P, C, K) per group -> xs, weights, biases, sigmoid masks (every other column)."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(P, C, generator=gen).to(dtype) for P, C, _ in shapes]
    ws = [torch.randn(C, K, generator=gen) * 2 / C**0.5 for _, C, K in shapes]
    bs = [torch.randn(K, generator=gen) for *_, K in shapes]
    ms = [[k % 2 == 1 for k in range(K)] for *_, K in shapes]
    return xs, ws, bs, ms


def reference(xs, ws, bs, ms):
    outs = []
    for x, w, b, m in zip(xs, ws, bs, ms, strict=True):
        y = x.double() @ w.double() + (0 if b is None else b.double())
        if m is not None:
            cols = torch.as_tensor(m).bool()
            y[:, cols] = torch.sigmoid(y[:, cols])
        outs.append(y)
    return outs


def assert_matches(result, xs, ws, bs, ms, dtype=torch.float32):
    assert isinstance(result, GroupedLinearResult)
    assert len(result.outputs) == len(xs)
    for y, r, x, w in zip(result.outputs, reference(xs, ws, bs, ms), xs, ws, strict=True):
        assert y.dtype == torch.float32 and y.shape == (x.shape[0], w.shape[1])
        torch.testing.assert_close(y.double(), r, **TOL[dtype])


# Shapes that are not multiples of any block size, C spanning several BLOCK_C chunks.
MIXED = [(100, 33, 3), (7, 70, 8), (300, 130, 1), (1, 32, 5), (64, 64, 2), (16, 128, 7), (5, 17, 4), (250, 96, 6)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_sizes", [None, (16, 32)], ids=["default-blocks", "small-blocks"])
def test_mixed_groups_one_launch(dtype, block_sizes):
    xs, ws, bs, ms = make_groups(MIXED, dtype)
    result = grouped_linear(xs, ws, bs, ms, backend="triton", block_sizes=block_sizes)
    assert result.backend == "triton-interpret"
    assert_matches(result, xs, ws, bs, ms, dtype)


@pytest.mark.parametrize("K", range(1, 9))
def test_single_group_each_k(K):
    xs, ws, bs, ms = make_groups([(77, 45, K)], torch.float16, seed=K)
    result = grouped_linear(xs, ws, bs, ms)  # auto picks the interpreter for CPU tensors
    assert result.backend == "triton-interpret"
    assert_matches(result, xs, ws, bs, ms, torch.float16)


def test_max_k_and_weights_in_input_dtype():
    xs, ws, bs, ms = make_groups([(40, 50, MAX_K), (9, 20, 8)], torch.bfloat16)
    ws = [w.to(torch.bfloat16) for w in ws]  # any float weight dtype; upcast exactly to fp32
    result = grouped_linear(xs, ws, bs, ms, backend="triton")
    assert_matches(result, xs, ws, bs, ms, torch.bfloat16)


def test_sigmoid_only_on_flagged_columns():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 40, generator=gen)
    w = torch.randn(40, 4, generator=gen) * 3  # large logits: sigmoid saturates, raw ones do not
    masks = [torch.tensor([True, False, True, False])]
    result = grouped_linear([x], [w], [torch.zeros(4)], masks, backend="triton")
    y = result.outputs[0]
    assert ((y[:, [0, 2]] >= 0) & (y[:, [0, 2]] <= 1)).all()
    assert (y[:, [1, 3]].abs() > 1).any() and (y[:, [1, 3]] < 0).any()
    assert_matches(result, [x], [w], [torch.zeros(4)], masks)


def test_no_bias_no_masks_and_empty_group():
    xs, ws, _, _ = make_groups([(30, 24, 3), (0, 24, 2), (3, 40, 1)])
    result = grouped_linear(xs, ws, backend="triton")
    assert result.outputs[1].shape == (0, 2)
    assert_matches(result, xs, ws, [None] * 3, [None] * 3)


def test_shared_storage_views_and_non_contiguous_inputs():
    # Views into one buffer (one with a row stride wider than C) take the zero-copy path ...
    buf = torch.randn(4000, dtype=torch.float16)
    a = buf[:1200].view(40, 30)
    b = buf[1200:3200].view(50, 40)[:, 5:25]  # [50, 20], row stride 40
    c = buf[3200 : 3200 + 7 * 33].view(7, 33)
    xs = [a, b, c]
    ws = [torch.randn(x.shape[1], 3) for x in xs]
    bs = [torch.randn(3) for _ in xs]
    ms = [[True, False, False]] * 3
    result = grouped_linear(xs, ws, bs, ms, backend="triton")
    assert_matches(result, xs, ws, bs, ms, torch.float16)
    # ... separate tensors, one of them transposed (non-contiguous), are packed by a copy.
    xs = [torch.randn(30, 60).t(), torch.randn(20, 10)]
    ws = [torch.randn(30, 2), torch.randn(10, 5)]
    result = grouped_linear(xs, ws, backend="triton")
    assert_matches(result, xs, ws, [None, None], [None, None])


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend(dtype):
    xs, ws, bs, ms = make_groups(MIXED, dtype)
    result = grouped_linear(xs, ws, bs, ms, backend="torch")
    assert result.backend == "torch"
    assert_matches(result, xs, ws, bs, ms, dtype)


def test_cpu_without_interpreter_uses_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    xs, ws, bs, ms = make_groups([(10, 16, 2)])
    assert not triton_available("cpu")
    result = grouped_linear(xs, ws, bs, ms)
    assert result.backend == "torch"
    assert_matches(result, xs, ws, bs, ms)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        grouped_linear(xs, ws, bs, ms, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available("cpu")


def _bad_calls():
    x, w = torch.randn(4, 8), torch.randn(8, 2)
    return {
        "no groups": (([], []), {}, "at least one group"),
        "weights length": (([x, x], [w]), {}, "2 inputs but 1 weights"),
        "biases length": (([x], [w]), {"biases": []}, "1 inputs but 0 biases"),
        "masks length": (([x], [w]), {"sigmoid_masks": [None, None]}, "sigmoid masks"),
        "C mismatch": (([x], [torch.randn(9, 2)]), {}, "C=8 channels but W has 9 rows"),
        "K too big": (([x], [torch.randn(8, MAX_K + 1)]), {}, f"1..{MAX_K}"),
        "K zero": (([x], [torch.randn(8, 0)]), {}, f"1..{MAX_K}"),
        "dtype": (([x.double()], [w]), {}, "not supported"),
        "mixed dtypes": (([x, x.half()], [w, w]), {}, "share one dtype"),
        "X not 2-D": (([x[None]], [w]), {}, "2-D"),
        "bias shape": (([x], [w]), {"biases": [torch.zeros(3)]}, r"\[2\]"),
        "mask length": (([x], [w]), {"sigmoid_masks": [[True]]}, "length K=2"),
        "mask floats": (([x], [w]), {"sigmoid_masks": [torch.ones(2)]}, "bool/int"),
        "backend": (([x], [w]), {"backend": "cuda"}, "backend must be"),
        "block sizes": (([x], [w]), {"backend": "triton", "block_sizes": (24, 32)}, "powers of two"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_validation_errors(case):
    args, kwargs, message = _bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        grouped_linear(*args, **kwargs)


def test_compiles_for_hopper_without_gpu():
    """The compiled (non-interpreted) kernel lowers to a cubin for sm_90, per input dtype."""
    import triton

    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ldmprobe.kernels import grouped_linear_triton as glt

    constexprs = {
        "NCOL": glt.NCOL,
        "BLOCK_P": glt.COMPILED_BLOCKS[0],
        "BLOCK_C": glt.COMPILED_BLOCKS[1],
        "BLOCK_K": glt.BLOCK_K,
    }
    for x_type in ("*fp16", "*bf16", "*fp32"):
        signature = {
            "x_ptr": x_type,
            "w_ptr": "*fp32",
            "b_ptr": "*fp32",
            "out_ptr": "*fp32",
            "groups_ptr": "*i64",
            "tiles_ptr": "*i64",
            **{k: "constexpr" for k in constexprs},
        }
        source = ASTSource(fn=glt._kernel(False), signature=signature, constexprs=constexprs)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        except FileNotFoundError as e:  # no ptxas in this install
            pytest.skip(f"CUDA toolchain unavailable: {e}")
        assert compiled.asm["cubin"]


@pytest.mark.slow
def test_sd_v1_4_shapes():
    """One denoising step of SD v1.4 at batch 1: 16 probed layers, K=3, one interpreted launch."""
    shapes = [(4096, 320, 3)] * 5 + [(1024, 640, 3)] * 5 + [(256, 1280, 3)] * 5 + [(64, 1280, 3)]
    xs, ws, bs, _ = make_groups(shapes, torch.float16)
    ms = [[False, False, True]] * len(shapes)  # e.g. two linear probes and one mask probe
    start = time.perf_counter()
    result = grouped_linear(xs, ws, bs, ms)
    elapsed = time.perf_counter() - start
    assert result.backend == "triton-interpret"
    assert_matches(result, xs, ws, bs, ms, torch.float16)
    assert elapsed < 60, f"interpreted SD v1.4 step took {elapsed:.1f}s"
