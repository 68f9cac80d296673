"""The main job on the embedded default model (what `scripts/run_default.sh` runs).

    python -m qeft_jax.demo [--out runs/default] [--calib-samples 32 --calib-len 512 --eval-samples 24]

1. fetch + convert SmolLM2-135M-Instruct (cached), 2. perplexity of the fp model,
3. QEFT 4-bit quantization (g=128, k=16), 4. perplexity of the quantized model,
5. a generated answer from each, 6. a short weak-column fine-tune on the built-in instruction
data (held-out loss before and after). Quick settings by default, so it runs in minutes on
2 CPU cores. The final line is JSON with the figures.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qeft_jax.cli import run_cli
from qeft_jax.data import text_windows
from qeft_jax.eval.perplexity import perplexity
from qeft_jax.generation import generate_text
from qeft_jax.io import parse_jsonl
from qeft_jax.load import default_model_dir, load_model
from qeft_jax.quant.pipeline import quantize_checkpoint
from qeft_jax.recipes import make_recipe
from train.trainer import TrainConfig, train

PROMPT = "Explain in one sentence why the sky is blue."


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qeft_jax.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/default", help="where the quantized model is written")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--eval-samples", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=8, help="weak-column fine-tuning steps (0: skip)")
    a = p.parse_args(argv)

    t0 = time.time()
    src = default_model_dir()
    print(f"[1/6] default model ready at {src} ({time.time() - t0:.0f} s)")
    model, tok, cfg = load_model(src)
    eval_ids = text_windows(tok, "eval", a.seq_len, a.eval_samples, seed=None)
    fp_ppl, tokens = perplexity(model, eval_ids)
    print(f"[2/6] fp perplexity {fp_ppl:.3f} over {tokens} tokens")
    fp_text = generate_text(model, tok, [PROMPT], max_new_tokens=a.max_new_tokens)[0]
    del model

    out = Path(a.out) / "qeft-4bit-k16"
    recipe = make_recipe("qeft", bits=4, group_size=128, k=16)
    calib = text_windows(tok, "calib", a.calib_len, a.calib_samples, seed=0)
    summary = quantize_checkpoint(src, out, recipe, calib, overwrite=True,
                                  meta={"calibration_seed": 0, "calibration_data": "boolq-wikipedia/calib"})
    print(f"[3/6] quantized with QEFT 4-bit g128 k16 in {summary['seconds']:.0f} s -> {out}")
    qmodel, _, _ = load_model(out)
    q_ppl, _ = perplexity(qmodel, eval_ids)
    print(f"[4/6] QEFT 4-bit perplexity {q_ppl:.3f} ({100 * (q_ppl / fp_ppl - 1):+.2f}% vs fp)")
    q_text = generate_text(qmodel, tok, [PROMPT], max_new_tokens=a.max_new_tokens)[0]
    print(f"[5/6] prompt: {PROMPT}\n  fp:   {fp_text.strip()}\n  qeft: {q_text.strip()}")
    del qmodel
    losses = finetune(out, Path(a.out) / "qeft-4bit-k16-tuned", a.train_steps) if a.train_steps else {}
    print(json.dumps({"fp_ppl": fp_ppl, "qeft_4_ppl": q_ppl, "eval_tokens": tokens,
                      "quantize_seconds": summary["seconds"], **losses,
                      "total_seconds": round(time.time() - t0, 1)}))


def finetune(qdir: Path, out: Path, steps: int) -> dict[str, float]:
    """A few QEFT steps on the built-in instruction data; held-out loss before and after."""
    cfg = TrainConfig(model=str(qdir), out=str(out), method="qeft", data="builtin",
                      tasks=["arc_easy", "boolq", "piqa"], limit_per_task=200, seq_len=256, batch_size=8,
                      micro_batch_size=4, steps=steps, lr=1e-4, eval_every=steps, eval_rows=16,
                      save_every=steps)
    summary = train(cfg, overwrite=True)
    metrics = out / "metrics.jsonl"
    evals = [r["eval_loss"] for _, r in parse_jsonl(metrics.read_text(), metrics) if "eval_loss" in r]
    print(f"[6/6] QEFT fine-tune: {steps} steps, {summary['trainable_params']} trainable params, "
          f"held-out loss {evals[0]:.4f} -> {evals[-1]:.4f} -> {out}")
    return {"heldout_loss_before": evals[0], "heldout_loss_after": evals[-1]}


if __name__ == "__main__":
    run_cli(main)
