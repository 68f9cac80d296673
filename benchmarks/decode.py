"""Decode speed: the fp model against its QEFT 4-bit version, same prompt, same process.

    python benchmarks/decode.py [--quick] [--qeft DIR] [--max-new-tokens N] [--batch B] [--models default,large]

1. load the default model (SmolLM2-135M-Instruct) in fp;
2. quantize it with QEFT (4-bit, g128, k=16, OPTQ) into a temp dir, or reuse/write --qeft DIR. The
   calibration set is RANDOM token ids (4 x 128): enough to exercise the pipeline and produce the
   packed layout whose speed is measured here, useless for quality (see benchmarks/quality.py);
3. time both with `qeft_jax.generation.benchmark`: greedy, stop tokens ignored so every run decodes
   exactly N tokens, one warm-up call first (compile excluded), median of the timed runs.

On a GPU (jax.default_backend() == "gpu") both models run in bfloat16 and the QEFT linears use the
Pallas kernel, and a 1B-class Llama-shaped model with random weights (hidden 2048, 16 layers,
intermediate 5632, vocab 32000, 32 heads / 4 kv heads; `--models large` alone needs no download) is
added: its fp checkpoint is written from random tensors and quantized to the QEFT layout (k=16 weak
columns, g128) with RTN rounding (optq=False) for speed. On CPU the models run in float32 and QEFT
uses the XLA reference path (dequantize + dot), so no speed-up is expected there.

The last line printed is JSON: fp_tok_s, qeft_tok_s, ratio (= qeft / fp) for the default model
(plus large_* keys on a GPU).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qeft_jax.cli import comma_list, run_cli
from qeft_jax.config import ModelConfig
from qeft_jax.generation import GenerationStats, benchmark, generate_text
from qeft_jax.checkpoint import write_fp
from qeft_jax.load import default_model_dir, load_model
from qeft_jax.spec import fp_shapes
from qeft_jax.tokenization import batch_prompt_ids, pad_id
from qeft_jax.quant.pipeline import quantize_checkpoint
from qeft_jax.recipes import make_recipe

PROMPT = "Write a short paragraph about the history of the printing press."
CALIB_SHAPE = (4, 128)  # random token ids: a speed benchmark needs the packed layout, not quality

LARGE = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=4, head_dim=64,
                    max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5)


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of every array the model holds (packed weights, scales, weak columns, norms, ...)."""
    _, state = nnx.split(model)
    return sum(x.nbytes for x in jax.tree.leaves(state))


def random_calibration(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, CALIB_SHAPE).astype(np.int32)


def quantize(src: Path, out: Path, recipe, vocab: int) -> None:
    meta = {"calibration_data": f"random token ids {CALIB_SHAPE} (speed benchmark)"}
    summary = quantize_checkpoint(src, out, recipe, random_calibration(vocab), overwrite=True, meta=meta)
    print(f"  quantized ({recipe.method}, {recipe.bits}-bit, g{recipe.group_size}, k={recipe.k}, "
          f"optq={recipe.optq}) in {summary['seconds']:.0f} s -> {out}")


def random_checkpoint(cfg: ModelConfig, out: Path, seed: int = 0) -> Path:
    """An fp16 checkpoint of random weights (N(0, 0.02) matrices, unit norms) for shape-only timing."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in fp_shapes(cfg).items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, np.float16)
        else:
            tensors[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16)
    out.mkdir(parents=True, exist_ok=True)
    write_fp(out, cfg.to_hf_dict(), tensors)
    return out


def time_model(label: str, path: Path, prompt_ids, tok, a, dtype) -> tuple[GenerationStats, int, str]:
    model, _, _ = load_model(path, dtype=dtype, param_dtype=dtype)
    pad = pad_id(tok, model.config)
    stats = benchmark(model, prompt_ids, max_new_tokens=a.max_new_tokens, repeats=a.repeats, pad_id=pad)
    text = ""
    if tok is not None:  # same shapes as the benchmark: no new compile
        text = generate_text(model, tok, [PROMPT] * a.batch, max_new_tokens=a.max_new_tokens)[0]
    nbytes = weight_bytes(model)
    print(f"  {label}: decode {stats.decode_tok_s:.1f} tok/s, prefill {stats.prefill_tok_s:.1f} tok/s")
    del model
    return stats, nbytes, text


def table(title: str, rows: list[tuple[str, GenerationStats, int]]) -> None:
    print(f"\n{title}")
    head = f"{'model':<22}{'weights MB':>12}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/step':>10}"
    print(head)
    print("-" * len(head))
    for name, s, nbytes in rows:
        print(f"{name:<22}{nbytes / 2**20:>12.1f}{s.prefill_tok_s:>15.1f}{s.decode_tok_s:>14.1f}"
              f"{1e3 * s.decode_s / s.decode_steps:>10.2f}")
    fp, q = rows[0][1], rows[1][1]
    print(f"{'QEFT / fp':<22}{rows[1][2] / rows[0][2]:>12.3f}{q.prefill_tok_s / fp.prefill_tok_s:>15.3f}"
          f"{q.decode_tok_s / fp.decode_tok_s:>14.3f}")


def bench_pair(title: str, fp_dir: Path, q_dir: Path, prompt_ids, tok, a, dtype) -> tuple[float, float]:
    fp, fp_bytes, fp_text = time_model("fp", fp_dir, prompt_ids, tok, a, dtype)
    q, q_bytes, q_text = time_model("qeft", q_dir, prompt_ids, tok, a, dtype)
    table(f"{title} — batch {a.batch}, prompt {fp.prompt_tokens // a.batch} tokens, "
          f"{fp.decode_steps} decode steps, {jnp.dtype(dtype).name}, median of {a.repeats}",
          [("fp", fp, fp_bytes), ("QEFT 4-bit g128 k16", q, q_bytes)])
    if tok is not None:
        print(f"  fp   says: {fp_text.strip()[:120]!r}\n  qeft says: {q_text.strip()[:120]!r}")
    return fp.decode_tok_s, q.decode_tok_s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python benchmarks/decode.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer tokens and runs (a few minutes on 2 CPU cores)")
    p.add_argument("--qeft", type=Path, default=None,
                   help="QEFT checkpoint of the default model to reuse (written there if absent)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="decode length (quick 32, else 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per model (quick 2, else 5)")
    p.add_argument("--batch", type=int, default=1, help="prompts per batch (the same prompt repeated)")
    p.add_argument("--models", type=comma_list, default=None, metavar="default,large",
                   help="which models to time (default: both on a GPU, the default model elsewhere); "
                        "'large' is a random-weight 1B-class Llama that needs no download")
    a = p.parse_args(argv)
    a.max_new_tokens = a.max_new_tokens or (32 if a.quick else 128)
    a.repeats = a.repeats or (2 if a.quick else 5)
    if a.max_new_tokens < 2 or a.batch < 1 or a.repeats < 1:
        raise ValueError("need --max-new-tokens >= 2, --batch >= 1, --repeats >= 1")
    if a.models and set(a.models) - {"default", "large"}:
        raise ValueError(f"--models takes 'default' and/or 'large', got {','.join(a.models)}")

    gpu = jax.default_backend() == "gpu"
    models = a.models or (["default", "large"] if gpu else ["default"])
    dtype = jnp.bfloat16 if gpu else jnp.float32
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), compute dtype "
          f"{jnp.dtype(dtype).name}")
    print(f"calibration for quantization: RANDOM token ids {CALIB_SHAPE[0]}x{CALIB_SHAPE[1]} "
          f"(acceptable for a speed benchmark; not for quality)")

    result = {}
    with tempfile.TemporaryDirectory(prefix="qeft-decode-") as tmp:
        if "default" in models:
            src = default_model_dir()
            _, tok, cfg = load_model(src)
            prompt_ids = batch_prompt_ids(tok, [PROMPT] * a.batch)
            q_dir = a.qeft or Path(tmp) / "qeft-4bit"
            if (q_dir / "quantization.json").is_file():
                print(f"reusing QEFT checkpoint {q_dir}")
            else:
                quantize(src, q_dir, make_recipe("qeft", bits=4, group_size=128, k=16), cfg.vocab_size)
            fp_s, q_s = bench_pair(f"default model ({src.name})", src, q_dir, prompt_ids, tok, a, dtype)
            result.update(fp_tok_s=round(fp_s, 2), qeft_tok_s=round(q_s, 2), ratio=round(q_s / fp_s, 3))

        if "large" in models:
            print("\nlarge model: random-weight Llama (hidden 2048, 16 layers, inter 5632, vocab 32000)")
            big_fp = random_checkpoint(LARGE, Path(tmp) / "large-fp")
            big_q = Path(tmp) / "large-qeft"
            quantize(big_fp, big_q, make_recipe("qeft", bits=4, group_size=128, k=16, optq=False),
                     LARGE.vocab_size)
            ids = np.random.default_rng(1).integers(0, LARGE.vocab_size, (a.batch, 64)).tolist()
            fp_s, q_s = bench_pair("large random model", big_fp, big_q, ids, None, a, dtype)
            result.update(large_fp_tok_s=round(fp_s, 2), large_qeft_tok_s=round(q_s, 2),
                          large_ratio=round(q_s / fp_s, 3))
    result.update(backend=jax.default_backend(), batch=a.batch, decode_tokens=a.max_new_tokens,
                  calibration="random token ids 4x128")
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
