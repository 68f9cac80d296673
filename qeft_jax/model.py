"""The decoder in Flax nnx: Llama and, through config flags, every family in `qeft_jax.families`
(q/k/v biases, Qwen3's q/k norms, sliding windows, Gemma's (1+w) norms, scaled embeddings, GeGLU,
sandwich norms and soft-capping).

Attribute names mirror Hugging Face's module tree, so the flat state path of every parameter,
joined with '.', is exactly its Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight`).
Linear weights keep the PyTorch layout `[out, in]`: the quantizer works on input columns (axis 1)
without transposes, and conversion is a copy.

Every block linear (the names in `qeft_jax.spec.LINEARS`) is a `Linear` that `swap_linears` may
replace by a `qeft_jax.qlinear.QEFTLinear` or a LoRA wrapper; all take `x[..., in] -> y[..., out]`.
`place_tensors` fills any of these modules from named arrays.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qeft_jax import spec
from qeft_jax.config import ModelConfig


# Chunk sizes, chosen on the main job's training step (2 micro-batches of 4 x 256 tokens, f32, CPU):
# XLA's compiled temporaries 3.29 GiB whole, 2.61 with 128-query attention chunks (64: the same),
# 2.33 with 256-token logit chunks as well.
LOGIT_CHUNK = 256  # tokens (of all B·T) whose logits exist at a time (target_logprobs)
ATTN_CHUNK = 128  # queries per attention chunk (Attention.attend): bounds the [heads, chunk, keys] scores


def map_chunks(fn: Callable[..., Any], *xs: jax.Array, chunk: int) -> Any:
    """`fn(*xs)` computed `chunk` positions of axis 1 at a time (the last chunk zero-padded), for an
    `fn` that treats positions independently: a chunk's intermediates exist one chunk at a time, and
    under jax.checkpoint the backward pass recomputes them instead of keeping every chunk's. Inputs of
    at most `chunk` positions take the direct call. Returns fn's outputs with axis 1 cut back."""
    t = xs[0].shape[1]
    if t <= chunk:
        return fn(*xs)
    pad = -t % chunk

    def split(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [T/chunk, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(x.shape[0], -1, chunk, *x.shape[2:]).swapaxes(0, 1)

    ys = jax.lax.map(lambda c: jax.checkpoint(fn)(*c), tuple(split(x) for x in xs))
    return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(y.shape[1], -1, *y.shape[3:])[:, :t], ys)


class Buffer(nnx.Variable):
    """A derived constant (rope frequencies): never trained, never stored in a checkpoint."""


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
    """Normalises in float32. Llama-style (offset 0) casts back before the weight, as transformers
    does; Gemma-style (offset 1: the stored weight is w - 1) applies (1 + w) in float32 first."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any, offset: float = 0.0):
        self.eps, self.offset = eps, offset
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * h.astype(x.dtype)


def embedding_scale(cfg: ModelConfig) -> float:
    """What the embeddings are multiplied by before the first block (Gemma: sqrt(hidden))."""
    return math.sqrt(cfg.hidden_size) if cfg.embed_scale else 1.0


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's tanh soft-capping, cap · tanh(x / cap) (identity without a cap)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": partial(jax.nn.gelu, approximate=True)}


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
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


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any) -> list[LayerCache]:
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return [LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for _ in range(cfg.num_hidden_layers)]


class Attention(nnx.Module):
    """Grouped-query attention; `window` (None: full) limits each query to the keys within that many
    positions (sliding-window layers)."""

    def __init__(self, cfg: ModelConfig, *, window: int | None, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.cfg = cfg
        self.window = window
        self.dtype = dtype
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias, **kw)
        self.k_proj = Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias, **kw)
        self.v_proj = Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias, **kw)
        self.o_proj = Linear(h * d, cfg.hidden_size, bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, offset=cfg.norm_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, offset=cfg.norm_offset)

    def attend(self, x: jax.Array, positions: jax.Array, kv_valid: jax.Array,
               inv_freq: jax.Array, cache: LayerCache | None, cache_index: jax.Array, chunk: int = ATTN_CHUNK
               ) -> tuple[jax.Array, LayerCache | None]:
        """Multi-head attention up to (not including) o_proj: [B, T, heads * head_dim].

        kv_valid: [B, S] (which key slots exist) or [B, T, S] (which keys each query may see, e.g.
        one packed example per segment); either way combined with the causal mask. The scores exist
        for `chunk` queries at a time and the backward pass recomputes them (`map_chunks`): whole,
        with their softmax and mask, they were most of a training step's activation memory."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, cache_index, 0, 0))
            cache = LayerCache(k, v)
        s = k.shape[1]
        q_slot = cache_index + jnp.arange(t)
        visible = kv_valid.astype(bool)
        visible = visible if visible.ndim == 3 else visible[:, None, :]
        k_slot = jnp.arange(s)[None, :]
        allowed = k_slot <= q_slot[:, None]
        if self.window is not None:
            allowed &= k_slot > q_slot[:, None] - self.window
        allowed = allowed[None] & visible
        kh, g, d = cfg.num_key_value_heads, cfg.num_kv_groups, cfg.head_dim
        qg = q.reshape(b, t, kh, g, d)
        # head-major keys/values [B, kv_heads, S, D], queries [B, kv_heads, groups * chunk, D]: both
        # products are plain batched matmuls (position-major einsums ran 1.4x slower on XLA:CPU)
        k, v = k.astype(q.dtype).transpose(0, 2, 1, 3), v.astype(self.dtype).transpose(0, 2, 1, 3)

        def chunk_out(q_c: jax.Array, allowed_c: jax.Array) -> jax.Array:
            c = q_c.shape[1]
            q_h = q_c.transpose(0, 2, 3, 1, 4).reshape(b, kh, g * c, d)
            scores = jnp.einsum("bkqd,bksd->bkqs", q_h, k).astype(jnp.float32).reshape(b, kh, g, c, -1)
            scores = softcap(scores * cfg.attention_scale, cfg.attn_logit_softcap)
            scores = jnp.where(allowed_c[:, None, None], scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype).reshape(b, kh, g * c, -1)
            return jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kh, g, c, d).transpose(0, 3, 1, 2, 4)

        out = map_chunks(chunk_out, qg, allowed, chunk=chunk)
        return out.reshape(b, t, -1), cache


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh GELU (Gemma's GeGLU)."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.hidden_act = cfg.hidden_act
        kw = dict(bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def act(self, x: jax.Array) -> jax.Array:
        """The down_proj input (the quantizer calibrates on it)."""
        return ACTIVATIONS[self.hidden_act](self.gate_proj(x)) * self.up_proj(x)


class DecoderLayer(nnx.Module):
    """Pre-norm block. With `cfg.sandwich_norms` (Gemma 2) the attention and MLP outputs are normed
    too: post_attention_layernorm then normalises the attention output and pre_feedforward_layernorm
    the MLP input; otherwise post_attention_layernorm is the MLP's input norm."""

    def __init__(self, cfg: ModelConfig, *, layer: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.sandwich = cfg.sandwich_norms
        self.self_attn = Attention(cfg, window=cfg.window(layer), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = partial(RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, offset=cfg.norm_offset)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def __call__(self, x, positions, kv_valid, inv_freq, cache, cache_index, attn_chunk: int = ATTN_CHUNK):
        x, cache, _ = self.forward_with_inputs(x, positions, kv_valid, inv_freq, cache, cache_index, attn_chunk)
        return x, cache

    def forward_with_inputs(self, x, positions, kv_valid, inv_freq, cache, cache_index,
                            attn_chunk: int = ATTN_CHUNK):
        """The block, also returning the activation each linear reads, keyed as `spec.Linear.reads`
        (the calibration accumulates its statistics per key)."""
        a_in = self.input_layernorm(x)
        o_in, cache = self.self_attn.attend(a_in, positions, kv_valid, inv_freq, cache, cache_index, attn_chunk)
        attn = self.self_attn.o_proj(o_in)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            f_in = self.pre_feedforward_layernorm(x)
        else:
            x = x + attn
            f_in = self.post_attention_layernorm(x)
        d_in = self.mlp.act(f_in)
        mlp = self.mlp.down_proj(d_in)
        x = x + (self.post_feedforward_layernorm(mlp) if self.sandwich else mlp)
        return x, cache, {spec.ATTN_IN: a_in, spec.O_IN: o_in, spec.FFN_IN: f_in, spec.DOWN_IN: d_in}


class DecoderStack(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, layer=i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, offset=cfg.norm_offset)


class CausalLM(nnx.Module):
    """`model(input_ids, attention_mask=None) -> logits [B, T, V]`."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.dtype = dtype
        self.model = DecoderStack(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.inv_freq = Buffer(jnp.asarray(rope_inv_freq(cfg)))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.forward(input_ids, attention_mask=attention_mask)[0]

    def hidden_states(self, input_ids: jax.Array) -> jax.Array:
        x = self.model.embed_tokens(input_ids)
        scale = embedding_scale(self.config)
        return x if scale == 1.0 else x * jnp.asarray(scale, x.dtype)

    def logits(self, h: jax.Array) -> jax.Array:
        h = self.model.norm(h)
        logits = self.model.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return softcap(logits, self.config.final_logit_softcap)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[jax.Array, list[LayerCache] | None]:
        """(logits [B, T, V], cache) of `hidden`'s final states (same arguments)."""
        h, cache = self.hidden(*args, **kwargs)
        return self.logits(h), cache

    def target_logprobs(self, h: jax.Array, targets: jax.Array, *, chunk: int = LOGIT_CHUNK
                        ) -> tuple[jax.Array, jax.Array]:
        """(log p(targets) [B, T] float32, whether each target is the argmax [B, T]) from final
        states h [B, T, hidden]. Logits exist for `chunk` tokens (of all B·T) at a time, never as a
        whole [B, T, vocab] array (with a 49k-128k vocabulary that array and its gradient dominate the
        memory of training and evaluation), and are recomputed in the backward pass (`map_chunks`)."""
        b, t, d = h.shape

        def one(h_c: jax.Array, t_c: jax.Array) -> tuple[jax.Array, jax.Array]:
            logits = self.logits(h_c).astype(jnp.float32)
            picked = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
            return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == t_c

        logp, greedy = map_chunks(one, h.reshape(1, b * t, d), targets.reshape(1, b * t), chunk=chunk)
        return logp.reshape(b, t), greedy.reshape(b, t)

    def hidden(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
               cache: list[LayerCache] | None = None, cache_index: jax.Array | int = 0,
               remat: bool = False, attn_chunk: int = ATTN_CHUNK) -> tuple[jax.Array, list[LayerCache] | None]:
        """The one forward loop, up to the final states [B, T, hidden] (before the final norm). With
        `cache`, keys/values of this chunk are written at `cache_index` and `attention_mask` covers
        all cache slots [B, S_max]; without, it covers the T inputs. A [B, T, S] mask says per query
        which keys it may see (packed training rows, with their own `positions`). `remat`
        rematerialises each block in the backward pass (training memory); `attn_chunk` is the
        attention's query chunk (`Attention.attend`). `inputs_embeds` [B, T, hidden] replaces the
        embedding lookup of `input_ids` (give one of the two): e.g. to differentiate with respect to
        the block stack's input."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.hidden_states(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if remat and cache is not None:
            raise ValueError("remat is for training; it cannot be combined with a KV cache")
        cache_index = jnp.asarray(cache_index, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
        s = t if cache is None else cache[0].k.shape[1]
        kv_valid = jnp.ones((b, s), jnp.int32) if attention_mask is None else attention_mask
        inv_freq = self.inv_freq[...]
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.model.layers):
            if remat:
                gd, st = nnx.split(layer)

                def block(st, x, gd=gd):
                    return nnx.merge(gd, st)(x, positions, kv_valid, inv_freq, None, cache_index, attn_chunk)[0]

                x = jax.checkpoint(block)(st, x)
                continue
            x, c = layer(x, positions, kv_valid, inv_freq, None if cache is None else cache[i], cache_index,
                         attn_chunk)
            if new_cache is not None:
                new_cache.append(c)
        return x, new_cache


def dotted(path: tuple[Any, ...]) -> str:
    """An nnx state path as its Hugging Face name ('model.layers.3.self_attn.q_proj.weight')."""
    return ".".join(str(p) for p in path)


def named_variables(module: nnx.Module, only: Any = nnx.Param) -> dict[str, jax.Array]:
    """Hugging Face name -> array for every variable of `module` that the nnx filter `only` selects."""
    return {dotted(path): v[...] for path, v in nnx.to_flat_state(nnx.state(module, only))}


def place_tensors(module: nnx.Module, tensors: Mapping[str, Any], *, only: Any = nnx.Not(Buffer),
                  source: str = "checkpoint") -> None:
    """The one way named arrays enter a model: set every variable `only` selects (by default all but
    buffers) from `tensors[name]`, cast to the variable's dtype; a missing name or a shape that differs
    is an error. Works on abstract (nnx.eval_shape) modules, so nothing is allocated twice."""
    state = nnx.state(module, only)
    flat = nnx.to_flat_state(state)
    missing = [dotted(p) for p, _ in flat if dotted(p) not in tensors]
    if missing:
        raise ValueError(f"{source}: {len(missing)} tensor(s) the model needs are missing, e.g. "
                         f"{', '.join(missing[:3])}")
    for path, var in flat:
        name = dotted(path)
        arr = tensors[name]
        if tuple(arr.shape) != tuple(var.shape):
            raise ValueError(f"{source}: tensor '{name}' has shape {tuple(arr.shape)}, the model expects "
                             f"{tuple(var.shape)}")
        var.set_value(jnp.asarray(arr, dtype=var.dtype))
    nnx.update(module, state)


def swap_linears(module: nnx.Module, make: Callable[[str, nnx.Module], nnx.Module]) -> None:
    """The one way block linears are replaced: for every decoder layer of `module` (a causal LM or a
    single DecoderLayer) and every linear name of `spec.LINEARS`, `make(name, current)` returns the
    module to put in its place (a QEFTLinear, a LoRA wrapper, ...)."""
    layers = [module] if isinstance(module, DecoderLayer) else list(module.model.layers)
    for layer in layers:
        for name in spec.LINEAR_NAMES:
            parent, attr = name.split(".")
            owner = getattr(layer, parent)
            setattr(owner, attr, make(name, getattr(owner, attr)))


def abstract_model(cfg: ModelConfig, *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> CausalLM:
    """A model with shapes but no parameter values (nnx.eval_shape: no random init, nothing allocated)
    and its buffers computed; fill it with `place_tensors`."""
    model = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, param_dtype=param_dtype))
    model.inv_freq = Buffer(jnp.asarray(rope_inv_freq(cfg)))
    return model
