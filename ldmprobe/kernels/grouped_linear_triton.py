"""Triton kernel for the grouped probe linear: every group of a denoising step in ONE launch.

Layout (all built once per call on the host, see :func:`_build_tables`):

* ``x_flat``   -- every ``X_g`` in one flat buffer of the input dtype; group g starts at
  ``x_off[g]`` with row stride ``x_rs[g]``. If all ``X_g`` already live in one storage this is a
  zero-copy view of that storage, otherwise one ``torch.cat`` copy.
* ``w_flat``   -- every ``W_g`` (fp32, row-major ``[C_g, K_g]``) concatenated; ``b_flat`` likewise.
* ``out_flat`` -- one fp32 buffer; group g's ``[P_g, K_g]`` output starts at ``out_off[g]``.
* ``groups``   -- int64 ``[G, NCOL]`` table: x_off, x_rs, C, K, P, w_off, b_off, out_off, sigmoid bits.
* ``tiles``    -- int64 ``[T, 2]`` table: (group, first row) of each program's ``BLOCK_P`` rows.

Every address is ``base pointer + int64 offset``; nothing casts an integer to a pointer, so the
same kernel runs compiled on CUDA and under the Triton CPU interpreter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

BLOCK_K = 16  # tl.dot needs N >= 16 when compiled; this is also the largest K supported.
NCOL = 9  # columns of the per-group table (see module docstring)

# (BLOCK_P, BLOCK_C): small tiles keep the GPU busy; the interpreter pays a fixed cost per
# program and per loop step, so it wants few, big tiles.
COMPILED_BLOCKS = (64, 64)
INTERPRETED_BLOCKS = (256, 128)


# Only tl *builtins* here (tl.full, tl.exp, ... -- not tl.zeros / tl.sigmoid): Triton's library helpers
# are @triton.jit functions frozen as compiled or interpreted when triton is first imported, which
# would tie interpreter runs to TRITON_INTERPRET being set before that import.
def _grouped_linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    groups_ptr,
    tiles_ptr,
    NCOL: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.load(tiles_ptr + 2 * pid)
    row0 = tl.load(tiles_ptr + 2 * pid + 1)
    meta = groups_ptr + g * NCOL
    x_off = tl.load(meta + 0)
    x_rs = tl.load(meta + 1)
    C = tl.load(meta + 2)
    K = tl.load(meta + 3)
    P = tl.load(meta + 4)
    w_off = tl.load(meta + 5)
    b_off = tl.load(meta + 6)
    out_off = tl.load(meta + 7)
    sig_bits = tl.load(meta + 8)

    rows = row0 + tl.arange(0, BLOCK_P)  # int64, so offsets cannot overflow
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < P
    k_ok = ks < K
    x_rows = x_ptr + x_off + rows[:, None] * x_rs
    acc = tl.full((BLOCK_P, BLOCK_K), 0.0, tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        x = tl.load(x_rows + cs[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(w_ptr + w_off + cs[:, None] * K + ks[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
        # Upcast first and use "ieee": fp32 products and accumulation whatever the input dtype.
        acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
    acc += tl.load(b_ptr + b_off + ks, mask=k_ok, other=0.0)[None, :]
    is_sig = ((sig_bits >> ks) & 1) != 0
    z = tl.exp(-tl.abs(acc))  # overflow-free sigmoid
    sig = tl.where(acc >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
    acc = tl.where(is_sig[None, :], sig, acc)
    tl.store(out_ptr + out_off + rows[:, None] * K + ks[None, :], acc, mask=row_ok[:, None] & k_ok[None, :])


# Built explicitly (not via @triton.jit, which decides at import time from TRITON_INTERPRET), so
# the choice between compiled and interpreted is made per call and import order does not matter.
_KERNELS: dict[bool, object] = {}


def _kernel(interpret: bool):
    if interpret not in _KERNELS:
        cls = InterpretedFunction if interpret else JITFunction
        _KERNELS[interpret] = cls(_grouped_linear_kernel)
    return _KERNELS[interpret]


def _pack_inputs(xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int], list[int]]:
    """Return (flat buffer, per-group element offset, per-group row stride).

    Zero-copy when every non-empty X_g is a view (unit channel stride) into one shared storage,
    e.g. activations written into slices of one preallocated buffer; otherwise one concatenation.
    """
    live = [x for x in xs if x.numel() > 0]
    ptr = live[0].untyped_storage().data_ptr()
    if all(x.untyped_storage().data_ptr() == ptr and (x.stride(1) == 1 or x.shape[1] == 1) for x in live):
        storage = live[0].untyped_storage()
        flat = live[0].new_empty(0).set_(storage, 0, (storage.nbytes() // live[0].element_size(),), (1,))
        return flat, [x.storage_offset() for x in xs], [x.stride(0) for x in xs]
    flat = torch.cat([x.reshape(-1) for x in xs])
    offsets, start = [], 0
    for x in xs:
        offsets.append(start)
        start += x.numel()
    return flat, offsets, [x.shape[1] for x in xs]


def _build_tables(xs, weights, sigmoid_cols, x_off, x_rs, block_p, device):
    """Host-built int64 tables (one host-to-device copy). Tiles of wide-C groups go first so the
    longest programs start early and the tail of the launch stays short."""
    rows, tiles = [], []
    w_off = b_off = out_off = 0
    for g, (x, w, cols) in enumerate(zip(xs, weights, sigmoid_cols, strict=True)):
        (P, C), K = x.shape, w.shape[1]
        rows.append([x_off[g], x_rs[g], C, K, P, w_off, b_off, out_off, sum(1 << c for c in cols)])
        w_off, b_off, out_off = w_off + C * K, b_off + K, out_off + P * K
    for g in sorted(range(len(xs)), key=lambda g: -xs[g].shape[1]):
        tiles.extend([g, r] for r in range(0, xs[g].shape[0], block_p))
    n_groups = len(rows)
    flat = torch.tensor([v for row in rows for v in row] + [v for t in tiles for v in t], dtype=torch.int64)
    flat = flat.to(device)
    groups = flat[: n_groups * NCOL]
    return groups, flat[n_groups * NCOL :], len(tiles), out_off


def grouped_linear_triton(
    xs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    sigmoid_cols: Sequence[Sequence[int]],
    *,
    interpret: bool,
    block_sizes: tuple[int, int] | None = None,
) -> list[torch.Tensor]:
    """Launch the kernel once for all groups; return fp32 ``[P_g, K_g]`` views of one buffer.

    Inputs must be validated already (same dtype/device, 1 <= K <= BLOCK_K). No autograd.
    """
    block_p, block_c = block_sizes or (INTERPRETED_BLOCKS if interpret else COMPILED_BLOCKS)
    for b in (block_p, block_c):
        if b < 16 or b & (b - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {block_sizes}")
    device = xs[0].device
    w_flat = torch.cat([w.to(device=device, dtype=torch.float32).reshape(-1) for w in weights])
    b_flat = torch.cat(
        [
            torch.zeros(w.shape[1], device=device, dtype=torch.float32)
            if b is None
            else b.to(device=device, dtype=torch.float32).reshape(-1)
            for w, b in zip(weights, biases, strict=True)
        ]
    )
    if all(x.numel() == 0 for x in xs):
        x_flat, x_off, x_rs = xs[0], [0] * len(xs), [1] * len(xs)
    else:
        x_flat, x_off, x_rs = _pack_inputs(xs)
    groups, tiles, n_tiles, n_out = _build_tables(xs, weights, sigmoid_cols, x_off, x_rs, block_p, device)
    out_flat = torch.empty(n_out, device=device, dtype=torch.float32)
    if n_tiles:
        args = (x_flat, w_flat, b_flat, out_flat, groups, tiles)
        meta = dict(NCOL=NCOL, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=BLOCK_K)
        if interpret:
            _kernel(True)[(n_tiles,)](*args, **meta)
        else:
            with torch.cuda.device(device):
                _kernel(False)[(n_tiles,)](*args, **meta, num_warps=4)
    outputs, start = [], 0
    for x, w in zip(xs, weights, strict=True):
        n = x.shape[0] * w.shape[1]
        outputs.append(out_flat[start : start + n].view(x.shape[0], w.shape[1]))
        start += n
    return outputs
