"""qeft_jax.generation (the jitted prefill + while_loop decode against plain references; CPU, fast)
and its CLI, qeft_jax.generate."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qeft_jax import load_model, tokenization
from qeft_jax.generate import main
from qeft_jax.generation import (completion_text, generate, generate_text, generate_with_stats, left_pad,
                                 top_p_filter)

NAME = "gqa_untied"
N = 8  # new tokens in every tiny test: shapes repeat, so each program compiles once


@pytest.fixture(scope="module")
def tiny(converted):
    model, _, cfg = load_model(converted[NAME])
    return model, cfg


def prompts(cfg, lengths=(5, 11), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def reference_greedy(model, prompt, n, width=32):
    """No cache, no left padding: re-run the whole model on the growing sequence, argmax at its
    last token. The sequence sits at the start of a fixed-width buffer (one compile); the zeros
    after it cannot be seen by causal attention."""
    graphdef, state = nnx.split(model)
    ids = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(ids)] = ids
        logits = _full_logits(graphdef, state, jnp.asarray(buf))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_left_pad_and_positions():
    ids, mask = left_pad([[7, 8, 9], [5]], pad_id=0, multiple=4)
    assert ids.tolist() == [[0, 7, 8, 9], [0, 0, 0, 5]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_greedy_matches_reference_loop_left_padded(tiny):
    model, cfg = tiny
    ps = prompts(cfg)
    out, stats = generate_with_stats(model, ps, max_new_tokens=N)
    assert stats.padded_len == 16 and stats.decode_steps == N - 1
    assert out == [reference_greedy(model, p, N) for p in ps]


def test_greedy_matches_transformers(hf_models, converted):
    _, tmodel = hf_models[NAME]
    model, _, cfg = load_model(converted[NAME])
    prompt = prompts(cfg, (9,), seed=3)[0]
    eos = tmodel.generation_config.eos_token_id
    with torch.no_grad():
        ref = tmodel.generate(torch.tensor([prompt]),
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=N, do_sample=False, pad_token_id=0)
    ref = ref[0, len(prompt):].tolist()
    stops = [eos] if isinstance(eos, int) else list(eos or [])
    assert generate(model, [prompt], max_new_tokens=N, stop_tokens=stops) == [ref]


def test_sampling_reproducible_and_seeded(tiny):
    model, cfg = tiny
    ps = prompts(cfg)
    kw = dict(max_new_tokens=N, temperature=1.0)
    a = generate(model, ps, seed=1, **kw)
    assert a == generate(model, ps, seed=1, **kw)
    assert a != generate(model, ps, seed=2, **kw)
    assert all(0 <= t < cfg.vocab_size for row in a for t in row)


def test_tiny_top_p_is_greedy(tiny):
    model, cfg = tiny
    ps = prompts(cfg)
    greedy = generate(model, ps, max_new_tokens=N)
    assert generate(model, ps, max_new_tokens=N, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_top_p_filter_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(top_p_filter(logits, jnp.float32(0.7))))
    assert kept.tolist() == [[True, True, False, False]]
    assert np.isfinite(np.asarray(top_p_filter(logits, jnp.float32(1.0)))).all()


def test_stop_tokens_cut_output(tiny):
    model, cfg = tiny
    ps = prompts(cfg)
    free = generate(model, ps, max_new_tokens=N)
    stop = free[0][3]
    cut, stats = generate_with_stats(model, ps, max_new_tokens=N, stop_tokens=[stop])
    for row, ref in zip(cut, free):
        end = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row == ref[:end]
    assert cut[0][-1] == stop and len(cut[0]) <= 4
    if stop in free[1]:  # every row stopped: the loop ends early
        assert stats.decode_steps < N - 1
    # a stop token emitted by the prefill ends generation at once
    assert generate(model, ps[:1], max_new_tokens=N, stop_tokens=[free[0][0]]) == [free[0][:1]]


def test_bad_arguments(tiny):
    model, cfg = tiny
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1, 2]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1, 2]], max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[cfg.vocab_size]], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=2)
    assert generate(model, [[1, 2]], max_new_tokens=0) == [[]]


def test_generate_text_prompts_as_fine_tuning_does(tiny_with_tokenizer):
    """generate_text feeds the prompt fine-tuning trains on (tokenization.example_ids): here the
    Alpaca prompt, as the tokenizer has no chat template; style="raw" sends the text itself."""
    model, tok, cfg = load_model(tiny_with_tokenizer[0])
    prompt, _ = tokenization.example_ids(tok, "w1 w2 w3", "", "w4")
    assert prompt != tokenization.prompt_ids(tok, "w1 w2 w3", style="raw")
    stops, pad = tokenization.stop_ids(tok, cfg), tokenization.pad_id(tok, cfg)
    for style, ids in ((None, prompt), ("raw", tokenization.prompt_ids(tok, "w1 w2 w3", style="raw"))):
        row = generate(model, [ids], max_new_tokens=N, stop_tokens=stops, pad_id=pad)[0]
        assert generate_text(model, tok, ["w1 w2 w3"], max_new_tokens=N, style=style) == \
            [completion_text(tok, row, stops)]


def test_cli_needs_a_tokenizer(converted, capsys):
    with pytest.raises(ValueError, match="no tokenizer"):
        main(["--model", str(converted[NAME]), "--prompt", "hi"])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--max-new-tokens" in capsys.readouterr().out


def test_default_model_chat(default_model_dir):
    model, tok, _ = load_model(default_model_dir)
    text = generate_text(model, tok, ["What is the capital of France?"], max_new_tokens=12)[0]
    print(f"default model: {text!r}")
    assert text.strip()
