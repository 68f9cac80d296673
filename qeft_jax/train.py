"""python -m qeft_jax.train --model DIR --method qeft --data FILE.jsonl|builtin --out DIR [options]

Fine-tunes a model: QEFT weak-column tuning of a quantized checkpoint (--method qeft), or the
baselines LoRA (fp model), QLoRA (LoRA on the quantized base, weak columns frozen) and full
fine-tuning. Rerunning the same command with the same --out resumes from the last checkpoint and
ends with exactly the parameters of an uninterrupted run. The final --out is a loadable checkpoint
(qeft: quantized, weak columns updated; lora/full: fp, adapters merged; qlora: the quantized base
plus adapter_model.safetensors, read by qeft_jax.load_model). See train/trainer.py.

--devices N (0 = all) trains data-parallel over N devices with parameters, optimizer state and the
frozen base sharded FSDP-style (qeft_jax/sharding.py); --micro-batch-size must be a multiple of N.
Multi-host: set QEFT_COORDINATOR_ADDRESS / QEFT_NUM_PROCESSES / QEFT_PROCESS_ID in every process.
"""
from __future__ import annotations

import argparse
import json

from qeft_jax.cli import add_dataclass_arguments, dataclass_from_args, run_cli
from qeft_jax.sharding import maybe_initialize_distributed
from qeft_jax.tokenization import load_tokenizer
from train.trainer import TrainConfig, train


def parser() -> argparse.ArgumentParser:
    """One flag per train.trainer.TrainConfig field (see its help texts) plus --tokenizer and --overwrite."""
    p = argparse.ArgumentParser(prog="python -m qeft_jax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, TrainConfig)
    p.add_argument("--tokenizer", default=None, help="a directory with tokenizer files (default: the model's)")
    p.add_argument("--overwrite", action="store_true", help="delete --out and start over")
    return p


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """(TrainConfig, the parsed namespace: also .tokenizer and .overwrite)."""
    a = parser().parse_args(argv)
    return dataclass_from_args(TrainConfig, a), a


def main(argv: list[str] | None = None) -> None:
    maybe_initialize_distributed()  # no-op unless the QEFT_* multi-host variables are set
    cfg, a = parse(argv)
    tokenizer = None
    if a.tokenizer:
        tokenizer = load_tokenizer(a.tokenizer)
        if tokenizer is None:
            raise FileNotFoundError(f"--tokenizer {a.tokenizer}: no tokenizer.json or tokenizer.model there")
    summary = train(cfg, tokenizer=tokenizer, overwrite=a.overwrite)
    print(json.dumps(summary))


if __name__ == "__main__":
    run_cli(main)
