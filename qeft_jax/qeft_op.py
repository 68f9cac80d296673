"""The QEFT linear op with its efficient backward (paper section 3.3, Fig. 4).

Forward: y = dequant(W_q)·x + W_weak·x[weak_idx]   (Pallas-Triton kernel on GPU, Pallas-Mosaic kernel
on TPU, the XLA reference elsewhere: ``resolve_backend`` is the one place that picks)
Backward: dX flows through the full dequantized weight; dW_weak = dYᵀ · X_weak only. The residual
saved for the backward pass is X_weak ([..., k]), never the full X, so activation memory for the
linear's weight gradient is k / in_features of a LoRA/full fine-tune's.
"""
from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels import qeft_gemv, qeft_tpu
from qeft_jax.packing import dense_weight, qeft_matmul_ref, weak_inputs

BACKEND_ENV = "QEFT_JAX_BACKEND"
# xla: dequantize + XLA dot (the reference); triton: pallas_kernels.qeft_gemv (GPU); mosaic:
# pallas_kernels.qeft_tpu (TPU); *_interpret: the same kernels run by the Pallas interpreter on any
# device (CPU included: slow, for checking); auto: by platform.
BACKENDS = ("auto", "xla", "triton", "mosaic", "triton_interpret", "mosaic_interpret")
ALIASES = {"pallas": "triton"}  # the GPU kernel's earlier name


def resolve_backend(backend: str | None = None) -> str:
    """The one place the forward implementation is chosen. An explicit backend wins; None or 'auto'
    takes $QEFT_JAX_BACKEND if set, else the platform of jax.default_backend(): gpu -> 'triton',
    tpu -> 'mosaic', anything else -> 'xla'. Returns a concrete name (never 'auto' or an alias)."""
    if backend is None or backend == "auto":
        backend = os.environ.get(BACKEND_ENV) or "auto"
        where = f"${BACKEND_ENV}"
    else:
        where = "backend"
    backend = ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS + tuple(ALIASES)}, got {backend!r}")
    if backend == "auto":
        return {"gpu": "triton", "tpu": "mosaic"}.get(jax.default_backend(), "xla")
    return backend


def _forward(x, qweight, scales, zeros, weak, weak_idx, bits, group_size, backend, tpu_layout=None,
             weak_first=False):
    backend = resolve_backend(backend)
    args = (x, qweight, scales, zeros, weak, weak_idx)
    kw = {"bits": bits, "group_size": group_size}
    # Configs a kernel does not take go to the reference: the Triton kernel needs every packed word
    # inside at most two groups (group_size >= values per word); the Mosaic one see qeft_tpu.supports.
    if backend in ("triton", "triton_interpret") and group_size >= 32 // bits:
        return qeft_gemv.qeft_matmul(*args, **kw, interpret=backend == "triton_interpret")
    if backend in ("mosaic", "mosaic_interpret") and tpu_layout is not None:
        # the packed part laid out once at load time (qlinear.prepare_tpu); weak stays trainable
        return qeft_tpu.matmul_prepared(x, tpu_layout, weak, weak_idx,
                                        interpret=backend == "mosaic_interpret")
    if backend in ("mosaic", "mosaic_interpret") and qeft_tpu.supports(
            bits=bits, group_size=group_size, in_features=x.shape[-1]):
        return qeft_tpu.qeft_matmul(*args, **kw, interpret=backend == "mosaic_interpret")
    return qeft_matmul_ref(*args, **kw, weak_first=weak_first)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 10))
def qeft_linear(x, qweight, scales, zeros, weak, weak_idx, bits: int, group_size: int, backend: str,
                tpu_layout=None, weak_first: bool = False):
    """tpu_layout: an optional ``qeft_tpu.TPULayout`` of the same packed tensors, prepared without the
    weak columns, that the Mosaic backends use instead of re-laying the weights out per call.
    weak_first: weak_idx is 0..k-1 (OGR, QuantSpec.weak_first): the XLA path and the saved residual
    slice x instead of gathering (the kernels read weak_idx either way)."""
    return _forward(x, qweight, scales, zeros, weak, weak_idx, bits, group_size, backend, tpu_layout, weak_first)


def _fwd(x, qweight, scales, zeros, weak, weak_idx, bits, group_size, backend, tpu_layout=None, weak_first=False):
    y = _forward(x, qweight, scales, zeros, weak, weak_idx, bits, group_size, backend, tpu_layout, weak_first)
    x_weak = weak_inputs(x, weak_idx, weak_first)
    # Only X_weak is saved; x itself is kept as a shape/dtype-only stand-in (no data).
    x_aval = jnp.zeros((0,) + x.shape[-1:], x.dtype)
    return y, (x_weak, x_aval, qweight, scales, zeros, weak, weak_idx)


def _bwd(bits, group_size, backend, weak_first, res, dy):
    x_weak, x_aval, qweight, scales, zeros, weak, weak_idx = res
    n = x_aval.shape[-1]
    # dX = dY · Ŵ, Ŵ the full effective weight (dense grid, zero at weak positions, + weak columns).
    w = dense_weight(qweight, scales, zeros, weak, weak_idx, bits=bits, group_size=group_size, n=n,
                     weak_first=weak_first)
    dx = jnp.einsum("...o,oi->...i", dy.astype(jnp.float32), w).astype(x_aval.dtype)
    d_weak = jnp.einsum("...o,...k->ok", dy.astype(jnp.float32), x_weak.astype(jnp.float32))
    return (dx, None, jnp.zeros_like(scales), jnp.zeros_like(zeros), d_weak.astype(weak.dtype), None,
            None)


qeft_linear.defvjp(_fwd, _bwd)
