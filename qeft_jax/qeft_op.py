"""The QEFT linear op with its efficient backward (paper section 3.3, Fig. 4).

Forward: y = dequant(W_q)·x + W_weak·x[weak_idx]   (Pallas kernel on GPU, XLA reference elsewhere)
Backward: dX flows through the full dequantized weight; dW_weak = dYᵀ · X_weak only. The residual
saved for the backward pass is X_weak ([..., k]), never the full X, so activation memory for the
linear's weight gradient is k / in_features of a LoRA/full fine-tune's.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels.qeft_gemv import qeft_matmul
from qeft_jax.packing import dequantize, qeft_matmul_ref


def _forward(x, qweight, scales, zeros, weak, weak_idx, bits, group_size, backend):
    # The kernel needs every packed word inside at most two groups (group_size >= values per word);
    # smaller groups take the reference path.
    if backend == "pallas" and group_size >= 32 // bits:
        return qeft_matmul(x, qweight, scales, zeros, weak, weak_idx, bits=bits, group_size=group_size)
    return qeft_matmul_ref(x, qweight, scales, zeros, weak, weak_idx, bits=bits, group_size=group_size)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def qeft_linear(x, qweight, scales, zeros, weak, weak_idx, bits: int, group_size: int, backend: str):
    return _forward(x, qweight, scales, zeros, weak, weak_idx, bits, group_size, backend)


def _fwd(x, qweight, scales, zeros, weak, weak_idx, bits, group_size, backend):
    y = _forward(x, qweight, scales, zeros, weak, weak_idx, bits, group_size, backend)
    x_weak = jnp.take(x, weak_idx, axis=-1)
    # Only X_weak is saved; x itself is kept as a shape/dtype-only stand-in (no data).
    x_aval = jnp.zeros((0,) + x.shape[-1:], x.dtype)
    return y, (x_weak, x_aval, qweight, scales, zeros, weak, weak_idx)


def _bwd(bits, group_size, backend, res, dy):
    x_weak, x_aval, qweight, scales, zeros, weak, weak_idx = res
    n = x_aval.shape[-1]
    # dX = dY · Ŵ, Ŵ the full effective weight (dense grid, zero at weak positions, + weak columns).
    w = dequantize(qweight, scales, zeros, bits=bits, group_size=group_size, n=n, dtype=jnp.float32)
    w = w.at[:, weak_idx].add(weak.astype(jnp.float32))
    dx = jnp.einsum("...o,oi->...i", dy.astype(jnp.float32), w).astype(x_aval.dtype)
    d_weak = jnp.einsum("...o,...k->ok", dy.astype(jnp.float32), x_weak.astype(jnp.float32))
    return (dx, None, jnp.zeros_like(scales), jnp.zeros_like(zeros), d_weak.astype(weak.dtype), None)


qeft_linear.defvjp(_fwd, _bwd)
