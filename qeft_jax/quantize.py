"""python -m qeft_jax.quantize --model default|DIR --method qeft --bits 4 --group-size 128 --k 16 --out DIR

Quantizes an fp checkpoint with one of the paper's methods (rtn | gptq | awq | owq | qeft). The output
directory is a packed checkpoint that `eval perplexity`, `generate` and `convert.to_hf` accept; its
quantization.json records the full recipe, calibration settings and timing.

--devices N (0 = all) splits every calibration batch over N devices (data parallel, see
qeft_jax/sharding.py; multi-host via the QEFT_COORDINATOR_ADDRESS / QEFT_NUM_PROCESSES /
QEFT_PROCESS_ID environment variables). The default, 1, is the plain single-device run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qeft_jax.cli import run_cli
from qeft_jax.checkpoint import read_info
from qeft_jax.data import text_windows
from qeft_jax.io import check_output_dir
from qeft_jax.load import resolve
from qeft_jax.quant.calibrate import ACTIVATIONS
from qeft_jax.quant.pipeline import quantize_checkpoint
from qeft_jax.recipes import METHODS, make_recipe
from qeft_jax.sharding import make_mesh, maybe_initialize_distributed
from qeft_jax.tokenization import load_tokenizer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qeft_jax.quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' or an fp checkpoint directory")
    p.add_argument("--method", default="qeft", choices=list(METHODS),
                   help="awq: activation-aware input-channel scales searched on the calibration data and "
                        "folded into the norms / producing linears, then group-wise RTN")
    p.add_argument("--bits", type=int, default=4, help="2, 3 or 4")
    p.add_argument("--group-size", type=int, default=128,
                   help="columns per quantization group (a partial last group is allowed); "
                        "owq always uses per-channel")
    p.add_argument("--k", type=int, default=16, help="weak columns kept in 16-bit (qeft, owq)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--calib-data", default=None, help="a .txt/.jsonl file instead of the built-in corpus")
    p.add_argument("--act-order", action="store_true", help="OPTQ in decreasing Hessian-diagonal order")
    p.add_argument("--batch-size", type=int, default=8,
                   help="calibration sequences per batch (with --devices: the global batch, rounded up "
                        "to a multiple of the device count)")
    p.add_argument("--calib-activations", default="float32", choices=list(ACTIVATIONS),
                   help="how the calibration activations are kept between blocks: float32 in memory "
                        "(samples x seq-len x hidden x 4 bytes), bfloat16 in memory (half; slightly different "
                        "codes), or disk: float32 in a temporary file beside --out (the float32 codes, "
                        "~one batch in memory)")
    p.add_argument("--devices", type=int, default=1,
                   help="data-parallel calibration over this many devices (0 = all, 1 = single device)")
    p.add_argument("--seed", type=int, default=0, help="calibration sample selection seed")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    a = p.parse_args(argv)
    if a.devices < 0:
        p.error("--devices must be >= 0")
    maybe_initialize_distributed()  # no-op unless the QEFT_* multi-host variables are set
    mesh = None if a.devices == 1 else make_mesh(data=a.devices or None)

    out = Path(a.out)
    check_output_dir(out, overwrite=a.overwrite)
    k = a.k if a.method in ("qeft", "owq") else 0
    recipe = make_recipe(a.method, bits=a.bits, group_size=a.group_size, k=k, act_order=a.act_order)
    src = resolve(a.model)
    cfg = read_info(src).config
    if a.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {a.seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    ids = text_windows(load_tokenizer(src), "calib", a.seq_len, a.calib_samples, seed=a.seed, path=a.calib_data)
    t0 = time.time()
    meta = {"command": vars(a), "calibration_seed": a.seed,
            "calibration_data": a.calib_data or "boolq-wikipedia/calib"}
    summary = quantize_checkpoint(src, out, recipe, ids, batch_size=a.batch_size, overwrite=a.overwrite,
                                  meta=meta, mesh=mesh, activations=a.calib_activations)
    print(f"quantized {src} with {a.method} ({a.bits}-bit, g={recipe.group_size or 'per-channel'}, "
          f"k={recipe.k}) in {time.time() - t0:.1f} s -> {out}")
    print(json.dumps({"out": str(out), "seconds": summary["seconds"], "recipe": summary["recipe"]}))


if __name__ == "__main__":
    run_cli(main)
