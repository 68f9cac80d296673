"""python -m qeft_jax.eval perplexity --model default|DIR [--seq-len 512] [--max-samples N] [--data FILE]
python -m qeft_jax.eval tasks --model default|DIR --tasks arc_easy,piqa,... [--limit N] [--num-fewshot K]
                              [--batch-size B]"""
from __future__ import annotations

import argparse
import json
import time

from qeft_jax.cli import run_cli
from qeft_jax.data import text_windows
from qeft_jax.eval import tasks as T
from qeft_jax.eval.perplexity import perplexity
from qeft_jax.load import load_model


def cmd_perplexity(a: argparse.Namespace) -> None:
    model, tok, cfg = load_model(a.model)
    if a.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {a.seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    ids = text_windows(tok, "eval", a.seq_len, a.max_samples, seed=None, path=a.data)
    t0 = time.time()
    ppl, tokens = perplexity(model, ids, batch_size=a.batch_size)
    source = a.data or "BoolQ Wikipedia passages (eval split)"
    print(f"model: {a.model}\ndata: {source}\nwindows: {len(ids)} x {a.seq_len} tokens\n"
          f"perplexity: {ppl:.4f}  ({tokens} predicted tokens, {time.time() - t0:.1f} s)")
    print(json.dumps({"ppl": ppl, "tokens": tokens}))


def cmd_tasks(a: argparse.Namespace) -> None:
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--tasks is empty; available tasks: {T.available_text()}")
    for t in names:  # unknown names fail before the model is loaded
        T.resolve_task(t)
    if a.limit is not None and a.limit < 1:
        raise ValueError(f"--limit must be >= 1, not {a.limit}")
    if a.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, not {a.num_fewshot}")
    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, not {a.batch_size}")
    model, tok, _ = load_model(a.model)
    t0 = time.time()
    results = T.evaluate_tasks(model, tok, names, limit=a.limit, num_fewshot=a.num_fewshot,
                               batch_size=a.batch_size, seed=a.seed, max_length=a.max_length)
    print(f"model: {a.model}\nfew-shot: {a.num_fewshot}  limit: {a.limit}  "
          f"({time.time() - t0:.1f} s)\n{T.format_table(results)}")
    print(json.dumps({t: {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"]}
                      for t, r in results.items()}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qeft_jax.eval", description="Evaluate a model.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("perplexity", help="perplexity on the built-in evaluation corpus or a file")
    pp.add_argument("--model", default="default", help="'default' or a checkpoint directory")
    pp.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    pp.add_argument("--max-samples", type=int, default=None, help="evaluate at most N windows")
    pp.add_argument("--batch-size", type=int, default=4)
    pp.add_argument("--data", default=None, help="a .txt or .jsonl file instead of the built-in corpus")
    pp.set_defaults(fn=cmd_perplexity)
    pt = sub.add_parser("tasks", help="multiple-choice accuracy (acc, acc_norm) by log-likelihood")
    pt.add_argument("--model", default="default", help="'default' or a checkpoint directory")
    pt.add_argument("--tasks", required=True,
                    help="comma-separated: arc_easy,arc_challenge,hellaswag,winogrande,piqa,boolq,mmlu (all 57 "
                         "subjects; or one, e.g. mmlu_anatomy),...")
    pt.add_argument("--limit", type=int, default=None, help="the first N questions of each task")
    pt.add_argument("--num-fewshot", type=int, default=0, help="solved train examples per question")
    pt.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    pt.add_argument("--max-length", type=int, default=None,
                    help="context tokens kept (left-truncated); default max_position_embeddings")
    pt.add_argument("--seed", type=int, default=1234, help="seed of the few-shot example choice")
    pt.set_defaults(fn=cmd_tasks)
    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    run_cli(main)
