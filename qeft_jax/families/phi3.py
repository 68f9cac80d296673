"""Phi-3: a Llama whose checkpoint fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`.

The fused linears are split at conversion and fused again by `convert.to_hf`: inside qeft-jax a
Phi-3 is the plain decoder. That costs nothing for QEFT (q/k/v read one activation, as do gate/up:
they share one Hessian and one weak set whether fused or not) and keeps one tensor table, one
OGR and one kernel path for every family.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from qeft_jax.families.common import uniform_window

MODEL_TYPES = ("phi3",)
ARCHITECTURE = {"phi3": "Phi3ForCausalLM"}
NATIVE_ACT = "silu"
TIED_BY_DEFAULT = False
_LAYER = "model.layers.{i}."


def from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    rope = {**(d.get("rope_parameters") or {}), **(d.get("rope_scaling") or {})}
    if float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("Phi-3 with partial_rotary_factor != 1 (partial rotary embeddings) is not supported")
    return uniform_window(d)


def to_hf(cfg: Any) -> dict[str, Any]:
    return {"original_max_position_embeddings": cfg.rope_scaling.original_max_position_embeddings,
            "sliding_window": cfg.sliding_window}


def tensors_from_hf(tensors: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
    out = dict(tensors)
    q, kv, ffn = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    for i in range(cfg.num_hidden_layers):
        p = _LAYER.format(i=i)
        qkv = out.pop(p + "self_attn.qkv_proj.weight", None)
        if qkv is not None:
            out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"], \
                out[p + "self_attn.v_proj.weight"] = np.split(qkv, [q, q + kv])
        gate_up = out.pop(p + "mlp.gate_up_proj.weight", None)
        if gate_up is not None:
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = np.split(gate_up, [ffn])
    return out


def tensors_to_hf(tensors: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
    out = dict(tensors)
    for i in range(cfg.num_hidden_layers):  # the layers present (an exporter passes one at a time)
        p = _LAYER.format(i=i)
        if p + "self_attn.q_proj.weight" in out:
            out[p + "self_attn.qkv_proj.weight"] = np.concatenate(
                [out.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if p + "mlp.gate_proj.weight" in out:
            out[p + "mlp.gate_up_proj.weight"] = np.concatenate(
                [out.pop(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")])
    return out
