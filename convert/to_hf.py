"""python -m convert.to_hf CKPT OUT_DIR [--dtype float16|bfloat16|float32] [--overwrite]

Exports a qeft-jax checkpoint to a directory `transformers` loads. A quantized checkpoint is
dequantized, its weak columns put back and the channel reordering undone. Library: convert.hf_export.
"""
from __future__ import annotations

from convert.hf_export import DTYPES, export
from qeft_jax.cli import conversion_parser, run_cli
from qeft_jax.load import resolve


def main(argv: list[str] | None = None) -> None:
    p = conversion_parser("python -m convert.to_hf", __doc__,
                          "qeft-jax checkpoint directory (fp or quantized) or 'default'")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="tensor dtype to write")
    a = p.parse_args(argv)
    print(f"wrote {export(resolve(a.source), a.out_dir, dtype=a.dtype, overwrite=a.overwrite)}")


if __name__ == "__main__":
    run_cli(main)
