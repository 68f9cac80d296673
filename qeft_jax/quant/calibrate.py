"""Streaming calibration: one decoder block at a time, batches of activations through a jitted pass.

Only one block's weights and one batch's activations live on the device; the activations of all
calibration sequences between blocks stay on the host in one buffer (`activation_buffer`: float32
or bfloat16 in memory, or float32 in a file), updated in place batch by batch. Hessians are accumulated in
float32 as H = 2 XᵀX / tokens (Eq. 2), one per activation a linear reads (`spec.Linear.reads`:
q/k/v share one, gate/up share one).

With a `mesh` (qeft_jax.sharding), each batch is split over the mesh's 'data' axis, the block's
weights are replicated, and the Hessians are summed across devices by an all-reduce.
"""
from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qeft_jax import sharding as shd
from qeft_jax.checkpoint import STORAGE_DTYPES
from qeft_jax.config import ModelConfig
from qeft_jax.io import RowFile
from qeft_jax.model import DecoderLayer, dotted, place_tensors, rope_inv_freq, swap_linears


Rows = Union[np.ndarray, RowFile]   # activations [N, T, D], sliced along N: x[a:b], x[a:b] = y


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


def symmetric_gram(vw: jax.Array, v: jax.Array) -> jax.Array:
    """vwᵀ v [n, n] for a symmetric result (vw = v scaled per row): the top rows and the bottom-right
    block are computed, the bottom-left block is the top-right one transposed, so a wide Gram takes
    3/4 of the products (22% faster on XLA:CPU at n = 576 and 1536)."""
    n = v.shape[1]
    if n < 256:
        return jnp.einsum("tn,tm->nm", vw, v, precision=jax.lax.Precision.HIGHEST)
    h = n // 2
    top = jnp.einsum("tn,tm->nm", vw[:, :h], v, precision=jax.lax.Precision.HIGHEST)
    corner = jnp.einsum("tn,tm->nm", vw[:, h:], v[:, h:], precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([top, jnp.concatenate([top[:, h:].T, corner], axis=1)], axis=0)


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
            out[name] = 2.0 * symmetric_gram(vw, v)
        if absmean:
            out[absmean_key(name)] = jnp.sum(jnp.abs(vw), axis=0)
    if shardings is not None:  # y stays split over 'data'; the token sums become an all-reduce
        y = jax.lax.with_sharding_constraint(y, shardings[0])
        out = {k: jax.lax.with_sharding_constraint(v, shardings[1]) for k, v in out.items()}
    return (y if outputs else None), out


def run_block(layer: DecoderLayer, x: Rows, cfg: ModelConfig, *, batch_size: int, stats: str = "none",
              out: Rows | None = None, on_batch: Callable[[], None] | None = None, mesh: Any = None,
              absmean: bool = False) -> dict[str, np.ndarray]:
    """Push all calibration activations x [N, T, D] through one block in batches; returns the
    statistics.

    stats: 'none' | 'diag' (Σ 2x², for selection) | 'full' (2XᵀX, for OPTQ); averaged per token.
    out: where each batch's outputs are written (cast to its dtype); `x` itself updates in place
    (a batch is read before its outputs overwrite it); None: the outputs are not computed at all
    (statistics only: XLA skips down_proj and the host copy). No list of per-batch outputs and no
    concatenated copy: the activations are held once, in `x` (see `activation_buffer`).
    absmean: also Σ|x| per channel averaged per token (AWQ's s_x), keyed `absmean_key(activation)`.
    mesh: None (one device) or a jax.sharding.Mesh with a 'data' axis (qeft_jax.sharding.make_mesh):
    then batch_size is the global batch, rounded up to a multiple of the 'data' size, and a final
    partial batch is padded with copies of its own sequences weighted zero in the statistics.
    """
    graphdef, state = nnx.split(layer)
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    outputs = out is not None
    run: Callable[[np.ndarray], tuple[np.ndarray | None, dict[str, jax.Array]]]
    if mesh is None:
        def run(xb: np.ndarray) -> tuple[np.ndarray | None, dict[str, jax.Array]]:
            y, s = _run_block(graphdef, state, jnp.asarray(xb), inv_freq, stats, absmean=absmean, outputs=outputs)
            return (np.asarray(y) if outputs else None), s
        batch = batch_size
    else:
        run, batch = _sharded_runner(graphdef, state, inv_freq, x.shape[0], batch_size=batch_size, stats=stats,
                                     mesh=mesh, absmean=absmean, outputs=outputs)
    host = np.asarray if mesh is None else shd.to_host
    acc: dict[str, jax.Array] = {}
    for start in range(0, x.shape[0], batch):
        y, s = run(np.asarray(x[start:start + batch], np.float32))
        if outputs and not np.all(np.isfinite(y)):
            raise _nonfinite()
        if out is not None:
            out[start:start + len(y)] = y
        for k, v in s.items():
            acc[k] = v if k not in acc else acc[k] + v
        if on_batch:
            on_batch()
    tokens = x.shape[0] * x.shape[1]
    stats_out = {k: host(v) / tokens for k, v in acc.items()}
    # without outputs, the summed statistics carry a NaN/Inf the block produced: one check, on the host once
    if not outputs and not all(np.all(np.isfinite(v)) for v in stats_out.values()):
        raise _nonfinite()
    return stats_out


@partial(jax.jit, static_argnames=("graphdef",))
def _attention_errors(graphdef: Any, own: Any, rest: Any, candidates: Any, x: jax.Array, inv_freq: jax.Array
                      ) -> jax.Array:
    """Σ over the batch's tokens of ||attn_c(x) - attn(x)||² for every candidate c: attn is the
    block's attention output (o_proj's output) with its own weights `own`, attn_c the same with
    `candidates` (the same state with a leading candidate axis [A, ...]) in their place. The fp
    output is computed once, the candidates one at a time."""
    b, t, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), jnp.int32)
    a_in = nnx.merge(graphdef, own, rest).input_layernorm(x)

    def attention(weights: Any) -> jax.Array:
        layer = nnx.merge(graphdef, weights, rest)
        o_in, _ = layer.self_attn.attend(a_in, pos, valid, inv_freq, None, jnp.int32(0))
        return layer.self_attn.o_proj(o_in).astype(jnp.float32)

    ref = attention(own)
    return jax.lax.map(lambda weights: jnp.sum(jnp.square(attention(weights) - ref)), candidates)


def attention_output_errors(layer: DecoderLayer, x: Rows, cfg: ModelConfig, names: Sequence[str],
                            candidates: Iterable[Sequence[jax.Array]], *, batch_size: int) -> np.ndarray:
    """Mean over the calibration tokens x [N, T, D] of the squared error at the block's attention
    output when the linears `names` (some of q/k/v_proj) hold candidate weights instead of their
    own: [A] for candidates [A][len(names)] of [out, in]. What AWQ scores q/k/v's scale on (their
    outputs meet in the softmax). Runs on one device (under a mesh too: every process holds x),
    reading x once; all candidates are resident at once, A x the q/k/v weights in float32 (AWQ's 21:
    ~46 MB on the default model, ~2 GB for an 8B Llama)."""
    wanted = [name + ".weight" for name in names]
    graphdef, own, rest = nnx.split(layer, lambda path, _: dotted(path) in wanted, ...)
    stacked = dict(zip(wanted, (jnp.stack(ws) for ws in zip(*candidates))))
    cands = jax.tree.map(lambda v: v, own)   # a copy whose values become the stacked candidates
    for path, var in nnx.to_flat_state(cands):
        var.set_value(stacked[dotted(path)])
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    acc = jnp.zeros(len(next(iter(stacked.values()))), jnp.float32)
    for start in range(0, x.shape[0], batch_size):
        xb = jnp.asarray(np.asarray(x[start:start + batch_size], np.float32))
        acc = acc + _attention_errors(graphdef, own, rest, cands, xb, inv_freq)
    errors = np.asarray(acc, np.float64) / (x.shape[0] * x.shape[1])
    if not np.all(np.isfinite(errors)):
        raise _nonfinite()
    return errors


def _nonfinite() -> CalibrationError:
    return CalibrationError("calibration activations became NaN/Inf inside a block: the weights or "
                            "the calibration data are broken")


def _sharded_runner(graphdef: Any, state: Any, inv_freq: jax.Array, n: int, *, batch_size: int, stats: str,
                    mesh: Any, absmean: bool, outputs: bool
                    ) -> tuple[Callable[[np.ndarray], tuple[np.ndarray | None, dict[str, jax.Array]]], int]:
    """run_block's per-batch step data-parallel over mesh's 'data' axis (weights replicated,
    Hessians all-reduced), and its batch size (every batch the same shape)."""
    n_dev = shd.data_size(mesh)
    batch = -(-max(1, min(batch_size, n)) // n_dev) * n_dev
    rep = shd.replicated(mesh)
    state = jax.device_put(state, rep)
    inv_freq = jax.device_put(inv_freq, rep)
    shardings = (shd.data_sharding(mesh), rep)

    def run(xb: np.ndarray) -> tuple[np.ndarray | None, dict[str, jax.Array]]:
        real = xb.shape[0]
        weights = np.zeros(batch, np.float32)
        weights[:real] = 1.0
        if real < batch:  # pad with copies of real sequences (finite), weighted zero
            xb = np.concatenate([xb, xb[np.arange(batch - real) % real]])
        y, s = _run_block(graphdef, state, shd.shard_batch(xb, mesh), inv_freq, stats,
                          shd.shard_batch(weights, mesh), shardings, absmean, outputs)
        return (shd.to_host(y)[:real] if outputs else None), s
    return run, batch


ACTIVATIONS = ("float32", "bfloat16", "disk")


@contextlib.contextmanager
def activation_buffer(shape: tuple[int, ...], kind: str, directory: str | Path) -> Iterator[Rows]:
    """The one buffer that holds the calibration activations [N, T, D] between blocks.

    kind 'float32' (exact, the default), 'bfloat16' (in memory at half the bytes; the Hessians and
    the next blocks see rounded inputs, so the codes change) or 'disk' (float32, exact, in an
    anonymous file in `directory` read and written a batch at a time: ~one batch resident)."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"calibration activations must be one of {ACTIVATIONS}, got {kind!r}")
    if kind != "disk":
        yield np.empty(shape, STORAGE_DTYPES[kind])
        return
    f = RowFile(shape, np.float32, directory)
    try:
        yield f
    finally:
        f.close()
