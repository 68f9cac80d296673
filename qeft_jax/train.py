"""python -m qeft_jax.train --model DIR --method qeft --data FILE.jsonl|builtin --out DIR [options]

Fine-tunes a model: QEFT weak-column tuning of a quantized checkpoint (--method qeft), or the
baselines LoRA (fp model), QLoRA (LoRA on the quantized base, weak columns frozen) and full
fine-tuning. Rerunning the same command with the same --out resumes from the last checkpoint and
ends with exactly the parameters of an uninterrupted run. The final --out is a loadable checkpoint
(qeft: quantized, weak columns updated; lora/full: fp, adapters merged; qlora: the quantized base
plus adapter_model.safetensors, read by train.lora.load_with_adapters). See train/trainer.py.

--devices N (0 = all) trains data-parallel over N devices with parameters, optimizer state and the
frozen base sharded FSDP-style (qeft_jax/sharding.py); --micro-batch-size must be a multiple of N.
Multi-host: set QEFT_COORDINATOR_ADDRESS / QEFT_NUM_PROCESSES / QEFT_PROCESS_ID in every process.
"""
from __future__ import annotations

import argparse
import json

from qeft_jax.cli import run_cli


def parse(argv: list[str] | None = None):
    from train.trainer import METHODS, TrainConfig

    d = TrainConfig(model="", out="")
    p = argparse.ArgumentParser(prog="python -m qeft_jax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="checkpoint dir or 'default' (quantized for qeft/qlora, fp for lora/full)")
    p.add_argument("--method", default="qeft", choices=METHODS)
    p.add_argument("--data", default="builtin",
                   help="Alpaca/Open-Platypus .jsonl/.json (instruction, input, output) or 'builtin'")
    p.add_argument("--tasks", default=None, help="builtin data: comma-separated task names (default all)")
    p.add_argument("--limit-per-task", type=int, default=d.limit_per_task)
    p.add_argument("--val-data", default=None, help="held-out jsonl (default: a split of --data)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--tokenizer", default=None, help="a directory with tokenizer files (default: the model's)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="effective batch (rows per step)")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                   help="rows per forward/backward (gradient accumulation = batch / micro)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--lr", type=float, default=None,
                   help="default: qeft 1e-5 (k<128) / 5e-6 (k>=128), lora/qlora 2e-4, full 1e-5")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip-norm", type=float, default=d.clip_norm)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--remat", action="store_true", help="rematerialise each decoder block (less memory)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"])
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-rows", type=int, default=d.eval_rows)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="delete --out and start over")
    p.add_argument("--devices", type=int, default=d.devices,
                   help="data parallel + FSDP over this many devices (0 = all, 1 = single device)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = TrainConfig(
        model=a.model, out=a.out, method=a.method, data=a.data,
        tasks=[t for t in a.tasks.split(",") if t] if a.tasks else None, limit_per_task=a.limit_per_task,
        val_data=a.val_data, val_fraction=a.val_fraction, seq_len=a.seq_len, batch_size=a.batch_size,
        micro_batch_size=a.micro_batch_size, steps=a.steps, epochs=a.epochs, lr=a.lr,
        warmup_steps=a.warmup_steps, weight_decay=a.weight_decay, clip_norm=a.clip_norm, seed=a.seed,
        remat=a.remat, dtype=a.dtype, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha,
        save_every=a.save_every, keep=a.keep, eval_every=a.eval_every, eval_rows=a.eval_rows,
        progress=not a.no_progress, devices=a.devices)
    return cfg, a


def main(argv: list[str] | None = None) -> None:
    from qeft_jax.sharding import maybe_initialize_distributed
    from train.trainer import train

    maybe_initialize_distributed()  # no-op unless the QEFT_* multi-host variables are set
    cfg, a = parse(argv)
    tokenizer = None
    if a.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    summary = train(cfg, tokenizer=tokenizer, overwrite=a.overwrite)
    print(json.dumps(summary))


if __name__ == "__main__":
    run_cli(main)
