"""Asymmetric group-wise quantization with a grid-searched clipping range (paper section 3.1).

One code path for every bit width. Groups run along the input dimension: group j // g holds
column j; when n is not a multiple of g the last group is partial (the padding used to reshape
is zeros, which never change a group's range since 0 is always inside it, and cost no error).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from qeft_jax.packing import num_groups


def minmax_params(wmin: jax.Array, wmax: jax.Array, maxq: int) -> tuple[jax.Array, jax.Array]:
    """Scale and integer zero point covering [wmin, wmax] ∪ {0} (0 stays exactly representable)."""
    lo, hi = jnp.minimum(wmin, 0.0), jnp.maximum(wmax, 0.0)
    flat = lo == hi
    lo, hi = jnp.where(flat, -1.0, lo), jnp.where(flat, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = jnp.round(-lo / scale)
    return scale, zero


def quantize(w: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
    """Integer codes clip(round(w / s) + z, 0, maxq) (as float, exact)."""
    return jnp.clip(jnp.round(w / scale) + zero, 0, maxq)


def fake_quantize(w: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
    return scale * (quantize(w, scale, zero, maxq) - zero)


def to_groups(w: jax.Array, group_size: int) -> jax.Array:
    """[out, n] -> [out, G, g], zero-padded."""
    out, n = w.shape
    G = num_groups(n, group_size)
    return jnp.pad(w, ((0, 0), (0, G * group_size - n))).reshape(out, G, group_size)


@partial(jax.jit, static_argnames=("bits", "group_size", "grid", "max_shrink", "storage_dtype"))
def search_group_params(w: jax.Array, *, bits: int, group_size: int, grid: int = 100,
                        max_shrink: float = 0.8, storage_dtype=jnp.float16
                        ) -> tuple[jax.Array, jax.Array]:
    """Per (row, group) clipping search: shrink the min-max range by p ∈ {1, 1 - 1/grid, ...,
    1 - max_shrink} and keep the p that minimises the squared weight error. p = 1 is min-max, so the
    result is never worse than min-max. Scales are rounded to their 16-bit storage dtype *before*
    the error is measured, so the chosen grid is exactly what the packed checkpoint holds.

    Returns scales, zeros: float32 [out, G] (scales already representable in storage_dtype).
    """
    maxq = 2 ** bits - 1
    wg = to_groups(w.astype(jnp.float32), group_size)
    wmin, wmax = wg.min(-1), wg.max(-1)

    def params(p):
        s, z = minmax_params(wmin * p, wmax * p, maxq)
        s = jnp.maximum(s.astype(storage_dtype).astype(jnp.float32), jnp.finfo(storage_dtype).tiny)
        return s, z

    ones = jnp.ones((wg.shape[-1],), jnp.float32)

    def err(s, z):  # the sum over a group as a product with ones: XLA:CPU's row reduction ran 2x slower
        return ((fake_quantize(wg, s[..., None], z[..., None], maxq) - wg) ** 2) @ ones

    s0, z0 = params(1.0)
    best = (err(s0, z0), s0, z0)

    def body(i, carry):
        best_err, best_s, best_z = carry
        s, z = params(1.0 - i / grid)
        e = err(s, z)
        better = e < best_err
        return (jnp.where(better, e, best_err), jnp.where(better, s, best_s), jnp.where(better, z, best_z))

    steps = int(max_shrink * grid)
    _, s, z = jax.lax.fori_loop(1, steps + 1, body, best)
    return s, z


def column_params(scales: jax.Array, zeros: jax.Array, n: int, group_size: int
                  ) -> tuple[jax.Array, jax.Array]:
    """Expand [out, G] group params to per-column [out, n]."""
    g = jnp.arange(n) // group_size
    return scales[:, g], zeros[:, g]


@partial(jax.jit, static_argnames=("bits", "group_size"))
def rtn(w: jax.Array, scales: jax.Array, zeros: jax.Array, *, bits: int, group_size: int) -> jax.Array:
    """Round-to-nearest codes [out, n] (int32) with given group params."""
    s, z = column_params(scales, zeros, w.shape[1], group_size)
    return quantize(w.astype(jnp.float32), s, z, 2 ** bits - 1).astype(jnp.int32)
