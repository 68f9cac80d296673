"""python -m qeft_jax.eval perplexity --model default|DIR [--seq-len 512] [--max-samples N] [--data FILE]"""
from __future__ import annotations

import argparse
import json
import time

from qeft_jax.cli import run_cli


def cmd_perplexity(a: argparse.Namespace) -> None:
    from qeft_jax import data, load_model
    from qeft_jax.eval.perplexity import perplexity

    model, tok, cfg = load_model(a.model)
    if tok is None:
        raise ValueError(f"model {a.model} has no tokenizer files; perplexity needs one to tokenise text")
    if a.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {a.seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    texts = data.load_user_texts(a.data) if a.data else data.corpus_texts("eval")
    ids = data.token_sequences(tok, texts, a.seq_len, a.max_samples, seed=None)
    t0 = time.time()
    ppl, tokens = perplexity(model, ids, batch_size=a.batch_size)
    source = a.data or "BoolQ Wikipedia passages (eval split)"
    print(f"model: {a.model}\ndata: {source}\nwindows: {len(ids)} x {a.seq_len} tokens\n"
          f"perplexity: {ppl:.4f}  ({tokens} predicted tokens, {time.time() - t0:.1f} s)")
    print(json.dumps({"ppl": ppl, "tokens": tokens}))


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
    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    run_cli(main)
