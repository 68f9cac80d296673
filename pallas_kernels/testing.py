"""Helpers shared by tests/test_kernels.py, tests/test_tpu_kernel.py and benchmarks/kernel.py: random
packed inputs, error metric, and the lowering checks (jax.export with platforms=["cuda"] / ["tpu"],
which work without a GPU / TPU)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from pallas_kernels import qeft_tpu
from pallas_kernels.qeft_gemv import qeft_matmul
from qeft_jax.packing import num_groups, pack_codes, values_per_word

# Pallas-Triton lowers to this custom call (jax 0.10/0.11: "__gpu$xla.gpu.triton"; older jaxlibs
# compiled ahead of time into "triton_kernel_call_ffi"). Triton IR carries no compatibility
# guarantee, so jax.export refuses it unless explicitly allowed.
TRITON_CUSTOM_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi", "triton_kernel_call")
# Pallas-Mosaic lowers to this custom call (its body: the serialized Mosaic MLIR module).
MOSAIC_CUSTOM_CALL = "tpu_custom_call"


def random_inputs(out: int, n: int, *, bits: int, group_size: int, k: int, m: int = 1,
                  dtype: Any = jnp.bfloat16, scattered: bool = False, seed: int = 0,
                  lead: tuple[int, ...] | None = None):
    """(x, qweight, scales, zeros, weak, weak_idx) for a random packed QEFT linear.

    Codes are uniform in [0, 2^bits); codes at weak columns are set to their group's zero point
    (so they dequantize to 0, as the format specifies). Scales are positive 16-bit values, zeros
    integers stored as 16-bit floats, weak and x ~ N(0, 1) rounded to 16 bits.
    """
    rng = np.random.default_rng(seed)
    g = num_groups(n, group_size)
    zeros = rng.integers(0, 2 ** bits, (out, g)).astype(np.float32)
    scales = rng.uniform(0.5, 1.5, (out, g)).astype(np.float32) / (2 ** bits)
    codes = rng.integers(0, 2 ** bits, (out, n))
    if scattered:
        idx = np.sort(rng.choice(n, size=k, replace=False))
    else:
        idx = np.arange(k)
    if k:
        codes[:, idx] = zeros[:, idx // group_size].astype(np.int64)
    weak = rng.normal(0.0, 1.0, (out, k)).astype(np.float32)
    shape = (lead if lead is not None else (m,)) + (n,)
    x = rng.normal(0.0, 1.0, shape).astype(np.float32)
    return (jnp.asarray(x, dtype), pack_codes(jnp.asarray(codes, jnp.int32), bits),
            jnp.asarray(scales, dtype), jnp.asarray(zeros, dtype), jnp.asarray(weak, dtype),
            jnp.asarray(idx, jnp.int32))


def rel_err(y: jax.Array, ref: jax.Array) -> float:
    """max |y - ref| / max |ref|, in float32."""
    y = np.asarray(jnp.asarray(y, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    return float(np.max(np.abs(y - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def _arg_specs(out: int, n: int, bits: int, group_size: int, k: int, m: int, dtype: Any,
               storage_dtype: Any) -> tuple[jax.ShapeDtypeStruct, ...]:
    vpw = values_per_word(bits)
    g = num_groups(n, group_size)
    return (jax.ShapeDtypeStruct((m, n), dtype),
            jax.ShapeDtypeStruct((out, -(-n // vpw)), jnp.uint32),
            jax.ShapeDtypeStruct((out, g), storage_dtype), jax.ShapeDtypeStruct((out, g), storage_dtype),
            jax.ShapeDtypeStruct((out, k), storage_dtype), jax.ShapeDtypeStruct((k,), jnp.int32))


def lower_for_tpu(*, out: int, n: int, bits: int, group_size: int, k: int, m: int = 1,
                  dtype: Any = jnp.bfloat16, storage_dtype: Any = jnp.float16,
                  prepared: bool = False, **kernel_kw) -> str:
    """Export the Mosaic kernel for TPU (no TPU needed); returns the StableHLO text.

    ``prepared=False`` exports ``qeft_tpu.qeft_matmul`` (the layout is built inside the exported
    function, as the op does); ``prepared=True`` exports ``matmul_prepared`` on an already prepared
    layout (what serving runs per call). Raises if the Pallas -> Mosaic lowering fails (block shapes
    not (8, 128)-tiled, unsupported ops, ...). Mosaic's own compile to TPU code happens on a TPU.
    """
    args = _arg_specs(out, n, bits, group_size, k, m, dtype, storage_dtype)
    if prepared:
        lay = jax.eval_shape(lambda *a: qeft_tpu.prepare(
            *a, bits=bits, group_size=group_size, in_features=n, dtype=dtype,
            **{kk: v for kk, v in kernel_kw.items() if kk != "block_m"}), *args[1:])
        fn = jax.jit(lambda x, lay: qeft_tpu.matmul_prepared(x, lay, block_m=kernel_kw.get("block_m")))
        exp = export.export(fn, platforms=["tpu"])(args[0], lay)
    else:
        fn = jax.jit(lambda *a: qeft_tpu.qeft_matmul(*a, bits=bits, group_size=group_size, **kernel_kw))
        exp = export.export(fn, platforms=["tpu"])(*args)
    text = exp.mlir_module()
    if MOSAIC_CUSTOM_CALL not in text:
        raise AssertionError("exported module has no Mosaic (tpu_custom_call) custom call")
    return text


def lower_for_cuda(*, out: int, n: int, bits: int, group_size: int, k: int, m: int = 1,
                   dtype: Any = jnp.bfloat16, **kernel_kw) -> str:
    """Export ``qeft_matmul`` for CUDA (no GPU needed); returns the StableHLO text.

    Raises if the Pallas -> Triton IR lowering fails. This checks the Triton IR is generated and
    verified; the PTX compile itself happens on a GPU at load time.
    """
    args = _arg_specs(out, n, bits, group_size, k, m, dtype, dtype)
    fn = jax.jit(lambda *a: qeft_matmul(*a, bits=bits, group_size=group_size, **kernel_kw))
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in TRITON_CUSTOM_CALLS]
    exp = export.export(fn, platforms=["cuda"], disabled_checks=checks)(*args)
    text = exp.mlir_module()
    if not any(t in text for t in TRITON_CUSTOM_CALLS):
        raise AssertionError("exported module has no Triton custom call")
    return text
