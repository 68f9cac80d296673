"""The expected set of named tensors for a config, and validation of a tensor dict against it."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from qeft_jax.config import LlamaConfig
from qeft_jax.io import CheckpointError

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def linear_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """Per-layer linear name (relative to the layer) -> weight shape [out, in]."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"self_attn.q_proj": (qd, d), "self_attn.k_proj": (kvd, d), "self_attn.v_proj": (kvd, d),
            "self_attn.o_proj": (d, qd), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
            "mlp.down_proj": (d, f)}


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d = cfg.hidden_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d),
                                       "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        for name, shape in linear_shapes(cfg).items():
            out[p + name + ".weight"] = shape
            bias = cfg.attention_bias if name.startswith("self_attn") else cfg.mlp_bias
            if bias:
                out[p + name + ".bias"] = (shape[0],)
    return out


def check_tensors(cfg: LlamaConfig, tensors: Mapping[str, np.ndarray], *, source: str) -> None:
    """Every expected tensor present with the right shape, floating point and finite."""
    check_tensors_against(expected_shapes(cfg), tensors, source=source)


def check_tensors_against(want: Mapping[str, tuple[int, ...]], tensors: Mapping[str, np.ndarray], *,
                          source: str) -> None:
    missing = [k for k in want if k not in tensors]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) the config needs are missing, e.g. "
                              f"{', '.join(missing[:3])}")
    for k, shape in want.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: tensor '{k}' has shape {tuple(t.shape)}, the config "
                                  f"expects {shape}")
        if not np.issubdtype(np.dtype(t.dtype), np.floating) and np.dtype(t.dtype).name != "bfloat16":
            raise CheckpointError(f"{source}: tensor '{k}' has dtype {t.dtype}, expected a float type")
        if not np.all(np.isfinite(np.asarray(t, np.float32))):
            raise CheckpointError(f"{source}: tensor '{k}' contains NaN or Inf")
