"""The QEFT linear: packed low-bit weights + k fp weak columns (the only trainable part).

Variables:
  QuantState  qweight, scales, zeros, weak_idx, bias — frozen, never get gradients or optimizer state
  WeakColumns weak [out, k]                          — an nnx.Param subclass: the fine-tuning target
  TPULayoutState tpu_qweight, tpu_scales, tpu_zeros   — only after prepare_tpu: the same packed tensors
                                                       in the Mosaic kernel's layout (a Buffer:
                                                       derived, never trained or stored)
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import qeft_tpu
from qeft_jax.model import Buffer
from qeft_jax.packing import QuantSpec
from qeft_jax.qeft_op import qeft_linear, resolve_backend


class QuantState(nnx.Variable):
    """Frozen packed tensors of a quantized linear."""


class WeakColumns(nnx.Param):
    """The 16-bit weak columns: what QEFT fine-tunes (paper section 4)."""


class TPULayoutState(Buffer):
    """The packed tensors re-laid out for the Mosaic kernel (prepare_tpu): derived, never stored."""


def default_backend() -> str:
    """What backend=None / 'auto' runs here: 'triton' on GPU, 'mosaic' on TPU, 'xla' (the reference:
    dequantize + dot) elsewhere; $QEFT_JAX_BACKEND overrides (see qeft_op.resolve_backend)."""
    return resolve_backend(None)


def set_backend(module: nnx.Module, backend: str | None) -> int:
    """Set the backend of every QEFTLinear in `module` (e.g. a loaded model); returns how many.
    None means 'auto' (resolved per call: qeft_op.resolve_backend). Checked here, not at call time."""
    if backend is not None:
        resolve_backend(backend)
    count = 0
    for _, m in nnx.iter_graph(module):
        if isinstance(m, QEFTLinear):
            m.backend = backend
            count += 1
    return count


def prepare_tpu(module: nnx.Module) -> int:
    """Lay the packed tensors of every QEFTLinear in `module` out for the TPU (Mosaic) kernel, once
    (load time; pallas_kernels.qeft_tpu.prepare); returns how many took it (configs the kernel does
    not take keep the per-call path). The backends 'mosaic' / 'mosaic_interpret' then use the
    layout instead of re-laying the weights out on every call. The weak columns stay where they
    are (trainable). Re-run after replacing qweight/scales/zeros."""
    count = 0
    for _, m in nnx.iter_graph(module):
        if isinstance(m, QEFTLinear) and m.prepare_tpu():
            count += 1
    return count


class QEFTLinear(nnx.Module):
    def __init__(self, spec: QuantSpec, *, bias: bool, dtype: Any = jnp.float32,
                 storage_dtype: Any = jnp.float16, weak_dtype: Any = None, backend: str | None = None):
        """backend: one of qeft_op.BACKENDS ('xla', 'triton', 'mosaic', '*_interpret', 'auto');
        None = 'auto' ($QEFT_JAX_BACKEND, else by platform)."""
        if backend is not None:
            resolve_backend(backend)  # fail early on a typo
        self.spec = spec
        self.dtype = dtype
        self.backend = backend
        shapes = spec.shapes()
        self.qweight = QuantState(jnp.zeros(shapes["qweight"], jnp.uint32))
        self.scales = QuantState(jnp.ones(shapes["scales"], storage_dtype))
        self.zeros = QuantState(jnp.zeros(shapes["zeros"], storage_dtype))
        self.weak_idx = QuantState(jnp.arange(spec.k, dtype=jnp.int32))
        self.weak = WeakColumns(jnp.zeros(shapes["weak"], weak_dtype or storage_dtype))
        self.bias = QuantState(jnp.zeros((spec.out_features,), storage_dtype)) if bias else None
        self.tpu_meta: qeft_tpu.TPUMeta | None = None  # set by prepare_tpu, with the tpu_* buffers

    def prepare_tpu(self) -> bool:
        """The Mosaic layout of qweight/scales/zeros (module docstring of pallas_kernels.qeft_tpu)."""
        sp = self.spec
        if not qeft_tpu.supports(bits=sp.bits, group_size=sp.group_size, in_features=sp.in_features):
            return False
        lay = qeft_tpu.prepare(self.qweight[...], self.scales[...], self.zeros[...], None, None,
                               bits=sp.bits, group_size=sp.group_size, in_features=sp.in_features)
        self.tpu_qweight = TPULayoutState(lay.qweight)
        self.tpu_scales = TPULayoutState(lay.scales)
        self.tpu_zeros = TPULayoutState(lay.zeros)
        self.tpu_meta = lay.meta
        return True

    def _tpu_layout(self) -> qeft_tpu.TPULayout | None:
        if self.tpu_meta is None:
            return None
        return qeft_tpu.TPULayout(self.tpu_qweight[...], self.tpu_scales[...], self.tpu_zeros[...],
                                  None, jnp.zeros((0,), jnp.int32), self.tpu_meta)

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def out_features(self) -> int:
        return self.spec.out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        y = qeft_linear(x.astype(self.dtype), self.qweight[...], self.scales[...], self.zeros[...],
                        self.weak[...], self.weak_idx[...], bits=self.spec.bits,
                        group_size=self.spec.group_size, backend=resolve_backend(self.backend),
                        tpu_layout=self._tpu_layout(), weak_first=self.spec.weak_first)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y

