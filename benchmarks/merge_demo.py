"""QEFT merging on the default model (paper section 5): tune on one task family, merge into a model
fully fine-tuned on another, and score both tasks before and after.

    python benchmarks/merge_demo.py [--quick] [--base QDIR] [--out DIR] [--reuse]

Models (all from the default model, SmolLM2-135M-Instruct):
  fp            the fp model
  qeft_base     Q: its QEFT 4-bit g128 k16 quantization (--base; copied into OUT/qeft_base so a
                concurrent rewrite of --base cannot change it mid-run; quantized here with 16 x 512
                calibration tokens if --base does not exist)
  qeft_tuned_A  T: Q with its weak columns tuned (method qeft) on task A = arc_easy (builtin data)
  full_B        F: the fp model fully fine-tuned (method full) on task B = piqa (builtin data)
  merged        M: F + (T - Q), the weak-column delta placed at the original channels of the weak
                columns through Q's hidden/FFN permutations (python -m qeft_jax.merge, fp target)

Training data: the train splits of the tasks (train.trainer's builtin data, which drops any question
whose context is in the task's eval split). Evaluation: the first --limit validation questions of
arc_easy and piqa, 0-shot, acc and acc_norm (the lm-eval definitions of qeft_jax.eval.tasks).

Learning rates: the paper fine-tunes weak columns at 1e-5 for a full epoch or more; this demo takes
only ~30 optimizer steps, so QEFT runs at 1e-4 (as qeft_jax.demo does) to move the 16 weak columns
per linear measurably in so few steps. The full fine-tune keeps the usual 1e-5: every weight moves,
and ~10 steps at 1e-5 already shift the model.

Checks printed along the way (not part of the scores):
  * M - F equals dense(T) - dense(Q) in original channel order (qeft_jax.checkpoint's
    independent dequantization path), and is zero outside the weak columns;
  * merging T - Q into Q itself (quantized target) reproduces T's tensors exactly.

Eval results are per question, so the table also gives paired counts (questions that turned
right / wrong from one model to another), which are less noisy at n=150 than the accuracies.
The final line is JSON: {"fp": {...}, "qeft_base": {...}, "qeft_tuned_A": {...}, "full_B": {...},
"merged": {...}} with per task {"acc", "acc_norm", "n"}, plus "meta" (settings, timings, checks).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

TASK_A, TASK_B = "arc_easy", "piqa"
TASKS = (TASK_A, TASK_B)
MODELS = ("fp", "qeft_base", "qeft_tuned_A", "full_B", "merged")
DEFAULT_BASE = "/tmp/demo_run/qeft-4bit-k16"

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f} s] {msg}", flush=True)


# ------------------------------------------------------------------------------------ the base
def prepare_base(base: Path, out: Path, calib_samples: int, calib_len: int) -> Path:
    """OUT/qeft_base: a snapshot of --base, or a fresh QEFT 4-bit k16 quantization of the fp model."""
    dst = out / "qeft_base"
    if (dst / "quantization.json").is_file():
        src_q = base / "quantization.json"
        if not src_q.is_file() or src_q.read_bytes() == (dst / "quantization.json").read_bytes():
            log(f"base: using {dst}")
            return dst
        shutil.rmtree(dst)
    if (base / "quantization.json").is_file():
        tmp = out / ".qeft_base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp, ignore=shutil.ignore_patterns(".*"))
        os.replace(tmp, dst)
        log(f"base: copied {base} -> {dst}")
        return dst
    from qeft_jax import data
    from qeft_jax.load import default_model_dir, load_tokenizer
    from qeft_jax.quant.pipeline import quantize_checkpoint
    from qeft_jax.recipes import make_recipe

    src = default_model_dir()
    tok = load_tokenizer(src)
    calib = data.token_sequences(tok, data.corpus_texts("calib"), calib_len, calib_samples, seed=0)
    log(f"base: {base} not found; quantizing {src} (QEFT 4-bit g128 k16, {calib_samples} x {calib_len} "
        f"calibration tokens) -> {dst}")
    s = quantize_checkpoint(src, dst, make_recipe("qeft", bits=4, group_size=128, k=16), calib,
                            overwrite=True, meta={"calibration_seed": 0,
                                                  "calibration_data": "boolq-wikipedia/calib"})
    log(f"base: quantized in {s['seconds']:.0f} s")
    return dst


# ------------------------------------------------------------------------------------ training
def run_training(name: str, cfg, reuse: bool) -> dict:
    from train.trainer import train

    log(f"{name}: {cfg.method} on {cfg.tasks} from {cfg.model}: {cfg.steps} steps, batch {cfg.batch_size} "
        f"(micro {cfg.micro_batch_size}) x {cfg.seq_len} tokens, lr {cfg.lr:g}")
    t0 = time.time()

    def on_step(step: int, rec: dict) -> None:
        extra = f", held-out loss {rec['eval_loss']:.4f}" if "eval_loss" in rec else ""
        log(f"{name}: step {step}/{cfg.steps} loss {rec['loss']:.4f} grad_norm {rec['grad_norm']:.3f} "
            f"({rec['step_s']:.1f} s){extra}")

    summary = train(cfg, overwrite=not reuse, on_step=on_step)
    recs = [json.loads(ln) for ln in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    steps_s = [r["step_s"] for r in recs if "step_s" in r]
    info = {"steps": cfg.steps, "lr": cfg.lr, "trainable_params": summary.get("trainable_params"),
            "train_rows": summary.get("train_rows"), "final_train_loss": summary.get("final_loss"),
            "heldout_loss_before": evals[0] if evals else None,
            "heldout_loss_after": evals[-1] if len(evals) > 1 else None,
            "median_step_s": float(np.median(steps_s[1:] or steps_s)) if steps_s else None,
            "seconds": round(time.time() - t0, 1)}
    log(f"{name}: done in {info['seconds']:.0f} s; {info['trainable_params']} trainable params; held-out loss "
        f"{_f(info['heldout_loss_before'])} -> {_f(info['heldout_loss_after'])}; median step "
        f"{_f(info['median_step_s'], 1)} s")
    return info


def _f(x, nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


# ------------------------------------------------------------------------------------ merging
def run_merge(tuned: Path, base: Path, target: Path, out: Path) -> dict:
    """The CLI, as a user would run it; returns its JSON summary."""
    cmd = [sys.executable, "-m", "qeft_jax.merge", "--tuned", str(tuned), "--base", str(base),
           "--target", str(target), "--out", str(out), "--overwrite"]
    log("merge: " + " ".join(cmd[1:]))
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"merge failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    summary["seconds"] = round(time.time() - t0, 1)
    log(f"merge: {summary}")
    return summary


def check_merge(tuned: Path, base: Path, full: Path, merged: Path) -> dict:
    """M - F against dense(T) - dense(Q) (original order), and merge(T, Q -> Q) == T."""
    from qeft_jax.checkpoint import dense_tensors, read_info
    from qeft_jax.io import SafetensorsReader
    from qeft_jax.spec import LINEAR_NAMES
    from train.merge import merge

    dq, dt = dense_tensors(read_info(base)), dense_tensors(read_info(tuned))
    rf, rm = SafetensorsReader([full / "model.safetensors"]), SafetensorsReader([merged / "model.safetensors"])
    worst, outside, changed, total, changed_cols = 0.0, 0, 0, 0, 0
    for k in rm.keys():
        f, m = np.asarray(rf.get(k), np.float64), np.asarray(rm.get(k), np.float64)
        diff = m - f
        if k not in dt or not any(k.endswith(n + ".weight") for n in LINEAR_NAMES):
            outside += int(np.count_nonzero(diff))  # nothing but the block linears may change
            continue
        want = np.asarray(dt[k], np.float64) - np.asarray(dq[k], np.float64)
        # M = f32(F + delta) and dense() rounds grid + weak to float32: compare in float32 ulps
        mag = np.maximum(np.abs(f), np.maximum(np.abs(dq[k]), np.abs(dt[k]))).astype(np.float32)
        tol = np.spacing(mag).astype(np.float64)
        worst = max(worst, float(np.max(np.abs(diff - want) / np.maximum(tol, 1e-30))))
        cols = np.flatnonzero(np.any(want != 0, axis=0))
        outside += int(np.count_nonzero(np.delete(diff, cols, axis=1)))
        changed += int(np.count_nonzero(diff))
        changed_cols += len(cols)
        total += diff.size
    # the same delta merged into the quantized base itself must give back the tuned checkpoint
    with tempfile.TemporaryDirectory(dir=merged.parent) as tmp:
        merge(tuned, base, base, Path(tmp) / "m", overwrite=True)
        ra = SafetensorsReader([tuned / "model.safetensors"])
        rb = SafetensorsReader([Path(tmp) / "m" / "model.safetensors"])
        same = set(ra.keys()) == set(rb.keys()) and all(
            np.array_equal(np.asarray(ra.get(k)), np.asarray(rb.get(k))) for k in ra.keys())
    res = {"merged_minus_full_vs_dense_delta_max_ulps": worst, "changed_outside_weak_columns": outside,
           "changed_linear_weights": changed, "linear_weights": total, "changed_input_columns": changed_cols,
           "merge_into_base_reproduces_tuned": bool(same)}
    log(f"merge check: {res}")
    if outside or worst > 4.0 or not same:
        log("merge check: FAILED (see above)")
    return res


# ------------------------------------------------------------------------------------ evaluation
def per_question(model, tok, task: str, limit: int | None) -> tuple[dict, np.ndarray, np.ndarray]:
    """evaluate_tasks' 0-shot scoring of one task, keeping each question's outcome."""
    from qeft_jax.eval.tasks import evaluate_tasks

    r = evaluate_tasks(model, tok, [task], limit=limit, batch_size=8, keep_outcomes=True)[task]
    o = r.pop("outcomes")
    return r, np.asarray(o["acc"], bool), np.asarray(o["acc_norm"], bool)


def model_key(path: Path, limit: int | None) -> str:
    st = (path / "model.safetensors").stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{limit}"


def evaluate_all(dirs: dict[str, Path], limit: int | None, cache_path: Path, reuse: bool
                 ) -> tuple[dict, dict]:
    from qeft_jax.io import write_json_atomic
    from qeft_jax.load import load_model

    cache = json.loads(cache_path.read_text()) if reuse and cache_path.is_file() else {}
    scores, outcomes = {}, {}
    for name, d in dirs.items():
        key = model_key(d, limit)
        if key in cache.get(name, {}):
            got = cache[name][key]
            scores[name] = got["scores"]
            outcomes[name] = {t: {m: np.asarray(v, bool) for m, v in o.items()} for t, o in got["outcomes"].items()}
            log(f"eval {name}: cached {scores[name]}")
            continue
        t0 = time.time()
        model, tok, _ = load_model(d)
        scores[name], outcomes[name] = {}, {}
        for task in TASKS:
            t1 = time.time()
            r, acc, norm = per_question(model, tok, task, limit)
            scores[name][task] = r
            outcomes[name][task] = {"acc": acc, "acc_norm": norm}
            log(f"eval {name} {task}: acc {r['acc']:.4f} acc_norm {r['acc_norm']:.4f} (n={r['n']}, "
                f"{time.time() - t1:.0f} s)")
        del model
        log(f"eval {name}: {time.time() - t0:.0f} s")
        cache.setdefault(name, {})[key] = {
            "scores": scores[name],
            "outcomes": {t: {m: v.astype(int).tolist() for m, v in o.items()} for t, o in outcomes[name].items()}}
        write_json_atomic(cache_path, cache)
    return scores, outcomes


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def print_table(scores: dict, outcomes: dict) -> None:
    labels = {"fp": "fp (default model)", "qeft_base": "Q   QEFT 4-bit k16", "qeft_tuned_A": "T   Q + qeft on A",
              "full_B": "F   fp + full on B", "merged": "M   F + (T - Q)"}
    head = f"{'model':<22}" + "".join(f"  {t + ' ' + m:>17}" for t in TASKS for m in ("acc", "acc_norm"))
    print("\n" + head)
    print("-" * len(head))
    for name in MODELS:
        row = f"{labels[name]:<22}"
        for t in TASKS:
            for m in ("acc", "acc_norm"):
                row += f"  {scores[name][t][m]:>17.4f}"
        print(row)
    n = {t: scores["fp"][t]["n"] for t in TASKS}
    print(f"(n = {', '.join(f'{t} {n[t]}' for t in TASKS)}; binomial std. error of an accuracy near 0.5: "
          f"{stderr(0.5, min(n.values())):.3f})")
    print("\npaired changes (questions wrong -> right / right -> wrong), acc | acc_norm:")
    for a, b, why in (("qeft_base", "qeft_tuned_A", "tuning A on Q"), ("fp", "full_B", "full fine-tune on B"),
                      ("full_B", "merged", "merging A's delta into F"), ("fp", "merged", "both, vs the fp model")):
        cells = []
        for t in TASKS:
            parts = []
            for m in ("acc", "acc_norm"):
                x, y = outcomes[a][t][m], outcomes[b][t][m]
                parts.append(f"+{int(np.sum(~x & y))}/-{int(np.sum(x & ~y))}")
            cells.append(f"{t} {parts[0]} | {parts[1]}")
        print(f"  {b} vs {a} ({why}): " + ";  ".join(cells))


# ------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2+2 steps, 16 questions per task")
    p.add_argument("--base", default=DEFAULT_BASE, help="QEFT 4-bit k16 checkpoint of the default model")
    p.add_argument("--out", default="/tmp/merge_demo", help="work directory (models, logs, results.json)")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished stages in --out (resume an interrupted run with the same settings)")
    p.add_argument("--qeft-steps", type=int, default=None, help="default 30 (quick: 2)")
    p.add_argument("--full-steps", type=int, default=None, help="default 10 (quick: 2)")
    p.add_argument("--qeft-lr", type=float, default=1e-4)
    p.add_argument("--full-lr", type=float, default=1e-5)
    p.add_argument("--limit", type=int, default=None, help="questions per task (default 150; quick: 16)")
    p.add_argument("--limit-per-task", type=int, default=1000, help="training examples drawn per task")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=16, help="only if --base must be quantized")
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    qeft_steps = a.qeft_steps or (2 if a.quick else 30)
    full_steps = a.full_steps or (2 if a.quick else 10)
    limit = a.limit if a.limit is not None else (16 if a.quick else 150)

    import jax

    from qeft_jax.load import default_model_dir
    from train.trainer import TrainConfig

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log(f"merge demo: task A = {TASK_A} (QEFT weak columns, {qeft_steps} steps @ {a.qeft_lr:g}), task B = "
        f"{TASK_B} (full fine-tune, {full_steps} steps @ {a.full_lr:g}), eval limit {limit}; backend "
        f"{jax.default_backend()}, {os.cpu_count()} CPUs; out {out}")
    fp_dir = default_model_dir()
    q_dir = prepare_base(Path(a.base), out, a.calib_samples, a.calib_len)
    t_dir, f_dir, m_dir = out / "qeft_tuned_A", out / "full_B", out / "merged"
    common = dict(data="builtin", limit_per_task=a.limit_per_task, seq_len=a.seq_len, batch_size=a.batch,
                  micro_batch_size=a.micro_batch, seed=a.seed, eval_rows=16, keep=1)
    timings = {}
    t0 = time.time()
    train_a = run_training("qeft A", TrainConfig(model=str(q_dir), out=str(t_dir), method="qeft", tasks=[TASK_A],
                                                 steps=qeft_steps, lr=a.qeft_lr, eval_every=qeft_steps,
                                                 save_every=qeft_steps, **common), a.reuse)
    timings["train_qeft_A_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    train_b = run_training("full B", TrainConfig(model=str(fp_dir), out=str(f_dir), method="full", tasks=[TASK_B],
                                                 steps=full_steps, lr=a.full_lr, eval_every=full_steps,
                                                 save_every=full_steps, **common), a.reuse)
    shutil.rmtree(f_dir / "checkpoints", ignore_errors=True)  # 1.6 GB of optimizer state, not needed
    timings["train_full_B_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    if a.reuse and (m_dir / "merge.json").is_file() and (m_dir / "model.safetensors").stat().st_mtime > max(
            (t_dir / "model.safetensors").stat().st_mtime, (f_dir / "model.safetensors").stat().st_mtime):
        merge_info = {"reused": str(m_dir)}
        log(f"merge: reusing {m_dir}")
    else:
        merge_info = run_merge(t_dir, q_dir, f_dir, m_dir)
    checks = check_merge(t_dir, q_dir, f_dir, m_dir)
    timings["merge_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    dirs = {"fp": fp_dir, "qeft_base": q_dir, "qeft_tuned_A": t_dir, "full_B": f_dir, "merged": m_dir}
    scores, outcomes = evaluate_all(dirs, limit, out / "evals.json", a.reuse)
    timings["eval_s"] = round(time.time() - t0, 1)
    timings["total_s"] = round(time.time() - T0, 1)

    print_table(scores, outcomes)
    print(f"\ntimings: {timings}")
    result = {name: scores[name] for name in MODELS}
    result["meta"] = {"task_A": TASK_A, "task_B": TASK_B, "limit": limit, "num_fewshot": 0,
                      "train_qeft_A": train_a, "train_full_B": train_b, "merge": merge_info,
                      "merge_check": checks, "timings": timings, "base": str(q_dir),
                      "base_source": str(Path(a.base)), "quick": a.quick}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
