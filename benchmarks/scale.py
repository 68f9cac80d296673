"""Does it scale? Quantization cost of 8B-shaped blocks, and the memory of training/decoding an 8B
and a 70B model, from abstract compilation (issue 14, items 3 and 5).

    python benchmarks/scale.py [--quick] [--no-quant] [--no-70b] [--calib 4x512,8x512] [--activations disk]

1. Quantization (`quant`): a synthetic checkpoint with the Llama-3-8B shape (hidden 4096, FFN
   14336, 32/8 heads, vocab 128256) but only 2 decoder blocks, random bf16 weights written with
   `qeft_jax.checkpoint.write_fp`, quantized by the real `quantize_checkpoint` (QEFT 4-bit, k=128,
   g=128, OPTQ; calibration activations kept as --activations says: float32 in memory (default),
   bfloat16, or on disk) on random token ids (the pipeline takes ids: no tokenizer). Each quantization runs
   in a child process; its peak RSS is the child's `ru_maxrss` from `os.wait4` (the kernel's
   high-water mark of that one child) and, as a cross-check, the VmHWM the child reads from
   /proc/self/status before it exits. Two calibration sizes are run, so the bytes each calibration
   token adds to the peak, and the seconds it adds per block, are measured (a line through the
   two points); where the peak did not grow between them (run-to-run noise larger than the
   activations) or one size was run, the pipeline's own bytes per token are used (its one
   activation buffer: 4 x hidden for float32, 2 x hidden for bfloat16, 0 on disk) and
   `rss_per_token_source` says so. Extrapolations (keys `*_extrapolated`):
     time 32 blocks  = 32 x (seconds per block)  +  16 x (everything else: the selection pass over
                       the 2 blocks, reading/permuting the embeddings, writing; an upper bound,
                       since the reading and writing of the top tensors does not scale)
     RSS  32 blocks  = measured peak (nothing the pipeline holds grows with the number of blocks:
                       each finished block goes to the resume state's file and the output is
                       assembled from those files a tensor at a time)
     RSS at 128 x 2048 calibration tokens = highest measured peak + per-token bytes x (extra
                       tokens); the per-batch buffers (one sequence: batch 1) are in the measured
                       peak, exactly so when the measured sequence length is 2048
   `rss_budget` lists the buffers the pipeline holds in each of its phases (embedding the
   calibration tokens, quantizing a block, writing the output), computed from the shapes, so a
   missed target names what breaks it.

2. Training memory (`train_8b`): the full 32-block 8B, for qeft (k=128), qlora (r=64), lora (r=64)
   and full, with and without remat, one step at batch 1 x 2048, bf16 compute, compiled from
   shape-only inputs (`train.memory.step_memory`: nothing is allocated). Field meanings are in
   `train.memory`'s docstring: weights / trainable / optimizer are sums of nbytes of the abstract
   pytrees; arguments / outputs / aliased / temporaries are XLA's memory_analysis()
   (argument_size_in_bytes, output_size_in_bytes, alias_size_in_bytes, temp_size_in_bytes);
   total = arguments + outputs + temporaries - aliased. `ratios_8b[remat|no_remat]` holds
   `qlora_over_qeft`, `lora_over_qeft` and `full_over_qeft` of the totals.

3. Decode memory (`decode_8b`): the decode loop `qeft_jax.generation` runs (cache donated, as on an
   accelerator), at batch 1 and 8 with a 2048-slot KV cache (a 1792-token prompt + 256 new
   tokens), for the quantized model (qeft), the quantized model with QLoRA adapters unmerged
   (qlora) and the bf16 model (fp: what lora/full produce after merging).

4. 70B (`fsdp_70b`): on how many 80 GB devices each method fits under the trainer's FSDP
   (`qeft_jax.sharding.fsdp_shardings`, 1 row of 2048 tokens per device, remat on). Compiled, not
   computed: a child process with N fake CPU devices
   (XLA_FLAGS=--xla_force_host_platform_device_count) compiles the sharded step of a model with
   the 70B widths and 2 and 4 blocks; memory_analysis of an SPMD program is per device, and the
   per-device total is extended linearly in the number of blocks to 80 (`per_block` and `fixed`
   are the fitted terms). A device count whose sharded state alone (exact, `train.memory.fsdp_bytes`)
   exceeds 80 GB is recorded without compiling. `extrapolation_check_8b` tests that linear
   extension on the 8B: 2- and 4-block compiles extended to 32 against the real 32-block compile.

All XLA figures are the plan of the backend the script runs on (`backend`). On CPU, XLA upcasts
bf16 matmul operands to float32, which adds float32 copies of weights and activations to the
temporaries that a GPU would not have; run it on the accelerator for GPU figures.

--quick: the abstract 8B compilations with remat only, decode (qeft and fp) at batch 1 and 8, the
70B fit for qeft (up to 8 devices), and one quantization of a quarter-width block (hidden 1024,
FFN 3584) at one calibration size. The final line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

# XLA:CPU's default scheduler optimises for concurrency and keeps far more alive at once (measured
# on 4 blocks of the 8B with remat: 17.0 GB of temporaries against 6.8 GB), so remat barely showed;
# the memory-minimising scheduler is what an accelerator's memory-aware scheduler approximates.
# Set before jax starts its backend, for this process and the FSDP child; the quantization children
# run with the caller's own flags (QUANT_ENV), as `python -m qeft_jax.quantize` would.
QUANT_ENV = os.environ.copy()
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from qeft_jax import sharding as shd
from qeft_jax import spec
from qeft_jax.checkpoint import build_model, write_fp
from qeft_jax.config import ModelConfig
from qeft_jax.generation import decode_program
from qeft_jax.model import init_cache
from qeft_jax.recipes import make_recipe
from train.memory import (
    abstract_model,
    abstract_state,
    fsdp_bytes,
    optimizer_state,
    step_memory,
    tree_bytes,
)
from train.trainer import METHODS, memory_figures

GB = 1e9
DEVICE_BYTES = 80 * GB   # an "80 GB" accelerator (A100/H100 80GB)
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
LLAMA3_70B = {"vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128}
QUARTER_8B = dict(LLAMA3_8B, hidden_size=1024, intermediate_size=3584, num_attention_heads=8,
                  num_key_value_heads=2)
FULL_CALIBRATION = (128, 2048)   # the paper's setting: 128 sequences of 2048 tokens


def llama3(shape: dict[str, int], **over: Any) -> ModelConfig:
    return ModelConfig(**{**shape, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                          "max_position_embeddings": 8192, **over})


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- quantization
def write_synthetic_fp(out: Path, cfg: ModelConfig, seed: int = 0) -> int:
    """Random bf16 weights (N(0, 0.02²), norms 1) for every fp tensor of `cfg`, written as our fp
    checkpoint; returns the bytes of model.safetensors."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in spec.fp_shapes(cfg).items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, ml_dtypes.bfloat16)
            continue
        t = np.empty(shape, ml_dtypes.bfloat16)
        rows = max(1, (1 << 24) // int(np.prod(shape[1:], dtype=np.int64)))  # ~64 MB of float32 at a time
        for r in range(0, shape[0], rows):
            t[r:r + rows] = (rng.standard_normal((min(rows, shape[0] - r), *shape[1:]), np.float32)
                             * np.float32(0.02)).astype(ml_dtypes.bfloat16)
        tensors[name] = t
    out.mkdir(parents=True, exist_ok=True)
    write_fp(out, cfg.to_hf_dict(), tensors)
    return (out / "model.safetensors").stat().st_size


def quant_child(a: argparse.Namespace) -> None:
    """In a child process: quantize --fp into --q and print the timings and this process's peak."""
    # only the child needs the pipeline
    from qeft_jax.quant.pipeline import quantize_checkpoint

    cfg = ModelConfig.from_json_file(Path(a.fp) / "config.json")
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (a.samples, a.calib_len))
    blocks: list[float] = []
    t0 = time.perf_counter()
    quantize_checkpoint(Path(a.fp), Path(a.q), make_recipe("qeft", k=a.k, group_size=a.group_size), ids,
                        batch_size=1, progress=False, on_block=lambda i, s: blocks.append(s),
                        activations=a.activations)
    total = time.perf_counter() - t0
    print("RESULT " + json.dumps({"seconds": total, "block_s": blocks, "vmhwm": _vmhwm()}), flush=True)


def _vmhwm() -> int:
    """This process's peak RSS so far (bytes), from /proc/self/status."""
    for ln in Path("/proc/self/status").read_text().splitlines():
        if ln.startswith("VmHWM:"):
            return int(ln.split()[1]) * 1024
    return 0


def linear_child(a: argparse.Namespace) -> None:
    """In a child process: the host memory `quantize_linear` (grid search + OPTQ) adds for one
    [out, in] linear, random weight and Hessian; prints the peak before and after."""
    # only the child needs the pipeline
    from qeft_jax.quant.pipeline import quantize_linear

    out, inp = (int(v) for v in a.linear.split("x"))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((out, inp), np.float32) * np.float32(0.02)
    x = rng.standard_normal((256, inp), np.float32)
    h = 2 * x.T @ x / x.shape[0]
    del x
    recipe = make_recipe("qeft", k=a.k, group_size=a.group_size)
    before = _vmhwm()
    t0 = time.perf_counter()
    quantize_linear(w, h, np.arange(a.k, dtype=np.int32), recipe)
    print("RESULT " + json.dumps({"before": before, "after": _vmhwm(), "seconds": time.perf_counter() - t0}),
          flush=True)


def run_child(args: list[str]) -> tuple[dict, int]:
    """Run this script with `args` in a child process (the caller's environment): (its RESULT json,
    its peak RSS in bytes as the kernel reports it to os.wait4 for that one child)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, __file__, *args], stdout=out, stderr=err, env=QUANT_ENV)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not lines:
            raise RuntimeError(f"child {args[0]} failed ({p.returncode}):\n{err.read()[-3000:]}")
    return json.loads(lines[0][len("RESULT "):]), usage.ru_maxrss * 1024   # Linux: ru_maxrss in KiB


def run_quantization(fp: Path, q: Path, samples: int, calib_len: int, k: int, group_size: int,
                     activations: str) -> dict:
    """One quantization in a child process: its seconds and its peak RSS."""
    r, peak = run_child(["--quant-child", "--fp", str(fp), "--q", str(q), "--samples", str(samples),
                         "--calib-len", str(calib_len), "--k", str(k), "--group-size", str(group_size),
                         "--activations", activations])
    return {"samples": samples, "calib_len": calib_len, "tokens": samples * calib_len,
            "seconds": round(r["seconds"], 2), "block_s": [round(s, 2) for s in r["block_s"]],
            "peak_rss_bytes": peak, "peak_rss_gb": round(peak / GB, 3),
            "vmhwm_gb": round(r["vmhwm"] / GB, 3)}


ACTIVATION_BYTES = {"float32": 4, "bfloat16": 2, "disk": 0}   # per token and hidden channel, held


def rss_budget(cfg: ModelConfig, tokens: int, activations: str = "float32", storage_bytes: int = 2
               ) -> dict[str, dict[str, int]]:
    """The big host buffers of quantize_checkpoint in each phase, from the shapes (bytes): what the
    pipeline code holds, read off qeft_jax/quant/pipeline.py and calibrate.py. `storage_bytes`: the
    source checkpoint's bytes per weight (bf16). The peak is the largest phase."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    acts = tokens * d * ACTIVATION_BYTES[activations]
    block = (2 * d * q + 2 * d * kv + 3 * d * f) * 4
    return {
        "embed": {  # embed_calibration: the embedding in its storage dtype, one sequence at a time
            "embeddings (storage dtype)": v * d * storage_bytes,
            f"calibration_activations ({activations})": acts},
        "block": {
            f"calibration_activations ({activations})": acts,
            # read a tensor at a time; the FFN reordering copies gate/up/down once more
            "block_fp_weights_f32 (+ the FFN linears' reordered copy)": block + 3 * d * f * 4,
            "hessians_f32 (attn in, o in, ffn in, down in)": (2 * d * d + q * q + f * f) * 4,
            # estimate (the measured figure is down_proj_quantize_linear): OPTQ's [f, f] float32
            # matrices (Hessian, damped + reordered, Cholesky factor, inverse) and [d, f] copies
            "quantize_linear_down_proj (estimate: 4 [f, f] + 3 [d, f] float32)": (4 * f * f + 3 * d * f) * 4},
        "write": {  # one output tensor at a time: lm_head read, reordered, cast to float32
            "largest_top_tensor (read + reordered in storage dtype, float32 copy)": v * d * (2 * storage_bytes + 4)},
    }


def quant_section(shape: dict[str, int], calib: list[tuple[int, int]], k: int, group_size: int,
                  activations: str, tmp: Path) -> dict[str, Any]:
    cfg = llama3(shape, num_hidden_layers=2)
    fp = tmp / "fp"
    t0 = time.perf_counter()
    size = write_synthetic_fp(fp, cfg)
    log(f"synthetic fp checkpoint ({cfg.hidden_size}/{cfg.intermediate_size}, 2 blocks): "
        f"{size / GB:.2f} GB in {time.perf_counter() - t0:.0f} s")
    runs = []
    for i, (n, t) in enumerate(calib):
        r = run_quantization(fp, tmp / f"q{i}", n, t, k, group_size, activations)
        log(f"quantized 2 blocks on {n}x{t} tokens: {r['seconds']} s (blocks {r['block_s']}), "
            f"peak RSS {r['peak_rss_gb']} GB")
        runs.append(r)
    ffn = cfg.intermediate_size
    lin, _ = run_child(["--linear-child", "--linear", f"{cfg.hidden_size}x{ffn}", "--k", str(k),
                        "--group-size", str(group_size)])
    log(f"quantize_linear of one [{cfg.hidden_size}, {ffn}] linear: "
        f"+{(lin['after'] - lin['before']) / GB:.2f} GB over its inputs, {lin['seconds']:.0f} s")
    return summarize_quant({"shape": {**shape, "num_hidden_layers": 2}, "k": k, "group_size": group_size,
                            "bits": 4, "storage": "bfloat16", "activations": activations,
                            "checkpoint_bytes": size, "runs": runs,
                            "down_proj_quantize_linear": {
                                "shape": [cfg.hidden_size, ffn], "seconds": round(lin["seconds"], 1),
                                "added_peak_gb": round((lin["after"] - lin["before"]) / GB, 3)}})


def summarize_quant(raw: dict[str, Any]) -> dict[str, Any]:
    """The derived figures of quant_section from its measurements (`raw`: shape, k, group_size,
    checkpoint_bytes, runs, down_proj_quantize_linear, activations); see the module docstring."""
    shape, runs = raw["shape"], raw["runs"]
    activations = raw.get("activations", "float32")
    keep = ("shape", "k", "group_size", "bits", "storage", "checkpoint_bytes", "runs", "down_proj_quantize_linear")
    res = {key: raw[key] for key in keep}
    res["activations"] = activations
    cfg = llama3(shape)  # the measured 2-block model
    full = llama3({**shape, "num_hidden_layers": 32})
    last = runs[-1]
    peak = max(r["peak_rss_bytes"] for r in runs)
    block_s = float(np.mean(last["block_s"]))
    other_s = last["seconds"] - sum(last["block_s"])
    res["block_s"] = round(block_s, 2)
    res["other_s"] = round(other_s, 2)
    res["time_32_blocks_s_extrapolated"] = round(32 * block_s + 16 * other_s, 1)
    res["peak_rss_gb"] = round(peak / GB, 3)
    res["peak_rss_32_blocks_gb_extrapolated"] = round(peak / GB, 3)   # nothing held grows with the blocks
    full_tokens = FULL_CALIBRATION[0] * FULL_CALIBRATION[1]
    analytic = ACTIVATION_BYTES[activations] * cfg.hidden_size   # the one activation buffer, per token
    slope, tslope = float(analytic), 0.0
    res["rss_per_token_source"] = "analytic (one calibration size measured)"
    if len(runs) >= 2 and runs[-1]["tokens"] != runs[0]["tokens"]:
        dt = runs[-1]["tokens"] - runs[0]["tokens"]
        measured = (runs[-1]["peak_rss_bytes"] - runs[0]["peak_rss_bytes"]) / dt
        tslope = (np.mean(runs[-1]["block_s"]) - np.mean(runs[0]["block_s"])) / dt
        res["rss_bytes_per_calib_token_measured"] = round(measured, 1)
        res["block_s_per_calib_token"] = float(f"{tslope:.3g}")
        if measured > 0:
            slope = measured
            res["rss_per_token_source"] = "measured (two calibration sizes)"
        else:  # the peak did not grow with the tokens: the difference is below run-to-run noise
            res["rss_per_token_source"] = ("analytic: the measured slope was not positive (the activations "
                                           "of these token counts are below the peak's run-to-run noise)")
    res["rss_bytes_per_calib_token_used"] = round(slope, 1)
    extra = full_tokens - last["tokens"]
    res["peak_rss_full_calib_32_blocks_gb_extrapolated"] = round((peak + slope * extra) / GB, 3)
    if tslope > 0:
        res["block_s_full_calib_extrapolated"] = round(block_s + tslope * extra, 1)
        res["time_32_blocks_full_calib_s_extrapolated"] = round(32 * (block_s + tslope * extra) + 16 * other_s, 1)
    budget = rss_budget(full, full_tokens, activations)
    res["rss_budget_full_calib_32_blocks_gb"] = {phase: {name: round(b / GB, 3) for name, b in bufs.items()}
                                                 for phase, bufs in budget.items()}
    res["rss_budget_full_calib_32_blocks_peak_gb"] = round(max(sum(b.values()) for b in budget.values()) / GB, 3)
    res["rss_budget_as_measured_peak_gb"] = round(
        max(sum(b.values()) for b in rss_budget(cfg, last["tokens"], activations).values()) / GB, 3)
    res["target_rss_under_6gb"] = bool(res["peak_rss_full_calib_32_blocks_gb_extrapolated"] < 6.0)
    return res


# ----------------------------------------------------------------------------- training / decode
def train_section(cfg: ModelConfig, *, remats: tuple[bool, ...], batch: int, seq_len: int, k: int,
                  lora_rank: int) -> tuple[dict, dict, dict]:
    table: dict[str, dict] = {}
    ratios: dict[str, dict] = {}
    targets: dict[str, dict] = {}
    for remat in remats:
        key = "remat" if remat else "no_remat"
        rows = {}
        for m in METHODS:
            r = step_memory(cfg, m, batch=batch, seq_len=seq_len, remat=remat, dtype=jnp.bfloat16, k=k,
                            lora_rank=lora_rank).to_dict()
            rows[m] = r
            log(f"8B {m:>5} {key:>8}: total {r['total'] / GB:7.2f} GB  (weights {r['weights'] / GB:.2f}, "
                f"trainable {r['trainable'] / GB:.2f}, optimizer {r['optimizer'] / GB:.2f}, "
                f"temporaries {r['temporaries'] / GB:.2f}; compiled in {r['compile_s']} s)")
        table[key] = rows
        qe = rows["qeft"]["total"]
        ratios[key] = {"qlora_over_qeft": round(rows["qlora"]["total"] / qe, 3),
                       "lora_over_qeft": round(rows["lora"]["total"] / qe, 3),
                       "full_over_qeft": round(rows["full"]["total"] / qe, 3)}
        targets[key] = {"qeft_below_qlora": qe < rows["qlora"]["total"],
                        "qeft_below_third_of_full": qe < rows["full"]["total"] / 3}
    return table, ratios, targets


def decode_model(cfg: ModelConfig, kind: str, k: int, lora_rank: int) -> nnx.Module:
    if kind == "fp":
        return nnx.eval_shape(lambda: build_model(cfg, None, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    return abstract_model(cfg, kind, dtype=jnp.bfloat16, k=k, lora_rank=lora_rank)


def decode_memory(cfg: ModelConfig, kind: str, *, batch: int, cache_len: int, max_new: int, k: int,
                  lora_rank: int) -> dict[str, Any]:
    """memory_analysis of generation's decode loop on shape-only inputs (cache donated)."""
    graphdef, state = nnx.split(decode_model(cfg, kind, k, lora_rank))
    prompt = cache_len - max_new
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, cache_len, jnp.bfloat16))
    sds = jax.ShapeDtypeStruct
    args = (graphdef, state, cache, sds((batch, cfg.vocab_size), jnp.bfloat16), sds((batch, prompt), jnp.int32),
            sds((1,), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)), sds((), jnp.float32),
            sds((), jnp.float32), sds((), jnp.int32))
    t0 = time.perf_counter()
    # generate donates the cache on accelerators, but the loop returns only tokens, so XLA has no
    # output to alias it to (it says so): the figures below are what that program really holds
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    compiled = decode_program(donate_cache=True).lower(*args, max_new=max_new, greedy=True,
                                                       nucleus=False).compile()
    m = memory_figures(compiled)
    return {"kind": kind, "batch": batch, "cache_len": cache_len, "weights": tree_bytes(state),
            "kv_cache": tree_bytes(cache), "arguments": m["argument_bytes"], "outputs": m["output_bytes"],
            "aliased": m["alias_bytes"], "temporaries": m["temp_bytes"], "total": m["peak_bytes"],
            "compile_s": round(time.perf_counter() - t0, 2)}


DECODE_KINDS = ("qeft", "qlora", "fp")


def decode_section(cfg: ModelConfig, batches: tuple[int, ...], k: int, lora_rank: int,
                   kinds: tuple[str, ...] = DECODE_KINDS) -> dict:
    out: dict[str, dict] = {}
    for b in batches:
        for kind in kinds:
            r = decode_memory(cfg, kind, batch=b, cache_len=2048, max_new=256, k=k, lora_rank=lora_rank)
            out.setdefault(f"batch_{b}", {})[kind] = r
            log(f"8B decode {kind:>5} batch {b}: total {r['total'] / GB:6.2f} GB (weights {r['weights'] / GB:.2f}, "
                f"KV cache {r['kv_cache'] / GB:.2f}, temporaries {r['temporaries'] / GB:.2f})")
    return out


def extrapolation_check(shape: dict[str, int], method: str, k: int, lora_rank: int, full_total: int | None
                        ) -> dict[str, Any]:
    """Per-block linearity of the step's total: 2- and 4-block compiles extended to the full depth."""
    tot = {}
    for layers in (2, 4):
        tot[layers] = step_memory(llama3(shape, num_hidden_layers=layers), method, seq_len=2048, remat=True,
                                  dtype=jnp.bfloat16, k=k, lora_rank=lora_rank).total
    per_block = (tot[4] - tot[2]) / 2
    pred = tot[2] + per_block * (shape["num_hidden_layers"] - 2)
    res = {"method": method, "remat": True, "per_block": int(per_block), "predicted_total": int(pred)}
    if full_total:
        res.update(compiled_total=full_total, relative_error=round(pred / full_total - 1, 4))
    return res


# ----------------------------------------------------------------------------- 70B under FSDP
def fsdp_child(a: argparse.Namespace) -> None:
    """In a child with fake devices: for each method, the smallest device count whose per-device
    step (remat, one 2048-token row per device) fits DEVICE_BYTES, from 2-/4-block compiles."""
    layers = LLAMA3_70B["num_hidden_layers"]
    out: dict[str, Any] = {}
    for method in a.methods.split(","):
        tried = []
        _, trainable, frozen = abstract_state(llama3(LLAMA3_70B), method, dtype=jnp.bfloat16, k=a.k,
                                              lora_rank=a.lora_rank)
        opt = optimizer_state(trainable)
        for n in [int(x) for x in a.counts.split(",")]:
            state = fsdp_bytes(frozen, n) + fsdp_bytes(trainable, n) + fsdp_bytes(opt, n)
            if state > DEVICE_BYTES:  # exact: the sharded state alone does not fit, nothing to compile
                tried.append({"devices": n, "state_per_device_gb": round(state / GB, 2), "compiled": False})
                print(f"70B {method} on {n}: state alone {state / GB:.1f} GB per device", file=sys.stderr, flush=True)
                continue
            mesh = shd.make_mesh(data=n)
            tot = {}
            for blocks in (2, 4):
                r = step_memory(llama3(LLAMA3_70B, num_hidden_layers=blocks), method, batch=n, seq_len=2048,
                                remat=True, mesh=mesh, dtype=jnp.bfloat16, k=a.k, lora_rank=a.lora_rank)
                tot[blocks] = r.total
            per_block = (tot[4] - tot[2]) / 2
            per_device = tot[2] + per_block * (layers - 2)
            tried.append({"devices": n, "compiled": True, "per_device_gb": round(per_device / GB, 2),
                          "state_per_device_gb": round(state / GB, 2),
                          "per_block_gb": round(per_block / GB, 3),
                          "fixed_gb": round((tot[2] - 2 * per_block) / GB, 3)})
            print(f"70B {method} on {n}: {per_device / GB:.1f} GB per device", file=sys.stderr, flush=True)
            if per_device <= DEVICE_BYTES:
                break
        fits = tried[-1].get("per_device_gb", float("inf")) * GB <= DEVICE_BYTES
        out[method] = {"devices": tried[-1]["devices"] if fits else None, "tried": tried}
    print("RESULT " + json.dumps(out), flush=True)


def fsdp_section(methods: tuple[str, ...], counts: tuple[int, ...], k: int, lora_rank: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                      f" --xla_force_host_platform_device_count={max(counts)}").strip(),
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--fsdp-child", "--methods", ",".join(methods),
           "--counts", ",".join(map(str, counts)), "--k", str(k), "--lora-rank", str(lora_rank)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    sys.stderr.write("".join(ln + "\n" for ln in proc.stderr.splitlines() if ln.startswith("70B ")))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"FSDP child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(lines[0][len("RESULT "):])
    cfg = llama3(LLAMA3_70B)
    for m in methods:  # the state itself, exactly, from the abstract pytrees
        _, trainable, frozen = abstract_state(cfg, m, dtype=jnp.bfloat16, k=k, lora_rank=lora_rank)
        opt = optimizer_state(trainable)
        n = res[m]["devices"] or max(counts)
        res[m].update(weights_gb=round(tree_bytes(frozen) / GB, 2), trainable_gb=round(tree_bytes(trainable) / GB, 2),
                      optimizer_gb=round(tree_bytes(opt) / GB, 2),
                      state_per_device_gb=round((fsdp_bytes(frozen, n) + fsdp_bytes(trainable, n)
                                                 + fsdp_bytes(opt, n)) / GB, 2))
    return res


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="remat only, a quarter-width block, one calibration size")
    p.add_argument("--no-quant", action="store_true", help="skip the quantization measurement")
    p.add_argument("--no-train", action="store_true", help="skip the 8B training/decode compilations")
    p.add_argument("--no-70b", action="store_true", help="skip the 70B FSDP fit")
    p.add_argument("--calib", default=None, help="calibration sizes SAMPLESxLEN,... (default 2x512,4x512)")
    p.add_argument("--activations", default="float32", choices=list(ACTIVATION_BYTES),
                   help="how quantization keeps the calibration activations (quantize_checkpoint's option)")
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--resummarize", default=None, metavar="LOG",
                   help="recompute the derived quantization figures from the measurements in LOG's final "
                        "JSON line (measures nothing) and print that line again")
    for hidden in ("--quant-child", "--fsdp-child", "--linear-child"):
        p.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--fp", "--q", "--methods", "--counts", "--linear"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--calib-len", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quant_child:
        return quant_child(a)
    if a.fsdp_child:
        return fsdp_child(a)
    if a.linear_child:
        return linear_child(a)

    if a.resummarize:
        prev = json.loads([ln for ln in Path(a.resummarize).read_text().splitlines() if ln.startswith("{")][-1])
        prev["quant"] = summarize_quant(prev["quant"])
        print(json.dumps(prev))
        return None
    t_start = time.perf_counter()
    res: dict[str, Any] = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                           "quick": a.quick, "k": a.k, "lora_rank": a.lora_rank, "batch": 1, "seq_len": a.seq_len,
                           "dtype": "bfloat16"}
    if not a.no_train:
        cfg = llama3(LLAMA3_8B)
        remats = (True,) if a.quick else (False, True)
        res["train_8b"], res["ratios_8b"], res["targets_8b"] = train_section(
            cfg, remats=remats, batch=1, seq_len=a.seq_len, k=a.k, lora_rank=a.lora_rank)
        res["decode_8b"] = decode_section(cfg, (1, 8), a.k, a.lora_rank, ("qeft", "fp") if a.quick else DECODE_KINDS)
        res["extrapolation_check_8b"] = extrapolation_check(
            LLAMA3_8B, "qeft", a.k, a.lora_rank, res["train_8b"]["remat"]["qeft"]["total"])
        log(f"8B per-block extrapolation check: {res['extrapolation_check_8b']}")
    if not a.no_70b:
        methods, counts = (("qeft",), (1, 2, 4, 8)) if a.quick else (METHODS, (1, 2, 4, 8, 16, 32))
        res["fsdp_70b"] = fsdp_section(methods, counts, a.k, a.lora_rank)
    if not a.no_quant:
        calib_spec = a.calib or ("1x256" if a.quick else "2x512,4x512")
        calib = [tuple(int(v) for v in c.split("x")) for c in calib_spec.split(",")]
        with tempfile.TemporaryDirectory() as tmp:
            res["quant"] = quant_section(QUARTER_8B if a.quick else LLAMA3_8B, calib, a.k, a.group_size,
                                         a.activations, Path(tmp))
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    res["parent_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
