"""A llama-architecture GGUF file -> our fp checkpoint (weights dequantized, tokenizer carried over).

The CLI is `python -m convert.from_gguf FILE.gguf OUT_DIR`.

Every tensor type the `gguf` package can dequantize is accepted (F32/F16/BF16, Q4_0/Q4_1/Q8_0,
K-quants, ...). llama.cpp stores q_proj/k_proj rows permuted per head (interleaved rope halves);
this is undone so the weights match the Hugging Face layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from qeft_jax.config import ModelConfig
from qeft_jax.checkpoint import check_tensors, expected_tensors, write_fp
from qeft_jax.io import CheckpointError, atomic_dir
from qeft_jax.tokenization import import_transformers

_LAYER_MAP = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}
_TOP_MAP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader: Any) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture is {arch!r}; only 'llama' is supported")
    a = "llama."
    heads = int(_field(reader, a + "attention.head_count"))
    hidden = int(_field(reader, a + "embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, a + "vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    head_dim = _field(reader, a + "attention.key_length") or hidden // heads
    rope: dict[str, Any] = {}
    scaling_type = _field(reader, a + "rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise CheckpointError(f"GGUF rope scaling type {scaling_type!r} is not supported")
        rope = {"rope_type": "linear", "factor": float(_field(reader, a + "rope.scaling.factor"))}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig.from_hf_dict({
        "model_type": "llama", "vocab_size": int(vocab), "hidden_size": hidden,
        "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, a + "attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
        "rope_scaling": rope or None,
        "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    })


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permutation: rows (head, half, pair) -> (head, pair, half)."""
    out, inp = w.shape
    d = out // n_head
    return w.reshape(n_head, d // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_MAP:
        return _TOP_MAP[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_MAP:
        return f"model.layers.{parts[1]}.{_LAYER_MAP[parts[2]]}.{parts[3]}"
    return None


def read_gguf_tensors(reader: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF tensors", unit="tensor"):
        name = hf_name(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":
                continue  # llama3 rope factors: recomputed from the config
            raise CheckpointError(f"unexpected GGUF tensor '{t.name}' for a llama model")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"GGUF tensor '{t.name}' has type {t.tensor_type.name}, which the "
                                  f"gguf package cannot dequantize") from None
        arr = np.asarray(arr, np.float32).reshape(tuple(reversed([int(x) for x in t.shape])))
        if name.endswith("q_proj.weight"):
            arr = unpermute_qk(arr, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            arr = unpermute_qk(arr, cfg.num_key_value_heads)
        tensors[name] = arr
    return tensors


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
        try:
            tok = import_transformers().AutoTokenizer.from_pretrained(str(gguf_path.parent),
                                                                      gguf_file=gguf_path.name)
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
    tensors = read_gguf_tensors(reader, cfg)
    check_tensors(expected_tensors(cfg), tensors, source=str(src))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_fp(tmp, cfg.to_hf_dict(), tensors)
        if _field(reader, "tokenizer.ggml.model") is not None:
            export_tokenizer(reader, src, tmp)
    return Path(out)
