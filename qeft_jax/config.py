"""The model configuration: one frozen dataclass for every supported decoder family.

`ModelConfig` is read from a Hugging Face `config.json`: the keys every family shares here, the
family's own through `qeft_jax.families` (one small module per family). Published checkpoints carry
`rope_theta`/`rope_scaling`; transformers 5 writes a `rope_parameters` dict instead: both are read.
Architectures the decoder cannot represent (mixture of experts, latent attention, cross-attention,
an unknown rope type) are refused here, with what is missing named, before anything is written.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from qeft_jax import families
from qeft_jax.io import parse_json

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


ATTENTION_TYPES = ("full_attention", "sliding_attention")
# config keys that announce what the decoder does not implement -> what that is
UNSUPPORTED_KEYS = {"num_local_experts": "mixture-of-experts layers", "num_experts": "mixture-of-experts layers",
                    "n_routed_experts": "mixture-of-experts layers", "kv_lora_rank": "multi-head latent attention",
                    "q_lora_rank": "multi-head latent attention", "cross_attention_layers": "cross-attention layers"}


class ConfigError(ValueError):
    """A config.json that cannot describe a model we support."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rope frequency scaling. `rope_type` 'default' means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # what the families differ in (qeft_jax/families/*); the defaults are Llama's
    model_type: str = "llama"
    qkv_bias: bool = False                  # biases on q/k/v_proj
    o_bias: bool = False                    # bias on o_proj
    mlp_bias: bool = False
    qk_norm: bool = False                   # Qwen3: RMSNorm over head_dim on q and k before rope
    hidden_act: str = "silu"                # silu | gelu_tanh (the gate activation of the GLU)
    norm_offset: float = 0.0                # Gemma: RMSNorm applies (norm_offset + w)
    embed_scale: bool = False               # Gemma: embeddings multiplied by sqrt(hidden_size)
    sandwich_norms: bool = False            # Gemma 2: norms after attention and MLP too
    sliding_window: int | None = None       # keys within this many positions, on sliding layers
    layer_types: tuple[str, ...] = ()       # per layer, ATTENTION_TYPES; () = every layer full
    attn_logit_softcap: float | None = None   # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2: the same on the logits
    query_pre_attn_scalar: float | None = None  # attention scale is its ^-1/2 (default head_dim)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config key '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"unsupported rope type '{self.rope_scaling.rope_type}'; "
                              f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; supported: silu, gelu_tanh")
        if self.layer_types and (len(self.layer_types) != self.num_hidden_layers
                                 or set(self.layer_types) - set(ATTENTION_TYPES)):
            raise ConfigError(f"layer_types must name one of {ATTENTION_TYPES} per layer "
                              f"({self.num_hidden_layers}), got {list(self.layer_types)}")
        if "sliding_attention" in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            raise ConfigError(f"sliding-window layers need a positive sliding_window, got {self.sliding_window!r}")

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def untied_embeddings(self) -> bool:
        return not self.tie_word_embeddings

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: full attention)."""
        sliding = self.layer_types and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type")
        family = families.family(model_type)
        if family is None:
            raise ConfigError(f"unsupported model_type {model_type!r}; supported: "
                              f"{', '.join(families.MODEL_TYPES)}")
        for key, what in UNSUPPORTED_KEYS.items():
            if d.get(key):
                raise ConfigError(f"{model_type} config has '{key}': not supported ({what})")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"config.json is missing required key(s): {', '.join(missing)}")
        act = d.get("hidden_act", "silu")
        if family.NATIVE_ACT == "silu" and act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r} for {model_type}; expected 'silu'")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling") or {}
        rope_theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        if "rope_theta" in d and "rope_theta" in rope and d["rope_theta"] != rope["rope_theta"]:
            raise ConfigError(f"contradictory rope_theta: {d['rope_theta']} vs "
                              f"rope_parameters.rope_theta {rope['rope_theta']}")
        merged = {**rope, **legacy}
        rope_type = merged.get("rope_type", merged.get("type", "default"))
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(merged.get("factor", 1.0)),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                merged.get("original_max_position_embeddings",
                           d.get("original_max_position_embeddings", d.get("max_position_embeddings", 8192)))),
        )
        eos = d.get("eos_token_id")
        eos_t = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        try:
            own = family.from_hf(d)
        except ValueError as e:
            raise ConfigError(f"{model_type}: {e}") from None
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta), rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", family.TIED_BY_DEFAULT)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos_t, pad_token_id=d.get("pad_token_id"),
            model_type=model_type, **own,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that `transformers` (4.x and 5.x) reads as the same model."""
        rope_scaling = None
        if self.rope_scaling.rope_type != "default":
            rope_scaling = {"rope_type": self.rope_scaling.rope_type, "factor": self.rope_scaling.factor}
            if self.rope_scaling.rope_type == "llama3":
                rope_scaling.update(
                    low_freq_factor=self.rope_scaling.low_freq_factor,
                    high_freq_factor=self.rope_scaling.high_freq_factor,
                    original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings)
        eos: Any = list(self.eos_token_id)
        if len(eos) == 1:
            eos = eos[0]
        family = families.family(self.model_type)
        return {
            "architectures": [family.ARCHITECTURE[self.model_type]], "model_type": self.model_type,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rope_parameters": {"rope_theta": self.rope_theta, **(rope_scaling or {"rope_type": "default"})},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": eos if eos != [] else None, "pad_token_id": self.pad_token_id,
            **family.to_hf(self),
        }

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        return cls.from_hf_dict(parse_json(path.read_text(), path, ConfigError))
