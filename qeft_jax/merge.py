"""python -m qeft_jax.merge --tuned DIR --base DIR --target DIR --out DIR

QEFT merging: adds Δ = tuned − base of the weak columns to a target sharing the base's origin.
--tuned/--base are quantized QEFT checkpoints (a fine-tune and the checkpoint it started from);
--target is a quantized QEFT checkpoint (Δ added to its weak columns) or an fp checkpoint (Δ placed
at the weak columns' original channels through the base's hidden/FFN permutations). See train/merge.py.
"""
from __future__ import annotations

import argparse
import json

from qeft_jax.cli import run_cli
from train.merge import merge


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qeft_jax.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tuned", required=True, help="fine-tuned QEFT checkpoint (python -m qeft_jax.train --out)")
    p.add_argument("--base", required=True, help="the quantized checkpoint the fine-tune started from")
    p.add_argument("--target", required=True, help="quantized QEFT or fp checkpoint to merge into")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(merge(a.tuned, a.base, a.target, a.out, overwrite=a.overwrite)))


if __name__ == "__main__":
    run_cli(main)
