"""Streaming calibration: one decoder block at a time, batches of activations through a jitted pass.

Only one block's weights and one batch's activations live on the device; the activations of all
calibration sequences between blocks stay in host memory (numpy). Hessians are accumulated in
float32 as H = 2 XᵀX / tokens (Eq. 2), one per activation a linear reads (`spec.Linear.reads`:
q/k/v share one, gate/up share one).

With a `mesh` (qeft_jax.sharding), each batch is split over the mesh's 'data' axis, the block's
weights are replicated, and the Hessians are summed across devices by an all-reduce.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qeft_jax import sharding as shd
from qeft_jax.config import ModelConfig
from qeft_jax.model import DecoderLayer, place_tensors, rope_inv_freq, swap_linears


class CalibrationError(ValueError):
    """Calibration data or activations that cannot produce a valid quantization."""


def build_layer(cfg: ModelConfig, i: int, tensors: Mapping[str, np.ndarray],
                replace: Mapping[str, nnx.Module] | None = None) -> DecoderLayer:
    """Decoder layer `i` holding `tensors` (names relative to the layer); `replace` swaps linears."""
    layer = nnx.eval_shape(lambda: DecoderLayer(cfg, layer=i, dtype=jnp.float32, param_dtype=jnp.float32,
                                                rngs=nnx.Rngs(0)))
    if replace:
        swap_linears(layer, lambda name, current: replace.get(name, current))
    place_tensors(layer, tensors, source="calibration block")
    return layer


def absmean_key(activation: str) -> str:
    """The statistics key of an activation's per-channel mean |x| (run_block(absmean=True))."""
    return f"{activation}.absmean"


@partial(jax.jit, static_argnames=("graphdef", "stats", "shardings", "absmean", "outputs"))
def _run_block(graphdef: Any, state: Any, x: jax.Array, inv_freq: jax.Array, stats: str,
               weights: jax.Array | None = None, shardings: tuple[Any, Any] | None = None,
               absmean: bool = False, outputs: bool = True) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    """weights [B] (0/1) drop padded sequences from the statistics; shardings = (activations,
    statistics) output shardings under a mesh. Both None: the plain single-device pass.
    outputs=False returns no block output, so XLA drops the work only it needs (down_proj, the
    residual add) and nothing is copied back to the host."""
    layer = nnx.merge(graphdef, state)
    b, t, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    y, _, inputs = layer.forward_with_inputs(x, pos, jnp.ones((b, t), jnp.int32), inv_freq, None,
                                             jnp.int32(0))
    out: dict[str, jax.Array] = {}
    for name, v in inputs.items():
        v = v.astype(jnp.float32).reshape(-1, v.shape[-1])
        vw = v if weights is None else v * jnp.repeat(weights.astype(jnp.float32), t)[:, None]
        if stats == "diag":
            out[name] = 2.0 * jnp.sum(vw * v, axis=0)
        elif stats == "full":
            out[name] = 2.0 * jnp.einsum("tn,tm->nm", vw, v, precision=jax.lax.Precision.HIGHEST)
        if absmean:
            out[absmean_key(name)] = jnp.sum(jnp.abs(vw), axis=0)
    if shardings is not None:  # y stays split over 'data'; the token sums become an all-reduce
        y = jax.lax.with_sharding_constraint(y, shardings[0])
        out = {k: jax.lax.with_sharding_constraint(v, shardings[1]) for k, v in out.items()}
    return (y if outputs else None), out


def run_block(layer: DecoderLayer, x: np.ndarray, cfg: ModelConfig, *, batch_size: int,
              stats: str = "none", on_batch: Callable[[], None] | None = None, mesh: Any = None,
              absmean: bool = False, outputs: bool = True) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """Push all calibration activations x [N, T, D] through one block in batches.

    stats: 'none' | 'diag' (Σ 2x², for selection) | 'full' (2XᵀX, for OPTQ); averaged per token.
    absmean: also Σ|x| per channel averaged per token (AWQ's s_x), keyed `absmean_key(activation)`.
    mesh: None (one device) or a jax.sharding.Mesh with a 'data' axis (qeft_jax.sharding.make_mesh):
    then batch_size is the global batch, rounded up to a multiple of the 'data' size, and a final
    partial batch is padded with copies of its own sequences weighted zero in the statistics.
    outputs=False: statistics only (the returned output is None), for a block whose output is not
    needed (the fp block of the layer-sequential pass): it skips down_proj and the host copy.
    """
    if mesh is not None:
        return _run_block_sharded(layer, x, cfg, batch_size=batch_size, stats=stats, on_batch=on_batch,
                                  mesh=mesh, absmean=absmean, outputs=outputs)
    graphdef, state = nnx.split(layer)
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    ys, acc = [], {}
    for start in range(0, x.shape[0], batch_size):
        y, s = _run_block(graphdef, state, jnp.asarray(x[start:start + batch_size]), inv_freq, stats,
                          absmean=absmean, outputs=outputs)
        if outputs:
            ys.append(np.asarray(y))
        for k, v in s.items():
            acc[k] = v if k not in acc else acc[k] + v
        if on_batch:
            on_batch()
    return _finish(x, ys, {k: np.asarray(v) for k, v in acc.items()})


def _finish(x: np.ndarray, ys: list[np.ndarray], acc: dict[str, np.ndarray]
            ) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """Concatenated outputs (None when none were kept) and per-token statistics; NaN/Inf in
    either is an error (the statistics carry it when the outputs were not kept)."""
    tokens = x.shape[0] * x.shape[1]
    y = np.concatenate(ys) if ys else None
    if not all(np.all(np.isfinite(v)) for v in ([] if y is None else [y]) + list(acc.values())):
        raise CalibrationError("calibration activations became NaN/Inf inside a block: the weights or "
                               "the calibration data are broken")
    return y, {k: v / tokens for k, v in acc.items()}


def _run_block_sharded(layer: DecoderLayer, x: np.ndarray, cfg: ModelConfig, *, batch_size: int,
                       stats: str, on_batch: Callable[[], None] | None, mesh: Any, absmean: bool = False,
                       outputs: bool = True) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """run_block data-parallel over mesh's 'data' axis (weights replicated, Hessians all-reduced)."""
    n_dev = shd.data_size(mesh)
    batch = -(-max(1, min(batch_size, x.shape[0])) // n_dev) * n_dev  # every batch the same shape
    graphdef, state = nnx.split(layer)
    rep = shd.replicated(mesh)
    state = jax.device_put(state, rep)
    inv_freq = jax.device_put(jnp.asarray(rope_inv_freq(cfg)), rep)
    shardings = (shd.data_sharding(mesh), rep)
    ys, acc = [], {}
    for start in range(0, x.shape[0], batch):
        xb = x[start:start + batch]
        real = xb.shape[0]
        weights = np.zeros(batch, np.float32)
        weights[:real] = 1.0
        if real < batch:  # pad with copies of real sequences (finite), weighted zero
            xb = np.concatenate([xb, xb[np.arange(batch - real) % real]])
        y, s = _run_block(graphdef, state, shd.shard_batch(xb, mesh), inv_freq, stats,
                          shd.shard_batch(weights, mesh), shardings, absmean, outputs)
        if outputs:
            ys.append(shd.to_host(y)[:real])
        for k, v in s.items():
            acc[k] = v if k not in acc else acc[k] + v
        if on_batch:
            on_batch()
    return _finish(x, ys, {k: shd.to_host(v) for k, v in acc.items()})
