"""The decoder's own entry points against plain references: chunked target log-probs (values and
gradients) against a full log-softmax, query-chunked attention against whole attention (logits,
gradients, KV-cache decode), and `inputs_embeds` against the embedding lookup."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qeft_jax.config import ModelConfig
from qeft_jax.model import CausalLM


def _model(tied: bool, **cfg_kw) -> CausalLM:
    cfg = ModelConfig(vocab_size=101, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=10, tie_word_embeddings=tied,
                      **cfg_kw)
    return CausalLM(cfg, rngs=nnx.Rngs(3))


def _reference(model, ids):
    logits = model(ids[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == ids[:, 1:]


@pytest.mark.parametrize("tied,t,chunk", [(True, 13, 5), (False, 9, 64)])
def test_target_logprobs_match_full_log_softmax(tied, t, chunk):
    model = _model(tied)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 101, (3, t)))
    h, _ = model.hidden(ids[:, :-1])
    logp, greedy = model.target_logprobs(h, ids[:, 1:], chunk=chunk)
    ref_logp, ref_greedy = _reference(model, ids)
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(greedy, ref_greedy)

    graphdef, state = nnx.split(model)

    def loss(state, chunked):
        m = nnx.merge(graphdef, state)
        if chunked:
            return -jnp.sum(m.target_logprobs(m.hidden(ids[:, :-1])[0], ids[:, 1:], chunk=chunk)[0])
        return -jnp.sum(_reference(m, ids)[0])

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # jitted: op by op this test took ~20 s
    g, g_ref = grad(state, True), grad(state, False)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_inputs_embeds_equal_the_embedding_lookup():
    model = _model(False)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 101, (2, 7)))
    np.testing.assert_array_equal(model.forward(inputs_embeds=model.hidden_states(ids))[0], model(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model.forward(ids, inputs_embeds=model.hidden_states(ids))


WHOLE = 1 << 20  # an attention chunk longer than any test sequence: the plain, unchunked path
GEMMA2_LIKE = dict(layer_types=("sliding_attention", "full_attention"), sliding_window=4,
                   attn_logit_softcap=20.0)


@pytest.mark.parametrize("cfg_kw,t,chunk,padded", [
    ({}, 13, 5, False),           # GQA, T not a multiple of the chunk
    ({}, 12, 4, True),            # right-padded rows ([B, T] attention mask)
    (GEMMA2_LIKE, 11, 3, True),   # a sliding-window layer and soft-capped scores
])
def test_chunked_attention_matches_whole(cfg_kw, t, chunk, padded):
    """Query chunks give the logits and every parameter gradient of whole-sequence attention."""
    model = _model(False, **cfg_kw)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 101, (3, t)))
    mask = jnp.asarray(np.arange(t)[None] < np.array([[t], [t - 4], [t - 7]])) if padded else None
    graphdef, state = nnx.split(model)

    def loss(state, attn_chunk):
        m = nnx.merge(graphdef, state)
        logits = m.forward(ids, attention_mask=mask, attn_chunk=attn_chunk)[0]
        return jnp.sum(jnp.sin(logits)), logits  # every logit matters, with its own weight

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (g, logits), (g_ref, ref) = grad(state, chunk), grad(state, WHOLE)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_then_decode_matches_whole():
    """A chunked prefill into a KV cache writes the same cache, and the decode step after it (one
    query: never chunked) gives the same logits."""
    from qeft_jax.model import init_cache

    model = _model(True)
    b, t, slots = 2, 11, 16
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 101, (b, t + 1)))
    kv_valid = jnp.asarray(np.arange(slots)[None] < t + 1).repeat(b, 0).astype(jnp.int32)
    out = []
    for chunk in (4, WHOLE):
        cache = init_cache(model.config, b, slots, jnp.float32)
        prefill, cache = model.forward(ids[:, :t], attention_mask=kv_valid, cache=cache, cache_index=0,
                                       attn_chunk=chunk)
        step, cache = model.forward(ids[:, t:], attention_mask=kv_valid, cache=cache, cache_index=t)
        out.append((prefill, step, cache))
    (p, s, c), (p_ref, s_ref, c_ref) = out
    np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(jax.tree.leaves(c), jax.tree.leaves(c_ref)):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)
