"""python -m convert.from_hf HF_DIR OUT_DIR [--overwrite]

Converts a Hugging Face model directory (safetensors, sharded or not; `.bin` via
torch.load(weights_only=True)) to a qeft-jax checkpoint. Library: convert.hf.
"""
from __future__ import annotations

from convert.hf import convert
from qeft_jax.cli import conversion_parser, run_cli


def main(argv: list[str] | None = None) -> None:
    a = conversion_parser("python -m convert.from_hf", __doc__,
                          "Hugging Face model directory (config.json + weights)").parse_args(argv)
    print(f"wrote {convert(a.source, a.out_dir, overwrite=a.overwrite)}")


if __name__ == "__main__":
    run_cli(main)
