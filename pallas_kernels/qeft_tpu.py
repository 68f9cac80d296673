"""Fused QEFT mixed-precision matmul in Pallas for TPU (Mosaic).

    y[..., out] = x · dequantize(qweight)ᵀ + x[..., weak_idx] · weakᵀ        (f32 accumulation)

The same op as ``pallas_kernels.qeft_gemv`` (the GPU/Triton kernel) and ``qeft_jax.packing.
qeft_matmul_ref`` (the spec): codes of 2/3/4 bits, group size g any multiple of 8 with lcm(128, g)
<= 1024 (16..128 included; the last group may be partial; one group spanning the whole input, i.e.
per-channel scales, is stored as groups of 128), k 16-bit weak columns (k may be 0), activations
in bf16 (other float dtypes work in interpret mode) and f32 accumulation. Dequantization is
``(code - zero) * scale`` in f32 rounded to the activation dtype, exactly as in the reference.

TPU layout (``prepare``, once at load time; ``unprepare`` inverts it exactly)
------------------------------------------------------------------------------
Mosaic tiles the last two dims of every block in (8 sublanes, 128 lanes) and cannot gather or
repeat along lanes cheaply, while the packed format puts the input dimension (and hence the
groups) on lanes and ``out`` on sublanes, with ``vpw`` columns interleaved in each word. So the
weights are re-laid out once:

* Transposed: input dimension on sublanes, ``out`` on lanes, so the output ``y [M, out]`` is
  lane-dense and a group's scale is one lane-row broadcast down sublanes (no lane gathers).
* Planar words: the input is cut into K blocks of ``vpw · W`` columns (W words, W a multiple of
  lcm(128, g)). Word ``w`` of K block ``b`` holds, at bit ``s · bits``, the code of column
  ``b·vpw·W + s·W + w``. Shifting a ``[W, block_n]`` word tile by ``s · bits`` therefore yields
  the codes of W *consecutive* columns (plane s): the kernel multiplies it with the contiguous,
  128-aligned activation slice ``x[:, s·W:(s+1)·W]`` of the block; no activation re-layout, no
  lane shuffles, every matmul has K = W (a multiple of 128) rows.
* Groups never straddle a plane (W and the plane starts are multiples of g), so plane s of a K
  block has W/g groups of g sublanes each; the kernel broadcasts one scale/zero row per group.
* ``qweight`` int32 [nK·W, out_pad] (the uint32 words bit-cast: Mosaic's integer VPU ops are
  int32; shifts are logical); ``scales``/``zeros`` float32 [nK, vpw·W/g, out_pad] (exact copies
  of the 16-bit values: float16 is not a TPU compute type on every generation, f32 is, and the
  reference computes in f32 anyway; this costs 4 extra bytes per g weights per row: 6% of the
  traffic at 4 bits, g = 128); ``weak`` [k_pad, out_pad] in the activation dtype (the reference
  also casts weak to x.dtype before its dot).

Padding, decided once in ``prepare``: ``out`` to a multiple of 128 (``block_n`` divides it), the
input to a multiple of ``vpw · W`` with code 0, scale 0 and zero 0 (padded columns meet zero
activations; padded groups dequantize to 0), k to a multiple of 128 with zero weak columns. The
activations (M <= 8 rows at decode: to the sublane tile, 16 rows of bf16 or 8 of f32; and k
columns of them for the weak part) are padded inside the wrapper: that is small and per call.
Why padding and not masking: a masked partial block would read undefined VMEM (garbage scales
can be NaN/Inf, and NaN · 0 is NaN), so every tile would need selects; padding the weights once
costs nothing per call except for the padded bytes themselves. The price is traffic on shapes far
from the block grid: the default model's n = 576 is padded to one K block of 1024 (4-bit), 1280
(3-bit) or 2048 (2-bit) columns, and 3-bit n = 4096 to 5120 (two 2560-column blocks); 4-bit
4096/11008/14336 pad by 0-2.3%.

Where the layout is made: once at load time by ``prepare`` (``qeft_jax.qlinear.prepare_tpu``
does it for every linear of a model, packed part only: the weak columns stay trainable and are
cast/padded/transposed per call, k columns), then ``matmul_prepared`` per step. Without a
prepared layout, ``qeft_matmul`` (the op's fallback for backend 'mosaic') prepares inside every
call: correct, but one extra pass over the weights.

Kernel
------
Grid ``(M blocks, out blocks, K blocks)``, semantics (parallel, parallel, arbitrary). Blocks go
through BlockSpecs (double-buffered HBM -> VMEM DMAs by Pallas): x ``[block_m, vpw·W]`` (at
decode all of x, ``[K blocks, block_m, vpw·W]``, when it fits in 2 MiB: fetched once), words
``[W, block_n]``, scales/zeros ``[vpw·W/g, block_n]``, weak ``[k_pad, block_n]`` and
``x[:, weak_idx]`` ``[block_m, k_pad]`` (fetched once per out block: their index ignores K), out
``[block_m, block_n]``. An f32 VMEM scratch accumulator is initialised at K block 0 with the weak
product and written out (cast to x.dtype) at the last K block. Per K block the kernel loops
(unrolled) over the vpw planes: shift, mask, to f32, ``(code - zero) * scale``, round to x.dtype,
``jnp.dot(x_plane, w_plane, preferred_element_type=f32)``.

Block sizes: ``block_n`` = 512/256/128 (the largest dividing out rounded up to 128), W = 256
words (512 / 1024 when block_n = 256 / 128), fewer when the input is small: a word tile is at most
512 KiB (x2 for double buffering) and the f32 temporaries of one plane as much again, well inside
the 16 MiB default scoped VMEM of v5e (32 MiB on v6e). M <= 8 (decode) runs one block of 16 (bf16) or 8
(f32) rows; M > 8 (prefill) is tiled over M with ``block_m`` rows (default: M rounded up to 16,
at most 256 and at most 2 MiB of x per block: < 10 MiB of VMEM in all), each M block
re-dequantizing the weights it reads.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qeft_jax.packing import num_groups, pack_codes, unpack_codes, values_per_word

LANES = 128
DECODE_MAX_M = 8
MAX_TILE_WORDS = 128 * 1024  # W * block_n int32 words per weight tile (512 KiB)
MAX_X_BLOCK_BYTES = 2 << 20  # prefill: block_m is capped so an x block stays <= 2 MiB


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


@dataclasses.dataclass(frozen=True)
class TPUMeta:
    """Static description of a prepared (TPU layout) QEFT linear."""

    bits: int
    group_size: int
    in_features: int
    out_features: int
    k: int
    words_per_block: int   # W
    block_n: int
    kernel_group: int      # group size the layout uses: group_size, or 128 for a single group
    dtype: str             # activation dtype the weak columns were cast to
    storage_dtype: str     # dtype of the original scales/zeros/weak (for unprepare)

    @property
    def vpw(self) -> int:
        return values_per_word(self.bits)

    @property
    def cols_per_block(self) -> int:
        return self.vpw * self.words_per_block

    @property
    def k_blocks(self) -> int:
        return -(-self.in_features // self.cols_per_block)

    @property
    def in_pad(self) -> int:
        return self.k_blocks * self.cols_per_block

    @property
    def out_pad(self) -> int:
        return _round_up(self.out_features, self.block_n)

    @property
    def k_pad(self) -> int:
        return _round_up(self.k, LANES)

    @property
    def groups_per_block(self) -> int:
        return self.cols_per_block // self.kernel_group


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["qweight", "scales", "zeros", "weak", "weak_idx"],
                   meta_fields=["meta"])
@dataclasses.dataclass(frozen=True)
class TPULayout:
    """A QEFT linear in the TPU layout (see the module docstring); a pytree (meta is static)."""

    qweight: jax.Array          # int32 [k_blocks * W, out_pad]
    scales: jax.Array           # float32 [k_blocks, vpw * W / g, out_pad]
    zeros: jax.Array            # float32 [k_blocks, vpw * W / g, out_pad]
    weak: jax.Array | None      # dtype [k_pad, out_pad], None when k = 0
    weak_idx: jax.Array         # int32 [k]
    meta: TPUMeta


MAX_GROUP_WORDS = 1024  # lcm(128, g) words: larger per-block minimums are left to the reference


def kernel_group(group_size: int, in_features: int) -> int:
    """The group size of the TPU layout: g, except that one group spanning the whole input
    (per-channel scales, e.g. OWQ's g = in_features) becomes groups of 128 holding copies of it."""
    return LANES if group_size >= in_features else group_size


def supports(*, bits: int, group_size: int, in_features: int) -> bool:
    """Whether the kernel takes this config: the (kernel) group size is a multiple of 8 and
    lcm(128, g) words (the smallest K block) at most MAX_GROUP_WORDS."""
    kg = kernel_group(group_size, in_features)
    return bits in (2, 3, 4) and kg % 8 == 0 and math.lcm(LANES, kg) <= MAX_GROUP_WORDS


def choose_blocks(*, bits: int, group_size: int, in_features: int, out_features: int,
                  block_n: int | None = None, words_per_block: int | None = None) -> tuple[int, int]:
    """(block_n, W): block_n the largest of 512/256/128 dividing out rounded up to 128; W a
    multiple of lcm(128, g), as large as the input needs, at most MAX_TILE_WORDS / block_n."""
    if group_size % 8:
        raise ValueError(f"group_size must be a multiple of 8 for the TPU kernel, got {group_size}")
    base = math.lcm(LANES, group_size)
    if base > MAX_GROUP_WORDS:
        raise ValueError(f"lcm(128, group_size={group_size}) = {base} words is over {MAX_GROUP_WORDS}")
    out128 = _round_up(out_features, LANES)
    if block_n is None:
        block_n = next(b for b in (512, 256, 128) if out128 % b == 0)
    if block_n % LANES:
        raise ValueError(f"block_n must be a multiple of {LANES}, got {block_n}")
    if words_per_block is None:
        words = -(-in_features // values_per_word(bits))
        cap = max(base, MAX_TILE_WORDS // block_n // base * base)
        words_per_block = min(cap, _round_up(words, base))
    if words_per_block % base:
        raise ValueError(f"words_per_block must be a multiple of lcm(128, g) = {base}, "
                         f"got {words_per_block}")
    return block_n, words_per_block


def prepare(qweight: jax.Array, scales: jax.Array, zeros: jax.Array, weak: jax.Array | None,
            weak_idx: jax.Array | None, *, bits: int, group_size: int, in_features: int,
            dtype: Any = jnp.bfloat16, block_n: int | None = None,
            words_per_block: int | None = None) -> TPULayout:
    """Re-lay a packed QEFT linear (``qeft_jax.packing`` format) out for the TPU kernel.

    Jittable (shapes are static). Run it once at load time; ``unprepare`` inverts it exactly.
    ``dtype`` is the activation dtype the kernel will be called with (weak is cast to it).
    """
    out, n_words = qweight.shape
    n = in_features
    vpw = values_per_word(bits)
    if n_words != -(-n // vpw):
        raise ValueError(f"qweight has {n_words} words, expected ceil({n}/{vpw})")
    g_count = num_groups(n, group_size)
    if scales.shape != (out, g_count) or zeros.shape != (out, g_count):
        raise ValueError(f"scales/zeros must be {(out, g_count)}, got {scales.shape}, {zeros.shape}")
    k = 0 if weak is None or weak_idx is None else int(weak.shape[-1])
    kg = kernel_group(group_size, n)
    block_n, wpb = choose_blocks(bits=bits, group_size=kg, in_features=n,
                                 out_features=out, block_n=block_n, words_per_block=words_per_block)
    meta = TPUMeta(bits=bits, group_size=group_size, in_features=n, out_features=out, k=k,
                   words_per_block=wpb, block_n=block_n, kernel_group=kg, dtype=jnp.dtype(dtype).name,
                   storage_dtype=jnp.dtype(scales.dtype).name)
    nk, out_pad = meta.k_blocks, meta.out_pad

    codes = unpack_codes(qweight, bits, n).astype(jnp.uint32)                  # [out, n]
    codes = jnp.pad(codes, ((0, out_pad - out), (0, meta.in_pad - n)))
    codes = codes.reshape(out_pad, nk, vpw, wpb)                                # column b·vpw·W + s·W + w
    shifts = (jnp.arange(vpw, dtype=jnp.uint32) * bits)[None, None, :, None]
    words = jnp.sum(codes << shifts, axis=2, dtype=jnp.uint32)                  # disjoint fields: OR
    words = lax.bitcast_convert_type(words, jnp.int32).reshape(out_pad, nk * wpb).T

    def groups(a):
        if kg != group_size:  # one group over the whole input: copy it into every 128-group
            a = jnp.repeat(a, num_groups(n, kg), axis=1)
        a = jnp.pad(a.astype(jnp.float32),
                    ((0, out_pad - out), (0, nk * meta.groups_per_block - a.shape[1])))
        return a.T.reshape(nk, meta.groups_per_block, out_pad)

    wk = None
    if k:
        wk = weak_operand(weak, out_pad=out_pad, dtype=dtype)
        weak_idx = weak_idx.astype(jnp.int32)
    else:
        weak_idx = jnp.zeros((0,), jnp.int32)
    return TPULayout(words, groups(scales), groups(zeros), wk, weak_idx, meta)


def weak_operand(weak: jax.Array, *, out_pad: int, dtype: Any) -> jax.Array:
    """weak [out, k] -> the kernel's [round_up(k, 128), out_pad] in the activation dtype."""
    out, k = weak.shape
    return jnp.pad(weak.astype(dtype), ((0, out_pad - out), (0, _round_up(k, LANES) - k))).T


def unprepare(layout: TPULayout) -> tuple[jax.Array, ...]:
    """The packed format back: (qweight, scales, zeros, weak, weak_idx); weak is in the layout's
    activation dtype (bit-exact when that equals the storage dtype)."""
    m = layout.meta
    vpw, wpb, nk = m.vpw, m.words_per_block, m.k_blocks
    words = lax.bitcast_convert_type(layout.qweight, jnp.uint32).T.reshape(m.out_pad, nk, 1, wpb)
    shifts = (jnp.arange(vpw, dtype=jnp.uint32) * m.bits)[None, None, :, None]
    codes = (words >> shifts) & jnp.uint32((1 << m.bits) - 1)                  # [out_pad, nk, vpw, W]
    codes = codes.reshape(m.out_pad, m.in_pad)[:m.out_features, :m.in_features]
    qweight = pack_codes(codes, m.bits)
    g_count = num_groups(m.in_features, m.group_size)  # 1 when kernel_group != group_size

    def groups(a):
        return a.reshape(nk * m.groups_per_block, m.out_pad).T[:m.out_features, :g_count].astype(
            m.storage_dtype)

    if m.k:
        weak = layout.weak.T[:m.out_features, :m.k]
    else:
        weak = jnp.zeros((m.out_features, 0), m.dtype)
    return qweight, groups(layout.scales), groups(layout.zeros), weak, layout.weak_idx


def _group_rows(ref, row0: int, n_groups: int, group_size: int):
    """[n_groups · g, block_n] f32: rows row0.. of ref (one per group) each repeated g times."""
    bn = ref.shape[-1]
    parts = [jnp.broadcast_to(ref[pl.ds(row0 + t, 1), :].astype(jnp.float32), (group_size, bn))
             for t in range(n_groups)]
    return parts[0] if n_groups == 1 else jnp.concatenate(parts, axis=0)


def _kernel(x_ref, qw_ref, s_ref, z_ref, *rest, bits: int, group_size: int, wpb: int,
            has_weak: bool, x_resident: bool):
    if has_weak:
        xw_ref, wk_ref, o_ref, acc_ref = rest
    else:
        o_ref, acc_ref = rest
    kb = pl.program_id(2)
    # x_ref: [k_blocks, bm, vpw·W] (decode: all of x resident, fetched once) or [bm, vpw·W]
    x_blk = x_ref.at[kb] if x_resident else x_ref

    @pl.when(kb == 0)
    def _init():
        if has_weak:
            acc_ref[...] = jnp.dot(xw_ref[...], wk_ref[...], preferred_element_type=jnp.float32)
        else:
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    vpw = 32 // bits
    gpp = wpb // group_size  # groups per plane
    cdt = x_ref.dtype
    qw = qw_ref[...]                                                             # [W, bn] int32
    acc = acc_ref[...]
    for s in range(vpw):  # static unroll over the planes (in-word positions)
        codes = lax.shift_right_logical(qw, jnp.int32(s * bits)) if s else qw
        codes = (codes & jnp.int32((1 << bits) - 1)).astype(jnp.float32)
        sc = _group_rows(s_ref, s * gpp, gpp, group_size)
        zp = _group_rows(z_ref, s * gpp, gpp, group_size)
        w = ((codes - zp) * sc).astype(cdt)  # the reference's rounding: f32 -> activation dtype
        acc = acc + jnp.dot(x_blk[:, pl.ds(s * wpb, wpb)], w, preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(kb == pl.num_programs(2) - 1)
    def _done():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _block_m(m: int, block_m: int | None, *, itemsize: int, x_cols: int) -> int:
    """Rows per M block. Decode (M <= 8): one block of the dtype's sublane tile, 8 rows of 32-bit
    or 16 of 16-bit values (two rows packed per sublane). Prefill: M rounded up to 16, at most 256
    and at most MAX_X_BLOCK_BYTES of x per block (x_cols = vpw · W columns per K block)."""
    tile = 8 * (4 // itemsize)
    if m <= DECODE_MAX_M:
        return max(tile, 8)
    if block_m is None:
        cap = max(16, MAX_X_BLOCK_BYTES // (x_cols * itemsize) // 16 * 16)
        return min(256, cap, _round_up(m, 16))
    if block_m % 16:
        raise ValueError(f"block_m must be a multiple of 16, got {block_m}")
    return block_m


@functools.partial(jax.jit, static_argnames=("interpret", "block_m"))
def matmul_prepared(x: jax.Array, layout: TPULayout, weak: jax.Array | None = None,
                    weak_idx: jax.Array | None = None, *, interpret: Any = False,
                    block_m: int | None = None) -> jax.Array:
    """y[..., out] for a prepared linear; x [..., in_features].

    The weak columns come from the layout (prepared with them: x must then be in the layout's
    activation dtype) or, for a layout prepared without them, as ``weak [out, k]`` and
    ``weak_idx [k]`` here: then they are cast, padded and transposed on every call (k columns:
    what a model whose weak columns are trained does; the packed part stays prepared).
    ``interpret``: False (compile with Mosaic: a TPU), True or a ``pltpu.InterpretParams`` (run
    the kernel on CPU in TPU interpret mode; True means the default ``InterpretParams()``).
    """
    meta = layout.meta
    *lead, n = x.shape
    if n != meta.in_features:
        raise ValueError(f"x has {n} features, the layout {meta.in_features}")
    if layout.weak is not None:
        if weak is not None:
            raise ValueError("the layout already holds the weak columns")
        if jnp.dtype(x.dtype).name != meta.dtype:
            raise ValueError(f"x is {x.dtype}, the layout was prepared for {meta.dtype} "
                             "(prepare(..., dtype=x.dtype))")
        wk, weak_idx, k = layout.weak, layout.weak_idx, meta.k
    elif weak is not None and weak_idx is not None and weak.shape[-1]:
        if weak.shape[0] != meta.out_features:
            raise ValueError(f"weak has {weak.shape[0]} rows, the layout {meta.out_features}")
        wk, weak_idx, k = (weak_operand(weak, out_pad=meta.out_pad, dtype=x.dtype),
                           weak_idx.astype(jnp.int32), weak.shape[-1])
    else:
        wk, k = None, 0
    if interpret is True:
        interpret = pltpu.InterpretParams()
    x2 = x.reshape(-1, n)
    m = x2.shape[0]
    bm = _block_m(m, block_m, itemsize=jnp.dtype(x.dtype).itemsize, x_cols=meta.cols_per_block)
    m_pad = _round_up(m, bm)
    bn, wpb, vpw = meta.block_n, meta.words_per_block, meta.vpw
    gpb = meta.groups_per_block
    has_weak = k > 0

    # x as [k_blocks, m_pad, vpw·W]. Decode: one block holding all of it (index constant over the
    # grid, so fetched once instead of once per out block); prefill: one K block of bm rows.
    cols = vpw * wpb
    xp = jnp.pad(x2, ((0, m_pad - m), (0, meta.in_pad - n)))
    xp = xp.reshape(m_pad, meta.k_blocks, cols).transpose(1, 0, 2)
    x_resident = m_pad == bm and meta.k_blocks * bm * cols * xp.dtype.itemsize <= MAX_X_BLOCK_BYTES
    if x_resident:
        x_spec = pl.BlockSpec((meta.k_blocks, bm, cols), lambda i, j, kb: (0, i, 0))
    else:
        x_spec = pl.BlockSpec((None, bm, cols), lambda i, j, kb: (kb, i, 0))
    operands = [xp, layout.qweight, layout.scales, layout.zeros]
    in_specs = [x_spec,
                pl.BlockSpec((wpb, bn), lambda i, j, kb: (kb, j)),
                pl.BlockSpec((None, gpb, bn), lambda i, j, kb: (kb, 0, j)),
                pl.BlockSpec((None, gpb, bn), lambda i, j, kb: (kb, 0, j))]
    if has_weak:
        k_pad = wk.shape[0]
        xw = jnp.take(x2, weak_idx, axis=1)  # the k-column gather stays outside the kernel
        operands += [jnp.pad(xw, ((0, m_pad - m), (0, k_pad - k))), wk]
        in_specs += [pl.BlockSpec((bm, k_pad), lambda i, j, kb: (i, 0)),
                     pl.BlockSpec((k_pad, bn), lambda i, j, kb: (0, j))]
    kernel = functools.partial(_kernel, bits=meta.bits, group_size=meta.kernel_group, wpb=wpb,
                               has_weak=has_weak, x_resident=x_resident)
    grid = (m_pad // bm, meta.out_pad // bn, meta.k_blocks)
    y = pl.pallas_call(
        kernel,
        grid_spec=pl.GridSpec(
            grid=grid, in_specs=in_specs,
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, kb: (i, j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((m_pad, meta.out_pad), x.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"qeft_matmul_tpu_b{meta.bits}_g{meta.group_size}",
    )(*operands)
    return y[:m, :meta.out_features].reshape(*lead, meta.out_features)


def qeft_matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array,
                weak: jax.Array | None, weak_idx: jax.Array | None, *, bits: int,
                group_size: int, interpret: Any = False, block_m: int | None = None,
                block_n: int | None = None, words_per_block: int | None = None) -> jax.Array:
    """The packed format in, y out: ``prepare`` (re-layout) + ``matmul_prepared`` in one call.

    Convenient (tests, the op's default path), but the re-layout then runs on every call: one
    extra read and write of the weights. Serving code should ``prepare`` once at load time and
    call ``matmul_prepared``.
    """
    if weak is None or weak_idx is None or weak.shape[-1] == 0:
        weak, weak_idx = None, None
    layout = prepare(qweight, scales, zeros, weak, weak_idx, bits=bits, group_size=group_size,
                     in_features=x.shape[-1], dtype=x.dtype, block_n=block_n,
                     words_per_block=words_per_block)
    return matmul_prepared(x, layout, interpret=interpret, block_m=block_m)
