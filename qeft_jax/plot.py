"""Figures as PNG files (the library is `qeft_jax.plots`; its docstring describes every input).

    python -m qeft_jax.plot weak-channels CKPT_DIR [--top 8] --out weak.png
    python -m qeft_jax.plot ppl-vs-bits RESULTS.json --out ppl.png
    python -m qeft_jax.plot loss-curves RUN1/metrics.jsonl RUN2/metrics.jsonl --labels qeft,lora --out loss.png
    python -m qeft_jax.plot kernel-speed KERNEL.json --out speed.png
"""
from __future__ import annotations

import argparse
from typing import Sequence

from qeft_jax.cli import comma_list, run_cli
from qeft_jax.plots import (plot_kernel_speed, plot_loss_curves, plot_ppl_vs_bits, plot_weak_channels,
                            weak_channel_summary)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qeft_jax.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("weak-channels", help="per-layer top channels by λ + the global weak index")
    s.add_argument("ckpt", help="QEFT checkpoint directory (with selection.safetensors)")
    s.add_argument("--top", type=int, default=8, help="channels marked per block and sublayer")
    s.add_argument("--out", required=True)
    s = sub.add_parser("ppl-vs-bits", help="perplexity vs bits from benchmarks/quality.py")
    s.add_argument("results", help="JSON file, or quality.py stdout (last JSON line is used)")
    s.add_argument("--no-variants", action="store_true", help="skip keys like qeft_4_k32")
    s.add_argument("--out", required=True)
    s = sub.add_parser("loss-curves", help="train / held-out loss vs step from metrics.jsonl files")
    s.add_argument("metrics", nargs="+")
    s.add_argument("--labels", type=comma_list, default=None, help="comma-separated, one per file")
    s.add_argument("--smooth", type=float, default=0.0, help="EMA weight for the train loss, [0, 1)")
    s.add_argument("--out", required=True)
    s = sub.add_parser("kernel-speed", help="speedup per shape from benchmarks/kernel.py (GPU run)")
    s.add_argument("kernel", help="kernel.py's final JSON: a .json file, or a file holding its output")
    s.add_argument("--out", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    a = parser().parse_args(argv)
    if a.cmd == "weak-channels":
        plot_weak_channels(a.ckpt, top=a.top, out=a.out)
        st = weak_channel_summary(a.ckpt, a.top)
        print(f"{a.out}: {100 * st['mean_top_in_global']:.0f}% of each row's top-{a.top} in the global "
              f"index (k={st['k']}); {st['distinct_top_channels']} distinct top channels over "
              f"{st['rows']} rows; most frequent (channel, rows): {st['most_frequent']}")
        return
    if a.cmd == "ppl-vs-bits":
        plot_ppl_vs_bits(a.results, out=a.out, variants=not a.no_variants)
    elif a.cmd == "loss-curves":
        plot_loss_curves(a.metrics, labels=a.labels, out=a.out, smooth=a.smooth)
    else:
        plot_kernel_speed(a.kernel, out=a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    run_cli(main)
