"""Task accuracy of qeft-jax vs. an independent transformers (PyTorch) evaluation of the same weights.

    python benchmarks/tasks_vs_transformers.py [--task arc_easy] [--limit 200] [--model default|DIR]

Both sides score the same questions (qeft_jax.eval.tasks.load_questions) with the same recipe: the
continuation is the tail of encode(context + continuation) after encode(context), the sum of its
token log-probabilities is compared across choices (acc), or that sum per character of the choice
without its leading space (acc_norm, as lm-eval).
The transformers side tokenises on its own and runs each request unpadded, one at a time, with
AutoModelForCausalLM in float32. Prints both results, their difference, and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np



def transformers_scores(model_dir: str, questions) -> tuple[dict, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and \
        tok("a")["input_ids"][:1] == [tok.bos_token_id] else []
    t0 = time.time()
    acc, acc_norm = [], []
    for q in questions:
        lps = []
        for context, cont in zip(q.contexts, q.continuations):
            ctx = tok(context.rstrip(), add_special_tokens=False)["input_ids"]
            cont = context[len(context.rstrip()):] + cont
            whole = tok(context.rstrip() + cont, add_special_tokens=False)["input_ids"]
            cont_ids = whole[len(ctx):]
            ids = torch.tensor([bos + ctx + cont_ids])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), dim=-1)
            n = len(cont_ids)
            tgt = ids[0, -n:]
            lps.append(float(logp[-n:].gather(1, tgt[:, None]).sum()))
        lps = np.array(lps)
        chars = np.array([max(1, len(c[1:] if c.startswith(" ") else c)) for c in q.continuations])
        acc.append(float(np.argmax(lps) == q.gold))
        acc_norm.append(float(np.argmax(lps / chars) == q.gold))
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "n": len(questions)}, \
        time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--model", default="default")
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args()

    from qeft_jax.eval import tasks as T
    from qeft_jax.load import load_model, resolve

    model_dir = str(resolve(a.model))
    questions = T.load_questions(a.task, "eval", a.limit)
    model, tok, _ = load_model(model_dir)
    t0 = time.time()
    ours = T.score_questions(model, tok, questions, batch_size=a.batch_size)
    ours_s = time.time() - t0
    ref, ref_s = transformers_scores(model_dir, questions)
    print(f"task {a.task}, {len(questions)} questions, model {model_dir}")
    print(f"qeft-jax     acc {ours['acc']:.4f}  acc_norm {ours['acc_norm']:.4f}  ({ours_s:.1f} s incl. compile)")
    print(f"transformers acc {ref['acc']:.4f}  acc_norm {ref['acc_norm']:.4f}  ({ref_s:.1f} s)")
    diff = {k: ours[k] - ref[k] for k in ("acc", "acc_norm")}
    print(f"difference   acc {diff['acc']:+.4f}  acc_norm {diff['acc_norm']:+.4f}")
    print(json.dumps({"task": a.task, "n": len(questions),
                      "qeft_jax": {"acc": ours["acc"], "acc_norm": ours["acc_norm"], "s": round(ours_s, 1)},
                      "transformers": {"acc": ref["acc"], "acc_norm": ref["acc_norm"], "s": round(ref_s, 1)},
                      "diff": diff}))


if __name__ == "__main__":
    main()
