"""Perplexity over fixed-length windows (next-token NLL, no overlap)."""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm


@partial(jax.jit, static_argnames=("graphdef",))
def _nll_sum(graphdef: Any, state: Any, ids: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    h, _ = model.hidden(ids[:, :-1])
    return -jnp.sum(model.target_logprobs(h, ids[:, 1:])[0])


def perplexity(model: nnx.Module, ids: np.ndarray, *, batch_size: int = 4, progress: bool = True
               ) -> tuple[float, int]:
    """(exp(mean NLL), number of predicted tokens) over windows ids [N, T]."""
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(f"perplexity needs token windows [N >= 1, T], got shape {ids.shape}")
    graphdef, state = nnx.split(model)
    total = 0.0
    for start in tqdm(range(0, len(ids), batch_size), desc="perplexity", disable=not progress):
        total += float(_nll_sum(graphdef, state, jnp.asarray(ids[start:start + batch_size])))
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    return float(np.exp(total / tokens)), tokens
