"""Zero-shot task accuracy of several models side by side (e.g. fp vs QEFT 4-bit vs GPTQ 4-bit).

    python benchmarks/task_table.py --models fp=default,qeft4=DIR,gptq4=DIR \
        --tasks arc_easy,arc_challenge,hellaswag,winogrande,piqa,boolq,mmlu --limit 300 --out results.json

Every model scores the same questions (the first --limit of each task; for mmlu, of each subject)
as `qeft_jax.eval.tasks.evaluate_tasks` scores them. Each (model, task) is scored in parts of
--part-size questions and --out is rewritten after every part (a task's finished parts under
"partial" until its last), so a killed run resumes where it stopped, losing at most one part; the
file records the settings, the models, each model's checkpoint (the sha256 of its tensors) and every
question's outcome. (A question's scores do not depend on the part it was scored in, up to float
rounding.) A model whose checkpoint changed since its results were saved (re-made under the same
path) is an error, so one name never mixes the results of two checkpoints.

Prints a markdown table of acc / acc_norm in points, each model's difference to the first with its
paired standard error (the models answer the same questions, so the difference's error is
sd(outcome_m - outcome_first) / sqrt(n), much smaller than either accuracy's own binomial error,
which is shown for the first model).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np



def parse_models(spec: str) -> dict[str, str]:
    models = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--models entries must look like NAME=DIR or NAME=default, got {item!r}")
        if name in models:
            raise ValueError(f"--models names model {name!r} twice")
        models[name] = path
    if not models:
        raise ValueError("--models is empty")
    return models


def checkpoint_id(path: str) -> str:
    """What a model name stands for: "default", or the sha256 of its checkpoint's tensor file (a
    quantized checkpoint records it when written; an fp one is hashed here)."""
    if path == "default":
        return path
    from qeft_jax.checkpoint import TENSORS_FILE, read_info, sha256_file

    info = read_info(path)
    return info.meta.get("sha256") or sha256_file(info.path / TENSORS_FILE)


def paired_diff(a: list[int], b: list[int]) -> tuple[float, float]:
    """(mean(b - a), its standard error) over paired 0/1 outcomes, in points."""
    d = np.asarray(b, float) - np.asarray(a, float)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return 100 * d.mean(), 100 * se


def table(record: dict, models: list[str], tasks: list[str]) -> str:
    first = models[0]
    head = ["task", "n"] + [f"{m} acc / acc_norm" for m in models] + [f"±se ({first})"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        res = [record["results"].get(m, {}).get(t) for m in models]
        if res[0] is None:
            continue
        cells = [t, str(res[0]["n"])]
        for m, r in zip(models, res):
            if r is None:
                cells.append("–")
                continue
            cell = f"{100 * r['acc']:.1f} / {100 * r['acc_norm']:.1f}"
            if m != first:
                diffs = [paired_diff(res[0]["outcomes"][k], r["outcomes"][k]) for k in ("acc", "acc_norm")]
                cell += " (" + " / ".join(f"{d:+.1f}±{e:.1f}" for d, e in diffs) + ")"
            cells.append(cell)
        p, n = res[0]["acc"], res[0]["n"]
        cells.append(f"{100 * math.sqrt(p * (1 - p) / n):.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="NAME=DIR|default,... (the first is the reference)")
    p.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,winogrande,piqa,boolq,mmlu")
    p.add_argument("--limit", type=int, default=None, help="the first N questions of each task (subject)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--part-size", type=int, default=1000, help="questions scored between two writes of --out")
    p.add_argument("--out", required=True, help="JSON results file (resumed if it exists)")
    a = p.parse_args(argv)
    if a.part_size < 1:
        p.error(f"--part-size must be >= 1, not {a.part_size}")
    from qeft_jax import load_model
    from qeft_jax.eval import tasks as T
    from qeft_jax.io import write_json_atomic

    models = parse_models(a.models)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    for t in tasks:
        T.resolve_task(t)
    out = Path(a.out)
    settings = {"limit": a.limit, "num_fewshot": a.num_fewshot}
    record = json.loads(out.read_text()) if out.is_file() else {"settings": settings, "results": {}, "seconds": {}}
    if record["settings"] != settings:
        raise ValueError(f"{out} holds results for {record['settings']}, not {settings}; use another --out")
    ids = {n: checkpoint_id(p) for n, p in models.items()}  # finished results and unfinished parts alike
    recorded = record.get("checkpoints", {})
    remade = [n for n, i in ids.items() if recorded.get(n, i) != i]
    if remade:
        raise ValueError(f"{out} holds results of {', '.join(remade)} from another checkpoint (the sha256 of "
                         f"its tensors changed: re-made?); score it under a new name or into another --out")
    record["checkpoints"] = {**recorded, **ids}
    record["models"] = {**record.get("models", {}), **models}  # a run of some models keeps the others' paths
    loaded: dict[str, tuple] = {}
    for t in tasks:  # task by task, so a partial run still compares every model on the tasks it did
        for name, path in models.items():
            if t in record["results"].get(name, {}):
                continue
            if name not in loaded:
                loaded[name] = load_model(path)[:2]
            model, tok = loaded[name]
            questions = T.task_questions(t, a.limit, a.num_fewshot)
            part = record.setdefault("partial", {}).setdefault(name, {}).setdefault(
                t, {"parts": [], "seconds": 0.0})
            while (done := sum(r["n"] for r in part["parts"])) < len(questions):
                t0 = time.time()
                r = T.score_questions(model, tok, questions[done:done + a.part_size], batch_size=a.batch_size,
                                      progress=True, desc=f"{name} {t} {done}+")
                part["parts"].append({k: r[k] for k in ("n", "outcomes", "logprobs")})
                part["seconds"] += time.time() - t0
                write_json_atomic(out, record, indent=1)
            res = T.merge_scores(part["parts"])
            record["results"].setdefault(name, {})[t] = res
            record["seconds"].setdefault(name, {})[t] = round(part["seconds"], 1)
            del record["partial"][name][t]
            if not record["partial"][name]:
                del record["partial"][name]
            if not record["partial"]:
                del record["partial"]
            write_json_atomic(out, record, indent=1)
            print(f"{name} {t}: acc {res['acc']:.4f} acc_norm {res['acc_norm']:.4f} n {res['n']} "
                  f"({part['seconds']:.0f} s)", flush=True)
    print(table(record, list(models), tasks))
    print(json.dumps({m: {t: {k: r[k] for k in ("acc", "acc_norm", "n")} for t, r in res.items()}
                      for m, res in record["results"].items()}))


if __name__ == "__main__":
    main()
