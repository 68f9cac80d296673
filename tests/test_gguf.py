"""The GGUF path (embedded default model) against transformers' own GGUF loader."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qeft_jax import load_model
from qeft_jax.io import CheckpointError
from convert.default_model import default_gguf_path

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n <", "Water boils at a temperature of"]
TOKENIZER_TEXTS = PROMPTS + ["In 1969, 3 astronauts flew 384,400 km!", "  leading spaces\tand tabs\n\n",
                             "émigré naïve café — “quotes” 中文 🙂", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def default_model(default_model_dir):
    return load_model(default_model_dir)


def test_gguf_logits_match_transformers_gguf_loader(default_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, cfg = default_model
    path = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert cfg.num_hidden_layers == 30 and cfg.hidden_size == 576 and cfg.tie_word_embeddings
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="np")["input_ids"]
        np.testing.assert_array_equal(ids, hf_tok(prompt, return_tensors="np")["input_ids"])
        with torch.no_grad():
            ref = hf(torch.tensor(ids)).logits.numpy()
        out = np.asarray(model(jnp.asarray(ids)))
        worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
    assert worst < 1e-4, worst


def test_tokenizer_matches_transformers_gguf_tokenizer(default_model):
    """Our torch-free GGUF tokenizer conversion against transformers' GGUF tokenizer."""
    from transformers import AutoTokenizer

    _, tok, _ = default_model
    path = default_gguf_path()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TOKENIZER_TEXTS:
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
        ids = ref(text)["input_ids"]
        assert tok.decode(ids) == ref.decode(ids)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)


def test_tokenizer_round_trip_and_chat_template(default_model):
    _, tok, _ = default_model
    text = "Quantized models, fine-tuned cheaply: 4-bit weights + 16 weak columns!"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "hi" in chat and chat != "hi"


def test_unpermute_inverts_llama_cpp_permutation():
    from convert.gguf_file import unpermute_qk

    n_head, d, inp = 3, 8, 5
    w = np.arange(n_head * d * inp, dtype=np.float32).reshape(n_head * d, inp)
    # llama.cpp's convert script: reshape(n_head, 2, d/2, in).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, d // 2, inp).swapaxes(1, 2).reshape(n_head * d, inp)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)


def test_bad_paths_give_clear_errors(tmp_path):
    from convert import from_gguf, from_hf

    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="expected config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="not a file"):
        from_gguf.convert(tmp_path / "missing.gguf", tmp_path / "o")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        from_gguf.convert(bad, tmp_path / "o")
    with pytest.raises(CheckpointError, match="no config.json"):
        from_hf.convert(tmp_path, tmp_path / "o")
    assert not (tmp_path / "o").exists()
