"""Shared fixtures: tiny random Llamas built and saved by transformers, and the default model."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

TINY_CONFIGS = {
    # name: kwargs for transformers.LlamaConfig
    "gqa_untied": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=101, tie_word_embeddings=False),
    "mha_tied": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                     num_key_value_heads=3, vocab_size=77, tie_word_embeddings=True, rope_theta=500.0),
    "llama3_rope_bias": dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
                             num_key_value_heads=1, vocab_size=97, head_dim=16, attention_bias=True,
                             mlp_bias=True, max_position_embeddings=256,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


def make_hf_llama(tmp: Path, name: str, seed: int = 0):
    """Save a random transformers LlamaForCausalLM under tmp/name; return (dir, torch model)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**TINY_CONFIGS[name], rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make norms and biases non-trivial so their handling is tested
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp / name
    model.save_pretrained(out)
    return out, model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_llama(root, name) for name in TINY_CONFIGS}


@pytest.fixture(scope="session")
def converted(hf_models, tmp_path_factory):
    from convert import from_hf

    root = tmp_path_factory.mktemp("ckpt")
    return {name: from_hf.convert(d, root / name) for name, (d, _) in hf_models.items()}


@pytest.fixture(scope="session")
def default_model_dir():
    from qeft_jax.load import default_model_dir as fetch

    return fetch()


@pytest.fixture(scope="session")
def tiny_with_tokenizer(converted, tmp_path_factory):
    """A tiny converted model plus a word-level tokenizer, and a calibration text file."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("resume")
    model = root / "model"
    shutil.copytree(converted["llama3_rope_bias"], model)
    words = [f"w{i}" for i in range(90)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<eos>"] + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(model)
    rng = np.random.default_rng(0)
    data = root / "calib.txt"
    data.write_text("\n\n".join(" ".join(rng.choice(words, 60)) for _ in range(10)))
    return model, data
