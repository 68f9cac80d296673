"""The one description of a decoder's tensors: names, shapes, biases and where OGR's permutations act.

Every tensor is a Hugging Face name plus the *dimension names* of its axes. A dimension name is
both the shape rule (its size comes from the config, `dim_size`) and the permutation rule:
offline global reordering (OGR, paper section 3.2) permutes the residual stream `hidden` with one
model-wide permutation and every layer's `ffn` dimension with its own; `vocab`, `q` (heads x
head_dim), `kv` and `head` (one head's dim: Qwen3's q/k norms) are never permuted. So "which side
of a linear a permutation touches" is read off its dims: q_proj is (q, hidden), a permutation of
`hidden` reorders its input columns; o_proj is (hidden, q), the same permutation reorders its
output rows. Tensors only some families have name the config flag they need (`when`).

OGR, its inverse for `convert.to_hf`, QEFT merging (channel maps), the checkpoint validator,
calibration (which activations each linear reads) and AWQ (which parameter produces each of
those activations, `PRODUCERS`) all read this table. Adding a tensor is one line.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from qeft_jax.config import ModelConfig

LAYER_PREFIX = "model.layers.{i}."
PERMUTED_DIMS = ("hidden", "ffn")   # OGR permutes these; the others are fixed by vocab or heads

# Activations a block's linears read (the calibration statistics are keyed by them):
ATTN_IN, O_IN, FFN_IN, DOWN_IN = "attn", "o", "ffn", "down"

# Where the permutations themselves are stored in a quantized checkpoint (int32; reordered channel c
# holds original channel perm[c]).
PERM_TENSORS = {"hidden": "qeft.hidden_perm", "ffn": "qeft.layers.{i}.ffn_perm"}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A non-linear parameter: `name` (relative to the layer for per-layer tensors), its dims, and
    `when`: the config flag without which the model has no such tensor (None: always present)."""

    name: str
    dims: tuple[str, ...]
    when: str | None = None


@dataclasses.dataclass(frozen=True)
class Linear:
    """A block linear, weight [out, in] (PyTorch layout); `bias` names the config flag that gives it
    a bias [out]; `reads` names the activation it reads (its calibration Hessian)."""

    name: str
    out: str
    inp: str
    bias: str
    reads: str

    @property
    def dims(self) -> tuple[str, str]:
        return (self.out, self.inp)


TOP_TENSORS = (
    Tensor("model.embed_tokens.weight", ("vocab", "hidden")),
    Tensor("model.norm.weight", ("hidden",)),
    Tensor("lm_head.weight", ("vocab", "hidden"), when="untied_embeddings"),
)
LAYER_NORMS = (
    Tensor("input_layernorm.weight", ("hidden",)),
    Tensor("post_attention_layernorm.weight", ("hidden",)),
    Tensor("pre_feedforward_layernorm.weight", ("hidden",), when="sandwich_norms"),
    Tensor("post_feedforward_layernorm.weight", ("hidden",), when="sandwich_norms"),
    Tensor("self_attn.q_norm.weight", ("head",), when="qk_norm"),
    Tensor("self_attn.k_norm.weight", ("head",), when="qk_norm"),
)
LINEARS = (
    Linear("self_attn.q_proj", out="q", inp="hidden", bias="qkv_bias", reads=ATTN_IN),
    Linear("self_attn.k_proj", out="kv", inp="hidden", bias="qkv_bias", reads=ATTN_IN),
    Linear("self_attn.v_proj", out="kv", inp="hidden", bias="qkv_bias", reads=ATTN_IN),
    Linear("self_attn.o_proj", out="hidden", inp="q", bias="o_bias", reads=O_IN),
    Linear("mlp.gate_proj", out="ffn", inp="hidden", bias="mlp_bias", reads=FFN_IN),
    Linear("mlp.up_proj", out="ffn", inp="hidden", bias="mlp_bias", reads=FFN_IN),
    Linear("mlp.down_proj", out="hidden", inp="ffn", bias="mlp_bias", reads=DOWN_IN),
)
LINEAR_NAMES = tuple(lin.name for lin in LINEARS)
LINEAR = {lin.name: lin for lin in LINEARS}


@dataclasses.dataclass(frozen=True)
class Producer:
    """The parameter that writes activation `reads` channel for channel, so that dividing it by a
    per-channel scale s divides the activation by s (AWQ folds its scales here): an RMSNorm weight
    (`kind` 'norm', `tensor` its name relative to the layer; with `ModelConfig.norm_offset` the
    norm applies offset + w) or a block linear's output rows and bias (`kind` 'rows', `tensor` the
    linear's name). `when` / `unless`: the config flag that must be set / unset for this producer.
    A 'rows' producer counts only where its output dim has the size of its readers' input dim:
    then the rows map one to one onto the readers' channels (v_proj -> o_proj without GQA; with
    GQA, o_proj's channel c comes from v head c // head_dim // groups, a shared row)."""

    reads: str
    tensor: str
    kind: str
    when: str | None = None
    unless: str | None = None


PRODUCER_KINDS = ("norm", "rows")
PRODUCERS = (
    Producer(ATTN_IN, "input_layernorm.weight", "norm"),
    Producer(O_IN, "self_attn.v_proj", "rows"),
    Producer(FFN_IN, "post_attention_layernorm.weight", "norm", unless="sandwich_norms"),
    Producer(FFN_IN, "pre_feedforward_layernorm.weight", "norm", when="sandwich_norms"),
    Producer(DOWN_IN, "mlp.up_proj", "rows"),
)


def dim_size(cfg: ModelConfig, dim: str) -> int:
    return {"vocab": cfg.vocab_size, "hidden": cfg.hidden_size, "ffn": cfg.intermediate_size,
            "q": cfg.num_attention_heads * cfg.head_dim, "kv": cfg.num_key_value_heads * cfg.head_dim,
            "head": cfg.head_dim}[dim]


def shape(cfg: ModelConfig, dims: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(dim_size(cfg, d) for d in dims)


def linear_shape(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """[out, in] of a block linear."""
    return shape(cfg, LINEAR[name].dims)  # type: ignore[return-value]


def has_bias(cfg: ModelConfig, name: str) -> bool:
    return bool(getattr(cfg, LINEAR[name].bias))


def layer_prefix(i: int) -> str:
    return LAYER_PREFIX.format(i=i)


def layer_of(name: str) -> int | None:
    """The decoder layer a full tensor name belongs to (None for top-level tensors)."""
    head = LAYER_PREFIX.split("{")[0]
    return int(name[len(head):].split(".")[0]) if name.startswith(head) else None


def present(cfg: ModelConfig, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The tensors of `tensors` this config's model has."""
    return tuple(t for t in tensors if t.when is None or getattr(cfg, t.when))


def top_dims(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Top-level (not per-layer) tensor name -> dims."""
    return {t.name: t.dims for t in present(cfg, TOP_TENSORS)}


def norm_dims(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Per-layer norm weights (relative to the layer) -> dims: what stays fp in a quantized layer."""
    return {t.name: t.dims for t in present(cfg, LAYER_NORMS)}


def layer_dims(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Per-layer fp tensor name (relative to the layer) -> dims, biases included."""
    out = norm_dims(cfg)
    for lin in LINEARS:
        out[lin.name + ".weight"] = lin.dims
        if has_bias(cfg, lin.name):
            out[lin.name + ".bias"] = (lin.out,)
    return out


def fp_dims(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Every fp tensor of the model (full names) -> dims."""
    out = top_dims(cfg)
    for i in range(cfg.num_hidden_layers):
        out.update({layer_prefix(i) + k: v for k, v in layer_dims(cfg).items()})
    return out


def fp_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every fp tensor of the model (full names) -> shape: what a checkpoint must hold."""
    return {k: shape(cfg, v) for k, v in fp_dims(cfg).items()}


def permute(tensors: Mapping[str, np.ndarray], dims: Mapping[str, tuple[str, ...]],
            perms: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reorder every axis of every tensor in `dims` whose dimension has a permutation in `perms`
    (x_new = x.take(perm, axis)); tensors not in `dims` pass through unchanged. With the inverse
    permutations (np.argsort) it undoes the reordering."""
    out = dict(tensors)
    for name, tdims in dims.items():
        if name not in out:
            continue
        t = out[name]
        for axis, d in enumerate(tdims):
            if d in perms:
                t = np.take(t, perms[d], axis=axis)
        out[name] = t
    return out


def linear_axis_perms(name: str, perms: Mapping[str, np.ndarray], cfg: ModelConfig
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of one reordered linear: reordered row r / column c is original row rows[r] /
    column cols[c] (identity on dims without a permutation)."""
    lin = LINEAR[name]
    return tuple(np.asarray(perms[d], np.int64) if d in perms else np.arange(dim_size(cfg, d))  # type: ignore[return-value]
                 for d in lin.dims)


def hidden_readers() -> tuple[str, ...]:
    """Linears that read the residual stream: their weak columns are the global index (Algorithm 1
    votes with their statistics) and sit first after OGR."""
    return tuple(lin.name for lin in LINEARS if lin.inp == "hidden")


def ffn_reader_input() -> str:
    """The activation whose statistics choose a layer's FFN permutation (down_proj's input)."""
    (reads,) = {lin.reads for lin in LINEARS if lin.inp == "ffn"}
    return reads


def producers(cfg: ModelConfig) -> dict[str, Producer]:
    """Activation -> the producer a per-channel scale of it folds into, for this config's model, in
    block order (`PRODUCERS` filtered by its flags and, for 'rows', by the one-to-one shape rule).
    An activation that has none (o_proj's input under GQA) is absent."""
    out: dict[str, Producer] = {}
    for p in PRODUCERS:
        if (p.when and not getattr(cfg, p.when)) or (p.unless and getattr(cfg, p.unless)):
            continue
        if p.kind == "rows":
            (inp,) = {lin.inp for lin in LINEARS if lin.reads == p.reads}
            if dim_size(cfg, LINEAR[p.tensor].out) != dim_size(cfg, inp):
                continue
        if p.reads in out:
            raise ValueError(f"two producers of activation {p.reads!r} for this config")
        out[p.reads] = p
    return out


def readers(reads: str) -> tuple[str, ...]:
    """The block linears that read activation `reads` (they share its Hessian and any input scale)."""
    return tuple(lin.name for lin in LINEARS if lin.reads == reads)
