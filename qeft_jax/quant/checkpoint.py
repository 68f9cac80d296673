"""The quantized checkpoint: written in one place (`write_quantized`), read in one place
(`read_quantized`), validated against the config and a checksum.

Directory layout: config.json, tokenizer files, model.safetensors and quantization.json.
model.safetensors holds
  model.embed_tokens.weight, model.norm.weight, [lm_head.weight]   fp, hidden dim reordered (OGR)
  model.layers.{i}.{input,post_attention}_layernorm.weight         fp, reordered
  model.layers.{i}.{linear}.{qweight,scales,zeros,weak,weak_idx[,bias]}   see qeft_jax.quant.pack
  qeft.hidden_perm              int32 [D]   reordered channel c holds original channel hidden_perm[c]
  qeft.layers.{i}.ffn_perm      int32 [F]   the same for layer i's FFN dimension
quantization.json: format_version, recipe, calibration settings, sha256 of model.safetensors.
selection.safetensors (QEFT only): attn_lambda / ffn_lambda [layers, hidden], the per-layer
  sensitivities λ = diag(H) that Algorithm 1 voted with (original channel order; for plots).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from qeft_jax.config import LlamaConfig
from qeft_jax.io import CheckpointError, SafetensorsReader, write_checkpoint
from qeft_jax.model import LlamaForCausalLM, abstract_model
from qeft_jax.params import LINEAR_NAMES, linear_shapes
from qeft_jax.qlinear import QEFTLinear
from qeft_jax.quant.pack import FORMAT_VERSION, QuantSpec, dequantize
from qeft_jax.quant.recipes import QuantRecipe

STORAGE_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def linear_spec(cfg: LlamaConfig, recipe: QuantRecipe, name: str) -> QuantSpec:
    out, inp = linear_shapes(cfg)[name]
    return QuantSpec(bits=recipe.bits, group_size=recipe.group_size or inp, in_features=inp,
                     out_features=out, k=recipe.k)


def write_quantized(tmp: Path, cfg: LlamaConfig, tensors: Mapping[str, np.ndarray],
                    meta: Mapping[str, Any], extra_files: Mapping[str, bytes]) -> None:
    """Write into an (atomic) temp dir; the checksum covers model.safetensors byte for byte."""
    write_checkpoint(tmp, cfg.to_hf_dict(), tensors, extra_files=extra_files)
    info = {"format_version": FORMAT_VERSION, **meta,
            "sha256": sha256_file(tmp / "model.safetensors")}
    (tmp / "quantization.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def read_quantized(path: Path, cfg: LlamaConfig, *, verify: bool = True
                   ) -> tuple[dict[str, Any], QuantRecipe, dict[str, np.ndarray]]:
    """(quantization.json, recipe, tensors), every shape and dtype checked against the config."""
    try:
        info = json.loads((path / "quantization.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/quantization.json is not valid JSON: {e}") from None
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: packed format version {info.get('format_version')!r}, this "
                              f"qeft-jax reads version {FORMAT_VERSION}")
    if verify and sha256_file(path / "model.safetensors") != info.get("sha256"):
        raise CheckpointError(f"{path}/model.safetensors does not match the checksum in "
                              f"quantization.json: the packed tensors were modified or corrupted")
    recipe = QuantRecipe(**info["recipe"])
    reader = SafetensorsReader([path / "model.safetensors"])
    tensors = {k: reader.get(k) for k in reader.keys()}
    sdt = np.dtype(STORAGE_DTYPES[recipe.storage_dtype])
    want: dict[str, tuple[tuple[int, ...], Any]] = {
        "model.embed_tokens.weight": ((cfg.vocab_size, cfg.hidden_size), None),
        "model.norm.weight": ((cfg.hidden_size,), None),
        "qeft.hidden_perm": ((cfg.hidden_size,), np.int32)}
    if not cfg.tie_word_embeddings:
        want["lm_head.weight"] = ((cfg.vocab_size, cfg.hidden_size), None)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        want[p + "input_layernorm.weight"] = ((cfg.hidden_size,), None)
        want[p + "post_attention_layernorm.weight"] = ((cfg.hidden_size,), None)
        want[f"qeft.layers.{i}.ffn_perm"] = ((cfg.intermediate_size,), np.int32)
        for name in LINEAR_NAMES:
            spec = linear_spec(cfg, recipe, name)
            dtypes = {"qweight": np.uint32, "scales": sdt, "zeros": sdt, "weak": sdt, "weak_idx": np.int32}
            for field, shape in spec.shapes().items():
                want[p + name + "." + field] = (shape, dtypes[field])
            bias = cfg.attention_bias if name.startswith("self_attn") else cfg.mlp_bias
            if bias:
                want[p + name + ".bias"] = ((spec.out_features,), sdt)
    missing = [k for k in want if k not in tensors]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} packed tensor(s) missing, e.g. {missing[:3]}")
    for k, (shape, dtype) in want.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{path}: tensor '{k}' has shape {tuple(t.shape)}, expected {shape}")
        if dtype is not None and t.dtype != dtype:
            raise CheckpointError(f"{path}: tensor '{k}' has dtype {t.dtype}, expected {np.dtype(dtype)}")
    return info, recipe, tensors


def quantized_model(cfg: LlamaConfig, recipe: QuantRecipe, *, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32) -> LlamaForCausalLM:
    """A model skeleton whose every block linear is a QEFTLinear."""
    model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
    sdt = jnp.dtype(recipe.storage_dtype)
    for layer in model.model.layers:
        for name in LINEAR_NAMES:
            parent, attr = name.split(".")
            bias = cfg.attention_bias if parent == "self_attn" else cfg.mlp_bias
            setattr(getattr(layer, parent), attr,
                    QEFTLinear(linear_spec(cfg, recipe, name), bias=bias, dtype=dtype, storage_dtype=sdt))
    return model


def assign(model: nnx.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Set every variable of `model` (by its HF-style path) from `tensors`."""
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        key = ".".join(str(p) for p in path)
        if key == "inv_freq":
            continue
        if key not in tensors:
            raise CheckpointError(f"tensor '{key}' missing from the quantized checkpoint")
        var.set_value(jnp.asarray(tensors[key], var[...].dtype))
    nnx.update(model, state)


def load_quantized(path: Path, cfg: LlamaConfig, *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> LlamaForCausalLM:
    _, recipe, tensors = read_quantized(path, cfg)
    model = quantized_model(cfg, recipe, dtype=dtype, param_dtype=param_dtype)
    assign(model, tensors)
    return model


def dense_linear(tensors: Mapping[str, np.ndarray], prefix: str, spec: QuantSpec) -> np.ndarray:
    """Ŵ [out, in] of one packed linear: dequantized grid with the weak columns put back."""
    w = np.array(dequantize(jnp.asarray(tensors[prefix + ".qweight"]), jnp.asarray(tensors[prefix + ".scales"]),
                            jnp.asarray(tensors[prefix + ".zeros"]), bits=spec.bits,
                            group_size=spec.group_size, n=spec.in_features))
    w[:, tensors[prefix + ".weak_idx"]] += np.asarray(tensors[prefix + ".weak"], np.float32)
    return w


def dense_original_order(path: Path, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """The quantized model as dense fp tensors in the ORIGINAL channel order (for to_hf)."""
    _, recipe, tensors = read_quantized(path, cfg)
    inv = np.argsort(tensors["qeft.hidden_perm"])
    out = {"model.embed_tokens.weight": np.asarray(tensors["model.embed_tokens.weight"], np.float32)[:, inv],
           "model.norm.weight": np.asarray(tensors["model.norm.weight"], np.float32)[inv]}
    if "lm_head.weight" in tensors:
        out["lm_head.weight"] = np.asarray(tensors["lm_head.weight"], np.float32)[:, inv]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        finv = np.argsort(tensors[f"qeft.layers.{i}.ffn_perm"])
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[p + n] = np.asarray(tensors[p + n], np.float32)[inv]
        for name in LINEAR_NAMES:
            w = dense_linear(tensors, p + name, linear_spec(cfg, recipe, name))
            b = np.asarray(tensors[p + name + ".bias"], np.float32) if p + name + ".bias" in tensors else None
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                w = w[:, inv]
            if name in ("mlp.gate_proj", "mlp.up_proj"):
                w = w[finv]
                b = None if b is None else b[finv]
            if name == "mlp.down_proj":
                w = w[:, finv]
            if name in ("self_attn.o_proj", "mlp.down_proj"):
                w = w[inv]
                b = None if b is None else b[inv]
            out[p + name + ".weight"] = w
            if b is not None:
                out[p + name + ".bias"] = b
    return out
