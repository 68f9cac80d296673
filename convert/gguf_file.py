"""A GGUF file -> our fp checkpoint (weights dequantized, tokenizer carried over).

The CLI is `python -m convert.from_gguf FILE.gguf OUT_DIR`.

Reads llama.cpp's architectures `llama` (Llama, and Mistral, which llama.cpp writes as llama),
`qwen2`, `qwen3`, `gemma`, `gemma2` and `phi3` (llama.cpp's names are our `model_type`s), with
every tensor type the `gguf` package can dequantize (F32/F16/BF16, Q4_0/Q4_1/Q8_0, K-quants, ...).
The file is turned back into the Hugging Face checkpoint llama.cpp's `convert_hf_to_gguf.py` read,
undoing what that script changes:
  - the config is `{arch}.*` metadata; what it leaves out takes llama.cpp's defaults;
  - tensor names: the gguf package's HF -> GGUF table (the one the script uses), inverted;
  - `llama` only: q/k rows (weights and biases) permuted per head for llama.cpp's interleaved
    rope. Qwen, Gemma and Phi-3 use NEOX-style rope and are stored unpermuted;
  - Gemma / Gemma 2: RMSNorm weights stored as 1 + w (llama.cpp applies w, HF applies 1 + w);
  - Phi-3: q/k/v and gate/up stay fused as in HF, split by `families.tensors_from_hf`.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from qeft_jax import families
from qeft_jax.checkpoint import converted_lazily, expected_tensors, write_fp
from qeft_jax.config import ModelConfig
from qeft_jax.io import CheckpointError, LazyArray, atomic_dir
from qeft_jax.tokenization import import_transformers

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
OFFSET_NORM_ARCHS = ("gemma", "gemma2")   # norms stored as 1 + w
_ARCH_ENUM = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
_ROPE_TENSORS = {"rope_freqs.weight": "llama3 rope scaling (per-frequency factors)",
                 "rope_factors_long.weight": "longrope scaling", "rope_factors_short.weight": "longrope scaling"}
K = gguf.Keys


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader: Any) -> ModelConfig:
    """The file's metadata as a Hugging Face config dict, read by the family like any config.json."""
    arch = _field(reader, K.General.ARCHITECTURE)
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ARCHS)}")

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, name.format(arch=arch), default)

    heads = int(key(K.Attention.HEAD_COUNT))
    hidden = int(key(K.LLM.EMBEDDING_LENGTH))
    layers = int(key(K.LLM.BLOCK_COUNT))
    head_dim = int(key(K.Attention.KEY_LENGTH) or hidden // heads)
    if int(key(K.Rope.DIMENSION_COUNT, head_dim)) != head_dim:
        raise CheckpointError(f"GGUF rope.dimension_count {key(K.Rope.DIMENSION_COUNT)} != head_dim "
                              f"{head_dim}: partial rotary embeddings are not supported")
    rope = None
    scaling_type = key(K.Rope.SCALING_TYPE)
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise CheckpointError(f"GGUF rope scaling type {scaling_type!r} is not supported")
        rope = {"rope_type": "linear", "factor": float(key(K.Rope.SCALING_FACTOR))}
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError("the GGUF file has no token_embd.weight tensor")
    eos = _field(reader, K.Tokenizer.EOS_ID)
    d: dict[str, Any] = {
        "model_type": arch, "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "hidden_size": hidden, "intermediate_size": int(key(K.LLM.FEED_FORWARD_LENGTH)),
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": int(key(K.Attention.HEAD_COUNT_KV, heads)), "head_dim": head_dim,
        "rms_norm_eps": float(key(K.Attention.LAYERNORM_RMS_EPS, 1e-5)),
        "rope_theta": float(key(K.Rope.FREQ_BASE, 10000.0)), "rope_scaling": rope,
        "max_position_embeddings": int(key(K.LLM.CONTEXT_LENGTH, 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors,
        "mlp_bias": "blk.0.ffn_down.bias" in tensors,
        "num_local_experts": key(K.LLM.EXPERT_COUNT),   # the config refuses mixture-of-experts
        "bos_token_id": _field(reader, K.Tokenizer.BOS_ID),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": _field(reader, K.Tokenizer.PAD_ID),
    }
    if arch == "gemma2":
        # llama.cpp's defaults where a key is absent. No key gives the attention scale: llama.cpp
        # uses head_dim^-1/2, except on the 46-layer 27B, where it is (hidden / heads)^-1/2.
        d.update(
            sliding_window=int(key(K.Attention.SLIDING_WINDOW, 4096)),
            attn_logit_softcapping=float(key(K.LLM.ATTN_LOGIT_SOFTCAPPING, 50.0)),
            final_logit_softcapping=float(key(K.LLM.FINAL_LOGIT_SOFTCAPPING, 30.0)),
            query_pre_attn_scalar=hidden // heads if layers == 46 else head_dim)
    elif arch == "phi3":   # window 0 = none (Phi-4); else applied as in HF (llama.cpp ignores it)
        d.update(sliding_window=int(key(K.Attention.SLIDING_WINDOW, 0)) or None,
                 original_max_position_embeddings=int(key(K.Rope.SCALING_ORIG_CTX_LEN,
                                                          d["max_position_embeddings"])))
    return ModelConfig.from_hf_dict(d)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's llama permutation of q/k rows (weights or biases): per head, rows
    (half, pair) -> (pair, half)."""
    return w.reshape(n_head, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """GGUF tensor name -> the Hugging Face name llama.cpp's convert script read it from: the gguf
    package's HF -> GGUF table inverted over our spec's names, then over the family's own checkpoint
    names, which win (Phi-3: llama.cpp's `ffn_up` is the fused gate_up_proj)."""
    table = gguf.get_tensor_name_map(_ARCH_ENUM[cfg.model_type], cfg.num_hidden_layers)
    ours = list(expected_tensors(cfg))
    # only the names matter: empty placeholders through the family's renaming / fusing
    theirs = families.tensors_to_hf(cfg.model_type, dict.fromkeys(ours, np.empty(0, np.float32)), cfg)
    out: dict[str, str] = {}
    for hf in [*ours, *theirs]:
        base, suffix = hf.rsplit(".", 1)
        if (name := table.get_name(base)) is not None:
            out[f"{name}.{suffix}"] = hf
    return out


def gguf_tensors(reader: Any, cfg: ModelConfig, source: str) -> dict[str, LazyArray]:
    """The tensors under the names `qeft_jax.spec` gives them, each dequantized to float32 with
    llama.cpp's changes undone only when it is written (`checkpoint.converted_lazily`): one tensor
    at a time, never the whole model in float32."""
    arch, names = cfg.model_type, hf_names(cfg)
    sources: dict[str, LazyArray] = {}
    for t in reader.tensors:
        name = names.get(t.name)
        if name is None:
            if t.name not in _ROPE_TENSORS:
                raise CheckpointError(f"unexpected GGUF tensor '{t.name}' for a {arch} model")
            if t.name == "rope_freqs.weight" and np.all(dequantize(t.data, t.tensor_type) == 1):
                continue  # llama3 factors that scale nothing
            raise CheckpointError(f"GGUF tensor '{t.name}' holds {_ROPE_TENSORS[t.name]}, which is not "
                                  f"supported (convert from the Hugging Face checkpoint instead)")
        shape = tuple(reversed([int(x) for x in t.shape]))
        sources[name] = LazyArray(shape, np.dtype(np.float32), partial(_dequantized, t, name, shape, cfg))
    return converted_lazily(sources, cfg, source=source)


def _dequantized(t: Any, name: str, shape: tuple[int, ...], cfg: ModelConfig) -> np.ndarray:
    """One GGUF tensor as the float32 Hugging Face tensor it was made from."""
    arch = cfg.model_type
    try:
        arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"GGUF tensor '{t.name}' has type {t.tensor_type.name}, which the "
                              f"gguf package cannot dequantize") from None
    arr = np.asarray(arr, np.float32).reshape(shape)
    if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
        arr = unpermute_qk(arr, cfg.num_attention_heads)
    elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
        arr = unpermute_qk(arr, cfg.num_key_value_heads)
    elif arch in OFFSET_NORM_ARCHS and name.endswith("norm.weight"):
        arr = arr - 1.0
    return arr


def byte_level_tokenizer(reader: Any) -> Any:
    """A GGUF 'gpt2' (byte-level BPE) vocabulary as a Hugging Face fast tokenizer, built with the
    `tokenizers` library directly (transformers' GGUF reader needs torch; this path must not).
    transformers comes through `import_transformers` (a slow import, its torch-free banner quiet)."""
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # llama.cpp token type 3 = control: special tokens, never split and skipped when decoding
    tok.add_special_tokens([tokens[i] for i, t in enumerate(types) if int(t) == 3])

    def special(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[int(idx)]

    return import_transformers().PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special("bos"), eos_token=special("eos"),
        unk_token=special("unknown"), pad_token=special("padding"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)))


def export_tokenizer(reader: Any, gguf_path: Path, out: Path) -> None:
    """Carry the GGUF's tokenizer over as Hugging Face tokenizer files."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind == "gpt2":
        tok = byte_level_tokenizer(reader)
    else:  # sentencepiece and others: transformers' converter (it needs torch installed)
        # transformers (5.x) reads no `gemma` GGUF config; naming the tokenizer type skips that read
        gemma = {"tokenizer_type": "gemma"} if _field(reader, K.General.ARCHITECTURE) == "gemma" else {}
        try:
            tok = import_transformers().AutoTokenizer.from_pretrained(str(gguf_path.parent),
                                                                      gguf_file=gguf_path.name, **gemma)
        except ModuleNotFoundError as e:
            raise CheckpointError(f"converting a GGUF '{kind}' tokenizer needs transformers' GGUF reader, "
                                  f"which needs torch: pip install 'qeft-jax[convert]' ({e})") from None
    tok.save_pretrained(str(out))


def convert(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"{src} is not a file (expected a .gguf file)")
    try:
        reader = gguf.GGUFReader(str(src))
    except Exception as e:  # the gguf package raises ValueError/AssertionError/OSError on bad files
        raise CheckpointError(f"{src} is not a readable GGUF file: {e}") from None
    cfg = gguf_config(reader)
    tensors = gguf_tensors(reader, cfg, str(src))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_fp(tmp, cfg.to_hf_dict(), tensors, progress="dequantizing GGUF tensors")
        if _field(reader, "tokenizer.ggml.model") is not None:
            export_tokenizer(reader, src, tmp)
    return Path(out)
