"""LoRA / QLoRA baselines: a low-rank path beside every block linear.

    y = base(x) + (alpha / r) · (x · Aᵀ) · Bᵀ        A [r, in] ~ N(0, 1/in), B [out, r] = 0

`base` is a dense `Linear` (LoRA on the fp model) or a `QEFTLinear` (QLoRA: the same 4-bit base,
its weak columns frozen). Only `LoraParam` variables are trained.

Saving: LoRA on an fp model is merged (W += (alpha/r)·B·A) into a plain fp checkpoint. QLoRA cannot
be merged into the 4-bit grid without requantizing, so its output directory is the unchanged
quantized base plus `adapter_model.safetensors` (names `model.layers.{i}.{linear}.lora_A|lora_B`,
in the quantized model's channel order) and `adapter_config.json`; `qeft_jax.load_model` on that
directory rebuilds the tuned model (`load_adapters`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from qeft_jax.io import SafetensorsReader
from qeft_jax.model import named_variables, place_tensors, swap_linears
from qeft_jax.spec import LINEAR_NAMES

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoraParam(nnx.Param):
    """The trainable low-rank factors."""


class LoRALinear(nnx.Module):
    def __init__(self, base: nnx.Module, rank: int, alpha: float, *, rngs: nnx.Rngs,
                 param_dtype: Any = jnp.float32):
        self.base = base
        self.rank, self.alpha = rank, alpha
        n_in, n_out = base.in_features, base.out_features
        self.lora_A = LoraParam(jax.random.normal(rngs.params(), (rank, n_in), param_dtype) / np.sqrt(n_in))
        self.lora_B = LoraParam(jnp.zeros((n_out, rank), param_dtype))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        a = self.lora_A[...].astype(y.dtype)
        b = self.lora_B[...].astype(y.dtype)
        return y + (self.alpha / self.rank) * jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r",
                                                                                   x.astype(y.dtype), a), b)


def apply_lora(model: nnx.Module, rank: int, alpha: float, seed: int) -> None:
    """Wrap every block linear of `model` (in place) with a LoRALinear; deterministic in `seed`
    (the adapters draw their init in swap_linears' order: layer by layer, spec.LINEARS order)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    rngs = nnx.Rngs(params=seed)

    def wrap(name: str, base: nnx.Module) -> LoRALinear:
        if isinstance(base, LoRALinear):
            raise ValueError("the model already carries LoRA adapters")
        return LoRALinear(base, rank, alpha, rngs=rngs)

    swap_linears(model, wrap)


def lora_delta(a: np.ndarray, b: np.ndarray, rank: int, alpha: float) -> np.ndarray:
    return (alpha / rank) * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))


def adapter_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """{'model.layers.{i}.{linear}.lora_A|lora_B': float32} of a LoRA-wrapped model."""
    return {k: np.asarray(v, np.float32) for k, v in named_variables(model, LoraParam).items()}


def merged_fp_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """HF-named fp tensors of a LoRA-wrapped dense model with every adapter merged into its weight."""
    flat = {k: np.asarray(v, np.float32) for k, v in named_variables(model, nnx.Param).items()}
    out = {}
    for k, v in flat.items():
        if k.endswith(".lora_A") or k.endswith(".lora_B"):
            continue
        if k.endswith(".base.weight"):
            stem = k[: -len(".base.weight")]
            lin = _get(model, stem)
            v = (v + lora_delta(flat[stem + ".lora_A"], flat[stem + ".lora_B"], lin.rank, lin.alpha)
                 ).astype(np.float32)
            out[stem + ".weight"] = v
        elif ".base." in k:
            out[k.replace(".base.", ".")] = v
        else:
            out[k] = v
    return out


def _get(model: nnx.Module, dotted: str) -> Any:
    obj = model
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def save_adapters(out: Path, model: nnx.Module, *, rank: int, alpha: float, meta: Mapping[str, Any]) -> None:
    save_file(adapter_tensors(model), str(out / ADAPTER_FILE), metadata={"format": "np"})
    (out / ADAPTER_CONFIG).write_text(json.dumps({"rank": rank, "alpha": alpha, "targets": list(LINEAR_NAMES),
                                                  **meta}, indent=2, sort_keys=True))


def has_adapters(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapters(model: nnx.Module, path: str | Path) -> None:
    """Wrap `model`'s linears with the LoRA adapters saved in `path` (a QLoRA training output), in place."""
    path = Path(path)
    conf = json.loads((path / ADAPTER_CONFIG).read_text())
    apply_lora(model, int(conf["rank"]), float(conf["alpha"]), seed=0)
    reader = SafetensorsReader([path / ADAPTER_FILE])
    place_tensors(model, {k: reader.get(k) for k in reader.keys()}, only=LoraParam,
                  source=str(path / ADAPTER_FILE))
