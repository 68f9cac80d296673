"""Our checkpoint (fp or quantized) -> a directory `transformers` loads.

A quantized QEFT checkpoint is exported as a dense model: every linear dequantized, the weak
columns put back, and the offline global reordering undone (`qeft_jax.checkpoint.dense_lazily`:
a decoder layer at a time, each written before the next is made).
The CLI is `python -m convert.to_hf CKPT OUT_DIR [--dtype float16|bfloat16|float32]`.
"""
from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np

from qeft_jax import families
from qeft_jax.checkpoint import dense_lazily, read_info, tokenizer_files, write_fp
from qeft_jax.io import atomic_dir

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def export(path: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write checkpoint `path` to `out` as a Hugging Face model directory (atomic)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    info = read_info(path)
    cfg = info.config

    def to_hf(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # one layer (or top tensor) at a time
        cast = {k: np.asarray(v, np.float32).astype(DTYPES[dtype]) for k, v in group.items()}
        return families.tensors_to_hf(cfg.model_type, cast, cfg)

    hf_cfg = cfg.to_hf_dict() | {"torch_dtype": dtype, "dtype": dtype}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_fp(tmp, hf_cfg, dense_lazily(info, to_hf), extra_files=tokenizer_files(info.path), progress="exporting")
    return Path(out)
