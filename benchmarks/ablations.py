"""The paper's ablations on the default model (issue 16, item 2; paper Table 1 and section 6.1).

    python benchmarks/ablations.py [--quick] [--work DIR] [--out FILE.json] [--skip-tuning]

Three tables, one calibration set and one evaluation for all (the settings are recorded in --out):
  (a) k in {0, 8, 16, 32, 64, 128} (QEFT 4-bit g128, global weak columns + OGR): perplexity, bytes of
      the block linears, and the tuning gain: held-out loss before/after the same short weak-column
      fine-tune (k = 0 has nothing to tune);
  (b) global weak columns (Algorithm 1 + OGR) vs per-layer selection (OWQ's Eq. 3 per linear, no
      reordering) at the same k and group size: perplexity, tuning gain, and the time of one decode
      step in the XLA path three ways: OGR (the weak inputs are a static slice of x), the same OGR
      checkpoint read by index (an online gather: QuantSpec.weak_first switched off), and the
      per-layer checkpoint (a gather by its own indices);
  (c) group size 32 / 64 / 128, act-order off / on (k = 16): perplexity and bytes.

Every quantization is written to WORK/<config> and every tuning run to WORK/tune_<config>; a rerun
reuses what exists and --out is rewritten after each result, so a killed run resumes. The tuning
runs are child processes of `python -m qeft_jax.train` on the built-in instruction data (train
splits), all on the same batches. Decode steps are timed interleaved (A, B, C, A, B, C, ...) so a
shared machine's load falls on all three alike. The final line is JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from finetune_table import ROOT, eval_curve, log, read_metrics, run  # sibling scripts (benchmarks/ on sys.path)
from quality import linear_bytes
from qeft_jax.io import write_json_atomic

K_VALUES = (0, 8, 16, 32, 64, 128)
GROUPS = (32, 64, 128)


def configs(quick: bool) -> dict[str, dict[str, Any]]:
    """name -> make_recipe overrides (all QEFT 4-bit)."""
    out = {f"k{k}": {"k": k, "group_size": 128} for k in ((0, 16) if quick else K_VALUES)}
    out["per_layer_k16"] = {"k": 16, "group_size": 128, "weak": "per_layer"}
    for g, act in [(64, True)] if quick else [(g, act) for g in GROUPS for act in (False, True)]:
        if (g, act) != (128, False):  # that one is k16
            out[f"g{g}" + ("_act" if act else "")] = {"k": 16, "group_size": g, "act_order": act}
    return out


def use_index_gather(model: Any) -> int:
    """Make every QEFTLinear read its weak inputs by index (an online gather) although OGR put them
    first: the same checkpoint and arithmetic without OGR's static slice. Returns how many changed."""
    from flax import nnx  # noqa: PLC0415
    from qeft_jax.qlinear import QEFTLinear  # noqa: PLC0415

    n = 0
    for _, m in nnx.iter_graph(model):
        if isinstance(m, QEFTLinear) and m.spec.weak_first:
            m.spec = dataclasses.replace(m.spec, weak_first=False)
            n += 1
    return n


def decode_step_ms(models: dict[str, Any], prompt_ids: list[list[int]], *, new_tokens: int, rounds: int,
                   pad_id: int) -> dict[str, dict[str, float]]:
    """Median milliseconds per decode step of each model, timed in interleaved rounds."""
    from qeft_jax.generation import generate_with_stats  # noqa: PLC0415

    kw = dict(max_new_tokens=new_tokens, stop_tokens=(), pad_id=pad_id)
    for m in models.values():
        generate_with_stats(m, prompt_ids, **kw)  # compile
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            s = generate_with_stats(m, prompt_ids, **kw)[1]
            times[name].append(1e3 * s.decode_s / s.decode_steps)
    return {name: {"median_ms": round(statistics.median(t), 3), "min_ms": round(min(t), 3), "runs": len(t)}
            for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="k in {0,16}, per-layer k16, g64 with act-order, 3 tuning steps: checks the pipeline")
    p.add_argument("--work", default=None, help="checkpoints and runs (default .cache/ablations[_quick])")
    p.add_argument("--out", default=None, help="default docs/results/ablations[_quick].json")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration sequences (x --calib-len tokens)")
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--eval-samples", type=int, default=24, help="perplexity windows (x 512 tokens)")
    p.add_argument("--steps", type=int, default=None, help="tuning steps per run (default 20; quick 3)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="tuning tokens per row (default 256; quick 128)")
    p.add_argument("--lr", type=float, default=1e-4, help="tuning LR (qeft's CLI default at k < 128)")
    p.add_argument("--eval-rows", type=int, default=32, help="held-out rows per tuning evaluation")
    p.add_argument("--decode-rounds", type=int, default=None, help="interleaved decode timings (default 7; quick 2)")
    p.add_argument("--skip-tuning", action="store_true",
                   help="start no tuning run (finished ones in WORK are still read)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    q = a.quick
    steps = a.steps or (3 if q else 20)
    seq_len = a.seq_len or (128 if q else 256)
    rounds = a.decode_rounds or (2 if q else 7)
    suffix = "_quick" if q else ""
    work = Path(a.work or ROOT / ".cache" / f"ablations{suffix}")
    out = Path(a.out or ROOT / "docs" / "results" / f"ablations{suffix}.json")
    cfgs = configs(q)
    settings = {"bits": 4, "calib": [a.calib_samples, a.calib_len], "eval_windows": [a.eval_samples, 512],
                "tuning": {"steps": steps, "batch_size": a.batch_size, "seq_len": seq_len, "lr": a.lr,
                           "eval_rows": a.eval_rows, "data": "builtin"},
                "decode": {"batch": 1, "new_tokens": 16 if q else 32, "rounds": rounds}, "seed": a.seed}
    record = json.loads(out.read_text()) if out.is_file() else {}
    if record.get("settings", settings) != settings:
        raise SystemExit(f"error: {out} holds results for other settings; use another --out")
    record["settings"] = settings  # each result records its own recipe
    results: dict[str, dict] = record.setdefault("results", {})
    save = lambda: write_json_atomic(out, record, indent=1)  # noqa: E731

    from qeft_jax import data, load_model  # noqa: PLC0415 - keeps --help fast
    from qeft_jax.eval.perplexity import perplexity  # noqa: PLC0415
    from qeft_jax.load import default_model_dir  # noqa: PLC0415
    from qeft_jax.quant.pipeline import quantize_checkpoint  # noqa: PLC0415
    from qeft_jax.recipes import make_recipe  # noqa: PLC0415

    src = default_model_dir()
    model, tok, _ = load_model(src)
    eval_ids = data.token_sequences(tok, data.corpus_texts("eval"), 512, a.eval_samples, seed=None)
    calib_ids = data.token_sequences(tok, data.corpus_texts("calib"), a.calib_len, a.calib_samples, seed=a.seed)
    if "fp_ppl" not in record:
        record["fp_ppl"] = perplexity(model, eval_ids, progress=False)[0]
        save()
    del model
    log(f"fp perplexity {record['fp_ppl']:.3f}")

    # 1. quantize + perplexity
    for name, over in cfgs.items():
        if name in results:
            continue
        d = work / name
        recipe = make_recipe("qeft", bits=4, **over)
        t0 = time.time()
        if not (d / "quantization.json").is_file():
            quantize_checkpoint(src, d, recipe, calib_ids, progress=False,
                                meta={"calibration_data": f"calib split, {a.calib_samples} x {a.calib_len}"})
        secs = time.time() - t0
        qmodel, _, _ = load_model(d)
        ppl = perplexity(qmodel, eval_ids, progress=False)[0]
        results[name] = {"recipe": recipe.to_dict(), "ppl": ppl, "linear_bytes": linear_bytes(d),
                         "quantize_s": round(secs, 1), "dir": str(d)}
        save()
        log(f"{name}: ppl {ppl:.3f} ({secs:.0f} s)")

    # 2. decode step: OGR slice vs online gather vs per-layer indices
    from qeft_jax.tokenization import batch_prompt_ids, pad_id  # noqa: PLC0415
    from decode import PROMPT  # noqa: PLC0415 - the decode benchmark's prompt
    timing = record.setdefault("decode_step", {})
    for k in [int(n[len("per_layer_k"):]) for n in cfgs if n.startswith("per_layer_k")]:
        if str(k) in timing or f"k{k}" not in results or f"per_layer_k{k}" not in results:
            continue
        ogr, _, cfg = load_model(results[f"k{k}"]["dir"])
        gather, _, _ = load_model(results[f"k{k}"]["dir"])
        changed = use_index_gather(gather)
        per_layer, _, _ = load_model(results[f"per_layer_k{k}"]["dir"])
        ids = batch_prompt_ids(tok, [PROMPT])
        timing[str(k)] = {"linears_switched_to_gather": changed, **decode_step_ms(
            {"ogr_slice": ogr, "ogr_index_gather": gather, "per_layer_gather": per_layer}, ids,
            new_tokens=settings["decode"]["new_tokens"], rounds=rounds, pad_id=pad_id(tok, cfg))}
        save()
        log(f"decode step k={k}: {timing[str(k)]}")

    # 3. tuning gain: the same short weak-column fine-tune of every base with weak columns
    logs = work / "logs"
    todo = [n for n in cfgs if cfgs[n]["k"] and (n.startswith("k") or n.startswith("per_layer"))]
    for name in todo:
        d = work / f"tune_{name}"
        if "tuning" in results[name] or (a.skip_tuning and not (d / "train_done.json").is_file()):
            continue
        if not (d / "train_done.json").is_file():
            run(f"tune_{name}", [sys.executable, "-m", "qeft_jax.train", "--model", results[name]["dir"],
                                 "--method", "qeft", "--data", "builtin", "--out", str(d), "--steps", str(steps),
                                 "--batch-size", str(a.batch_size), "--micro-batch-size", str(a.batch_size),
                                 "--seq-len", str(seq_len), "--lr", repr(a.lr), "--seed", str(a.seed),
                                 "--eval-every", str(steps), "--eval-rows", str(a.eval_rows),
                                 "--save-every", str(steps), "--keep", "1", "--no-progress"], logs)
        done = json.loads((d / "train_done.json").read_text())
        curve = eval_curve(read_metrics(d))
        results[name]["tuning"] = {"eval_loss_before": curve[0][1], "eval_loss_after": curve[-1][1],
                                   "gain": curve[0][1] - curve[-1][1],
                                   "trainable_params": done["trainable_params"],
                                   "step_s_median": done.get("step_s_median")}
        save()
        log(f"tuned {name}: held-out {curve[0][1]:.4f} -> {curve[-1][1]:.4f}")

    report(record)
    print(json.dumps({"fp_ppl": record["fp_ppl"], **{n: {"ppl": r["ppl"], "linear_mb": r["linear_bytes"] / 2**20,
                                                        "tuning_gain": r.get("tuning", {}).get("gain")}
                                                    for n, r in results.items()},
                      "decode_step_ms": {k: {m: v["median_ms"] for m, v in t.items() if isinstance(v, dict)}
                                         for k, t in record.get("decode_step", {}).items()}}))


def report(record: dict) -> None:
    """Markdown tables of a results file."""
    res, fp = record["results"], record["fp_ppl"]

    def row(name: str, label: str) -> str:
        r = res[name]
        t = r.get("tuning")
        tune = (f"{t['eval_loss_before']:.3f} → {t['eval_loss_after']:.3f} | {t['gain']:.3f} | "
                f"{t['trainable_params'] / 1e6:.2f}M" if t else "– | – | 0")
        return (f"| {label} | {r['ppl']:.3f} | {100 * (r['ppl'] / fp - 1):+.1f}% | {r['linear_bytes'] / 2**20:.2f} | "
                f"{tune} |")

    head = ("| config | ppl | vs fp | linear MB | held-out loss (tuning) | gain | trainable |\n"
            "|---|---|---|---|---|---|---|")
    print(f"\nfp perplexity {fp:.3f}\n\n(a) k\n{head}")
    for name in [n for n in res if n.startswith("k")]:
        print(row(name, f"k = {res[name]['recipe']['k']}"))
    print(f"\n(b) global vs per-layer\n{head}")
    for name in [n for n in res if n.startswith("per_layer")]:
        k = res[name]["recipe"]["k"]
        if f"k{k}" in res:
            print(row(f"k{k}", f"global (OGR) k = {k}"))
        print(row(name, f"per-layer k = {k}"))
    for k, t in record.get("decode_step", {}).items():
        cells = ", ".join(f"{m} {v['median_ms']:.2f} ms" for m, v in t.items() if isinstance(v, dict))
        print(f"decode step (k = {k}, median of {t['ogr_slice']['runs']}): {cells}")
    print(f"\n(c) group size and act-order (k = 16)\n{head}")
    for name in [n for n in res if n.startswith("g")] + ["k16"]:
        if name in res:
            r = res[name]["recipe"]
            print(row(name, f"g = {r['group_size']}, act-order {'on' if r['act_order'] else 'off'}"))


if __name__ == "__main__":
    main()
