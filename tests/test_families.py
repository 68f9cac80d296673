"""Every supported model family end to end, on tiny random models built and saved by `transformers`.

For each family in FAMILIES a tiny `transformers` model (float32, odd sizes where the family allows,
random weights with enough scale that every tensor matters, norms random around their identity) is
saved with `save_pretrained` and then taken through the whole library:

  1. conversion (convert.hf.convert + load_model): logits vs transformers' PyTorch model;
  2. KV-cache prefill + token-by-token decode vs transformers' full-sequence logits;
  3. convert.hf_export.export of the fp checkpoint, loaded back by transformers;
  4. quantization with every method (rtn, gptq, owq, qeft);
  5. OGR exactness: the reordered, packed QEFT model equals an fp model built from its dequantized
     tensors in the original channel order, and its to_hf export in transformers;
  6. weak-column gradients through the custom backward vs plain autodiff of a dense model;
  7. merging weak-column deltas into the fp checkpoint.
Architectures the decoder cannot represent (other model types, MoE, latent attention,
cross-attention, unknown rope types, partial rotary) are refused with one error, nothing written.

Each family's artifacts (HF dir, fp checkpoint, quantized checkpoints) are built lazily, once per
module, by the `store` fixture. Adding a family = one entry in FAMILIES and one in HF_CONFIGS.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2"]
METHODS = ["rtn", "gptq", "awq", "owq", "qeft"]
BITS, GROUP, K = 4, 32, 4
WINDOW = 5                     # sliding window of the mistral / gemma2 tiny models
SEQ = 17                       # test sequence length (odd, > 3 windows)
PAD_FROM = 11                  # row 1 of the conversion batch is right-padded from here
MAX_POS = 128
CALIB_SHAPE = (8, 32)           # 256 calibration tokens: more than any linear's input width (136)

_COMMON = dict(vocab_size=211, hidden_size=72, intermediate_size=136, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=MAX_POS, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> (transformers class name, config class name, config kwargs). Where a family has an explicit
# head_dim it is 24 (!= 72 / 4 = 18) everywhere: the families then share two sets of linear shapes,
# so the quantizer's compiled functions are reused across families (the suite's time is mostly XLA
# compilation).
HF_CONFIGS = {
    # untied, llama3 rope scaling, head_dim 18 = 72 / 4; biases on every linear (o_proj's and the
    # MLP's lie on the permuted hidden / ffn dims)
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(
        _COMMON, num_hidden_layers=2, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # biases on q/k/v only (transformers' Qwen2 default), large rope_theta, tied
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        _COMMON, num_hidden_layers=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # q_norm / k_norm over an explicit head_dim 24 != 72 / 4
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        _COMMON, num_hidden_layers=2, head_dim=24, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # sliding window 5 << sequence 17, explicit head_dim 24
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(
        _COMMON, num_hidden_layers=2, head_dim=24, sliding_window=WINDOW, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # fused qkv_proj / gate_up_proj in the saved checkpoint
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(
        _COMMON, num_hidden_layers=2, tie_word_embeddings=False, original_max_position_embeddings=MAX_POS,
        sliding_window=7, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # (1 + w) norms, sqrt(hidden) embedding scale, GeGLU (tanh), explicit head_dim 24, tied
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(
        _COMMON, num_hidden_layers=2, head_dim=24, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # + sandwich norms, alternating sliding/full layers, soft-capping that actually bites,
    # query_pre_attn_scalar 20 != head_dim 24
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        _COMMON, num_hidden_layers=3, head_dim=24, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=4.0, final_logit_softcapping=3.0, query_pre_attn_scalar=20,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}
OFFSET_NORMS = {"gemma", "gemma2"}   # norm weights stored as w, applied as (1 + w)
WEIGHT_STD, BIAS_STD, NORM_STD, EMBED_RMS = 0.1, 0.2, 0.2, 0.8


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def assert_close(got, want, tol: float, what: str) -> None:
    """rel_err(got, want) < tol, with a one-line message (no array dumps)."""
    err = rel_err(got, want)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


def make_hf_model(family: str, out: Path, seed: int = 0):
    """A tiny random transformers model of `family`, saved under `out`; returns the (eval) model."""
    import transformers

    model_cls, cfg_cls, kwargs = HF_CONFIGS[family]
    torch.manual_seed(seed)
    # eager: plain softmax attention (what gemma2's soft-capping needs)
    cfg = getattr(transformers, cfg_cls)(**kwargs, attn_implementation="eager")
    model = getattr(transformers, model_cls)(cfg).float().eval()
    # Residual stream of RMS ~0.8 from the embeddings (Gemma's are multiplied by sqrt(hidden)), to
    # which every block adds a comparable amount: each block matters, yet 4-bit noise does not
    # swamp the logits.
    embed_std = EMBED_RMS / (kwargs["hidden_size"] ** 0.5 if family in OFFSET_NORMS else 1.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                centre = 0.0 if family in OFFSET_NORMS else 1.0
                p.copy_(centre + NORM_STD * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * torch.randn_like(p))
            elif name == "model.embed_tokens.weight":
                p.copy_(embed_std * torch.randn_like(p))
            else:
                p.copy_(WEIGHT_STD * torch.randn_like(p))
    model.save_pretrained(out)
    return model


def torch_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(np.asarray(mask))}
        return model(torch.tensor(np.asarray(ids)), **kw).logits.float().numpy()


def batch_ids(vocab: int, seed: int, shape=(2, SEQ)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


def fp_model_from(tensors, cfg):
    """An fp CausalLM filled from named tensors (public pieces: checkpoint.build_model + model.place_tensors)."""
    from qeft_jax.checkpoint import build_model
    from qeft_jax.model import place_tensors

    model = build_model(cfg, None)
    place_tensors(model, tensors, source="dense tensors")
    return model


class Store:
    """Per-family artifacts, built on first use and kept for the module."""

    def __init__(self, root: Path):
        self.root = root
        self._hf: dict = {}
        self._fp: dict = {}
        self._q: dict = {}

    def hf(self, family: str):
        """(HF directory, transformers model)."""
        if family not in self._hf:
            d = self.root / family / "hf"
            self._hf[family] = (d, make_hf_model(family, d))
        return self._hf[family]

    def fp(self, family: str) -> Path:
        """Our fp checkpoint converted from the HF directory."""
        if family not in self._fp:
            from convert.hf import convert

            hf_dir, _ = self.hf(family)
            self._fp[family] = convert(hf_dir, self.root / family / "fp")
        return self._fp[family]

    def vocab(self, family: str) -> int:
        return HF_CONFIGS[family][2]["vocab_size"]

    def quantized(self, family: str, method: str) -> Path:
        if (family, method) not in self._q:
            from qeft_jax.quant.pipeline import quantize_checkpoint
            from qeft_jax.recipes import make_recipe

            src = self.fp(family)
            out = self.root / family / f"q_{method}"
            calib = batch_ids(self.vocab(family), 100, CALIB_SHAPE)
            k = 0 if method in ("rtn", "gptq", "awq") else K
            quantize_checkpoint(src, out, make_recipe(method, bits=BITS, group_size=GROUP, k=k), calib,
                                progress=False)
            self._q[(family, method)] = out
        return self._q[(family, method)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("families"))


# ------------------------------------------------------------------------------------ 1. conversion
@pytest.mark.parametrize("family", FAMILIES)
def test_families_conversion_logits_match_transformers(family, store):
    from qeft_jax import load_model

    _, tmodel = store.hf(family)
    model, tok, cfg = load_model(store.fp(family))
    assert cfg.model_type == family and tok is None
    ids = batch_ids(cfg.vocab_size, 1)
    mask = np.ones_like(ids)
    mask[1, PAD_FROM:] = 0    # right padding in row 1
    ref = torch_logits(tmodel, ids, mask)
    out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert_close(out[0], ref[0], 1e-4, f"{family} logits vs transformers, row 0")
    assert_close(out[1, :PAD_FROM], ref[1, :PAD_FROM], 1e-4, f"{family} logits vs transformers, padded row 1")


# ------------------------------------------------------------------------------- 2. KV-cache decode
@pytest.mark.parametrize("family", FAMILIES)
def test_families_kv_cache_decode_matches_transformers(family, store):
    from flax import nnx

    from qeft_jax import load_model
    from qeft_jax.model import init_cache

    _, tmodel = store.hf(family)
    model, _, cfg = load_model(store.fp(family))
    ids = batch_ids(cfg.vocab_size, 2)
    ref = torch_logits(tmodel, ids)
    prefix, slots = 6, SEQ + 3
    assert SEQ - prefix > WINDOW    # the decoded part alone is longer than the sliding window
    cache = init_cache(cfg, 2, slots, jnp.float32)
    mask = jnp.zeros((2, slots), jnp.int32).at[:, :SEQ].set(1)
    x = jnp.asarray(ids)
    # jitted (one compile for the prefill, one for every decode step) as generation runs it
    forward = nnx.jit(lambda m, ids, mask, cache, index: m.forward(ids, attention_mask=mask, cache=cache,
                                                                    cache_index=index))
    logits, cache = forward(model, x[:, :prefix], mask, cache, jnp.int32(0))
    steps = [logits]
    for t in range(prefix, SEQ):
        lg, cache = forward(model, x[:, t:t + 1], mask, cache, jnp.int32(t))
        steps.append(lg)
    assert_close(jnp.concatenate(steps, axis=1), ref, 1e-4, f"{family} KV-cache decode vs transformers")


# ---------------------------------------------------------------------------------- 3. fp to_hf
def load_in_transformers(path: Path):
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, attn_implementation="eager", dtype=torch.float32)
    missing = [k for k in info["missing_keys"] if k != "lm_head.weight"]
    assert not missing and not info["unexpected_keys"] and not info.get("mismatched_keys"), info
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_families_fp_export_loads_in_transformers(family, store, tmp_path):
    from convert.hf_export import export

    hf_dir, tmodel = store.hf(family)
    out = export(store.fp(family), tmp_path / "hf")
    back = load_in_transformers(out)
    assert type(back).__name__ == HF_CONFIGS[family][0]
    exported_cfg = json.loads((out / "config.json").read_text())
    assert exported_cfg["model_type"] == family
    ids = batch_ids(store.vocab(family), 3)
    assert_close(torch_logits(back, ids), torch_logits(tmodel, ids), 1e-5, f"{family} to_hf export vs original")


# --------------------------------------------------------------------------------- 4. quantization
# CI runs qeft on every family and every method on llama (AWQ's folding into Gemma's (1+w) norms
# has its own exact test in test_quant.py); QEFT_TEST_FULL=1 runs the whole family x method grid
# (all green when last run in full).
QUANT_GRID = [(f, m) for f in FAMILIES for m in METHODS
              if os.environ.get("QEFT_TEST_FULL") == "1" or m == "qeft" or f == "llama"]


@pytest.mark.parametrize("family,method", QUANT_GRID)
def test_families_quantize_every_method(family, method, store):
    from qeft_jax import load_model
    from qeft_jax.checkpoint import read_info

    qdir = store.quantized(family, method)
    info = read_info(qdir)
    assert info.quantized and info.recipe.method == method and info.config.model_type == family
    qmodel, _, cfg = load_model(qdir)
    fmodel, _, _ = load_model(store.fp(family))
    ids = jnp.asarray(batch_ids(cfg.vocab_size, 4))
    q, f = np.asarray(qmodel(ids)), np.asarray(fmodel(ids))
    assert np.all(np.isfinite(q))
    err = rel_err(q, f)
    assert 0 < err < 0.5, f"{family} {method}: quantized vs fp logits, relative error {err:.3g}"  # a sanity bound


# ------------------------------------------------------------------------------- 5. OGR exactness
@pytest.mark.parametrize("family", FAMILIES)
def test_families_ogr_reordered_equals_dense_and_to_hf(family, store, tmp_path):
    from convert.hf_export import export
    from qeft_jax import load_model
    from qeft_jax.checkpoint import dense_tensors, read_info, read_tensors

    qdir = store.quantized(family, "qeft")
    info = read_info(qdir)
    raw = read_tensors(info)
    hidden_perm = np.asarray(raw["qeft.hidden_perm"])
    assert not np.array_equal(hidden_perm, np.arange(len(hidden_perm)))   # OGR did reorder
    qmodel, _, cfg = load_model(qdir)
    ids = jnp.asarray(batch_ids(cfg.vocab_size, 5))
    q = np.asarray(qmodel(ids))
    dense = fp_model_from(dense_tensors(info), cfg)    # original channel order, no packing
    assert_close(np.asarray(dense(ids)), q, 1e-4, f"{family} dense un-reordered model vs quantized QEFT model")
    # and through transformers
    back = load_in_transformers(export(qdir, tmp_path / "hf"))
    assert_close(torch_logits(back, np.asarray(ids)), q, 1e-4,
                 f"{family} quantized to_hf in transformers vs quantized model")


# ------------------------------------------------------------------- 6. weak-column gradients
@pytest.mark.parametrize("family", FAMILIES)
def test_families_weak_column_gradients_match_dense_autodiff(family, store):
    """d(next-token loss)/d(weak columns) through the custom backward of the quantized model equals
    plain autodiff of the same loss through a dense fp model (dequantized weights, original channel
    order) at the weak columns' original positions."""
    from flax import nnx

    from qeft_jax import load_model
    from qeft_jax.checkpoint import dense_tensors, layer_perms, read_info, read_tensors
    from qeft_jax.model import dotted
    from qeft_jax.spec import LINEAR_NAMES, layer_prefix, linear_axis_perms
    from train.trainer import TrainConfig, make_optimizer, make_step_fns, split_trainable

    qdir = store.quantized(family, "qeft")
    info = read_info(qdir)
    raw = read_tensors(info)
    qmodel, _, cfg = load_model(qdir)
    tokens = batch_ids(cfg.vocab_size, 6, (2, 16))    # longer than the sliding window
    weights = np.ones(tokens.shape, np.float32)

    # the training path: trainable = WeakColumns only, loss through the custom_vjp op
    graphdef, trainable, frozen = split_trainable(qmodel, "qeft")
    _, loss_sums = make_step_fns(graphdef, make_optimizer(1e-3, TrainConfig(model="", out=""))[0], False)
    (loss, n), grads = jax.jit(jax.value_and_grad(loss_sums, has_aux=True))(
        trainable, frozen, jnp.asarray(tokens), jnp.asarray(weights))
    got = {dotted(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    assert sorted(got) == sorted(layer_prefix(i) + name + ".weak" for i in range(cfg.num_hidden_layers)
                                 for name in LINEAR_NAMES)

    # the reference: plain autodiff through a dense fp model
    dense = fp_model_from(dense_tensors(info), cfg)
    gd, params, rest = nnx.split(dense, nnx.Param, ...)

    def ref_loss(params):
        logits = nnx.merge(gd, params, rest)(jnp.asarray(tokens)).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1))

    ref_value, ref_grads = jax.jit(jax.value_and_grad(ref_loss))(params)
    ref = {dotted(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(ref_grads)}
    assert float(n) == tokens.shape[0] * (tokens.shape[1] - 1)
    assert float(loss) == pytest.approx(float(ref_value), rel=1e-5)
    for i in range(cfg.num_hidden_layers):
        perms = layer_perms(raw, i)
        for name in LINEAR_NAMES:
            p = layer_prefix(i) + name
            rows, cols = linear_axis_perms(name, perms, cfg)
            weak_orig = cols[np.asarray(raw[p + ".weak_idx"], np.int64)]
            want = ref[p + ".weight"][np.ix_(rows, weak_orig)]
            assert np.abs(want).max() > 0, p
            assert_close(got[p + ".weak"], want, 1e-4, f"{family} {p}.weak gradient")


# --------------------------------------------------------------------------------------- 7. merge
@pytest.mark.parametrize("family", FAMILIES)
def test_families_merge_adds_weak_deltas_in_original_order(family, store, tmp_path):
    from qeft_jax.checkpoint import layer_perms, read_info, read_tensors, tokenizer_files, write_quantized
    from qeft_jax.io import atomic_dir
    from qeft_jax.spec import LINEAR_NAMES, layer_prefix, linear_axis_perms
    from train.merge import merge

    base, fp = store.quantized(family, "qeft"), store.fp(family)
    info = read_info(base)
    cfg = info.config
    bq = read_tensors(info)
    tq = dict(bq)
    rng = np.random.default_rng(7)
    for i in range(cfg.num_hidden_layers):
        for name in LINEAR_NAMES:
            k = layer_prefix(i) + name + ".weak"
            w = bq[k].astype(np.float32) + rng.normal(0, 0.05, bq[k].shape).astype(np.float32)
            tq[k] = w.astype(bq[k].dtype)
    tuned = tmp_path / "tuned"
    with atomic_dir(tuned) as tmp:
        write_quantized(tmp, cfg, tq, info.derived_meta(), tokenizer_files(base))

    out = tmp_path / "merged_fp"
    merge(tuned, base, fp, out)
    before, after = read_tensors(read_info(fp)), read_tensors(read_info(out))
    assert before.keys() == after.keys()
    linears = {layer_prefix(i) + name + ".weight": (i, name)
               for i in range(cfg.num_hidden_layers) for name in LINEAR_NAMES}
    for key in before:
        if key not in linears:
            assert np.array_equal(before[key], after[key]), key   # norms, biases, embeddings untouched
            continue
        i, name = linears[key]
        p = layer_prefix(i) + name
        rows, cols = linear_axis_perms(name, layer_perms(bq, i), cfg)
        weak_orig = cols[np.asarray(bq[p + ".weak_idx"], np.int64)]
        diff = after[key].astype(np.float64) - before[key].astype(np.float64)
        delta = tq[p + ".weak"].astype(np.float64) - bq[p + ".weak"].astype(np.float64)
        outside = np.ones(diff.shape, bool)
        outside[:, weak_orig] = False
        assert not np.any(diff[outside]), f"{key}: a non-weak column moved"
        expect = np.zeros_like(diff)
        expect[np.ix_(rows, weak_orig)] = delta
        np.testing.assert_allclose(diff, expect, atol=1e-6, rtol=1e-5, err_msg=key)
        assert np.count_nonzero(diff) > 0.9 * delta.size, key

    # merging into the base itself reproduces the tuned checkpoint bit for bit
    again = tmp_path / "merged_q"
    merge(tuned, base, base, again)
    assert (again / "model.safetensors").read_bytes() == (tuned / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------- unsupported configs
_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32,
              intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64, hidden_act="silu")
UNSUPPORTED = {
    # name: (config.json, what the error must name)
    "mixtral": (dict(_LLAMA, model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4,
                     num_experts_per_tok=2), "mixtral"),
    "deepseek_v3": (dict(_LLAMA, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
                         kv_lora_rank=16, q_lora_rank=24, n_routed_experts=4), "deepseek_v3"),
    "llama_moe": (dict(_LLAMA, num_local_experts=4), "mixture-of-experts"),
    "llama_mla": (dict(_LLAMA, kv_lora_rank=16), "latent attention"),
    "llama_cross_attention": (dict(_LLAMA, cross_attention_layers=[0]), "cross-attention"),
    "llama_yarn": (dict(_LLAMA, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 32}), "yarn"),
    "llama_yarn_rope_parameters": (dict(_LLAMA, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                 "rope_theta": 10000.0}), "yarn"),
    "phi3_longrope": (dict(_LLAMA, model_type="phi3", architectures=["Phi3ForCausalLM"],
                           rope_scaling={"type": "longrope", "long_factor": [1.0] * 4,
                                         "short_factor": [1.0] * 4}), "longrope"),
    "phi3_partial_rotary": (dict(_LLAMA, model_type="phi3", architectures=["Phi3ForCausalLM"],
                                 partial_rotary_factor=0.5), "partial"),
}


_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# the same, as transformers' own config classes write them (transformers 5: rope_parameters)
UNSUPPORTED_HF = {
    "hf_mixtral": ("MixtralConfig", dict(_SMALL, num_local_experts=4), "mixtral"),
    "hf_qwen2_moe": ("Qwen2MoeConfig", dict(_SMALL, num_experts=4), "qwen2_moe"),
    "hf_deepseek_v3": ("DeepseekV3Config", dict(_SMALL, n_routed_experts=4, kv_lora_rank=16, q_lora_rank=24),
                       "deepseek_v3"),
    "hf_llama_yarn": ("LlamaConfig", dict(_SMALL, max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}), "yarn"),
    "hf_phi3_longrope": ("Phi3Config", dict(_SMALL, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 4, "short_factor": [1.0] * 4,
        "original_max_position_embeddings": 32}), "longrope"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED) + sorted(UNSUPPORTED_HF))
def test_families_unsupported_architecture_refused_before_writing(name, tmp_path):
    from safetensors.numpy import save_file

    from convert.hf import convert

    src = tmp_path / "src"
    src.mkdir()
    if name in UNSUPPORTED:
        config, what = UNSUPPORTED[name]
        (src / "config.json").write_text(json.dumps(config))
    else:
        import transformers

        cls, kwargs, what = UNSUPPORTED_HF[name]
        getattr(transformers, cls)(**kwargs).save_pretrained(src)
    save_file({"model.embed_tokens.weight": np.zeros((64, 32), np.float32)}, str(src / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(ValueError) as exc:
        convert(src, out)
    msg = str(exc.value)
    assert what.lower() in msg.lower(), msg
    assert "\n" not in msg.strip() and "Traceback" not in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]   # no temp directory left behind
