"""qeft-jax: QEFT (arXiv 2410.08661) quantization and weak-column fine-tuning in JAX/Flax.

The top-level names are resolved lazily (PEP 562): importing a low layer such as
`qeft_jax.packing` (what the kernels read) must not pull in the model, the loaders or transformers.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"ModelConfig": "qeft_jax.config", "CausalLM": "qeft_jax.model",
            "load_model": "qeft_jax.load"}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qeft_jax' has no attribute {name!r}")
