"""Fine-tuning quality of QEFT against QLoRA, LoRA and full fine-tuning on the default model
(the paper's Table 2 claim, scaled to SmolLM2-135M and the built-in instruction data).

    python benchmarks/finetune_table.py [--quick] [--jobs N] [--work DIR] [--out FILE.json]

What it does (every stage resumable: rerun the same command after a kill):
1. bases: the fp model; QEFT 4-bit g128 with k = 16 and k = 64 (qeft runs tune their weak columns);
   GPTQ 4-bit g128 with k = 0 (QLoRA's base: the same 4-bit grid, no weak columns).
2. data: the built-in instruction set (train splits of the bundled tasks, eval questions removed)
   written once to WORK/instructions.jsonl; every run reads it, so all see the same batches.
3. sweep: each method at each of its learning rates (--lrs; the paper's LR first) for the same
   steps x batch x seq_len tokens; the best LR of a method is the one with the lowest final
   held-out loss (a split of the data that no run trains on).
4. tasks: zero-shot arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq (--limit questions
   each) and MMLU 5-shot (--mmlu-limit per subject), before (the untuned base) and after (each
   method's best run), with per-question outcomes; gains carry the paired standard error against
   the untuned model of the same base. The qeft runs store their weak columns in float32
   (--weak-dtype float32); the same runs rounded to fp16 (the default storage) are scored too.
5. timing: with --jobs > 1 the sweep shares the accelerator, so each method's best LR is rerun
   alone for --time-steps steps (same compiled step, from the persistent compilation cache when
   JAX_COMPILATION_CACHE_DIR is set) to measure step time; with --jobs 1 the sweep's own step
   times are used; --time-steps 0 skips it.

Writes --out (default docs/results/finetune_table.json: settings, sweep, curves, per-question
outcomes) after every stage, prints markdown tables, and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from task_table import paired_diff  # the sibling script (benchmarks/ is on sys.path)
from qeft_jax.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
ZERO_SHOT = "arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq"
# method -> (base, quantize flags or None for the fp model, train flags)
RUNS = {
    "qeft_k16": ("qeft16", ["--method", "qeft"]),
    "qeft_k64": ("qeft64", ["--method", "qeft"]),
    "qlora_r64": ("gptq", ["--method", "qlora", "--lora-rank", "64"]),
    "lora_r64": ("fp", ["--method", "lora", "--lora-rank", "64"]),
    "full": ("fp", ["--method", "full"]),
}
BASES = {
    "fp": None,
    "qeft16": ["--method", "qeft", "--k", "16"],
    "qeft64": ["--method", "qeft", "--k", "64"],
    "gptq": ["--method", "gptq", "--k", "0"],
}
# The paper's LR first (Table 4: qeft 1e-5 at k < 128, lora/qlora 2e-4, full as qeft), then larger ones.
DEFAULT_LRS = {"qeft_k16": "1e-5,1e-4,1e-3,3e-3", "qeft_k64": "1e-5,1e-4,1e-3,3e-3",
               "qlora_r64": "2e-4,5e-4,1e-3", "lora_r64": "2e-4,5e-4,1e-3", "full": "1e-5,3e-5,1e-4"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(name: str, cmd: list[str], logs: Path) -> None:
    """One stage as a child process (each is resumable on its own); its output goes to logs/NAME.log."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # children share one accelerator
    t0 = time.time()
    with open(logs / f"{name}.log", "a") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        tail = (logs / f"{name}.log").read_text()[-1500:]
        raise RuntimeError(f"{name} failed (rc {rc}); end of {logs / (name + '.log')}:\n{tail}")
    log(f"done {name} ({time.time() - t0:.0f} s)")


def parallel(jobs: int, work: dict[str, list[str]], logs: Path) -> None:
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for f in [pool.submit(run, name, cmd, logs) for name, cmd in work.items()]:
            f.result()


def lr_name(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def read_metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.is_file() else []


def eval_curve(metrics: list[dict]) -> list[tuple[int, float]]:
    return [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]


def fp16_copy(src: Path, dst: Path) -> float:
    """`src` (a qeft run stored with --weak-dtype float32) with its weak columns rounded to float16, as
    the default export stores them; returns the share of tuned weak entries that round back to the
    untuned base's value (the part of the tuning that fp16 storage loses)."""
    import dataclasses  # noqa: PLC0415 - only this stage needs these
    from qeft_jax.checkpoint import aux_files, read_info, read_tensors, tokenizer_files, write_quantized  # noqa: PLC0415
    from qeft_jax.io import atomic_dir  # noqa: PLC0415

    info = read_info(src)
    base = read_tensors(read_info(info.meta["finetune"]["base"]))
    tensors = dict(read_tensors(info))
    lost, moved = 0, 0
    for k in [k for k in tensors if k.endswith(".weak")]:
        tuned = tensors[k]
        tensors[k] = tuned.astype(np.float16)
        changed = tuned != base[k].astype(np.float32)
        moved += int(changed.sum())
        lost += int((changed & (tensors[k] == base[k])).sum())
    if not dst.is_dir():
        recipe = dataclasses.replace(info.recipe, weak_dtype=None)
        with atomic_dir(dst) as tmp:
            write_quantized(tmp, info.config, tensors, {**info.derived_meta(), "recipe": recipe.to_dict()},
                            {**aux_files(info.path), **tokenizer_files(info.path)})
    return lost / max(moved, 1)


def dir_bytes(path: Path, names: tuple[str, ...]) -> int:
    return sum((path / n).stat().st_size for n in names if (path / n).is_file())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps and questions: checks the pipeline")
    p.add_argument("--work", default=None, help="runs and checkpoints (default: .cache/finetune_table[_quick])")
    p.add_argument("--out", default=None, help="default docs/results/finetune_table[_quick].json")
    p.add_argument("--jobs", type=int, default=1, help="child processes at once (an accelerator: 4-8)")
    p.add_argument("--methods", default=",".join(RUNS), help=f"subset of {','.join(RUNS)}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300; quick 3)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default 16; quick 2)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default = batch size")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default 512; quick 128)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out loss every N steps (default steps/10)")
    p.add_argument("--lrs", default="", help="METHOD=LR:LR,... overrides (e.g. qeft_k16=1e-4:1e-3)")
    p.add_argument("--time-steps", type=int, default=30, help="steps of the timing reruns (--jobs > 1)")
    p.add_argument("--limit", type=int, default=None,
                   help="questions per zero-shot task (default 2000; quick 8; 0: all)")
    p.add_argument("--mmlu-limit", type=int, default=None,
                   help="MMLU questions per subject (default 10; quick 2, anatomy only)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=None, help="default 128 x 2048 tokens; quick 8 x 256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="only print the tables of a finished results file")
    a = p.parse_args(argv)
    if a.report:
        report(json.loads(Path(a.report).read_text()))
        return
    q = a.quick
    steps = a.steps or (3 if q else 300)
    batch = a.batch_size or (2 if q else 16)
    micro = a.micro_batch_size or batch
    seq_len = a.seq_len or (128 if q else 512)
    eval_every = a.eval_every or max(1, steps // 10)
    limit = (8 if q else 2000) if a.limit is None else (a.limit or None)  # 0: every question
    mmlu_limit = a.mmlu_limit or (2 if q else 10)
    mmlu = "mmlu_anatomy" if q else "mmlu"  # quick: one subject (57 subjects of 5-shot prompts are slow)
    calib = ["--calib-samples", str(a.calib_samples or (8 if q else 128)), "--seq-len", "256" if q else "2048"]
    suffix = "_quick" if q else ""
    work = Path(a.work or ROOT / ".cache" / f"finetune_table{suffix}")
    out = Path(a.out or ROOT / "docs" / "results" / f"finetune_table{suffix}.json")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in RUNS:
            raise SystemExit(f"error: unknown method {m!r}; choose from {', '.join(RUNS)}")
    lrs = dict(DEFAULT_LRS)
    for item in filter(None, (s.strip() for s in a.lrs.split(","))):
        name, _, vals = item.partition("=")
        if name not in RUNS or not vals:
            raise SystemExit(f"error: --lrs entries look like METHOD=LR:LR, got {item!r}")
        lrs[name] = vals.replace(":", ",")
    lrs = {m: [float(x) for x in lrs[m].split(",")] for m in methods}
    if q:  # two LRs per method are enough to exercise the selection
        lrs = {m: v[:2] for m, v in lrs.items()}
    settings = {"steps": steps, "batch_size": batch, "micro_batch_size": micro, "seq_len": seq_len,
                "tokens_per_run": steps * batch * seq_len, "eval_every": eval_every, "lrs": lrs,
                "limit": limit, "mmlu": mmlu, "mmlu_limit": mmlu_limit, "mmlu_fewshot": 5, "calib": calib,
                "seed": a.seed, "quick": q}
    record = json.loads(out.read_text()) if out.is_file() else {}
    if record.get("settings", settings) != settings:
        raise SystemExit(f"error: {out} holds results for other settings ({record['settings']}); use another --out")
    record["settings"] = settings
    logs = work / "logs"
    py = [sys.executable]
    save = lambda: write_json_atomic(out, record, indent=1)  # noqa: E731

    # 1. bases
    from qeft_jax.load import default_model_dir  # noqa: PLC0415 - keeps --help fast
    base_dirs = {"fp": default_model_dir()}
    need = {RUNS[m][0] for m in methods}
    todo = {}
    for b in sorted(need - {"fp"}):
        base_dirs[b] = work / "bases" / b
        if not (base_dirs[b] / "config.json").is_file():
            todo[f"quantize_{b}"] = py + ["-m", "qeft_jax.quantize", "--model", "default", *BASES[b], "--bits", "4",
                                          "--group-size", "128", *calib, "--seed", str(a.seed),
                                          "--out", str(base_dirs[b])]
    parallel(a.jobs, todo, logs)

    # 2. data
    data_file = work / "instructions.jsonl"
    if not data_file.is_file():
        from train.data import builtin_examples  # noqa: PLC0415 - keeps --help fast
        from train.trainer import TrainConfig  # noqa: PLC0415 - the trainer's own defaults
        cfg = TrainConfig(out="-")
        recs = builtin_examples(cfg.tasks, 200 if q else cfg.limit_per_task, a.seed)
        tmp = data_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
        os.replace(tmp, data_file)
        log(f"{len(recs)} instruction examples -> {data_file}")

    # 3. sweep
    def train_cmd(m: str, lr: float, run_dir: Path, n_steps: int, every: int) -> list[str]:
        # qeft runs store their weak columns in float32; stage 5 also scores them rounded to fp16
        f32 = ["--weak-dtype", "float32"] if m.startswith("qeft") else []
        return py + ["-m", "qeft_jax.train", "--model", str(base_dirs[RUNS[m][0]]), *RUNS[m][1], *f32,
                     "--data", str(data_file), "--out", str(run_dir), "--steps", str(n_steps),
                     "--batch-size", str(batch), "--micro-batch-size", str(micro), "--seq-len", str(seq_len),
                     "--lr", repr(lr), "--seed", str(a.seed), "--eval-every", str(every),
                     "--save-every", str(n_steps), "--keep", "1", "--no-progress"]
    runs = {(m, lr): work / "runs" / f"{m}_lr{lr_name(lr)}" for m in methods for lr in lrs[m]}
    parallel(a.jobs, {f"train_{d.name}": train_cmd(m, lr, d, steps, eval_every)
                      for (m, lr), d in runs.items() if not (d / "train_done.json").is_file()}, logs)
    sweep: dict[str, dict] = {}
    for (m, lr), d in runs.items():
        s = json.loads((d / "train_done.json").read_text())
        curve = eval_curve(read_metrics(d))
        sweep.setdefault(m, {})[lr_name(lr)] = {
            "lr": lr, "eval_loss_before": curve[0][1], "eval_loss_after": curve[-1][1], "eval_curve": curve,
            "train_loss_final": s["final_loss"], "step_s_median": s.get("step_s_median"),
            "trainable_params": s["trainable_params"], "step_memory": s.get("step_memory"), "dir": str(d)}
    best = {m: min(sweep[m].values(), key=lambda r: r["eval_loss_after"]
                   if math.isfinite(r["eval_loss_after"]) else math.inf) for m in methods}
    record["sweep"] = sweep
    record["best_lr"] = {m: b["lr"] for m, b in best.items()}
    save()

    # 4. tasks, before and after
    models = {f"base_{b}": base_dirs[b] for b in sorted(need)}
    models.update({f"tuned_{m}": Path(best[m]["dir"]) for m in methods})
    fp16_lost = {}
    for m in [m for m in methods if m.startswith("qeft")]:
        models[f"tuned_{m}_fp16"] = work / "fp16" / m
        fp16_lost[m] = fp16_copy(Path(best[m]["dir"]), models[f"tuned_{m}_fp16"])
    evals = work / "evals"
    todo = {}
    for name, path in models.items():
        for kind, tasks, lim, shots in (("zs", ZERO_SHOT, limit, 0), ("mmlu", mmlu, mmlu_limit, 5)):
            todo[f"eval_{kind}_{name}"] = py + [
                str(ROOT / "benchmarks" / "task_table.py"), "--models", f"{name}={path}", "--tasks", tasks,
                *(["--limit", str(lim)] if lim else []), "--num-fewshot", str(shots),
                "--batch-size", str(a.eval_batch_size), "--out", str(evals / f"{kind}_{name}.json")]
    evals.mkdir(parents=True, exist_ok=True)
    parallel(a.jobs, todo, logs)
    scores: dict[str, dict] = {}
    for name in models:
        for kind in ("zs", "mmlu"):
            rec = json.loads((evals / f"{kind}_{name}.json").read_text())
            scores.setdefault(name, {}).update(  # per-choice log-likelihoods stay in the eval files
                {t: {k: v for k, v in r.items() if k != "logprobs"} for t, r in rec["results"][name].items()})
    record["tasks"] = scores

    # 5. timing (alone on the accelerator; last, so an interrupted run still has its task table)
    timing = {}
    if a.jobs > 1 and a.time_steps:
        for m in methods:
            d = work / "timing" / m
            if not (d / "train_done.json").is_file():
                run(f"time_{m}", train_cmd(m, best[m]["lr"], d, a.time_steps, 0), logs)
            timing[m] = json.loads((d / "train_done.json").read_text())["step_s_median"]
    else:
        timing = {m: best[m]["step_s_median"] for m in methods}

    # the table
    task_names = ZERO_SHOT.split(",") + [mmlu]
    rows = {}
    for m in methods:
        b = best[m]
        rows[m] = {"lr": b["lr"], "base": f"base_{RUNS[m][0]}", "trainable_params": b["trainable_params"],
                   "base_bytes": dir_bytes(base_dirs[RUNS[m][0]], ("model.safetensors",)),
                   "eval_loss_before": b["eval_loss_before"], "eval_loss_after": b["eval_loss_after"],
                   "step_s": timing[m], "step_s_alone": a.jobs == 1 or bool(a.time_steps),
                   "step_peak_bytes": (b["step_memory"] or {}).get("peak_bytes"),
                   **gains(scores, f"base_{RUNS[m][0]}", f"tuned_{m}", task_names)}
    record["table"] = rows
    # the same tuned weak columns stored in float32 vs rounded to float16
    record["weak_storage"] = {m: {"share_of_delta_lost_in_fp16": fp16_lost[m],
                                  **gains(scores, f"tuned_{m}_fp16", f"tuned_{m}", task_names)}
                              for m in fp16_lost}
    save()
    report(record)


def gains(scores: dict, before: str, after: str, task_names: list[str]) -> dict:
    """Accuracy gains of model `after` over `before` on the same questions, in points with paired
    standard errors: per task, their mean, and pooled over all questions (with and without boolq,
    where this 135M model scores below the majority-class rate and gains are yes/no bias swings)."""
    per = {}
    for t in task_names:
        d, se = paired_diff(scores[before][t]["outcomes"]["acc"], scores[after][t]["outcomes"]["acc"])
        per[t] = {"before": scores[before][t]["acc"], "after": scores[after][t]["acc"], "gain_pts": d, "se_pts": se}

    def pooled(names: list[str]) -> tuple[float, float]:
        d = np.concatenate([np.asarray(scores[after][t]["outcomes"]["acc"], float)
                            - scores[before][t]["outcomes"]["acc"] for t in names])
        return 100 * float(d.mean()), 100 * float(d.std(ddof=1) / math.sqrt(len(d)))
    return {"tasks": per, "mean_gain_pts": float(np.mean([g["gain_pts"] for g in per.values()])),
            "pooled_gain_pts": pooled(task_names), "pooled_gain_no_boolq_pts":
                pooled([t for t in task_names if t != "boolq"])}


def report(record: dict) -> None:
    """The markdown tables of a finished record (also: --report FILE)."""
    s = record["settings"]
    print(f"\nsweep (held-out loss after {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens):")
    for m, runs in record["sweep"].items():
        print(f"  {m:10s} " + "  ".join(f"lr {k}: {v['eval_loss_before']:.3f} -> {v['eval_loss_after']:.3f}"
                                        for k, v in runs.items()))
    rows = record["table"]
    task_names = list(next(iter(rows.values()))["tasks"])
    head = ["method", "LR", "trainable", "base MB", "held-out before -> after", "step s", "step GB"]
    head += [f"{t} (gain ± se)" for t in task_names] + ["pooled gain ± se", "without boolq"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for m, r in rows.items():
        cells = [m, f"{r['lr']:g}", f"{r['trainable_params'] / 1e6:.2f}M", f"{r['base_bytes'] / 2**20:.0f}",
                 f"{r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f}",
                 f"{r['step_s']:.3f}" + ("" if r["step_s_alone"] else " (shared)"),
                 f"{r['step_peak_bytes'] / 2**30:.2f}" if r["step_peak_bytes"] else "–"]
        cells += [f"{100 * g['after']:.1f} ({g['gain_pts']:+.1f}±{g['se_pts']:.1f})" for g in r["tasks"].values()]
        cells += ["{:+.2f}±{:.2f}".format(*r[k]) for k in ("pooled_gain_pts", "pooled_gain_no_boolq_pts")]
        print("| " + " | ".join(cells) + " |")
    for m, w in record.get("weak_storage", {}).items():
        print(f"{m}: float32 minus fp16 weak storage, acc (pts ± se): "
              + ", ".join(f"{t} {g['gain_pts']:+.1f}±{g['se_pts']:.1f}" for t, g in w["tasks"].items())
              + f"; {100 * w['share_of_delta_lost_in_fp16']:.1f}% of the tuned entries round back to the base in fp16")
    print(json.dumps({m: {k: r[k] for k in ("lr", "trainable_params", "eval_loss_after", "step_s",
                                            "step_peak_bytes", "pooled_gain_pts", "pooled_gain_no_boolq_pts")}
                      for m, r in rows.items()}))

if __name__ == "__main__":
    main()
