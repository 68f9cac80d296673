"""Fine-tuning step cost, side by side: QEFT vs QLoRA vs LoRA vs full, and the lower bound.

    python benchmarks/train_step.py [--quick] [--model default|DIR] [--batch B] [--seq-len T] [--k 16[,64]]

One model (the default model, or with --quick a small random Llama), one batch, one sequence
length. qeft/qlora run on its 4-bit QEFT quantization (k weak columns; quantized here on random
calibration ids, which does not matter for speed), lora/full on the fp model. With several k
(--k 16,64) the first is the `qeft` row and every further k adds a `qeft_k<k>` row on its own
quantization. Each method runs in
its own process (clean peak-memory figures), one optimizer step = forward + backward + AdamW on
one micro-batch (no accumulation), timed as the median (`<method>_ms`) and minimum
(`<method>_min_ms`) of --iters steps after a warm-up; the ratios use the medians.

bound_ms: forward + input-gradient backward of the frozen quantized model (no weight gradient at
all): what any fine-tune of that quantized model must at least pay. QEFT adds only the k-column
weight gradients (paper section 3.3), so qeft_over_bound should be close to 1.

`<method>_gflops` is XLA's cost analysis of the compiled step (robust where timings are noisy).
Memory: `<method>_mem_mb` is XLA's compiled estimate of the step (arguments + outputs + temporaries
- donated aliases); where the device reports it, `<method>_peak_mb` is the measured peak.
The final line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("qeft", "qlora", "lora", "full")


def small_fp_model(out: Path) -> Path:
    """A random Llama (4 layers, hidden 256) written as an fp checkpoint."""
    import jax.numpy as jnp
    from flax import nnx

    from qeft_jax.config import ModelConfig
    from qeft_jax.checkpoint import write_fp
    from qeft_jax.model import CausalLM, named_variables

    cfg = ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    model = CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    out.mkdir(parents=True, exist_ok=True)
    write_fp(out, cfg.to_hf_dict(), {k: np.asarray(v) for k, v in named_variables(model).items()})
    return out


def quantize_for_bench(fp: Path, out: Path, k: int, group_size: int) -> Path:
    from qeft_jax.config import ModelConfig
    from qeft_jax.quant.pipeline import quantize_checkpoint
    from qeft_jax.recipes import make_recipe

    cfg = ModelConfig.from_json_file(fp / "config.json")
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 128))
    quantize_checkpoint(fp, out, make_recipe("qeft", k=k, group_size=group_size, optq=False), ids,
                        progress=False)
    return out


def _memory(compiled) -> float | None:
    from train.trainer import memory_figures  # noqa: PLC0415 - jax is imported inside functions here

    try:
        m = memory_figures(compiled)
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    return round(m["peak_bytes"] / 2**20, 2) if m else None


def _gflops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return round(float(ca["flops"]) / 1e9, 3)
    except Exception:  # noqa: BLE001
        return None


def _peak() -> float | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return round(stats["peak_bytes_in_use"] / 2**20, 2)


def _time(fn, args, iters: int, carry: bool) -> tuple[float, float]:
    import jax

    out = fn(*args)  # warm-up
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        if carry:
            args = (out[0], out[1], *args[2:])
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3, float(np.min(times)) * 1e3


def run_one(method: str, a: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from train.trainer import (TrainConfig, build_model, compute_dtype, make_optimizer, make_step_fns,
                               split_trainable)

    dtype = compute_dtype(a.dtype)
    src = Path(a.qdir if method in ("qeft", "qlora", "bound") else a.fpdir)
    model, _, cfg, _ = build_model(src, "qeft" if method == "bound" else method, dtype=dtype,
                                   lora_rank=a.lora_rank, lora_alpha=16.0, seed=0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (a.batch, a.seq_len)), jnp.int32)
    weights = jnp.ones((a.batch, a.seq_len), jnp.float32)
    res: dict = {}
    if method == "bound":
        graphdef, state = nnx.split(model)

        def loss_x(x, state):
            m = nnx.merge(graphdef, state)
            logits = m.forward(inputs_embeds=x, remat=a.remat)[0][:, :-1].astype(jnp.float32)
            return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))

        fn = jax.jit(jax.grad(loss_x))
        x = model.hidden_states(tokens)
        compiled = fn.lower(x, state).compile()
        res["ms"], res["min_ms"] = _time(compiled, (x, state), a.iters, carry=False)
    else:
        graphdef, trainable, frozen = split_trainable(model, method)
        tx, _ = make_optimizer(1e-5, TrainConfig(model="", out=""))
        opt = tx.init(trainable)
        step, _ = make_step_fns(graphdef, tx, a.remat)
        args = (trainable, opt, frozen, tokens[None], weights[None])
        compiled = step.lower(*args).compile()
        res["ms"], res["min_ms"] = _time(compiled, args, a.iters, carry=True)
        res["trainable_params"] = int(sum(x.size for x in jax.tree.leaves(trainable)))
    res["mem_mb"] = _memory(compiled)
    res["gflops"] = _gflops(compiled)
    res["peak_mb"] = _peak()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small random model, small batch (CPU-friendly)")
    p.add_argument("--model", default="default", help="fp checkpoint dir or 'default' (ignored with --quick)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--k", default="16", help="weak columns; comma-separated for one qeft row per k")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--out", type=Path, default=None, help="also write the final JSON (with the command) here")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # child process: one method
    p.add_argument("--fpdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--qdir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.batch = a.batch or (2 if a.quick else 4)
    a.seq_len = a.seq_len or (128 if a.quick else 512)
    a.iters = a.iters or (5 if a.quick else 10)
    if a.only:
        print("RESULT " + json.dumps(run_one(a.only, a)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if a.quick:
            fp = small_fp_model(Path(tmp) / "fp")
        else:
            from qeft_jax.load import resolve

            fp = resolve(a.model)
        ks = [int(k) for k in str(a.k).split(",")]
        qdirs = {}
        for k in ks:
            t0 = time.time()
            qdirs[k] = quantize_for_bench(fp, Path(tmp) / f"q{k}", k, 128 if not a.quick else 64)
            print(f"quantized {fp} (qeft, k={k}) in {time.time() - t0:.1f} s", file=sys.stderr)
        results: dict = {"device": __import__("jax").devices()[0].device_kind, "batch": a.batch,
                         "seq_len": a.seq_len, "k": ks[0], "lora_rank": a.lora_rank, "remat": a.remat}
        rows = [("bound", "bound", ks[0])] + [(m, m, ks[0]) for m in METHODS] + [(f"qeft_k{k}", "qeft", k)
                                                                              for k in ks[1:]]
        for row, method, k in rows:
            cmd = [sys.executable, __file__, "--only", method, "--fpdir", str(fp), "--qdir", str(qdirs[k]),
                   "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--iters", str(a.iters),
                   "--lora-rank", str(a.lora_rank), "--dtype", a.dtype] + (["--remat"] if a.remat else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[0][len("RESULT "):])
            results[f"{row}_ms"] = round(r["ms"], 3)
            results[f"{row}_min_ms"] = round(r["min_ms"], 3)
            results[f"{row}_mem_mb"] = r["mem_mb"]
            results[f"{row}_gflops"] = r["gflops"]
            if r.get("peak_mb") is not None:
                results[f"{row}_peak_mb"] = r["peak_mb"]
            if "trainable_params" in r:
                results[f"{row}_trainable_params"] = r["trainable_params"]
            print(f"{row:>8}: {r['ms']:9.2f} ms/step   {r['gflops']} GFLOP   mem {r['mem_mb']} MB"
                  + (f"   peak {r['peak_mb']} MB" if r.get("peak_mb") is not None else ""), file=sys.stderr)
    qe = results["qeft_ms"]
    results.update(qlora_over_qeft=round(results["qlora_ms"] / qe, 3),
                   lora_over_qeft=round(results["lora_ms"] / qe, 3),
                   full_over_qeft=round(results["full_ms"] / qe, 3),
                   qeft_over_bound=round(qe / results["bound_ms"], 3),
                   **{f"qlora_over_qeft_k{k}": round(results["qlora_ms"] / results[f"qeft_k{k}_ms"], 3)
                      for k in ks[1:]})
    if a.out:
        from qeft_jax.io import write_json_atomic

        write_json_atomic(a.out, {"command": " ".join(sys.argv), **results})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
