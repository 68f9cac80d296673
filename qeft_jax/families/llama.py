"""Llama 1/2/3/3.1/3.2 (and SmolLM): the reference decoder. Biases on all four attention linears
(`attention_bias`) or none; rope scaling default / linear / llama3; tied or untied embeddings."""
from __future__ import annotations

from typing import Any, Mapping

MODEL_TYPES = ("llama",)
ARCHITECTURE = {"llama": "LlamaForCausalLM"}
NATIVE_ACT = "silu"
TIED_BY_DEFAULT = False


def from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(d.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(d.get("mlp_bias", False))}


def to_hf(cfg: Any) -> dict[str, Any]:
    if cfg.qkv_bias != cfg.o_bias:
        raise ValueError("a Llama config has biases on all attention linears or on none")
    return {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}
