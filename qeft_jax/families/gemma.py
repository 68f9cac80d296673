"""Gemma (`gemma`) and Gemma 2 (`gemma2`).

Gemma: RMSNorm weights stored as w and applied as (1 + w), embeddings scaled by sqrt(hidden), GeGLU
with the tanh GELU, head_dim 256, tied embeddings. Gemma 2 adds norms after attention and after the
MLP ("sandwich" norms), tanh soft-capping of attention scores and final logits, alternating
sliding-window / global layers and an attention scale of query_pre_attn_scalar^-1/2.
"""
from __future__ import annotations

from typing import Any, Mapping

MODEL_TYPES = ("gemma", "gemma2")
ARCHITECTURE = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}
NATIVE_ACT = None          # from_hf checks Gemma's own activation keys
TIED_BY_DEFAULT = True
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")
GEMMA1_GELU = "gelu"   # Gemma 1 configs say "gelu" and transformers runs the tanh GELU; Gemma 2 runs exact GELU


def from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GELU_TANH and not (act == GEMMA1_GELU and d["model_type"] == "gemma"):
        raise ValueError(f"unsupported Gemma activation {act!r}; expected the tanh GELU")
    bias = bool(d.get("attention_bias", False))
    out = {"hidden_act": "gelu_tanh", "norm_offset": 1.0, "embed_scale": True, "qkv_bias": bias, "o_bias": bias}
    if d["model_type"] == "gemma2":
        n = d["num_hidden_layers"]
        types = tuple(d.get("layer_types") or
                      ("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)))
        out.update(sandwich_norms=True, layer_types=types, sliding_window=d.get("sliding_window"),
                   attn_logit_softcap=d.get("attn_logit_softcapping"),
                   final_logit_softcap=d.get("final_logit_softcapping"),
                   query_pre_attn_scalar=d.get("query_pre_attn_scalar"))
    return out


def to_hf(cfg: Any) -> dict[str, Any]:
    out = {"hidden_act": "gelu_pytorch_tanh",
           "hidden_activation": "gelu_pytorch_tanh", "attention_bias": cfg.qkv_bias}
    if cfg.model_type == "gemma2":
        out.update(layer_types=list(cfg.layer_types), sliding_window=cfg.sliding_window,
                   attn_logit_softcapping=cfg.attn_logit_softcap,
                   final_logit_softcapping=cfg.final_logit_softcap,
                   query_pre_attn_scalar=cfg.query_pre_attn_scalar)
    return out
