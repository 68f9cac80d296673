"""qeft-jax: QEFT (arXiv 2410.08661) quantization and weak-column fine-tuning for Llama in JAX/Flax."""
from qeft_jax.config import LlamaConfig
from qeft_jax.load import load_model
from qeft_jax.model import LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM", "load_model"]
__version__ = "0.1.0"
