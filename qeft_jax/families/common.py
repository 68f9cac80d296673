"""Config-reading rules more than one family shares (no imports from the rest of qeft_jax)."""
from __future__ import annotations

from typing import Any, Mapping


def uniform_window(d: Mapping[str, Any]) -> dict[str, Any]:
    """`sliding_window` on every layer (Mistral, Phi-3); None or absent means full attention."""
    window = d.get("sliding_window")
    return {"sliding_window": window,
            "layer_types": ("sliding_attention" if window else "full_attention",) * d["num_hidden_layers"]}
