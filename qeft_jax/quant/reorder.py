"""Offline global reordering (OGR, paper section 3.2) as pure functions over named tensors.

The hidden dimension of the whole model is permuted with P = [weak channels, the rest] so the k
global weak channels are the first k input columns of every q/k/v/gate/up. RMSNorm is invariant to
a permutation of its dimension, and the residual stream is only ever added to itself, so permuting
every producer's output rows and every consumer's input columns together leaves the logits
unchanged. The FFN dimension of each layer gets its own permutation Pf (gate/up rows, down_proj
columns). o_proj reads the attention output, whose layout is fixed by the heads: its weak columns
are gathered by index at run time instead.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


def weak_first_permutation(weak_idx: np.ndarray, d: int) -> np.ndarray:
    """P such that x_new = x[P] puts the (sorted) weak channels first, the rest after in order."""
    weak_idx = np.sort(np.asarray(weak_idx, np.int64))
    if len(np.unique(weak_idx)) != len(weak_idx) or (len(weak_idx) and (weak_idx.min() < 0 or weak_idx.max() >= d)):
        raise ValueError(f"weak index must hold distinct channels in [0, {d})")
    rest = np.setdiff1d(np.arange(d), weak_idx)
    return np.concatenate([weak_idx, rest]).astype(np.int32)


def permute_top(tensors: Mapping[str, np.ndarray], perm: np.ndarray) -> dict[str, np.ndarray]:
    """Embeddings, final norm and lm_head (tied or not) under the hidden permutation."""
    out = dict(tensors)
    out["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:, perm]
    out["model.norm.weight"] = tensors["model.norm.weight"][perm]
    if "lm_head.weight" in tensors:
        out["lm_head.weight"] = tensors["lm_head.weight"][:, perm]
    return out


def permute_layer(tensors: Mapping[str, np.ndarray], perm: np.ndarray,
                  ffn_perm: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One decoder layer's tensors (names relative to the layer) under the hidden permutation and,
    optionally, its own FFN permutation."""
    t = dict(tensors)
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        t[name] = t[name][perm]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        t[name + ".weight"] = t[name + ".weight"][:, perm]
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        t[name + ".weight"] = t[name + ".weight"][perm, :]
        if name + ".bias" in t:
            t[name + ".bias"] = t[name + ".bias"][perm]
    if ffn_perm is not None:
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            t[name + ".weight"] = t[name + ".weight"][ffn_perm, :]
            if name + ".bias" in t:
                t[name + ".bias"] = t[name + ".bias"][ffn_perm]
        t["mlp.down_proj.weight"] = t["mlp.down_proj.weight"][:, ffn_perm]
    return t


def layer_tensors(tensors: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    prefix = f"model.layers.{i}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def permute_model(tensors: Mapping[str, np.ndarray], num_layers: int, perm: np.ndarray,
                  ffn_perms: list[np.ndarray | None] | None = None) -> dict[str, np.ndarray]:
    """The whole model reordered (used for tests and for fp reordered checkpoints)."""
    out = permute_top({k: v for k, v in tensors.items() if not k.startswith("model.layers.")}, perm)
    for i in range(num_layers):
        fp = None if ffn_perms is None else ffn_perms[i]
        for k, v in permute_layer(layer_tensors(tensors, i), perm, fp).items():
            out[f"model.layers.{i}.{k}"] = v
    return out
