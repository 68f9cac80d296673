"""Qwen2 / Qwen2.5 (`qwen2`: biases on q/k/v only) and Qwen3 (`qwen3`: no biases by default, per-head
RMSNorm on q and k before rope, explicit head_dim). Both: large rope_theta, tied embeddings on the
small models. Their optional sliding window (`use_sliding_window`, layers >= `max_window_layers`)
is read as per-layer attention types."""
from __future__ import annotations

from typing import Any, Mapping

MODEL_TYPES = ("qwen2", "qwen3")
ARCHITECTURE = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
NATIVE_ACT = "silu"
TIED_BY_DEFAULT = False


def _layer_types(d: Mapping[str, Any]) -> tuple[str, ...]:
    n = d["num_hidden_layers"]
    if d.get("layer_types"):
        return tuple(d["layer_types"])
    if d.get("use_sliding_window") and d.get("sliding_window"):
        first = d.get("max_window_layers", n)
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))
    return ("full_attention",) * n


def from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    qwen3 = d["model_type"] == "qwen3"
    types = _layer_types(d)
    return {"qkv_bias": bool(d.get("attention_bias", False)) if qwen3 else True,
            "o_bias": bool(d.get("attention_bias", False)) if qwen3 else False,
            "qk_norm": qwen3, "layer_types": types,
            "sliding_window": d.get("sliding_window") if "sliding_attention" in types else None}


def to_hf(cfg: Any) -> dict[str, Any]:
    sliding = "sliding_attention" in cfg.layer_types
    out = {"use_sliding_window": sliding,
           "sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types),
           "max_window_layers": cfg.layer_types.index("sliding_attention") if sliding else cfg.num_hidden_layers}
    if cfg.model_type == "qwen3":
        if cfg.qkv_bias != cfg.o_bias:
            raise ValueError("a Qwen3 config has biases on all attention linears or on none")
        out["attention_bias"] = cfg.qkv_bias
    elif not cfg.qkv_bias or cfg.o_bias:
        raise ValueError("a Qwen2 config has biases on q/k/v and none on o_proj")
    return out
