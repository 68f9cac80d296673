"""`load_model`: a checkpoint directory (or "default") -> (model, tokenizer, config)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from convert.default_model import default_model_dir
from qeft_jax.checkpoint import load_checkpoint, read_info
from qeft_jax.config import ModelConfig
from qeft_jax.lora import has_adapters, load_adapters
from qeft_jax.model import CausalLM
from qeft_jax.tokenization import load_tokenizer

__all__ = ["default_model_dir", "load_model", "resolve"]


def resolve(path_or_default: str | Path) -> Path:
    """'default' -> the embedded default model's directory; otherwise a checked checkpoint directory."""
    if str(path_or_default) == "default":
        return default_model_dir()
    return read_info(path_or_default).path


def load_model(path_or_default: str | Path = "default", *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32) -> tuple[CausalLM, Any | None, ModelConfig]:
    """Load a checkpoint (fp or quantized, with its LoRA adapters if it is a QLoRA output) as an nnx
    model, its tokenizer (None if absent) and config."""
    model, info = load_checkpoint(resolve(path_or_default), dtype=dtype, param_dtype=param_dtype)
    if has_adapters(info.path):
        load_adapters(model, info.path)
    return model, load_tokenizer(info.path), info.config
