"""Weak-column selection: per-layer sensitivity and the global index (paper Algorithm 1, App. B).

QEFT scores input channel j of a layer by λ_j = diag(H)_j alone (section 3.2: the weight
perturbation term of Eq. (3) varies too much across layers to compare); OWQ scores it per layer by
the full Eq. (3), λ_j · ‖ΔW_{:,j}‖².
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qeft_jax.quant.groupwise import fake_quantize, minmax_params


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, ties broken by the lower index; returned sorted ascending."""
    scores = np.asarray(scores, np.float64)
    if not 0 <= k <= scores.shape[0]:
        raise ValueError(f"k must be in [0, {scores.shape[0]}], got {k}")
    order = np.lexsort((np.arange(scores.shape[0]), -scores))
    return np.sort(order[:k]).astype(np.int32)


def global_weak_index(sensitivities: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Algorithm 1: every layer votes for its own top-k channels with its scores normalised by the
    layer's mean; the k channels with the largest total vote form the one global index."""
    if not sensitivities:
        raise ValueError("global_weak_index needs at least one layer's sensitivity")
    d = len(sensitivities[0])
    s_global = np.zeros(d, np.float64)
    for i, s in enumerate(sensitivities):
        s = np.asarray(s, np.float64)
        mean = s.mean()
        if not (np.all(np.isfinite(s)) and mean > 0):
            raise ValueError(f"weak-channel selection: voter {i}'s sensitivities must be finite with a positive mean "
                             f"(mean {mean:.3g}): its calibration activations vanished or became NaN/Inf "
                             "(broken weights or calibration data)")
        ids = top_k(s, k)
        s_global[ids] += s[ids] / mean
    return top_k(s_global, k)


def owq_sensitivity(w: jax.Array, h_diag: jax.Array, bits: int) -> jax.Array:
    """Eq. (3): λ_j ‖ΔW_{:,j}‖² with ΔW the per-channel min-max quantization error (OWQ)."""
    w = w.astype(jnp.float32)
    s, z = minmax_params(w.min(1, keepdims=True), w.max(1, keepdims=True), 2 ** bits - 1)
    dw = w - fake_quantize(w, s, z, 2 ** bits - 1)
    return h_diag * jnp.sum(dw * dw, axis=0)
