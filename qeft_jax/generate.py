"""python -m qeft_jax.generate --model default|DIR --prompt "..." [--max-new-tokens N]
    [--temperature T --top-p P --seed S] [--no-chat] [--benchmark [--repeats R]]

Generates a completion for each prompt with `qeft_jax.generation.generate_text` (KV cache, jitted
prefill + on-device decode loop). Prompts are formatted as fine-tuning formats them: the chat
template when the tokenizer has one, else the Alpaca instruction prompt; --no-chat sends the text
as it is. --benchmark also prints prefill and decode tokens/s (`qeft_jax.generation.benchmark`).
"""
from __future__ import annotations

import argparse

import jax

from qeft_jax.cli import run_cli
from qeft_jax.generation import GenerationStats, benchmark, generate_text
from qeft_jax.load import load_model
from qeft_jax.tokenization import batch_prompt_ids, pad_id


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qeft_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct) or a checkpoint directory (fp or quantized)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default 0)")
    p.add_argument("--no-chat", action="store_true",
                   help="feed the prompt as plain text (no chat template, no Alpaca prompt)")
    p.add_argument("--benchmark", action="store_true",
                   help="also print prefill and decode tokens/s (after a warm-up run, so compile time "
                        "is excluded; timed runs are greedy and ignore stop tokens)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs for --benchmark (default 3)")
    return p


def format_stats(s: GenerationStats) -> str:
    return (f"prefill: {s.prompt_tokens} tokens (batch {s.batch}, padded to {s.padded_len}) in "
            f"{1e3 * s.prefill_s:.1f} ms = {s.prefill_tok_s:.1f} tok/s\n"
            f"decode:  {s.batch} x {s.decode_steps} tokens in {1e3 * s.decode_s:.1f} ms = "
            f"{s.decode_tok_s:.1f} tok/s ({1e3 * s.decode_s / max(s.decode_steps, 1):.2f} ms/step)")


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    model, tok, cfg = load_model(a.model)
    style = "raw" if a.no_chat else None
    texts = generate_text(model, tok, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                          top_p=a.top_p, seed=a.seed, style=style)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- [{i}] {a.prompt[i]}")
        print(text)
    if a.benchmark:
        stats = benchmark(model, batch_prompt_ids(tok, a.prompt, style=style),
                          max_new_tokens=max(a.max_new_tokens, 2), repeats=a.repeats, pad_id=pad_id(tok, cfg))
        print(f"[benchmark, {jax.default_backend()}, median of {max(1, a.repeats)} runs]")
        print(format_stats(stats))


if __name__ == "__main__":
    run_cli(main)
