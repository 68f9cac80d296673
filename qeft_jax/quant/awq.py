"""AWQ: activation-aware per-input-channel scaling (Lin et al., "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", 2023, section 3.2), the math as pure functions.

Scaling input channel j of a linear up by s_j before quantization and its input down by s_j leaves
the fp function unchanged but shrinks the relative rounding error of the salient channels (those
with large activations). AWQ searches, for the linears W that read one activation x,

    s* = argmin_s  L(s),   L(s) = || Q(W · diag(s)) · (diag(s)^-1 · x) - W · x ||²        (Eq. 4)
    s  = s_x^α,  α* = argmin_{α ∈ [0, 1]} L(s_x^α)                                         (Eq. 5)

with s_x the average magnitude of x per channel (mean over calibration tokens of |x|) and α on a
grid. As in the authors' code (llm-awq, AutoAWQ), s is clamped at 1e-4 and normalised by
sqrt(max(s) · min(s)), and α = 0 (s = 1, plain RTN with the same grid) is one of the candidates,
so the search never does worse than RTN on the objective.

For most activations the objective needs no activations: with ΔW = Q(W · diag(s)) · diag(s)^-1 - W
(the effective weight error in the original input space) and H = 2 XᵀX / tokens, the Hessian the
pipeline already accumulates,

    L(s) · 2 / tokens = tr(ΔW · H · ΔWᵀ),

summed over the linears sharing x (`hessian_loss`). q/k/v's input is different: their outputs go
through the softmax, so their own output errors say little about the error that reaches the
residual stream. As in AutoAWQ, their α is scored at the attention output instead (o_proj's output,
o_proj in fp), which needs the calibration activations: `search_scale` takes the loss as a function
of every candidate's effective weights, and the pipeline hands it a pass over the activations for
q/k/v (`qeft_jax.quant.calibrate.attention_output_errors`). Scored per linear at 3 bits, q/k/v's
scale made the default model worse than RTN (`benchmarks/awq_study.py`).

Q is the project's group-wise quantizer with its clipping grid search (`qeft_jax.quant.groupwise`)
and round-to-nearest (no OPTQ, as in AWQ), so α = 0 is exactly what RTN stores. Unlike AutoAWQ,
gate/up's error is each linear's own output error (not the MLP's output), and the clipping is the
quantizer's weight-error grid search (not a separate output-error search).

The scale is then folded exactly (`fold_scales`): W · diag(s) into the readers' input columns and
diag(s)^-1 into the parameter that produces x (`qeft_jax.spec.PRODUCERS`: an RMSNorm weight, or the
output rows and bias of up_proj / v_proj).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qeft_jax import spec
from qeft_jax.config import ModelConfig
from qeft_jax.quant.groupwise import column_params, fake_quantize, search_group_params

SCALE_FLOOR = 1e-4   # s_x^α is clamped here before normalising (as llm-awq / AutoAWQ)


def alpha_grid(n_grid: int) -> np.ndarray:
    """The exponents searched: α = i / n_grid for i = 0 .. n_grid (both ends included)."""
    if n_grid < 1:
        raise ValueError(f"the AWQ grid needs at least 1 step, got {n_grid}")
    return np.arange(n_grid + 1, dtype=np.float64) / n_grid


def candidate_scale(absmean: jax.Array, alpha: float) -> jax.Array:
    """s = max(s_x^α, 1e-4) / sqrt(max(s) · min(s)) (Eq. 5 with the authors' normalisation):
    absmean [n] = mean over tokens of |x| per input channel. α = 0 gives s = 1 exactly."""
    s = jnp.maximum(jnp.asarray(absmean, jnp.float32) ** jnp.float32(alpha), SCALE_FLOOR)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@partial(jax.jit, static_argnames=("bits", "group_size", "grid", "max_shrink", "storage_dtype"))
def effective_weight(w: jax.Array, s: jax.Array, *, bits: int, group_size: int, grid: int = 100,
                     max_shrink: float = 0.8, storage_dtype=jnp.float16) -> jax.Array:
    """Q(W · diag(s)) · diag(s)^-1 [out, n]: the weight the scaled, quantized linear applies to the
    unscaled input. Q: grid-searched group params + RTN."""
    w = w.astype(jnp.float32)
    ws = w * s[None, :]
    scales, zeros = search_group_params(ws, bits=bits, group_size=group_size, grid=grid,
                                        max_shrink=max_shrink, storage_dtype=storage_dtype)
    sc, zc = column_params(scales, zeros, w.shape[1], group_size)
    return fake_quantize(ws, sc, zc, 2 ** bits - 1) / s[None, :]


@jax.jit
def hessian_error(w: jax.Array, w_eff: jax.Array, h: jax.Array) -> jax.Array:
    """tr(ΔW · H · ΔWᵀ) = (2 / tokens) · || W_eff · X - W · X ||² (Eq. 4 for W_eff = Q(W diag(s))
    diag(s)^-1) for one linear [out, n] and its input's Hessian H = 2 XᵀX / tokens [n, n]."""
    dw = w_eff - w.astype(jnp.float32)
    hw = jnp.matmul(dw, h.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(hw * dw)


# L over the candidates: each candidate's effective weights (one per linear, in `weights` order),
# yielded one candidate at a time -> L per candidate [A]
Loss = Callable[[Iterator[list[jax.Array]]], np.ndarray]


def hessian_loss(weights: Sequence[np.ndarray | jax.Array], h: np.ndarray | jax.Array) -> Loss:
    """L = Σ over the linears of tr(ΔW · H · ΔWᵀ): their own output errors on the calibration
    inputs, from the Hessian alone. Candidates are scored as they come (one in memory at a time)."""
    ws = [jnp.asarray(w, jnp.float32) for w in weights]
    h = jnp.asarray(h, jnp.float32)
    return lambda candidates: np.array([sum(float(hessian_error(w, e, h)) for w, e in zip(ws, effs))
                                        for effs in candidates])


@dataclasses.dataclass(frozen=True)
class ScaleSearch:
    """The result of `search_scale`: the chosen scale [n], its α, and L(s_x^α) for every α."""

    scale: np.ndarray
    alpha: float
    alphas: np.ndarray
    errors: np.ndarray


def search_scale(weights: Sequence[np.ndarray | jax.Array], absmean: np.ndarray | jax.Array, loss: Loss, *,
                 n_grid: int, bits: int, group_size: int, grid: int = 100, max_shrink: float = 0.8,
                 storage_dtype=jnp.float16) -> ScaleSearch:
    """Eq. (5) for the linears `weights` ([out_i, n] each) that read one activation with per-channel
    mean |x| `absmean` [n]: the α on `alpha_grid(n_grid)` whose scale minimises `loss` (e.g.
    `hessian_loss`). Ties go to the smaller α (α = 0 first: never worse than RTN on the loss)."""
    ws = [jnp.asarray(w, jnp.float32) for w in weights]
    kw = dict(bits=bits, group_size=group_size, grid=grid, max_shrink=max_shrink,
              storage_dtype=jnp.dtype(storage_dtype))
    alphas = alpha_grid(n_grid)
    candidates = ([effective_weight(w, s, **kw) for w in ws]
                  for s in (candidate_scale(absmean, a) for a in alphas))
    errors = np.asarray(loss(candidates), np.float64)
    if errors.shape != alphas.shape or not np.all(np.isfinite(errors)):
        raise ValueError("AWQ scale search: the output error is NaN/Inf (broken weights or statistics)")
    best = int(np.argmin(errors))
    return ScaleSearch(np.asarray(candidate_scale(absmean, alphas[best])), float(alphas[best]), alphas, errors)


# ----------------------------------------------------------------------------------- folding


def fold_columns(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """A reader's weight [out, n] -> W · diag(s) (its input is divided by s)."""
    return (np.asarray(w, np.float32) * np.asarray(s, np.float32)[None, :]).astype(np.float32)


def fold_rows(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """A producing linear's weight [n, in] or bias [n] -> diag(s)^-1 · W: its output divided by s."""
    s = np.asarray(s, np.float32)
    return (np.asarray(w, np.float32) / (s[:, None] if np.ndim(w) == 2 else s)).astype(np.float32)


def fold_norm(weight: np.ndarray, s: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """A producing RMSNorm's stored weight [n] -> the weight whose output is divided by s. The norm
    applies (offset + w) (Llama: offset 0; Gemma: 1), so the new stored weight is (offset + w) / s
    - offset."""
    w = np.asarray(weight, np.float64)
    return ((w + offset) / np.asarray(s, np.float64) - offset).astype(np.float32)


def scale_hessian(h: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The Hessian of the scaled input x / s: diag(s)^-1 · H · diag(s)^-1."""
    inv = 1.0 / np.asarray(s, np.float32)
    return (np.asarray(h, np.float32) * inv[:, None] * inv[None, :]).astype(np.float32)


def fold_scales(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], scales: Mapping[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
    """Fold per-channel scales of a block's activations into its tensors (names relative to the
    layer), leaving the block's function unchanged: for `scales[reads]` = s, every linear reading
    `reads` gets W · diag(s) and the activation's producer (`spec.producers(cfg)`) is divided by s.
    An activation without a producer in this config (o_proj's input under GQA) is an error."""
    prods = spec.producers(cfg)
    out = dict(tensors)
    for reads, s in scales.items():
        if reads not in prods:
            raise ValueError(f"activation {reads!r} has no producer a scale folds into in this "
                             f"{cfg.model_type} config (have: {', '.join(prods)})")
        p = prods[reads]
        for name in spec.readers(reads):
            out[name + ".weight"] = fold_columns(out[name + ".weight"], s)
        if p.kind == "norm":
            out[p.tensor] = fold_norm(out[p.tensor], s, cfg.norm_offset)
        elif p.kind == "rows":
            for field in ("weight", "bias"):
                if f"{p.tensor}.{field}" in out:
                    out[f"{p.tensor}.{field}"] = fold_rows(out[f"{p.tensor}.{field}"], s)
        else:
            raise ValueError(f"unknown producer kind {p.kind!r}; expected one of {spec.PRODUCER_KINDS}")
    return out
