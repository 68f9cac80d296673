"""The main job on the embedded default model (what `scripts/run_default.sh` runs).

    python -m qeft_jax.demo [--out runs/default] [--calib-samples 32 --calib-len 512 --eval-samples 24]

1. fetch + convert SmolLM2-135M-Instruct (cached), 2. perplexity of the fp model,
3. QEFT 4-bit quantization (g=128, k=16), 4. perplexity of the quantized model,
5. a generated answer from each. Quick settings by default, so it runs in minutes on 2 CPU cores.
The final line is JSON with the figures.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qeft_jax.cli import run_cli

PROMPT = "Explain in one sentence why the sky is blue."


def main(argv: list[str] | None = None) -> None:
    from qeft_jax import data, load_model
    from qeft_jax.eval.perplexity import perplexity
    from qeft_jax.generate import generate_text
    from qeft_jax.load import default_model_dir
    from qeft_jax.quant.pipeline import quantize_checkpoint
    from qeft_jax.quant.recipes import make_recipe

    p = argparse.ArgumentParser(prog="python -m qeft_jax.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/default", help="where the quantized model is written")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--eval-samples", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args(argv)

    t0 = time.time()
    src = default_model_dir()
    print(f"[1/5] default model ready at {src} ({time.time() - t0:.0f} s)")
    model, tok, cfg = load_model(src)
    eval_ids = data.token_sequences(tok, data.corpus_texts("eval"), a.seq_len, a.eval_samples, seed=None)
    fp_ppl, tokens = perplexity(model, eval_ids)
    print(f"[2/5] fp perplexity {fp_ppl:.3f} over {tokens} tokens")
    fp_text = generate_text(model, tok, [PROMPT], max_new_tokens=a.max_new_tokens)[0]
    del model

    out = Path(a.out) / "qeft-4bit-k16"
    recipe = make_recipe("qeft", bits=4, group_size=128, k=16)
    calib = data.token_sequences(tok, data.corpus_texts("calib"), a.calib_len, a.calib_samples, seed=0)
    summary = quantize_checkpoint(src, out, recipe, calib, overwrite=True,
                                  meta={"calibration_seed": 0, "calibration_data": "boolq-wikipedia/calib"})
    print(f"[3/5] quantized with QEFT 4-bit g128 k16 in {summary['seconds']:.0f} s -> {out}")
    qmodel, _, _ = load_model(out)
    q_ppl, _ = perplexity(qmodel, eval_ids)
    print(f"[4/5] QEFT 4-bit perplexity {q_ppl:.3f} ({100 * (q_ppl / fp_ppl - 1):+.2f}% vs fp)")
    q_text = generate_text(qmodel, tok, [PROMPT], max_new_tokens=a.max_new_tokens)[0]
    print(f"[5/5] prompt: {PROMPT}\n  fp:   {fp_text.strip()}\n  qeft: {q_text.strip()}")
    print(json.dumps({"fp_ppl": fp_ppl, "qeft_4_ppl": q_ppl, "eval_tokens": tokens,
                      "quantize_seconds": summary["seconds"], "total_seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_cli(main)
