"""Llama in Flax nnx.

Attribute names mirror Hugging Face's module tree, so the flat state path of every parameter,
joined with '.', is exactly its Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight`).
Linear weights keep the PyTorch layout `[out, in]`: the quantizer works on input columns (axis 1)
without transposes, and conversion is a copy.

Every linear is built by `make_linear` and may later be swapped (by the quantizer) for a
`qeft_jax.qlinear.QEFTLinear`; both take `x[..., in] -> y[..., out]`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qeft_jax.config import LlamaConfig


class Linear(nnx.Module):
    """Dense linear with the PyTorch weight layout [out, in]."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        init = jax.random.normal(rngs.params(), (out_features, in_features), param_dtype) * 0.02
        self.weight = nnx.Param(init)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), self.weight[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embedding(nnx.Module):
    def __init__(self, num: int, features: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.dtype = dtype
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (num, features), param_dtype) * 0.02)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied lm_head: logits = x · Eᵀ."""
        return jnp.einsum("...d,vd->...v", x, self.weight[...].astype(x.dtype))


class RMSNorm(nnx.Module):
    """Normalises in float32 and casts back before the weight, as transformers does."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * h.astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse rope frequencies incl. 'linear' and 'llama3' scaling (float64 math, float32 out)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wl, high_wl = old / rs.low_freq_factor, old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [B, T, H, D]; positions: [B, T]. Rotate-half convention (Hugging Face)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class LayerCache(NamedTuple):
    """Keys/values of one layer for every slot of the generation window: [B, S, n_kv, head_dim]."""

    k: jax.Array
    v: jax.Array


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: Any) -> list[LayerCache]:
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return [LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for _ in range(cfg.num_hidden_layers)]


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(cfg.hidden_size, h * d, **kw)
        self.k_proj = Linear(cfg.hidden_size, kv * d, **kw)
        self.v_proj = Linear(cfg.hidden_size, kv * d, **kw)
        self.o_proj = Linear(h * d, cfg.hidden_size, **kw)

    def attend(self, x: jax.Array, positions: jax.Array, kv_valid: jax.Array,
               inv_freq: jax.Array, cache: LayerCache | None, cache_index: jax.Array
               ) -> tuple[jax.Array, LayerCache | None]:
        """Multi-head attention up to (not including) o_proj: [B, T, heads * head_dim].

        kv_valid: [B, S] (which key slots exist) or [B, T, S] (which keys each query may see, e.g.
        one packed example per segment); either way combined with the causal mask."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, cache_index, 0, 0))
            cache = LayerCache(k, v)
        s = k.shape[1]
        q_slot = cache_index + jnp.arange(t)
        visible = kv_valid.astype(bool)
        visible = visible if visible.ndim == 3 else visible[:, None, :]
        allowed = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & visible
        qg = q.reshape(b, t, cfg.num_key_value_heads, cfg.num_kv_groups, cfg.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype)).astype(jnp.float32)
        scores = scores / math.sqrt(cfg.head_dim)
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(self.dtype))
        return out.reshape(b, t, -1), cache


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def act(self, x: jax.Array) -> jax.Array:
        """The down_proj input (the quantizer calibrates on it)."""
        return jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x, positions, kv_valid, inv_freq, cache, cache_index):
        x, cache, _ = self.forward_with_inputs(x, positions, kv_valid, inv_freq, cache, cache_index)
        return x, cache

    def forward_with_inputs(self, x, positions, kv_valid, inv_freq, cache, cache_index):
        """The block, also returning what each linear group reads (the calibration needs it):
        'attn' (q/k/v), 'o' (o_proj), 'ffn' (gate/up), 'down' (down_proj)."""
        a_in = self.input_layernorm(x)
        o_in, cache = self.self_attn.attend(a_in, positions, kv_valid, inv_freq, cache, cache_index)
        x = x + self.self_attn.o_proj(o_in)
        f_in = self.post_attention_layernorm(x)
        d_in = self.mlp.act(f_in)
        x = x + self.mlp.down_proj(d_in)
        return x, cache, {"attn": a_in, "o": o_in, "ffn": f_in, "down": d_in}


class LlamaModel(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)


class LlamaForCausalLM(nnx.Module):
    """`model(input_ids, attention_mask=None) -> logits [B, T, V]`."""

    def __init__(self, cfg: LlamaConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.dtype = dtype
        self.model = LlamaModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(cfg)))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.forward(input_ids, attention_mask=attention_mask)[0]

    def hidden_states(self, input_ids: jax.Array) -> jax.Array:
        return self.model.embed_tokens(input_ids)

    def logits(self, h: jax.Array) -> jax.Array:
        h = self.model.norm(h)
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)

    def forward(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                positions: jax.Array | None = None, cache: list[LayerCache] | None = None,
                cache_index: jax.Array | int = 0) -> tuple[jax.Array, list[LayerCache] | None]:
        """Full forward. With `cache`, keys/values of this chunk are written at `cache_index` and
        `attention_mask` covers all cache slots [B, S_max]; without, it covers the T inputs. A
        [B, T, S] mask says per query which keys it may see (packed training rows)."""
        b, t = input_ids.shape
        cache_index = jnp.asarray(cache_index, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
        s = t if cache is None else cache[0].k.shape[1]
        kv_valid = jnp.ones((b, s), jnp.int32) if attention_mask is None else attention_mask
        inv_freq = self.inv_freq[...]
        x = self.hidden_states(input_ids)
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.model.layers):
            x, c = layer(x, positions, kv_valid, inv_freq, None if cache is None else cache[i], cache_index)
            if new_cache is not None:
                new_cache.append(c)
        return self.logits(x), new_cache


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """Hugging Face name -> array for every nnx.Param."""
    state = nnx.state(model, nnx.Param)
    return {".".join(str(p) for p in path): v[...] for path, v in nnx.to_flat_state(state)}


def load_params(model: nnx.Module, tensors: Mapping[str, Any], *, strict: bool = True) -> None:
    """Assign named arrays into the model's Params, checking names and shapes."""
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    expected = {".".join(str(p) for p in path): (path, v) for path, v in flat}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if strict and (missing or extra):
        raise ValueError(f"checkpoint does not match the config: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                         f"{'...' if len(extra) > 5 else ''}")
    for name, (path, var) in expected.items():
        if name not in tensors:
            continue
        arr = tensors[name]
        if tuple(arr.shape) != tuple(var.shape):
            raise ValueError(f"tensor '{name}' has shape {tuple(arr.shape)}, the config expects "
                             f"{tuple(var.shape)}")
        var.set_value(jnp.asarray(arr, dtype=var[...].dtype))
    nnx.update(model, state)


def abstract_model(cfg: LlamaConfig, *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> LlamaForCausalLM:
    """A model whose params are allocated (zeros) without running random init (fast for big models)."""
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype))
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    model = nnx.merge(graphdef, state)
    model.inv_freq.set_value(jnp.asarray(rope_inv_freq(cfg)))
    return model
