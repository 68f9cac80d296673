"""Fused QEFT mixed-precision matmul in Pallas (Triton backend).

    y[..., out] = x · dequantize(qweight)ᵀ + x[..., weak_idx] · weakᵀ        (f32 accumulation)

The packed format and the plain reference are defined in ``qeft_jax.packing``; this kernel
must equal ``qeft_matmul_ref``. One ``pallas_call`` computes both the dense low-bit part and the
weak (16-bit) columns.

Kernel layout
-------------
Grid ``(cdiv(out, block_n), cdiv(M, block_m), split_k)``. A program owns ``block_n`` output rows
and ``block_m`` activation rows and loops over blocks of ``block_w`` packed words along the input
dimension. A word holds ``vpw = 32 // bits`` columns; column ``j`` lives in word ``j // vpw`` at
position ``s = j % vpw``. Instead of unpacking a ``[block_n, block_w]`` word tile into a
``[block_n, block_w * vpw]`` tile (a reshape Triton cannot do for ``vpw = 10``: all tensor dims
must be powers of two), the kernel keeps the word axis and loops over the ``vpw`` positions:

    codes_s = (words >> s * bits) & (2^bits - 1)             [block_n, block_w]
    acc    += dot(dequant(codes_s), x_r[s, words, m])        [block_n, block_m]

where ``x_r[s, w, m] = x[m, w * vpw + s]`` is a re-layout of the (small) activation done outside
the kernel. Every tile is a power of two whatever ``vpw`` is.

Groups: the group of column ``j`` is ``j // g``. As long as ``g >= vpw`` (always: g >= 32 >= 16) a
word spans at most two groups, ``lo = (w·vpw) // g`` and ``hi = (w·vpw + vpw - 1) // g``, with the
switch at in-word position ``b = (lo + 1)·g - w·vpw``. The kernel gathers the per-word scale and
zero of ``lo`` (and, only when ``g % vpw != 0``, i.e. 3-bit, of ``hi``) once per word tile and
selects per position, so block boundaries need not line up with groups and the partial last
group needs no special case. Dequantization is ``(code - zero) * scale`` in f32, rounded to the
activation dtype, exactly like the reference; the products are accumulated in f32.

Ragged shapes: ``qweight``, ``scales``, ``zeros`` and ``weak`` are never copied or padded (a copy
would double the HBM traffic of a GEMV). Out-of-range rows and words are masked on load (zeros),
gather indices are clamped, and only the activations (x, x_weak; tiny for M <= 8) are padded
outside the kernel to block multiples with zeros. Columns past ``n`` in the last word carry code 0
and meet zero activations, so they contribute nothing. The output is allocated padded to
``block_n`` / ``block_m`` multiples and sliced.

Weak part: ``x_weak = x[:, weak_idx]`` is gathered outside (k columns) and padded with zero
columns to a power of two >= 16 (``k_pad``); inside the kernel a ``[block_n, block_k]`` tile of
``weak`` (masked past k) is multiplied with it. ``k = 0`` drops the weak operands altogether.

Two inner-product modes: ``use_dot=True`` uses ``pl.dot`` (tensor cores; block_m padded to 16, the
Triton minimum); ``use_dot=False`` is a broadcast-multiply + row reduction, the classic GEMV form
for M = 1 (no padding of M to 16). Both accumulate in f32.

Prefill (M > 8): ``qeft_matmul`` dispatches to ``prefill`` = "xla" (dequantize to the activation
dtype once + XLA/cuBLAS dot) or "pallas" (this same kernel tiled over M, block_m = 64, which
re-dequantizes each weight tile once per M block). For large M the dot is compute-bound and the
one-off dequantization (out·n elements, ~1/M of the matmul's work) is cheap, so "xla" is the
default; ``benchmarks/kernel.py --autotune`` times both per shape on the GPU and records the
faster one in the block table (key "prefill"), which ``qeft_matmul`` follows. See
``block_table.py`` for how block sizes are stored per GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import block_table
from pallas_kernels.block_table import default_blocks  # noqa: F401 - re-exported: the heuristic block sizes
from qeft_jax.packing import dequantize, num_groups, values_per_word

GEMV_MAX_M = 8
_MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16


def _next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def _is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def _qeft_kernel(x_ref, qw_ref, s_ref, z_ref, *rest, bits: int, group_size: int, n_words: int,
                 n_groups: int, out_features: int, k: int, block_n: int, block_w: int,
                 block_m: int, block_k: int, wblocks_per_split: int, use_dot: bool,
                 split_k: int):
    if k:
        xw_ref, weak_ref, o_ref = rest
    else:
        (o_ref,) = rest
    vpw = 32 // bits
    straddle = group_size % vpw != 0  # a word can span two groups (3-bit)
    cdt = x_ref.dtype
    pid_n, pid_m, pid_k = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    row0 = pid_n * block_n
    rows = row0 + jnp.arange(block_n, dtype=jnp.int32)
    row_mask = rows < out_features
    rows_c = jnp.minimum(rows, out_features - 1)[:, None]  # clamped rows for the gathers
    m_slice = pl.ds(pid_m * block_m, block_m)
    code_mask = jnp.uint32((1 << bits) - 1)

    def _mac(acc, w, xt):
        # acc [bn, bm] f32 += w [bn, K] · xt [K, bm]; w and xt in the activation dtype.
        if use_dot:
            return acc + plgpu.dot(w, xt)
        prod = w.astype(jnp.float32)[:, :, None] * xt.astype(jnp.float32)[None, :, :]
        return acc + jnp.sum(prod, axis=1)

    def word_block(j, acc):
        wb = pid_k * wblocks_per_split + j
        w0 = wb * block_w
        words = w0 + jnp.arange(block_w, dtype=jnp.int32)
        wmask = words < n_words
        qw = plgpu.load(qw_ref.at[pl.ds(row0, block_n), pl.ds(w0, block_w)],
                        mask=row_mask[:, None] & wmask[None, :], other=0)
        col0 = words * vpw  # first column of each word
        g_lo = jnp.minimum(col0 // group_size, n_groups - 1)[None, :]
        s_lo = s_ref[rows_c, g_lo].astype(jnp.float32)  # [bn, bw] gathers (L1-resident)
        z_lo = z_ref[rows_c, g_lo].astype(jnp.float32)
        if straddle:
            g_hi_raw = (col0 + vpw - 1) // group_size
            g_hi = jnp.minimum(g_hi_raw, n_groups - 1)[None, :]
            s_hi = s_ref[rows_c, g_hi].astype(jnp.float32)
            z_hi = z_ref[rows_c, g_hi].astype(jnp.float32)
            # first in-word position that belongs to the next group (>= vpw: none)
            boundary = ((col0 // group_size + 1) * group_size - col0)[None, :]
        for s in range(vpw):  # static unroll over the positions in a word
            codes = ((qw >> jnp.uint32(s * bits)) & code_mask).astype(jnp.int32).astype(jnp.float32)
            if straddle:
                hi = boundary <= s
                sc, zp = jnp.where(hi, s_hi, s_lo), jnp.where(hi, z_hi, z_lo)
            else:
                sc, zp = s_lo, z_lo
            w = ((codes - zp) * sc).astype(cdt)  # same rounding as pack.dequantize(dtype=x.dtype)
            xt = x_ref[s, pl.ds(w0, block_w), m_slice]  # [bw, bm], zero-padded outside
            acc = _mac(acc, w, xt)
        return acc

    acc = jnp.zeros((block_n, block_m), jnp.float32)
    acc = lax.fori_loop(0, wblocks_per_split, word_block, acc)

    if k:
        def weak_block(t, acc):
            # dynamic start: the [block_n, block_k] tile may run past k (masked, zeros)
            k0 = t * block_k
            cols = k0 + jnp.arange(block_k, dtype=jnp.int32)
            wk = plgpu.load(weak_ref.at[pl.ds(row0, block_n), pl.ds(k0, block_k)],
                            mask=row_mask[:, None] & (cols < k)[None, :], other=0)
            return _mac(acc, wk.astype(cdt), xw_ref[pl.ds(k0, block_k), m_slice])

        def weak_part(acc):
            return lax.fori_loop(0, xw_ref.shape[0] // block_k, weak_block, acc)

        if split_k == 1:
            acc = weak_part(acc)
        else:
            acc = lax.cond(pid_k == 0, weak_part, lambda a: a, acc)

    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=(
    "bits", "group_size", "block_n", "block_w", "block_m", "split_k", "use_dot", "num_warps",
    "num_stages", "interpret"))
def _fused_call(x2, qweight, scales, zeros, weak, weak_idx, *, bits: int, group_size: int,
                block_n: int, block_w: int, block_m: int | None, split_k: int, use_dot: bool,
                num_warps: int, num_stages: int, interpret: bool):
    m, n = x2.shape
    out, n_words = qweight.shape
    vpw = values_per_word(bits)
    n_groups = num_groups(n, group_size)
    k = int(weak.shape[-1]) if weak is not None else 0
    if n_words != -(-n // vpw):
        raise ValueError(f"qweight has {n_words} words, expected ceil({n}/{vpw})")
    if scales.shape != (out, n_groups) or zeros.shape != (out, n_groups):
        raise ValueError(f"scales/zeros must be {(out, n_groups)}, got {scales.shape}, {zeros.shape}")
    if group_size < vpw:
        raise ValueError(f"group_size {group_size} < values per word {vpw} is not supported")
    for name, v in (("block_n", block_n), ("block_w", block_w)):
        if not _is_pow2(v):
            raise ValueError(f"{name}={v} must be a power of two (Triton)")
    if use_dot:
        block_n = max(block_n, _MIN_DOT)
        block_w = max(block_w, _MIN_DOT)
    if block_m is None:
        block_m = max(_MIN_DOT, _next_pow2(m)) if use_dot else _next_pow2(m)
    block_m = max(block_m, _MIN_DOT) if use_dot else block_m
    m_pad = -(-m // block_m) * block_m
    cdt = x2.dtype

    n_wblocks = -(-n_words // block_w)
    split_k = max(1, min(split_k, n_wblocks))
    wps = -(-n_wblocks // split_k)
    w_pad = wps * split_k * block_w

    # x_r[s, w, m] = x[m, w * vpw + s], zero-padded (tiny: M <= 8 rows for the GEMV)
    xp = jnp.pad(x2, ((0, m_pad - m), (0, w_pad * vpw - n)))
    x_r = xp.reshape(m_pad, w_pad, vpw).transpose(2, 1, 0)
    operands = [x_r, qweight, scales, zeros]
    block_k = 0
    if k:
        k_pad = max(_MIN_DOT, _next_pow2(k))
        block_k = min(k_pad, 64)
        x_w = jnp.take(x2, weak_idx, axis=1)
        x_w = jnp.pad(x_w, ((0, m_pad - m), (0, k_pad - k))).T  # [k_pad, m_pad]
        operands += [x_w, weak]

    nb = -(-out // block_n)
    out_dtype = cdt if split_k == 1 else jnp.float32
    kernel = functools.partial(
        _qeft_kernel, bits=bits, group_size=group_size, n_words=n_words, n_groups=n_groups,
        out_features=out, k=k, block_n=block_n, block_w=block_w, block_m=block_m,
        block_k=block_k, wblocks_per_split=wps, use_dot=use_dot, split_k=split_k)
    y = pl.pallas_call(
        kernel,
        grid=(nb, m_pad // block_m, split_k),
        in_specs=[pl.no_block_spec] * len(operands),
        out_specs=pl.BlockSpec((None, block_n, block_m), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((split_k, nb * block_n, m_pad), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"qeft_matmul_b{bits}_g{group_size}",
    )(*operands)
    if split_k > 1:
        y = jnp.sum(y, axis=0)
    else:
        y = y[0]
    return y[:out, :m].T.astype(cdt)


def dequant_matmul(x2, qweight, scales, zeros, weak, weak_idx, *, bits: int, group_size: int):
    """Prefill path "xla": dequantize once to the activation dtype, then XLA dots (f32 accumulate)."""
    n = x2.shape[-1]
    w = dequantize(qweight, scales, zeros, bits=bits, group_size=group_size, n=n, dtype=x2.dtype)
    y = jnp.dot(x2, w.T, preferred_element_type=jnp.float32)
    if weak is not None and weak.shape[-1]:
        xw = jnp.take(x2, weak_idx, axis=-1)
        y = y + jnp.dot(xw, weak.astype(x2.dtype).T, preferred_element_type=jnp.float32)
    return y.astype(x2.dtype)


def qeft_matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array,
                weak: jax.Array | None, weak_idx: jax.Array | None, *, bits: int,
                group_size: int, interpret: bool = False, block_n: int | None = None,
                block_w: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None, split_k: int | None = None,
                use_dot: bool | None = None, prefill: str | None = None,
                block_m_prefill: int = 64) -> jax.Array:
    """y[..., out] = x · dequantize(qweight)ᵀ + x[..., weak_idx] · weakᵀ, in x.dtype.

    x: [..., n] bf16/fp16 (leading dims are flattened to M rows). qweight uint32 [out, ceil(n/vpw)];
    scales/zeros [out, ceil(n/g)]; weak [out, k] 16-bit (k may be 0, or weak None); weak_idx int32 [k].
    M <= 8 runs the fused GEMV kernel. M > 8 runs ``prefill`` ("xla": dequantize + XLA dot, the
    default; "pallas": the same fused kernel tiled over M with ``block_m_prefill`` rows).
    Block sizes left as None come from ``block_table.lookup`` (per GPU name and shape).
    """
    *lead, n = x.shape
    x2 = x.reshape(-1, n)
    m = x2.shape[0]
    out = qweight.shape[0]
    if weak is None or weak_idx is None or weak.shape[-1] == 0:
        weak, weak_idx = None, None
    else:
        weak_idx = weak_idx.astype(jnp.int32)
    cfg = block_table.lookup(n=n, out=out, bits=bits, m=m)
    if prefill is None:
        prefill = cfg.get("prefill", "xla")
    if m > GEMV_MAX_M and prefill == "xla":
        y = dequant_matmul(x2, qweight, scales, zeros, weak, weak_idx, bits=bits,
                           group_size=group_size)
        return y.reshape(*lead, out)
    if m > GEMV_MAX_M and prefill != "pallas":
        raise ValueError(f"prefill must be 'xla' or 'pallas', got {prefill!r}")
    pick = lambda v, key: cfg[key] if v is None else v  # noqa: E731
    y = _fused_call(
        x2, qweight, scales, zeros, weak, weak_idx, bits=bits, group_size=group_size,
        block_n=pick(block_n, "block_n"), block_w=pick(block_w, "block_w"),
        block_m=block_m_prefill if m > GEMV_MAX_M else None,
        split_k=pick(split_k, "split_k") if m <= GEMV_MAX_M else 1,
        # the table is tuned at M = 1; its reduce-mode choice is not carried over to M > 1
        use_dot=(True if m > GEMV_MAX_M else use_dot if use_dot is not None
                 else cfg["use_dot"] if m == 1 else True),
        num_warps=pick(num_warps, "num_warps"), num_stages=pick(num_stages, "num_stages"),
        interpret=interpret)
    return y.reshape(*lead, out)
