"""Model families: each file describes how one Hugging Face `model_type` maps onto the one decoder
in `qeft_jax.model` (config keys in and out, and any tensor renaming at conversion).

A family module defines
  MODEL_TYPES      the Hugging Face `model_type` values it reads;
  ARCHITECTURE     model_type -> the `architectures` entry written back (what transformers builds);
  NATIVE_ACT       the MLP activation its configs must name ("silu"), or None if from_hf checks it;
  TIED_BY_DEFAULT  whether a config without `tie_word_embeddings` ties them (transformers' default);
  from_hf(d)    config.json dict -> the family's `ModelConfig` fields (on top of the common ones);
  to_hf(cfg)    `ModelConfig` -> the family's config.json keys (on top of the common ones);
and optionally tensors_from_hf / tensors_to_hf (HF-named tensors -> ours and back; identity if absent).
Adding a family is one such file plus its entry in FAMILIES.
"""
from __future__ import annotations

from types import ModuleType

from qeft_jax.families import gemma, llama, mistral, phi3, qwen

FAMILIES: tuple[ModuleType, ...] = (llama, mistral, qwen, phi3, gemma)
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.MODEL_TYPES}
MODEL_TYPES = tuple(sorted(BY_MODEL_TYPE))


def family(model_type: str | None) -> ModuleType | None:
    """The family module reading `model_type` (None if no family does)."""
    return BY_MODEL_TYPE.get(model_type)  # type: ignore[arg-type]


def tensors_from_hf(model_type: str, tensors: dict, cfg) -> dict:
    """Hugging Face-named tensors -> the names `qeft_jax.spec` describes (e.g. Phi-3's fused linears split)."""
    f = family(model_type)
    return f.tensors_from_hf(tensors, cfg) if hasattr(f, "tensors_from_hf") else tensors


def tensors_to_hf(model_type: str, tensors: dict, cfg) -> dict:
    """The inverse of `tensors_from_hf` (what `convert.to_hf` writes)."""
    f = family(model_type)
    return f.tensors_to_hf(tensors, cfg) if hasattr(f, "tensors_to_hf") else tensors
