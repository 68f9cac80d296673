"""The packed QEFT linear: the one place that defines the low-bit layout, and its plain reference.

Layout of one quantized linear with weight W [out, n] (n = input features):
  qweight  uint32 [out, ceil(n / vpw)]  codes packed along the input dimension, vpw = 32 // bits
                                        values per word (16 at 2 bits, 10 at 3, 8 at 4); column j
                                        lives in word j // vpw at bit offset (j % vpw) * bits;
                                        unused high bits and padding columns are zero.
  scales   16-bit [out, G]              G = ceil(n / g); group of column j is j // g; the last group
                                        may be partial (e.g. n = 576, g = 128 -> 4 full + 1 of 64).
  zeros    16-bit [out, G]              integer zero points stored as floats (exact up to 2048).
  weak     16-bit [out, k]              the k weak input columns, never quantized.
  weak_idx int32 [k]                    which input columns are weak. After OGR these are 0..k-1
                                        for every layer except o_proj (gathered by index).
The dense grid covers all n columns (as the paper's code does): codes at weak positions equal the
zero point, so they dequantize to exactly 0 and
    y = dequantize(qweight) · x + weak · x[weak_idx]           (the spec the kernels must equal)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4)


def values_per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 32 // bits


def num_groups(n: int, group_size: int) -> int:
    return -(-n // group_size)


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """codes [out, n] integers in [0, 2^bits) -> uint32 [out, ceil(n / vpw)]."""
    vpw = values_per_word(bits)
    out, n = codes.shape
    words = -(-n // vpw)
    c = jnp.pad(codes.astype(jnp.uint32), ((0, 0), (0, words * vpw - n))).reshape(out, words, vpw)
    shifts = (jnp.arange(vpw, dtype=jnp.uint32) * bits)
    # Fields do not overlap, so a sum is a bitwise OR.
    return jnp.sum(c << shifts, axis=-1, dtype=jnp.uint32)


def unpack_codes(qweight: jax.Array, bits: int, n: int) -> jax.Array:
    """uint32 [out, words] -> int32 codes [out, n]."""
    vpw = values_per_word(bits)
    shifts = jnp.arange(vpw, dtype=jnp.uint32) * bits
    c = (qweight[:, :, None] >> shifts) & jnp.uint32((1 << bits) - 1)
    return c.reshape(qweight.shape[0], -1)[:, :n].astype(jnp.int32)


def group_index(n: int, group_size: int) -> np.ndarray:
    return np.arange(n) // group_size


def dequantize(qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *, bits: int,
               group_size: int, n: int, dtype: Any = jnp.float32) -> jax.Array:
    """W_hat [out, n] = (code - zero[group]) * scale[group], computed in float32."""
    codes = unpack_codes(qweight, bits, n).astype(jnp.float32)
    g = group_index(n, group_size)
    s = scales.astype(jnp.float32)[:, g]
    z = zeros.astype(jnp.float32)[:, g]
    return ((codes - z) * s).astype(dtype)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Static description of a packed linear (hashable, so usable as a jit static arg)."""

    bits: int
    group_size: int
    in_features: int
    out_features: int
    k: int
    weak_first: bool = False   # weak_idx is 0..k-1 (OGR): the weak inputs are read as a static slice

    def __post_init__(self) -> None:
        values_per_word(self.bits)
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if not 0 <= self.k <= self.in_features:
            raise ValueError(f"k must be in [0, {self.in_features}], got {self.k}")

    @property
    def words(self) -> int:
        return -(-self.in_features // values_per_word(self.bits))

    @property
    def groups(self) -> int:
        return num_groups(self.in_features, self.group_size)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"qweight": (self.out_features, self.words), "scales": (self.out_features, self.groups),
                "zeros": (self.out_features, self.groups), "weak": (self.out_features, self.k),
                "weak_idx": (self.k,)}


def weak_inputs(x: jax.Array, weak_idx: jax.Array, weak_first: bool = False) -> jax.Array:
    """x[..., weak_idx]. After OGR the weak columns are x's first k (`weak_first`, checked at load):
    a static slice, so no gather is left in the program — OGR's point (paper section 3.2, Table 1)."""
    return x[..., :weak_idx.shape[0]] if weak_first else jnp.take(x, weak_idx, axis=-1)


def qeft_matmul_ref(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array,
                    weak: jax.Array, weak_idx: jax.Array, *, bits: int, group_size: int,
                    weak_first: bool = False) -> jax.Array:
    """Plain reference: y[..., out] = x · Ŵᵀ (f32 accumulate) with Ŵ = dequantize(W) + the weak
    columns at weak_idx (where the codes dequantize to exactly 0), i.e. x · dequantize(W)ᵀ +
    x[..., weak_idx] · weakᵀ as one product: a second product over the k weak inputs wrote and
    re-read a whole [..., out] output (12-18% of a linear's CPU time at 2,044 tokens)."""
    w = dense_weight(qweight, scales, zeros, weak, weak_idx, bits=bits, group_size=group_size, n=x.shape[-1],
                     dtype=x.dtype, weak_first=weak_first)
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def dense_weight(qweight: jax.Array, scales: jax.Array, zeros: jax.Array, weak: jax.Array,
                 weak_idx: jax.Array, *, bits: int, group_size: int, n: int, dtype: Any = jnp.float32,
                 weak_first: bool = False) -> jax.Array:
    """Ŵ [out, n]: the dense grid (zero at the weak positions) plus the weak columns, in dtype."""
    w = dequantize(qweight, scales, zeros, bits=bits, group_size=group_size, n=n, dtype=dtype)
    cols = slice(0, weak.shape[-1]) if weak_first else weak_idx
    return w.at[:, cols].add(weak.astype(dtype)) if weak.shape[-1] else w
