"""Streaming calibration: one decoder block at a time, batches of activations through a jitted pass.

Only one block's weights and one batch's activations live on the device; the activations of all
calibration sequences between blocks stay in host memory (numpy). Hessians are accumulated in
float32 as H = 2 XᵀX / tokens (Eq. 2); q/k/v share the 'attn' Hessian, gate/up share 'ffn'.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qeft_jax.config import LlamaConfig
from qeft_jax.model import DecoderLayer, rope_inv_freq

GROUPS = ("attn", "o", "ffn", "down")
GROUP_OF = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn",
            "self_attn.o_proj": "o", "mlp.gate_proj": "ffn", "mlp.up_proj": "ffn", "mlp.down_proj": "down"}


class CalibrationError(ValueError):
    """Calibration data or activations that cannot produce a valid quantization."""


def build_layer(cfg: LlamaConfig, tensors: Mapping[str, np.ndarray],
                replace: Mapping[str, nnx.Module] | None = None) -> DecoderLayer:
    """A DecoderLayer holding `tensors` (names relative to the layer); `replace` swaps linears."""
    layer = nnx.eval_shape(lambda: DecoderLayer(cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                                                rngs=nnx.Rngs(0)))
    for name, module in (replace or {}).items():
        parent, attr = name.split(".")
        setattr(getattr(layer, parent), attr, module)
    graphdef, state = nnx.split(layer)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = ".".join(str(p) for p in path)
        if key not in tensors:
            raise KeyError(f"layer tensor '{key}' missing")
        value = tensors[key]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"layer tensor '{key}' has shape {tuple(value.shape)}, expected {tuple(var.shape)}")
        flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@partial(jax.jit, static_argnames=("graphdef", "stats"))
def _run_block(graphdef: Any, state: Any, x: jax.Array, inv_freq: jax.Array, stats: str
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    layer = nnx.merge(graphdef, state)
    b, t, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    y, _, inputs = layer.forward_with_inputs(x, pos, jnp.ones((b, t), jnp.int32), inv_freq, None,
                                             jnp.int32(0))
    out: dict[str, jax.Array] = {}
    for name, v in inputs.items():
        v = v.astype(jnp.float32).reshape(-1, v.shape[-1])
        if stats == "diag":
            out[name] = 2.0 * jnp.sum(v * v, axis=0)
        elif stats == "full":
            out[name] = 2.0 * jnp.einsum("tn,tm->nm", v, v, precision=jax.lax.Precision.HIGHEST)
    return y, out


def run_block(layer: DecoderLayer, x: np.ndarray, cfg: LlamaConfig, *, batch_size: int,
              stats: str = "none", on_batch: Callable[[], None] | None = None
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Push all calibration activations x [N, T, D] through one block in batches.

    stats: 'none' | 'diag' (Σ 2x², for selection) | 'full' (2XᵀX, for OPTQ); averaged per token.
    """
    graphdef, state = nnx.split(layer)
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    ys, acc = [], {}
    for start in range(0, x.shape[0], batch_size):
        y, s = _run_block(graphdef, state, jnp.asarray(x[start:start + batch_size]), inv_freq, stats)
        ys.append(np.asarray(y))
        for k, v in s.items():
            acc[k] = v if k not in acc else acc[k] + v
        if on_batch:
            on_batch()
    tokens = x.shape[0] * x.shape[1]
    y = np.concatenate(ys)
    if not np.all(np.isfinite(y)):
        raise CalibrationError("calibration activations became NaN/Inf inside a block: the weights or "
                               "the calibration data are broken")
    return y, {k: np.asarray(v) / tokens for k, v in acc.items()}
