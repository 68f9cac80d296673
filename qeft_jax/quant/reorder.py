"""Offline global reordering (OGR, paper section 3.2): the permutation that puts weak channels first.

The hidden dimension of the whole model is permuted with P = [weak channels, the rest] so the k
global weak channels are the first k input columns of every q/k/v/gate/up. RMSNorm is invariant to
a permutation of its dimension, and the residual stream is only ever added to itself, so permuting
every producer's output rows and every consumer's input columns together leaves the logits
unchanged. The FFN dimension of each layer gets its own permutation Pf (gate/up rows, down_proj
columns). o_proj reads the attention output, whose layout is fixed by the heads: its weak columns
are gathered by index at run time instead. Which axis of which tensor each permutation reorders is
`qeft_jax.spec`'s table; `spec.permute` applies it.
"""
from __future__ import annotations

import numpy as np


def weak_first_permutation(weak_idx: np.ndarray, d: int) -> np.ndarray:
    """P such that x_new = x[P] puts the (sorted) weak channels first, the rest after in order."""
    weak_idx = np.sort(np.asarray(weak_idx, np.int64))
    if len(np.unique(weak_idx)) != len(weak_idx) or (len(weak_idx) and (weak_idx.min() < 0 or weak_idx.max() >= d)):
        raise ValueError(f"weak index must hold distinct channels in [0, {d})")
    rest = np.setdiff1d(np.arange(d), weak_idx)
    return np.concatenate([weak_idx, rest]).astype(np.int32)
