"""The decoder's own entry points against plain references: chunked target log-probs (values and
gradients) against a full log-softmax, and `inputs_embeds` against the embedding lookup."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qeft_jax.config import ModelConfig
from qeft_jax.model import CausalLM


def _model(tied: bool) -> CausalLM:
    cfg = ModelConfig(vocab_size=101, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=10, tie_word_embeddings=tied)
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
