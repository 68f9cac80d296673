"""The GGUF path against transformers' own GGUF loader: the embedded default model, and tiny random
models of every llama.cpp architecture we read, written as llama.cpp's convert script writes them."""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.default_model import default_gguf_path
from qeft_jax import load_model
from qeft_jax.io import CheckpointError

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n <", "Water boils at a temperature of"]
TOKENIZER_TEXTS = PROMPTS + ["In 1969, 3 astronauts flew 384,400 km!", "  leading spaces\tand tabs\n\n",
                             "émigré naïve café — “quotes” 中文 🙂", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def default_model(default_model_dir):
    return load_model(default_model_dir)


@pytest.mark.skipif(os.environ.get("QEFT_TEST_FULL") != "1",
                    reason="~25 s (transformers dequantizes the 135M model in Python); every family's GGUF "
                           "conversion is checked against the same loader on tiny files: QEFT_TEST_FULL=1 runs it")
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


# ---------------------------------------------------------------- every llama.cpp architecture we read
GGUF_SEQ, GGUF_WINDOW = 11, 5          # test sequence length > gemma2's sliding window
_TINY = dict(vocab_size=67, hidden_size=40, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
# family -> (llama.cpp architecture, transformers class, config kwargs, the config keys transformers'
# legacy GGUF loader does not read from the file: passed to from_pretrained, so the check there is
# of the tensor conventions). Explicit head_dims (12 != 40 / 4) come from `attention.key_length`.
# The tokenizer section is sentencepiece where llama.cpp writes one for the family, else byte-level.
GGUF_FAMILIES = {
    # q/k biases: llama.cpp permutes them with the weights; transformers infers no attention_bias
    "llama": ("llama", "LlamaForCausalLM", dict(_TINY, tie_word_embeddings=False, attention_bias=True,
                                                rope_theta=500.0), {"attention_bias": True}),
    # llama.cpp writes Mistral as arch llama (no sliding window there: recent Mistrals have none)
    "mistral": ("llama", "MistralForCausalLM", dict(_TINY, head_dim=12, sliding_window=None,
                                                    tie_word_embeddings=False), {}),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", dict(_TINY, tie_word_embeddings=True, rope_theta=1e6), {}),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", dict(_TINY, head_dim=12, tie_word_embeddings=False, rope_theta=1e6),
              {"head_dim": 12}),
    "gemma": ("gemma", "GemmaForCausalLM", dict(_TINY, head_dim=12, hidden_act="gelu_pytorch_tanh"), {}),
    # soft-capping that bites; query_pre_attn_scalar = head_dim, what llama.cpp assumes below 27B
    "gemma2": ("gemma2", "Gemma2ForCausalLM", dict(
        _TINY, num_hidden_layers=3, head_dim=12, query_pre_attn_scalar=12, sliding_window=GGUF_WINDOW,
        attn_logit_softcapping=4.0, final_logit_softcapping=3.0),
        {"query_pre_attn_scalar": 12, "attn_logit_softcapping": 4.0, "final_logit_softcapping": 3.0}),
    # fused qkv_proj / gate_up_proj, kept fused by llama.cpp
    "phi3": ("phi3", "Phi3ForCausalLM", dict(_TINY, original_max_position_embeddings=64, sliding_window=None,
                                             tie_word_embeddings=False), {}),
}
SENTENCEPIECE = {"mistral", "gemma", "gemma2", "phi3"}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tiny_hf_model(family: str):
    """A random float32 transformers model: weights std 0.1, norms random around their identity."""
    import transformers

    arch, cls, kwargs, _ = GGUF_FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cls.replace("ForCausalLM", "Config"))(**kwargs))
    model.config._attn_implementation = "eager"
    centre = 0.0 if arch.startswith("gemma") else 1.0      # Gemma's norms apply 1 + w
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((centre + 0.2 * torch.randn_like(p)) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model.float().eval()


def write_llama_cpp_gguf(path, arch: str, model, tokenizer: str = "gpt2") -> None:
    """`model` as llama.cpp's convert_hf_to_gguf.py writes it (F32): its metadata keys per architecture,
    its tensor names (the gguf package's table), q/k rows permuted for `llama` (LlamaModel.permute),
    Gemma norms + 1, no lm_head when tied; a minimal tokenizer section, byte-level BPE ("gpt2") or
    sentencepiece ("llama")."""
    import gguf

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if not arch.startswith("gemma"):                       # GemmaModel / Gemma2Model write no rope base
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if arch != "phi3" and getattr(c, "head_dim", None):    # TextModel: when config.json has head_dim
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(head_dim)
    elif arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
    elif arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        w.add_rope_dimension_count(head_dim)
        w.add_sliding_window(c.sliding_window or 0)
    special = ["<pad>", "<bos>", "<eos>"]      # the tiny configs' pad / bos / eos ids
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(special + [("\u2581" if tokenizer == "llama" else "") + f"t{i}"
                                for i in range(len(special), c.vocab_size)])
    w.add_token_types([3] * len(special) + [1] * (c.vocab_size - len(special)))   # 3: control
    if tokenizer == "llama":
        w.add_token_scores([0.0] * len(special) + [-float(i) for i in range(c.vocab_size - len(special))])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    table = gguf.get_tensor_name_map({n: a for a, n in gguf.MODEL_ARCH_NAMES.items()}[arch], c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.numpy().astype(np.float32)
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(name.split(".")[-2])
        if arch == "llama" and heads:
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            a = a + 1.0
        base, suffix = name.rsplit(".", 1)
        w.add_tensor(f"{table.get_name(base)}.{suffix}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_family(tmp_path_factory):
    """family -> (GGUF file, token ids, the original model's logits), built once per family."""
    root, cache = tmp_path_factory.mktemp("gguf_families"), {}
    ids = np.random.default_rng(0).integers(3, _TINY["vocab_size"], (2, GGUF_SEQ))

    def build(family: str):
        if family not in cache:
            model = tiny_hf_model(family)
            with torch.no_grad():
                ref = model(torch.tensor(ids)).logits.numpy()
            path = root / f"{family}.gguf"
            write_llama_cpp_gguf(path, GGUF_FAMILIES[family][0], model,
                                 "llama" if family in SENTENCEPIECE else "gpt2")
            cache[family] = path, ids, ref
        return cache[family]

    return build


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_test_file_loads_in_transformers(family, gguf_family):
    """The test files follow the conventions transformers' GGUF loader expects (the independent reference)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch, _, _, unread = GGUF_FAMILIES[family]
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        pytest.skip(f"transformers' GGUF loader does not read architecture {arch!r}")
    path, ids, ref = gguf_family(family)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                              attn_implementation="eager", **unread)
    with torch.no_grad():
        assert rel_err(hf(torch.tensor(ids)).logits.numpy(), ref) < 1e-4


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_converts_every_family(family, gguf_family, tmp_path):
    from convert.gguf_file import convert

    path, ids, ref = gguf_family(family)
    model, tok, cfg = load_model(convert(path, tmp_path / "ckpt"))
    assert cfg.model_type == GGUF_FAMILIES[family][0]
    assert (tok.bos_token, tok.eos_token, cfg.bos_token_id, cfg.eos_token_id) == ("<bos>", "<eos>", 1, (2,))
    assert rel_err(model(jnp.asarray(ids)), ref) < 1e-4


def write_metadata_gguf(path, arch: str, layers: int = 2, tensors: dict | None = None, **keys) -> None:
    """A GGUF with a config's metadata, `tensors` and a token embedding; `keys`: extra {arch}.KEY uint32s."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_embedding_length(48)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(16)
    for k, v in keys.items():
        w.add_uint32(f"{arch}.{k}", v)
    for name, t in {**(tensors or {}), "token_embd.weight": np.zeros((32, 48), np.float32)}.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_unsupported_architectures_give_clear_errors(tmp_path):
    from convert.gguf_file import convert
    from qeft_jax.config import ConfigError

    write_metadata_gguf(tmp_path / "falcon.gguf", "falcon")
    with pytest.raises(CheckpointError, match=r"architecture 'falcon' is not supported; supported: llama, qwen2, "
                                              r"qwen3, gemma, gemma2, phi3"):
        convert(tmp_path / "falcon.gguf", tmp_path / "out")
    write_metadata_gguf(tmp_path / "mixtral.gguf", "llama", expert_count=8)   # llama.cpp writes Mixtral as llama
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        convert(tmp_path / "mixtral.gguf", tmp_path / "out")
    factors = np.linspace(1.0, 8.0, 8, dtype=np.float32)   # what LlamaModel writes for llama3 rope scaling
    write_metadata_gguf(tmp_path / "llama31.gguf", "llama", tensors={"rope_freqs.weight": factors})
    with pytest.raises(CheckpointError, match="rope_freqs.weight' holds llama3 rope scaling"):
        convert(tmp_path / "llama31.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_gemma2_config_follows_llama_cpp(tmp_path):
    """llama.cpp's Gemma 2 defaults: soft-caps 50 / 30, window 4096, and an attention scale of
    head_dim^-1/2 except on the 46-layer 27B, where it is (hidden / heads)^-1/2."""
    import gguf

    from convert.gguf_file import gguf_config

    for layers, scalar in ((4, 16), (46, 48 // 4)):
        write_metadata_gguf(tmp_path / f"g{layers}.gguf", "gemma2", layers=layers)
        cfg = gguf_config(gguf.GGUFReader(str(tmp_path / f"g{layers}.gguf")))
        assert (cfg.query_pre_attn_scalar, cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.sliding_window,
                cfg.norm_offset) == (scalar, 50.0, 30.0, 4096, 1.0)
