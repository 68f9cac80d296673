"""Which activation's AWQ scale hurts at 3 bits? AWQ with one activation left out of its search.

    python benchmarks/awq_study.py [--bits 3] [--eval-windows 16] [--out docs/results/awq_study_3bit.json]

Runs, on the default model with the full quality run's calibration (128 x 128 tokens, seed 0):
plain RTN, AWQ as shipped, and AWQ with no scale for one activation (q/k/v's input, gate/up's
input, down_proj's input), each scored by perplexity on the first --eval-windows 512-token windows.
Leaving an activation out is done in this process only, by narrowing `spec.producers` (the list of
activations AWQ searches and folds) before quantizing; the library is unchanged. Final line JSON:
{variant: ppl}, with the α AWQ chose per layer in --out.

docs/results/awq_study_3bit.json is from the current AWQ (q/k/v's scale scored at the attention
output): RTN 156.2, AWQ 151.6, without q/k/v's scale 137.7, without gate/up's 152.8, without
down_proj's 194.2. Its previous version (`git show 34501ce:docs/results/awq_study_3bit.json`), with
q/k/v scored on each linear's own output error, located that defect (AWQ 219.6, worse than RTN).
docs/results/awq_study_4bit.json (`--bits 4`) is from the current AWQ too: RTN 31.9, AWQ 28.2,
without q/k/v's scale 28.9, without gate/up's 29.6, without down_proj's 29.8: every scale helps.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from qeft_jax import data, load_model, spec
from qeft_jax.eval.perplexity import perplexity_of, window_nll
from qeft_jax.io import write_json_atomic
from qeft_jax.load import resolve
from qeft_jax.quant.pipeline import quantize_checkpoint
from qeft_jax.recipes import make_recipe

LEAVE_OUT = {"awq_no_attn_in": spec.ATTN_IN, "awq_no_ffn_in": spec.FFN_IN, "awq_no_down_in": spec.DOWN_IN}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    src = resolve("default")
    model, tok, cfg = load_model(src)
    eval_ids = data.token_sequences(tok, data.corpus_texts("eval"), 512, a.eval_windows, seed=None)
    calib = data.token_sequences(tok, data.corpus_texts("calib"), a.calib_len, a.calib_samples, seed=0)
    del model
    shipped = spec.producers
    results, alphas, seconds = {}, {}, {}
    for variant in ("rtn", "awq", *LEAVE_OUT):
        left_out = LEAVE_OUT.get(variant)
        spec.producers = (shipped if left_out is None else
                          lambda c, skip=left_out: {k: v for k, v in shipped(c).items() if k != skip})
        try:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.time()
                summary = quantize_checkpoint(src, Path(tmp) / "q", make_recipe(
                    "rtn" if variant == "rtn" else "awq", bits=a.bits), calib, progress=False)
                qmodel, _, _ = load_model(Path(tmp) / "q")
                results[variant] = perplexity_of(window_nll(qmodel, eval_ids, progress=False), eval_ids)
                seconds[variant] = round(time.time() - t0, 1)
        finally:
            spec.producers = shipped
        alphas[variant] = summary.get("awq_alpha")
        print(f"{variant:16s} ppl {results[variant]:9.3f}  ({seconds[variant]:.0f} s)", file=sys.stderr, flush=True)
        if a.out:
            write_json_atomic(a.out, {"command": " ".join(sys.argv), "bits": a.bits, "eval_windows": a.eval_windows,
                                      "calibration": [a.calib_samples, a.calib_len], "ppl": results,
                                      "seconds": seconds, "awq_alpha": alphas}, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
