"""Quantization quality on the default model: perplexity, bytes and time per method, side by side.

    python benchmarks/quality.py [--quick] [--model default|DIR] [--out docs/results/quality_full.json]

"fp" is the default model as shipped: its weights were stored as GGUF Q4_1 (32-blocks) and are
dequantized to float32 here, so every method re-quantizes an already 4-bit-derived model.
The final line is JSON: {"fp": ppl, "rtn_4": ppl, "gptq_4": ..., "awq_4": ..., "owq_4": ..., "qeft_4": ...,
...} (with --bits 3: "rtn_3", "gptq_3", "awq_3", ...). --out also writes the configuration, every row
(perplexity, its change against fp with the paired standard error over the evaluation windows, every
window's NLL, bytes, quantization and evaluation seconds) and the wall time to a JSON file, rewritten
after every row ("complete": false until the last), so a run cut short still leaves its rows.

The full run (no --quick): 4- and 3-bit rows, k = 16 and 32 for QEFT, 128 calibration sequences of
FULL_CALIB_LEN tokens, FULL_EVAL_WINDOWS evaluation windows; sized for 30 minutes on 2 CPU cores
(28.6 min on a machine whose 2 cores run a float32 matmul at 277 GFLOP/s, 49 min on one at 113-133:
the README has both). Its cost is the
calibrated quantizations' block passes (each block's fp pass with the Hessians, then its quantized
pass: ~23 MFLOP per calibration token per block, run at the matmul peak), AWQ's 21 attention passes
per block, and the 13 evaluations (0.27 GFLOP per token): at 128 x 512 calibration tokens and 120
windows it is ~680 TFLOP, 1.5-2 h here.

The QEFT rows share one pass-1 weak-channel selection (it depends only on the fp model and the
calibration ids, not on bits or k): the first QEFT row computes it, the others reuse it.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


from qeft_jax import data, load_model
from qeft_jax.checkpoint import read_selection
from qeft_jax.eval.perplexity import perplexity_of, window_nll
from qeft_jax.io import write_json_atomic
from qeft_jax.load import resolve
from qeft_jax.quant.pipeline import quantize_checkpoint
from qeft_jax.recipes import make_recipe

FULL_CALIB_LEN = 128      # tokens per calibration sequence in the full run (--quick: 512)
FULL_EVAL_WINDOWS = 32    # 512-token evaluation windows in the full run (--quick: 24)


def linear_bytes(path: Path) -> int:
    """Bytes of the block linears as stored (packed codes + 16-bit params + weak columns)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        for k in f.keys():
            if k.startswith("model.layers.") and not k.endswith("layernorm.weight"):
                total += f.get_tensor(k).nbytes
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4-bit rows only, small calibration/eval sets")
    p.add_argument("--model", default="default")
    p.add_argument("--calib-samples", type=int, default=None)
    p.add_argument("--calib-len", type=int, default=None)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--bits", default=None, help="comma-separated bit widths (default: 4 with --quick, else 4,3)")
    p.add_argument("--out", type=Path, default=None, help="also write the results (rows, timings, config) here")
    a = p.parse_args()
    t_start = time.time()
    calib_n = a.calib_samples or (16 if a.quick else 128)
    calib_len = a.calib_len or (512 if a.quick else FULL_CALIB_LEN)
    eval_n = a.eval_samples or (24 if a.quick else FULL_EVAL_WINDOWS)

    src = resolve(a.model)
    model, tok, cfg = load_model(src)
    eval_ids = data.token_sequences(tok, data.corpus_texts("eval"), a.seq_len, eval_n, seed=None)
    calib_ids = data.token_sequences(tok, data.corpus_texts("calib"), calib_len, calib_n, seed=0)
    print(f"model {src} | calibration {calib_n} x {calib_len} tokens | eval {len(eval_ids)} x {a.seq_len}")
    t0 = time.time()
    fp_nll = window_nll(model, eval_ids, progress=False)
    fp_ppl = perplexity_of(fp_nll, eval_ids)
    windows = {"fp": fp_nll}
    fp16_bytes = 2 * sum(int(np.prod(shape)) for shape in _fp_linear_shapes(src).values())
    rows = [("fp", 16, "-", fp_ppl, fp16_bytes, 0.0, time.time() - t0)]  # the linears as fp16
    results = {"fp": fp_ppl}
    print(f"  {'fp':12s} ppl {fp_ppl:9.3f}  (eval {rows[0][-1]:.0f} s)", flush=True)
    bit_widths = [int(b) for b in (a.bits or ("4" if a.quick else "4,3")).split(",")]
    config = {"model": str(src), "calib_samples": calib_n, "calib_len": calib_len, "eval_samples": len(eval_ids),
              "seq_len": a.seq_len, "group_size": a.group_size, "bits": bit_widths, "quick": a.quick}

    def write_out(complete: bool) -> None:
        if a.out:
            keys = ("name", "bits", "k", "ppl", "linear_bytes", "quantize_seconds", "eval_seconds")
            write_json_atomic(a.out, {"config": config, "complete": complete, "results": results,
                                      "wall_seconds": round(time.time() - t_start, 1),
                                      "rows": [{**dict(zip(keys, r)), **vs_fp(windows[r[0]], fp_nll, eval_ids),
                                                "window_nll": [round(float(v), 4) for v in windows[r[0]]]}
                                               for r in rows]}, indent=1)

    write_out(False)
    configs = []
    for bits in bit_widths:
        configs += [(m, bits, 16) for m in ("rtn", "gptq", "awq", "owq", "qeft")]
        if not a.quick:
            configs.append(("qeft", bits, 32))
    del model
    selection = None  # pass 1 of the first QEFT row, reused by the others
    with tempfile.TemporaryDirectory() as tmp:
        for method, bits, k in configs:
            kk = k if method in ("qeft", "owq") else 0
            recipe = make_recipe(method, bits=bits, group_size=a.group_size, k=kk)
            out = Path(tmp) / f"{method}_{bits}_{k}"
            t0 = time.time()
            quantize_checkpoint(src, out, recipe, calib_ids, progress=False,
                                selection=selection if method == "qeft" else None)
            secs = time.time() - t0
            if method == "qeft" and selection is None:
                attn, ffn, _, _ = read_selection(out)
                selection = {"attn_lambda": attn, "ffn_lambda": ffn}
            t0 = time.time()
            qmodel, _, _ = load_model(out)
            nll = window_nll(qmodel, eval_ids, progress=False)
            ppl = perplexity_of(nll, eval_ids)
            eval_secs = time.time() - t0
            name = f"{method}_{bits}" + (f"_k{k}" if method == "qeft" and k != 16 else "")
            results[name] = ppl
            windows[name] = nll
            rows.append((name, bits, kk, ppl, linear_bytes(out), secs, eval_secs))
            print(f"  {name:12s} ppl {ppl:9.3f}  (quantize {secs:.0f} s, eval {eval_secs:.0f} s)", flush=True)
            write_out(False)
    print(f"\n{'method':12s} {'bits':>4s} {'k':>3s} {'ppl':>9s} {'vs fp (paired SE)':>19s} {'linear MB':>9s} "
          f"{'quant s':>7s} {'eval s':>6s}")
    for name, bits, k, ppl, nbytes, secs, eval_secs in rows:
        d = vs_fp(windows[name], fp_nll, eval_ids)
        print(f"{name:12s} {bits:4d} {str(k):>3s} {ppl:9.3f} {d['vs_fp_pct']:+9.2f}% ± {d['vs_fp_se_pct']:5.2f}% "
              f"{nbytes / 2**20:9.2f} {secs:7.1f} {eval_secs:6.1f}")
    print(f"wall time {time.time() - t_start:.0f} s")
    write_out(True)
    print(json.dumps(results))


def vs_fp(nll: np.ndarray, fp_nll: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """ppl / fp ppl - 1 in percent, and its paired standard error over the evaluation windows (delta
    method on the per-window mean NLL difference d_i: ratio = exp(mean d), SE = ratio · sd(d) / sqrt(N))."""
    d = (nll - fp_nll) / (ids.shape[1] - 1)
    ratio = float(np.exp(d.mean()))
    se = ratio * float(d.std(ddof=1)) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"vs_fp_pct": round(100 * (ratio - 1), 3), "vs_fp_se_pct": round(100 * se, 3)}


def _fp_linear_shapes(src: Path) -> dict[str, tuple[int, ...]]:
    from qeft_jax.checkpoint import read_info
    from qeft_jax.spec import fp_shapes

    return {k: v for k, v in fp_shapes(read_info(src).config).items()
            if k.startswith("model.layers.") and k.endswith("proj.weight")}


if __name__ == "__main__":
    main()
