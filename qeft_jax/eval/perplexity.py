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
def _window_nll(graphdef: Any, state: Any, ids: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    h, _ = model.hidden(ids[:, :-1])
    return -jnp.sum(model.target_logprobs(h, ids[:, 1:])[0], axis=-1)


def window_nll(model: nnx.Module, ids: np.ndarray, *, batch_size: int = 4, progress: bool = True) -> np.ndarray:
    """Summed next-token NLL of each window of ids [N, T] -> [N] (float64): what paired comparisons
    of two models on the same windows need."""
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(f"perplexity needs token windows [N >= 1, T], got shape {ids.shape}")
    graphdef, state = nnx.split(model)
    out = [np.asarray(_window_nll(graphdef, state, jnp.asarray(ids[start:start + batch_size])), np.float64)
           for start in tqdm(range(0, len(ids), batch_size), desc="perplexity", disable=not progress)]
    return np.concatenate(out)


def perplexity_of(nll: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean NLL per predicted token) from `window_nll`'s sums over windows ids [N, T]."""
    return float(np.exp(np.sum(nll) / (ids.shape[0] * (ids.shape[1] - 1))))


def perplexity(model: nnx.Module, ids: np.ndarray, *, batch_size: int = 4, progress: bool = True
               ) -> tuple[float, int]:
    """(exp(mean NLL), number of predicted tokens) over windows ids [N, T]."""
    nll = window_nll(model, ids, batch_size=batch_size, progress=progress)
    return perplexity_of(nll, ids), ids.shape[0] * (ids.shape[1] - 1)
