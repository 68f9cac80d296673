"""Batched generation with a KV cache: one jitted prefill, one jitted on-device decode loop.

    generate(model, prompt_ids, max_new_tokens=...)        -> list[list[int]]  (new tokens per prompt)
    generate_text(model, tokenizer, prompts, ...)          -> list[str]        (completions)
    generate_with_stats(...) / benchmark(...)              -> tokens + GenerationStats (timings)
The CLI is `python -m qeft_jax.generate`.

Prompts of different lengths are LEFT-padded into [B, T] (T rounded up to a multiple of 16 so
nearby lengths share a compiled program); rope positions come from the cumulative attention mask,
so every row sees positions 0..len-1 whatever its padding. The prefill writes the whole prompt into
a [B, T + max_new_tokens] KV cache and returns the last position's logits; the decode program
samples the first new token from them, then runs a `lax.while_loop` on the device (no Python
dispatch per token) that stops when every row has emitted a stop token or after `max_new_tokens`.
Temperature 0 is greedy (argmax); otherwise logits are divided by the temperature, restricted to
the nucleus (smallest set of most likely tokens whose probability reaches top_p; top_p=1 disables
it) and sampled with PRNG keys folded from `seed` and the step index. Each returned row keeps
its first stop token and drops everything after it.

Text prompts (`generate_text`) are built by `qeft_jax.tokenization.prompt_ids`, the format
fine-tuning trains on (`train.data.encode_example`): style None is the tokenizer's chat template
when it has one, else the Alpaca prompt, so a model fine-tuned here is prompted as it was trained;
style "raw" sends the text itself (plain completion). Pad and stop ids are
`tokenization.pad_id` / `tokenization.stop_ids`.

The model goes through `nnx.split` into (graphdef, state); the jitted functions take the graphdef
as a static argument and `nnx.merge` it inside, so fp and quantized (QEFTLinear) models share the
same code and each distinct model structure / shape compiles once per process.
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qeft_jax import tokenization
from qeft_jax.model import init_cache

PAD_MULTIPLE = 16  # prompt length bucket (left padding is masked, so it changes nothing but shapes)


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """Timings of one generate call (device-synchronised; compile time included on a first call)."""

    batch: int
    prompt_tokens: int   # real (unpadded) prompt tokens over the batch
    padded_len: int      # T after left padding
    decode_steps: int    # decode-loop forward passes (the first new token needs none: prefill logits)
    new_tokens: int      # tokens returned over the batch (after cutting at stop tokens)
    prefill_s: float
    decode_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        """Tokens produced by the decode loop per second (batch x steps / time)."""
        return self.batch * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


# ------------------------------------------------------------------ sampling
def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the nucleus: the most likely tokens until their cumulative probability reaches top_p
    (the top token is always kept; tokens tied with the last kept one are kept too)."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_next(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                greedy: bool, nucleus: bool) -> jax.Array:
    """logits [B, V] -> token ids [B] (int32)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if nucleus:
        scaled = top_p_filter(scaled, top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------ the two jitted programs
def _prefill_impl(graphdef, state, ids, mask, *, max_new: int):
    """The whole (left-padded) prompt into a fresh [B, T + max_new] cache -> (last logits, cache).
    Sampling happens in the decode program, so one prefill serves every sampling mode."""
    model = nnx.merge(graphdef, state)
    b, t = ids.shape
    kv_valid = jnp.concatenate([mask, jnp.ones((b, max_new), mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = init_cache(model.config, b, t + max_new, model.dtype)
    logits, cache = model.forward(ids, attention_mask=kv_valid, positions=positions, cache=cache,
                                  cache_index=0)
    return logits[:, -1], cache


def _decode_impl(graphdef, state, cache, last_logits, mask, stop, key, temperature, top_p, pad_id, *,
                 max_new: int, greedy: bool, nucleus: bool):
    """Token 0 from the prefill's logits; then, while some row is not done and fewer than max_new
    tokens exist, feed token i-1 at slot T + i - 1 (position len + i - 1) and sample token i.
    Returns (tokens [B, max_new], tokens made)."""
    model = nnx.merge(graphdef, state)
    first = sample_next(last_logits, jax.random.fold_in(key, 0), temperature, top_p,
                        greedy=greedy, nucleus=nucleus)
    b, t = mask.shape
    kv_valid = jnp.concatenate([mask, jnp.ones((b, max_new), mask.dtype)], axis=1)
    lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
    out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop)

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, out, done = carry
        logits, cache = model.forward(tok[:, None], attention_mask=kv_valid,
                                      positions=(lengths + i - 1)[:, None], cache=cache,
                                      cache_index=t + i - 1)
        nxt = sample_next(logits[:, 0], jax.random.fold_in(key, i), temperature, top_p,
                          greedy=greedy, nucleus=nucleus)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, cache, out, done | jnp.isin(nxt, stop)

    n, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, out, done))
    return out, n


def decode_program(*, donate_cache: bool) -> Any:
    """The jitted decode loop `generate` runs, the KV cache donated or not; also for lowering it on
    shape-only inputs (benchmarks/scale.py)."""
    return jax.jit(_decode_impl, static_argnames=("graphdef", "max_new", "greedy", "nucleus"),
                   donate_argnames=("cache",) if donate_cache else ())


@functools.cache
def _programs():
    """(prefill, decode) jitted; the cache is donated to the decode loop where the backend can."""
    return (jax.jit(_prefill_impl, static_argnames=("graphdef", "max_new")),
            decode_program(donate_cache=jax.default_backend() != "cpu"))


# ------------------------------------------------------------------ host side
def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int, multiple: int = PAD_MULTIPLE
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts into ids/mask [B, T], T = longest prompt rounded up to `multiple`."""
    longest = max(len(p) for p in prompt_ids)
    t = -(-longest // multiple) * multiple
    ids = np.full((len(prompt_ids), t), pad_id, np.int32)
    mask = np.zeros((len(prompt_ids), t), np.int32)
    for r, p in enumerate(prompt_ids):
        if len(p):
            ids[r, t - len(p):] = p
            mask[r, t - len(p):] = 1
    return ids, mask


def cut_at_stop(tokens: Sequence[int], stop_tokens: Sequence[int]) -> list[int]:
    """Tokens up to and including the first stop token."""
    stops = set(int(s) for s in stop_tokens)
    out: list[int] = []
    for tok in tokens:
        out.append(int(tok))
        if tok in stops:
            break
    return out


def _check_args(model: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                temperature: float, top_p: float) -> None:
    cfg = model.config
    if not prompt_ids:
        raise ValueError("no prompts given")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    flat = [int(t) for p in prompt_ids for t in p]
    if min(flat) < 0 or max(flat) >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size})")
    longest = max(len(p) for p in prompt_ids) + max_new_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens = {longest} exceeds the model's "
                         f"max_position_embeddings {cfg.max_position_embeddings}")


def generate_with_stats(model: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                        stop_tokens: Sequence[int] = (), pad_id: int = 0
                        ) -> tuple[list[list[int]], GenerationStats]:
    """`generate`, also returning prefill/decode timings."""
    _check_args(model, prompt_ids, max_new_tokens, temperature, top_p)
    b = len(prompt_ids)
    if max_new_tokens == 0:
        return [[] for _ in range(b)], GenerationStats(b, sum(map(len, prompt_ids)), 0, 0, 0, 0.0, 0.0)
    ids, mask = left_pad(prompt_ids, pad_id)
    graphdef, state = nnx.split(model)
    prefill, decode = _programs()
    greedy = temperature == 0
    nucleus = not greedy and top_p < 1.0
    key = jax.random.key(seed)
    temp = jnp.float32(temperature if not greedy else 1.0)
    p = jnp.float32(top_p)
    stop = jnp.asarray(sorted(set(int(s) for s in stop_tokens)) or [-1], jnp.int32)
    mask_d = jnp.asarray(mask)

    t0 = time.perf_counter()
    last, cache = prefill(graphdef, state, jnp.asarray(ids), mask_d, max_new=max_new_tokens)
    jax.block_until_ready((last, cache))
    t1 = time.perf_counter()
    out, n = decode(graphdef, state, cache, last, mask_d, stop, key, temp, p, jnp.int32(pad_id),
                    max_new=max_new_tokens, greedy=greedy, nucleus=nucleus)
    out, n = np.asarray(out), int(n)
    t2 = time.perf_counter()

    rows = [cut_at_stop(row[:n], stop_tokens) for row in out]
    stats = GenerationStats(batch=b, prompt_tokens=int(mask.sum()), padded_len=ids.shape[1],
                            decode_steps=n - 1, new_tokens=sum(map(len, rows)),
                            prefill_s=t1 - t0, decode_s=t2 - t1)
    return rows, stats


def generate(model: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids), cut after the first stop token."""
    return generate_with_stats(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, stop_tokens=stop_tokens, pad_id=pad_id)[0]


def benchmark(model: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, repeats: int = 3,
              pad_id: int = 0) -> GenerationStats:
    """Greedy generation timed after one warm-up call (so compile time is excluded), stop tokens
    ignored so every run decodes exactly max_new_tokens; the run with the median decode time."""
    if max_new_tokens < 2:
        raise ValueError("benchmark needs max_new_tokens >= 2 (one prefill token + decode steps)")
    kw = dict(max_new_tokens=max_new_tokens, stop_tokens=(), pad_id=pad_id)
    generate_with_stats(model, prompt_ids, **kw)  # compile
    runs = sorted((generate_with_stats(model, prompt_ids, **kw)[1] for _ in range(max(1, repeats))),
                  key=lambda s: s.decode_s)
    med = runs[len(runs) // 2]
    return dataclasses.replace(med, prefill_s=statistics.median(s.prefill_s for s in runs))


# ------------------------------------------------------------------ text level
def completion_text(tokenizer: Any, tokens: Sequence[int], stop_tokens: Sequence[int]) -> str:
    """The text of one generated row: its final stop token dropped, special tokens skipped."""
    stops = set(int(s) for s in stop_tokens)
    row = list(tokens)
    return tokenizer.decode(row[:-1] if row and row[-1] in stops else row, skip_special_tokens=True)


def generate_text(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, style: str | None = None,
                  stop_tokens: Sequence[int] | None = None) -> list[str]:
    """Completions (decoded, special tokens skipped) for text prompts. style: the prompt style of
    `qeft_jax.tokenization` (None: chat template if any, else Alpaca, as in fine-tuning; "raw":
    the text as it is). stop_tokens=None: the config's and tokenizer's eos ids."""
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer; generate_text needs one")
    ids = tokenization.batch_prompt_ids(tokenizer, prompts, style=style)
    stops = tokenization.stop_ids(tokenizer, model.config) if stop_tokens is None else tuple(stop_tokens)
    rows = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    seed=seed, stop_tokens=stops, pad_id=tokenization.pad_id(tokenizer, model.config))
    return [completion_text(tokenizer, r, stops) for r in rows]
