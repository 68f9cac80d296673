"""The Flax Llama port against transformers' PyTorch model (logits within 1e-4 relative)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qeft_jax import load_model
from qeft_jax.model import init_cache
from tests.conftest import TINY_CONFIGS


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_torch(name, hf_models, converted):
    _, tmodel = hf_models[name]
    model, tok, cfg = load_model(converted[name])
    assert tok is None
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (2, 37))
    mask = np.ones_like(ids)
    mask[1, 30:] = 0  # right padding in row 1
    with torch.no_grad():
        ref = tmodel(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert out.shape == ref.shape
    # padded positions are undefined; compare the real ones
    assert rel_err(out[0], ref[0]) < 1e-4
    assert rel_err(out[1, :30], ref[1, :30]) < 1e-4


@pytest.mark.parametrize("name", ["gqa_untied", "llama3_rope_bias"])
def test_kv_cache_matches_full_forward(name, converted):
    """Prefill a prefix into the cache, then decode token by token: same logits as one full pass."""
    model, _, cfg = load_model(converted[name])
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)))
    full = model(ids)
    cache = init_cache(cfg, 2, 16, jnp.float32)
    mask = jnp.zeros((2, 16), jnp.int32).at[:, :12].set(1)
    logits, cache = model.forward(ids[:, :8], attention_mask=mask, cache=cache, cache_index=0)
    steps = [logits]
    for t in range(8, 12):
        lg, cache = model.forward(ids[:, t:t + 1], attention_mask=mask, cache=cache, cache_index=t)
        steps.append(lg)
    assert rel_err(jnp.concatenate(steps, axis=1), full) < 1e-5


def test_to_hf_round_trip_exact(converted, tmp_path):
    from safetensors.numpy import load_file

    from convert import to_hf

    src = converted["gqa_untied"]
    out = to_hf.export(src, tmp_path / "hf")
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    ours, _, _ = load_model(src)
    with torch.no_grad():
        ref = m(ids).logits.numpy()
    assert rel_err(ours(jnp.asarray(ids.numpy())), ref) < 1e-4


def test_rope_parameters_and_legacy_keys_agree():
    from qeft_jax.config import ModelConfig

    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    legacy = ModelConfig.from_hf_dict(base | {"rope_theta": 5e5, "rope_scaling": scaling})
    new = ModelConfig.from_hf_dict(base | {"rope_parameters": scaling | {"rope_theta": 5e5}})
    assert legacy == new
    assert legacy.rope_scaling.rope_type == "llama3" and legacy.rope_theta == 5e5


def test_bin_checkpoint_converts_through_weights_only_load(hf_models, tmp_path):
    """A legacy pytorch_model.bin goes through torch.load(weights_only=True) and matches torch."""
    from convert import from_hf

    _, tmodel = hf_models["gqa_untied"]
    src = tmp_path / "bin"
    src.mkdir()
    tmodel.config.to_json_file(src / "config.json")
    torch.save(tmodel.state_dict(), src / "pytorch_model.bin")  # transformers 5 writes only safetensors
    model, _, _ = load_model(from_hf.convert(src, tmp_path / "ck"))
    ids = np.random.default_rng(2).integers(0, 101, (1, 9))
    with torch.no_grad():
        ref = tmodel(torch.tensor(ids)).logits.numpy()
    assert rel_err(model(jnp.asarray(ids)), ref) < 1e-4


@pytest.mark.parametrize("method", ["qeft"])
def test_quantized_to_hf_matches_quantized_model(method, converted, tmp_path):
    """Export of a quantized checkpoint: fp tensors with the weak columns restored and the original
    channel order, loadable by transformers, with the quantized model's logits."""
    import transformers

    from convert import to_hf
    from qeft_jax.quant.pipeline import quantize_checkpoint
    from qeft_jax.recipes import make_recipe

    src = converted["llama3_rope_bias"]
    calib = np.random.default_rng(0).integers(0, 97, (4, 16))
    quantize_checkpoint(src, tmp_path / "q", make_recipe(method, bits=3, group_size=16, k=3), calib,
                            progress=False)
    qdir = tmp_path / "q"
    qmodel, _, _ = load_model(qdir)
    hf_dir = to_hf.export(qdir, tmp_path / "hf", dtype="float32")
    tmodel = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = np.random.default_rng(3).integers(0, 97, (2, 11))
    with torch.no_grad():
        ref = tmodel(torch.tensor(ids)).logits.numpy()
    assert rel_err(qmodel(jnp.asarray(ids)), ref) < 1e-4
