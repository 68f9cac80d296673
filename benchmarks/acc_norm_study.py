"""Why does a quantized model lose more acc_norm than acc? Per-question evidence from task_table runs.

    python benchmarks/acc_norm_study.py --ref fp=EVAL.json --models qeft4=EVAL.json,gptq4=EVAL.json \
        [--tasks arc_easy,...] [--out study.json]

Each EVAL.json is a `benchmarks/task_table.py` results file (it keeps every question's outcomes and
per-choice log-likelihoods). For each task and model, against the reference model on the same
questions:
  - acc and acc_norm differences with their paired standard errors;
  - flips: questions whose acc_norm outcome changed while acc's did not (the normalisation alone);
  - the log-likelihood shift of the gold choice and of the distractors, in nats per character
    (acc_norm's unit), and how far the shift grows with the choice's length: a shift that is
    a constant per token moves choices of different lengths differently per character, so it can
    reorder acc_norm's ranking where acc's ranking (total log-likelihood) barely moves;
  - for two-choice tasks with unequal continuation lengths (boolq's " yes" / " no"), how often the
    longer answer is picked under acc and under acc_norm: acc_norm's decision depends on the
    log-likelihood level, not only on the difference, so a model that is less confident overall
    swings it.
Final line JSON.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from qeft_jax.eval import tasks as T


def load(spec: str) -> tuple[str, dict]:
    name, _, path = spec.partition("=")
    rec = json.loads(Path(path).read_text())
    results = rec["results"]
    key = name if name in results else next(iter(results))
    return name, results[key]


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.asarray(b, float) - np.asarray(a, float)
    return 100 * d.mean(), 100 * d.std(ddof=1) / math.sqrt(len(d))


def study_task(task: str, ref: dict, other: dict) -> dict:
    n = min(ref["n"], other["n"])
    qs = T.load_questions(task, "eval", n)
    chars = [np.array([T.norm_length(c) for c in q.continuations], float) for q in qs]
    out = {"n": n}
    for k in ("acc", "acc_norm"):
        out[k + "_diff"] = paired(np.array(ref["outcomes"][k][:n]), np.array(other["outcomes"][k][:n]))
    a0, a1 = np.array(ref["outcomes"]["acc"][:n]), np.array(other["outcomes"]["acc"][:n])
    n0, n1 = np.array(ref["outcomes"]["acc_norm"][:n]), np.array(other["outcomes"]["acc_norm"][:n])
    same_acc = a0 == a1
    out["norm_only_flips"] = {"gained": int(np.sum(same_acc & (n1 > n0))), "lost": int(np.sum(same_acc & (n1 < n0)))}
    gold_shift, dist_shift, shifts, lengths = [], [], [], []
    for q, c, l0, l1 in zip(qs, chars, ref["logprobs"][:n], other["logprobs"][:n]):
        d = np.asarray(l1) - np.asarray(l0)
        gold_shift.append(d[q.gold] / c[q.gold])
        dist_shift.append(np.mean(np.delete(d / c, q.gold)))
        shifts += list(d)
        lengths += list(c)
    out["gold_shift_per_char"] = float(np.mean(gold_shift))
    out["distractor_shift_per_char"] = float(np.mean(dist_shift))
    out["shift_per_char_of_length"] = float(np.polyfit(lengths, shifts, 1)[0]) if len(set(lengths)) > 1 else 0.0
    if all(len(c) == 2 and c[0] != c[1] for c in chars):
        longer = [int(np.argmax(c)) for c in chars]
        for name, lps in (("ref", ref["logprobs"][:n]), ("model", other["logprobs"][:n])):
            lp = np.asarray(lps)
            c = np.asarray(chars)
            out[f"{name}_picks_longer"] = {
                "acc": float(np.mean(np.argmax(lp, 1) == longer)),
                "acc_norm": float(np.mean(np.argmax(lp / c, 1) == longer)),
                "mean_logprob": float(lp.mean())}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="NAME=EVAL.json of the reference (fp) model")
    p.add_argument("--models", required=True, help="NAME=EVAL.json,... compared with the reference")
    p.add_argument("--tasks", default=None, help="default: every task the reference has")
    p.add_argument("--out", default=None, help="write the study as JSON here")
    a = p.parse_args(argv)
    ref_name, ref = load(a.ref)
    others = dict(load(s) for s in a.models.split(",") if s.strip())
    tasks = a.tasks.split(",") if a.tasks else [t for t in ref if "logprobs" in ref[t]]
    study = {m: {t: study_task(t, ref[t], res[t]) for t in tasks if t in res} for m, res in others.items()}
    for m, per in study.items():
        print(f"\n{m} vs {ref_name}")
        print("| task | n | acc Δ ± se | acc_norm Δ ± se | acc_norm-only flips +/− | gold / distractor shift "
              "(nats/char) | shift per char of length |\n|---|---|---|---|---|---|---|")
        for t, r in per.items():
            print(f"| {t} | {r['n']} | {r['acc_diff'][0]:+.1f} ± {r['acc_diff'][1]:.1f} | "
                  f"{r['acc_norm_diff'][0]:+.1f} ± {r['acc_norm_diff'][1]:.1f} | "
                  f"{r['norm_only_flips']['gained']} / {r['norm_only_flips']['lost']} | "
                  f"{r['gold_shift_per_char']:+.4f} / {r['distractor_shift_per_char']:+.4f} | "
                  f"{r['shift_per_char_of_length']:+.4f} |")
            if "ref_picks_longer" in r:
                print(f"|   {t}: picks the longer answer (acc / acc_norm): {ref_name} "
                      f"{100 * r['ref_picks_longer']['acc']:.1f}% / {100 * r['ref_picks_longer']['acc_norm']:.1f}%,"
                      f" {m} {100 * r['model_picks_longer']['acc']:.1f}% / "
                      f"{100 * r['model_picks_longer']['acc_norm']:.1f}%; mean log-likelihood "
                      f"{r['ref_picks_longer']['mean_logprob']:.3f} -> {r['model_picks_longer']['mean_logprob']:.3f}"
                      " | | | | | |")
    if a.out:
        Path(a.out).write_text(json.dumps(study, indent=1))
    print(json.dumps(study))


if __name__ == "__main__":
    main()
