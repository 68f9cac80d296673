"""Benchmark / check the fused QEFT kernels: pallas_kernels/qeft_gemv.py (GPU, Triton) and
pallas_kernels/qeft_tpu.py (TPU, Mosaic).

    python benchmarks/kernel.py [--quick]        # GPU: time shapes; CPU: interpret + lowering checks
    python benchmarks/kernel.py --autotune       # GPU only: fill the block table (block_table.table_path())
    python benchmarks/kernel.py --shapes 11008x4096,4096x4096   # time / autotune only these
    python benchmarks/kernel.py --print-table    # show the block table

On a GPU, per GEMV shape (out x in) and M: kernel µs, effective GB/s (bytes the kernel must read:
packed weight + scales + zeros + weak + activations + output), % of the device's HBM peak, and the
speedup over a bf16 ``jnp.dot`` against the dense weight and over dequantize + dot (the XLA
prefill path), all measured side by side in the same process. Each timed jit call runs the op on
C distinct weight copies (C chosen so the copies together exceed ~120 MB, i.e. more than the
H100's 50 MB L2, capped at 32) so large shapes are timed from HBM, not L2; the smallest shapes
(the default model) stay L2-resident, which the output marks.

Always (GPU or not): the interpret-mode kernel is compared with ``qeft_matmul_ref`` on a few
shapes, and every (bits, group, dtype) config plus each benchmark shape is lowered for CUDA with
``jax.export`` (platforms=["cuda"]). Without a GPU nothing can be timed and the script says so.

The TPU (Mosaic) kernel, always: its TPU-interpret run (``pltpu.InterpretParams``) against the
reference over a bf16 config grid (``tpu_interpret_max_rel_err``) and ``jax.export`` for
platforms=["tpu"] of every (bits, group, M regime) config plus the benchmark shapes
(``lowers_for_tpu``: true when all export; a Mosaic ``tpu_custom_call``). On a TPU, additionally:
the same grid compiled (``tpu_check_max_rel_err``) and per shape the kernel's µs on a layout
prepared once (``qeft_tpu.prepare``), GB/s, % of the roofline below, and a bf16 ``jnp.dot`` and
dequantize + dot side by side (``tpu_rows``).

TPU roofline (M = 1, 4 bits, g = 128, k = 128, bf16 x/y). Bytes per call = packed weights (out ·
in/8 · 4) + scales and zeros + weak (out · k · 2) + x (in · 2) + y (out · 2); the TPU layout keeps
scales/zeros in f32 (16-bit in the packed format):

    out x in        weights    scales+zeros   weak     total (16-bit s/z)  total (TPU layout)
    4096 x 4096     8.39 MB    0.52 / 1.05 MB 1.05 MB   9.98 MB             10.50 MB
    14336 x 4096    29.36 MB   1.84 / 3.67 MB 3.67 MB  34.90 MB             36.74 MB
    4096 x 14336    29.36 MB   1.84 / 3.67 MB 1.05 MB  32.28 MB             34.12 MB

    HBM-bound time  v5e (819 GB/s)      v6e (1640 GB/s)       (TPU layout; 16-bit s/z in brackets)
    4096 x 4096     12.8 µs (12.2)      6.4 µs (6.1)
    14336 x 4096    44.9 µs (42.6)      22.4 µs (21.3)
    4096 x 14336    41.7 µs (39.4)      20.8 µs (19.7)

(a bf16 dense GEMV reads 33.6 / 117.4 MB: 41 / 143 µs on v5e). At decode the kernel reads x
padded to 16 rows once (128 KiB at in = 4096) and writes a 16-row y: small next to the weights;
``tpu_rows`` reports both the bytes above (``bytes``, f32 s/z) and the prepared layout's
(``bytes_layout``, padding included).

The last line printed is JSON: interpret_max_rel_err, lowers_for_cuda, tpu_interpret_max_rel_err,
lowers_for_tpu, gpu, tpu, timed, and on a GPU gpu_check_max_rel_err (the interpret grid compiled
for the GPU), speedup_vs_bf16 (in=4096, out=11008, M=1) and "rows" ({"<out>x<in>_M<m>": {us,
us_bf16, us_dequant, gbps, ...}}: what ``python -m qeft_jax.plot kernel-speed`` draws) among others.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from pallas_kernels import block_table, qeft_tpu
from pallas_kernels.qeft_gemv import dequant_matmul, qeft_matmul
from pallas_kernels.testing import lower_for_cuda, lower_for_tpu, random_inputs, rel_err
from qeft_jax.packing import num_groups, qeft_matmul_ref, values_per_word

# (out, in): Llama-7B-like, Llama-70B-like MLP, and the default model (hidden 576, inter 1536,
# 192 = k/v projection width)
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672),
          (576, 576), (1536, 576), (576, 1536), (192, 576)]
HEADLINE = (11008, 4096)  # out=11008, in=4096

# Peak HBM bandwidth in bytes/s by device-kind substring (first match wins).
HBM_PEAK = [("H200", 4.8e12), ("GH200", 4.0e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
            ("H800", 3.35e12), ("B200", 8.0e12), ("A100-SXM4-80GB", 2.04e12),
            ("A100 80GB", 1.94e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12),
            ("RTX 4090", 1.008e12), ("A10", 0.6e12)]

L2_SPILL_BYTES = 120e6

# TPU HBM bandwidth (bytes/s) by device-kind substring, lower case (first match wins).
TPU_HBM_PEAK = [("v6", 1640e9), ("v5 lite", 819e9), ("v5e", 819e9), ("v5p", 2765e9), ("v5", 2765e9),
                ("v4", 1228e9)]
TPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (576, 576), (1536, 576), (576, 1536)]


def gemv_bytes(out: int, n: int, *, bits: int, group: int, k: int, m: int = 1,
               scale_bytes: int = 2, act_bytes: int = 2) -> int:
    """Bytes one call must move: packed weights + scales and zeros + weak + x + y."""
    words = -(-n // values_per_word(bits))
    return (out * words * 4 + 2 * out * num_groups(n, group) * scale_bytes + out * k * 2
            + act_bytes * m * (n + out))


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'11008x4096,576x576' -> [(11008, 4096), (576, 576)] (out x in)."""
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]  # type: ignore[misc]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are OUTxIN,... (e.g. 11008x4096), got {text!r}") from None


def hbm_peak(kind: str) -> float | None:
    for sub, bw in HBM_PEAK:
        if sub in kind:
            return bw
    return None


# ------------------------------------------------------------------ checks that need no GPU
def correctness_checks(quick: bool, interpret: bool) -> float:
    """Max relative error of the kernel against qeft_matmul_ref over a config grid: in interpret mode
    (any machine) or compiled for the GPU (interpret=False)."""
    #        out   n     bits g    k   M  dtype          scattered
    cases = [(576, 576, 4, 128, 16, 1, jnp.bfloat16, False),
             (1536, 576, 3, 64, 5, 3, jnp.float16, True),
             (576, 1536, 2, 32, 0, 8, jnp.bfloat16, False),
             (192, 576, 4, 32, 16, 1, jnp.float16, True)]
    if not quick:
        cases += [(576, 576, b, g, 16, m, jnp.bfloat16, True)
                  for b, g, m in [(2, 128, 3), (3, 32, 1), (4, 64, 8)]]
        cases += [(1024, 4096, 4, 128, 128, 1, jnp.bfloat16, True)]
    worst = 0.0
    for out, n, bits, g, k, m, dt, sc in cases:
        x, qw, s, z, weak, idx = random_inputs(out, n, bits=bits, group_size=g, k=k, m=m, dtype=dt,
                                               scattered=sc)
        t0 = time.perf_counter()
        y = qeft_matmul(x, qw, s, z, weak, idx, bits=bits, group_size=g, interpret=interpret)
        ref = qeft_matmul_ref(x, qw, s, z, weak, idx, bits=bits, group_size=g)
        err = rel_err(y, ref)
        worst = max(worst, err)
        print(f"{'interpret' if interpret else 'gpu':9s} {out:>5}x{n:<5} bits={bits} g={g:<3} k={k:<3} M={m} "
              f"{jnp.dtype(dt).name:8s} rel_err={err:.2e} ({time.perf_counter() - t0:.1f}s)")
    return worst


def lowering_checks(quick: bool, bits: int, group: int, k: int) -> tuple[bool, int]:
    configs = [dict(out=200, n=576, bits=b, group_size=g, k=5, m=3, dtype=dt)
               for b, g, dt in itertools.product((2, 3, 4), (32, 64, 128),
                                                 (jnp.bfloat16, jnp.float16))]
    ms = (1,) if quick else (1, 8)
    configs += [dict(out=o, n=n, bits=bits, group_size=group, k=k, m=m)
                for (o, n), m in itertools.product(SHAPES, ms)]
    return lower_all(lower_for_cuda, configs, "cuda")


def lower_all(lower, configs: list[dict], platform: str) -> tuple[bool, int]:
    """(every config lowered?, how many) for `lower(**config)`; each failure is printed."""
    ok = True
    for cfg in configs:
        try:
            lower(**cfg)
        except Exception as e:  # noqa: BLE001 - report every failing config
            ok = False
            print(f"{platform.upper()} LOWERING FAILED {cfg}: {type(e).__name__}: {str(e)[:300]}")
    print(f"{platform.upper()} lowering (jax.export, platforms=['{platform}']): {len(configs)} configs, "
          f"{'all ok' if ok else 'FAILURES'}")
    return ok, len(configs)


# ------------------------------------------------------------------ GPU timing
def _copies(qbytes: int) -> int:
    return int(min(32, max(1, math.ceil(L2_SPILL_BYTES / qbytes))))


def _time(fn, args, reps: int) -> float:
    """Median wall time of one jitted call (seconds); fn returns a pytree."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _make_copies(out, n, m, bits, group, k, copies, dtype=jnp.bfloat16):
    """`copies` independent input sets (x, qw, s, z, weak, idx), each its own device buffers."""
    return [random_inputs(out, n, bits=bits, group_size=group, k=k, m=m, dtype=dtype, scattered=True,
                          seed=i) for i in range(copies)]


def _unrolled(op):
    """jit(fn over C input sets): one dispatch runs op C times on distinct weights (no CSE/hoisting).
    The sets arrive as separate arguments, never slices of one stacked array: a slice feeding a
    custom call (the Pallas kernel) or a dot can be materialised as a copy, which would be timed too."""
    return jax.jit(lambda sets: [op(*args) for args in sets])


def warm_up_gpu(seconds: float = 2.0) -> None:
    """Raise the GPU's clocks before timing: an idle H100/H200 sits at a few hundred MHz and needs
    sustained load to boost, which a handful of microsecond-scale timed calls never gives it."""
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f(a).block_until_ready()


def time_shape(out, n, m, bits, group, k, reps, kernel_kw=None):
    vpw = values_per_word(bits)
    g = num_groups(n, group)
    qbytes = out * (-(-n // vpw)) * 4 + 2 * out * g * 2 + out * k * 2 + 2 * m * (n + out)
    c = _copies(qbytes)
    sets = _make_copies(out, n, m, bits, group, k, c)
    kw = dict(kernel_kw or {})
    kern = _unrolled(lambda *a: qeft_matmul(*a, bits=bits, group_size=group, **kw))
    deq = _unrolled(lambda *a: dequant_matmul(*a, bits=bits, group_size=group))
    keys = jax.random.split(jax.random.key(0), c)
    dense_sets = [(x, jax.random.normal(key, (n, out), jnp.bfloat16)) for (x, *_), key in zip(sets, keys)]
    dense = _unrolled(lambda xx, w: jnp.dot(xx, w, preferred_element_type=jnp.float32)
                      .astype(jnp.bfloat16))
    t_k = _time(kern, (sets,), reps) / c
    t_d = _time(deq, (sets,), reps) / c
    t_b = _time(dense, (dense_sets,), reps) / c
    y = qeft_matmul(*sets[0], bits=bits, group_size=group, **kw)
    ref = qeft_matmul_ref(*sets[0], bits=bits, group_size=group)
    del dense_sets
    return dict(us=t_k * 1e6, us_bf16=t_b * 1e6, us_dequant=t_d * 1e6, bytes=qbytes,
                gbps=qbytes / t_k / 1e9, speedup_vs_bf16=t_b / t_k, speedup_vs_dequant=t_d / t_k,
                copies=c, l2_resident=qbytes * c < L2_SPILL_BYTES, rel_err=rel_err(y, ref))


def time_kernel_only(bits, group, reps, kernel_kw, sets):
    kern = _unrolled(lambda *a: qeft_matmul(*a, bits=bits, group_size=group, **kernel_kw))
    return _time(kern, (sets,), reps) / len(sets)


def autotune(shapes, bits, group, k, reps, full: bool, prefill_m: int):
    gpu = block_table.gpu_name()
    new = {}
    for out, n in shapes:
        vpw = values_per_word(bits)
        qbytes = out * (-(-n // vpw)) * 4
        sets = _make_copies(out, n, 1, bits, group, k, _copies(qbytes))
        base = block_table.lookup(n=n, out=out, bits=bits)

        def run(cfg):
            try:
                return time_kernel_only(bits, group, reps, cfg, sets)
            except Exception as e:  # noqa: BLE001 - configs that fail to compile are skipped
                print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}")
                return float("inf")

        keys = ("block_n", "block_w", "num_warps", "num_stages", "split_k", "use_dot")
        best = {kk: base[kk] for kk in keys}
        best_t = run(best)
        if full:
            stages = [dict(zip(keys, v)) for v in itertools.product(
                (16, 32, 64, 128), (16, 32, 64, 128), (2, 4, 8), (1, 2, 3, 4), (1, 2, 4),
                (True, False))]
            stages = [stages]
        else:  # staged sweep: tiles and inner product first, then launch params and split
            stages = [[dict(best, block_n=bn, block_w=bw, use_dot=ud) for bn, bw, ud in
                       itertools.product((16, 32, 64, 128), (16, 32, 64, 128), (True, False))],
                      None]
        for stage in stages:
            if stage is None:
                stage = [dict(best, num_warps=w, num_stages=st, split_k=sk) for w, st, sk in
                         itertools.product((2, 4, 8), (1, 2, 3, 4), (1, 2, 4))]
            for cfg in stage:
                t = run(cfg)
                if t < best_t:
                    best, best_t = dict(cfg), t
        # prefill: XLA dequantize + dot vs the Pallas kernel tiled over M
        xm = random_inputs(out, n, bits=bits, group_size=group, k=k, m=prefill_m, scattered=True)
        t_xla = _time(jax.jit(lambda *a: qeft_matmul(*a, bits=bits, group_size=group,
                                                     prefill="xla")), xm, reps)
        try:
            t_pal = _time(jax.jit(lambda *a: qeft_matmul(*a, bits=bits, group_size=group,
                                                         prefill="pallas", **{
                                                             kk: best[kk] for kk in
                                                             ("block_n", "block_w", "num_warps",
                                                              "num_stages")})), xm, reps)
        except Exception as e:  # noqa: BLE001
            print(f"  prefill pallas failed: {e}")
            t_pal = float("inf")
        best["prefill"] = "pallas" if t_pal < t_xla else "xla"
        print(f"autotune {out}x{n} bits={bits}: {best} {best_t * 1e6:.1f}us; prefill M={prefill_m}"
              f" xla {t_xla * 1e6:.0f}us pallas {t_pal * 1e6:.0f}us")
        new[block_table.key(gpu, n, out, bits)] = dict(best, us=best_t * 1e6,
                                                       prefill_us_xla=t_xla * 1e6,
                                                       prefill_us_pallas=t_pal * 1e6)
        block_table.update(new)  # write as we go (a long sweep keeps partial results)
    print(f"wrote {len(new)} entries to {block_table.table_path()}")


# ------------------------------------------------------------------ the TPU (Mosaic) kernel
def tpu_correctness_checks(quick: bool, interpret: bool) -> float:
    """Max relative error (bf16) of qeft_tpu against qeft_matmul_ref: TPU interpret mode on any
    machine, or compiled with Mosaic on a TPU (interpret=False)."""
    #        out   n     bits g    k   M
    cases = [(576, 576, 4, 128, 16, 1), (1536, 576, 3, 64, 5, 8), (576, 1536, 2, 32, 0, 24),
             (200, 576, 4, 32, 16, 3)]
    if not quick:
        cases += [(576, 576, b, g, 16, m) for b, g, m in [(2, 128, 3), (3, 32, 1), (4, 64, 8),
                                                          (3, 128, 24)]]
        cases += [(1024, 4096, 4, 128, 128, 1)]
    worst = 0.0
    for out, n, bits, g, k, m in cases:
        x, qw, s, z, weak, idx = random_inputs(out, n, bits=bits, group_size=g, k=k, m=m, scattered=True)
        t0 = time.perf_counter()
        y = qeft_tpu.qeft_matmul(x, qw, s, z, weak, idx, bits=bits, group_size=g, interpret=interpret)
        err = rel_err(y, qeft_matmul_ref(x, qw, s, z, weak, idx, bits=bits, group_size=g))
        worst = max(worst, err)
        print(f"{'tpu-intp' if interpret else 'tpu':9s} {out:>5}x{n:<5} bits={bits} g={g:<3} k={k:<3} "
              f"M={m:<2} bfloat16 rel_err={err:.2e} ({time.perf_counter() - t0:.1f}s)")
    return worst


def tpu_lowering_checks(quick: bool, bits: int, group: int, k: int) -> tuple[bool, int]:
    """jax.export for TPU of every (bits, group, M) config, plus the timed shapes (prepared layout)."""
    configs = [{"out": 200, "n": 576, "bits": b, "group_size": g, "k": kk, "m": m}
               for b, g, (m, kk) in itertools.product((2, 3, 4), (32, 64, 128),
                                                      ((1, 5), (8, 0), (24, 16)))]
    ms = (1,) if quick else (1, 8, 512)
    configs += [{"out": o, "n": n, "bits": bits, "group_size": group, "k": k, "m": m, "prepared": True}
                for (o, n), m in itertools.product(TPU_SHAPES, ms)]
    return lower_all(lower_for_tpu, configs, "tpu")


def tpu_time_shape(out, n, m, bits, group, k, reps):
    """One shape on a TPU: the kernel on a layout prepared once, a bf16 dot, dequantize + dot."""
    x, qw, s, z, weak, idx = random_inputs(out, n, bits=bits, group_size=group, k=k, m=m,
                                           scattered=True)
    lay = jax.jit(lambda *a: qeft_tpu.prepare(*a, bits=bits, group_size=group, in_features=n))(
        qw, s, z, weak, idx)
    kern = jax.jit(lambda x, lay: qeft_tpu.matmul_prepared(x, lay))
    deq = jax.jit(lambda *a: dequant_matmul(*a, bits=bits, group_size=group))
    w = jax.random.normal(jax.random.key(0), (n, out), jnp.bfloat16)
    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    t_k = _time(kern, (x, lay), reps)
    t_d = _time(deq, (x, qw, s, z, weak, idx), reps)
    t_b = _time(dense, (x, w), reps)
    err = rel_err(kern(x, lay), qeft_matmul_ref(x, qw, s, z, weak, idx, bits=bits, group_size=group))
    need = gemv_bytes(out, n, bits=bits, group=group, k=k, m=m, scale_bytes=4)
    moved = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(lay)) + 2 * m * (n + out)
    return {"us": t_k * 1e6, "us_bf16": t_b * 1e6, "us_dequant": t_d * 1e6, "bytes": need,
            "bytes_layout": moved, "gbps": need / t_k / 1e9, "speedup_vs_bf16": t_b / t_k,
            "speedup_vs_dequant": t_d / t_k, "rel_err": err}


def tpu_section(args, summary: dict) -> None:
    t0 = time.perf_counter()
    summary["tpu_interpret_max_rel_err"] = tpu_correctness_checks(args.quick, interpret=True)
    ok, nconf = tpu_lowering_checks(args.quick, args.bits, args.group, args.k)
    summary["lowers_for_tpu"] = ok
    summary["tpu_lowering_configs"] = nconf
    tpu = jax.devices()[0].device_kind if jax.default_backend() == "tpu" else None
    summary["tpu"] = tpu
    print(f"TPU checks took {time.perf_counter() - t0:.1f}s")
    if tpu is None:
        return
    summary["tpu_check_max_rel_err"] = tpu_correctness_checks(False, interpret=False)
    peak = next((bw for sub, bw in TPU_HBM_PEAK if sub in tpu.lower()), None)
    reps = args.reps or (5 if args.quick else 20)
    rows = {}
    print(f"\nTPU '{tpu}' HBM peak {peak / 1e9 if peak else float('nan'):.0f} GB/s; bits={args.bits} "
          f"g={args.group} k={args.k}")
    for (out, n), m in itertools.product(TPU_SHAPES, args.m or ([1] if args.quick else [1, 8])):
        r = tpu_time_shape(out, n, m, args.bits, args.group, args.k, reps)
        r["pct_roofline"] = 100 * r["gbps"] * 1e9 / peak if peak else None
        rows[f"{out}x{n}_M{m}"] = r
        print(f"{out:>6}x{n:<6} {m:>2} {r['us']:9.1f}us {r['gbps']:7.0f} GB/s bf16 {r['us_bf16']:8.1f}us "
              f"deq+dot {r['us_dequant']:8.1f}us rel_err {r['rel_err']:.1e}")
    summary["tpu_rows"] = {name: {kk: (round(v, 4) if isinstance(v, float) else v)
                                  for kk, v in r.items()} for name, r in rows.items()}
    summary["tpu_max_rel_err"] = max(r["rel_err"] for r in rows.values())
    summary["timed"] = True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer checks / repetitions")
    ap.add_argument("--autotune", action="store_true", help="GPU: sweep block sizes, write table")
    ap.add_argument("--full-sweep", action="store_true", help="autotune the full cross product")
    ap.add_argument("--print-table", action="store_true")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--k", type=int, default=128, help="weak columns per layer")
    ap.add_argument("--m", type=int, nargs="+", default=None, help="batch rows to time (<= 8)")
    ap.add_argument("--prefill-m", type=int, default=512)
    ap.add_argument("--reps", type=int, default=None, help="timed calls per measurement (quick 5, else 20)")
    ap.add_argument("--shapes", type=parse_shapes, default=SHAPES, metavar="OUTxIN,...",
                    help="GEMV shapes to time and autotune (default: all of SHAPES)")
    args = ap.parse_args(argv)

    if args.print_table:
        print(block_table.format_table())
        if not (args.autotune or args.quick):
            return 0
    gpu = block_table.gpu_name()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, GPU: {gpu or 'none'}")

    summary: dict = {}
    t0 = time.perf_counter()
    summary["interpret_max_rel_err"] = correctness_checks(args.quick, interpret=True)
    if gpu is not None:  # the same grid compiled for the GPU (the full grid: it is fast there)
        summary["gpu_check_max_rel_err"] = correctness_checks(False, interpret=False)
    ok, nconf = lowering_checks(args.quick, args.bits, args.group, args.k)
    summary["lowers_for_cuda"] = ok
    summary["lowering_configs"] = nconf
    summary["gpu"] = gpu
    print(f"checks took {time.perf_counter() - t0:.1f}s")
    tpu_section(args, summary)

    if gpu is None and summary.get("tpu"):
        print(json.dumps(summary))
        return 0
    if gpu is None:
        if args.autotune:
            print("--autotune needs a GPU: no GPU found, nothing can be timed; table unchanged.")
        print("No GPU: kernel timings are UNMEASURED (interpret mode is not a performance proxy).")
        summary["timed"] = False
        print(json.dumps(summary))
        return 0

    reps = args.reps or (5 if args.quick else 20)
    warm_up_gpu()
    if args.autotune:
        autotune(args.shapes, args.bits, args.group, args.k, 3 if args.quick else 10,
                 args.full_sweep, args.prefill_m)
        print(block_table.format_table())

    peak = hbm_peak(gpu)
    ms = args.m or ([1] if args.quick else [1, 8])
    print(f"\nHBM peak for '{gpu}': {peak / 1e12 if peak else float('nan'):.2f} TB/s; "
          f"bits={args.bits} g={args.group} k={args.k}")
    print(f"{'out x in':>13} {'M':>2} {'kernel us':>9} {'GB/s':>7} {'%peak':>6} {'bf16 us':>8} "
          f"{'deq+dot us':>10} {'vs bf16':>7} {'vs deq':>7} {'rel_err':>8}")
    rows = {}
    gpu_err = 0.0
    for (out, n), m in itertools.product(args.shapes, ms):
        r = time_shape(out, n, m, args.bits, args.group, args.k, reps)
        rows[f"{out}x{n}_M{m}"] = r
        gpu_err = max(gpu_err, r["rel_err"])
        pct = 100 * r["gbps"] * 1e9 / peak if peak else float("nan")
        print(f"{out:>6}x{n:<6} {m:>2} {r['us']:9.1f} {r['gbps']:7.0f} {pct:6.1f} "
              f"{r['us_bf16']:8.1f} {r['us_dequant']:10.1f} {r['speedup_vs_bf16']:7.2f} "
              f"{r['speedup_vs_dequant']:7.2f} {r['rel_err']:8.1e}{'  (L2-resident)' if r['l2_resident'] else ''}")
    head = rows[f"{HEADLINE[0]}x{HEADLINE[1]}_M1"] if f"{HEADLINE[0]}x{HEADLINE[1]}_M1" in rows else None
    summary["timed"] = True
    summary["gpu_max_rel_err"] = gpu_err
    summary["rows"] = {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                       for name, r in rows.items()}
    if head:
        summary["speedup_vs_bf16"] = round(head["speedup_vs_bf16"], 3)
        summary["speedup_vs_dequant_dot"] = round(head["speedup_vs_dequant"], 3)
        summary["us_4096_11008"] = round(head["us"], 2)
        summary["pct_hbm_peak_4096_11008"] = (round(100 * head["gbps"] * 1e9 / peak, 1)
                                              if peak else None)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
