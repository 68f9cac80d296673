"""Export a qeft-jax checkpoint to a directory `transformers` loads.

    python -m convert.to_hf CKPT OUT_DIR [--dtype float16|bfloat16|float32]

A quantized QEFT checkpoint is exported as a dense model: every linear dequantized, the weak
columns put back, and the offline global reordering undone (original channel order).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import ml_dtypes
import numpy as np

from qeft_jax.cli import run_cli
from qeft_jax.config import LlamaConfig
from qeft_jax.io import SafetensorsReader, atomic_dir, tokenizer_files, write_checkpoint
from qeft_jax.load import resolve

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def dense_tensors(path: Path, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    if (path / "quantization.json").is_file():
        from qeft_jax.quant.checkpoint import dense_original_order

        return dense_original_order(path, cfg)
    reader = SafetensorsReader([path / "model.safetensors"])
    return {k: reader.get(k) for k in reader.keys()}


def export(src: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve(src)
    cfg = LlamaConfig.from_json_file(path / "config.json")
    tensors = {k: np.asarray(v, np.float32).astype(DTYPES[dtype]) for k, v in dense_tensors(path, cfg).items()}
    hf_cfg = cfg.to_hf_dict() | {"torch_dtype": dtype, "dtype": dtype}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, hf_cfg, tensors, extra_files=tokenizer_files(path))
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m convert.to_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="qeft-jax checkpoint directory (fp or quantized) or 'default'")
    p.add_argument("out_dir", help="where to write the Hugging Face model directory")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="tensor dtype to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    a = p.parse_args(argv)
    print(f"wrote {export(a.ckpt, a.out_dir, dtype=a.dtype, overwrite=a.overwrite)}")


if __name__ == "__main__":
    run_cli(main)
