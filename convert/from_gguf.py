"""python -m convert.from_gguf FILE.gguf OUT_DIR [--overwrite]

Converts a GGUF file of llama.cpp architecture llama (Llama, Mistral), qwen2, qwen3, gemma, gemma2
or phi3 (any tensor type the `gguf` package dequantizes) to a qeft-jax checkpoint, tokenizer
included. Library: convert.gguf_file.
"""
from __future__ import annotations

from convert.gguf_file import convert
from qeft_jax.cli import conversion_parser, run_cli


def main(argv: list[str] | None = None) -> None:
    a = conversion_parser("python -m convert.from_gguf", __doc__,
                          "a .gguf file (llama, qwen2, qwen3, gemma, gemma2 or phi3)").parse_args(argv)
    print(f"wrote {convert(a.source, a.out_dir, overwrite=a.overwrite)}")


if __name__ == "__main__":
    run_cli(main)
