"""Mistral: Llama with sliding-window attention on every layer (`sliding_window`, None = full)."""
from __future__ import annotations

from typing import Any, Mapping

from qeft_jax.families.common import uniform_window

MODEL_TYPES = ("mistral",)
ARCHITECTURE = {"mistral": "MistralForCausalLM"}
NATIVE_ACT = "silu"
TIED_BY_DEFAULT = False


def from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    return uniform_window(d)


def to_hf(cfg: Any) -> dict[str, Any]:
    return {"sliding_window": cfg.sliding_window}
