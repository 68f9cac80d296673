"""Hugging Face model directory (safetensors, sharded or not; or .bin) -> our fp checkpoint.

The CLI is `python -m convert.from_hf HF_DIR OUT_DIR`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qeft_jax.config import ModelConfig
from qeft_jax.checkpoint import converted_lazily, tokenizer_files, write_fp
from qeft_jax.io import CheckpointError, LazyArray, SafetensorsReader, atomic_dir


def _safetensors_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted({src / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    return sorted(src.glob("*.safetensors"))


def _load_bin(files: list[Path]) -> dict[str, np.ndarray]:
    try:
        import torch  # here, not at the top: torch is the optional 'convert' extra, needed for .bin only
    except ImportError:
        raise CheckpointError("this checkpoint is in PyTorch .bin format; install the 'convert' extra "
                              "(pip install 'qeft-jax[convert]') to read it") from None
    out: dict[str, np.ndarray] = {}
    for f in tqdm(files, desc="reading .bin shards", disable=len(files) < 2):
        # weights_only=True: a .bin is a pickle; never let it execute code.
        state = torch.load(f, map_location="cpu", weights_only=True)
        for k, v in state.items():
            out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out


def hf_tensors(src: Path, cfg: ModelConfig) -> dict[str, LazyArray]:
    """The tensors the model needs, by the names `qeft_jax.spec` gives them, read one at a time when
    written (`checkpoint.converted_lazily`; the family's own layout, e.g. Phi-3's fused linears, is
    converted by `families.tensors_from_hf`). Safetensors (one file or shards with an index) stream;
    a PyTorch .bin is a pickle and is loaded whole."""
    st = _safetensors_files(src)
    if st:
        reader = SafetensorsReader(st)
        sources = {n: reader.lazy(n) for n in reader.keys()}
    else:
        bins = sorted(src.glob("pytorch_model*.bin"))
        if not bins:
            raise CheckpointError(f"{src} holds no *.safetensors and no pytorch_model*.bin weights")
        sources = {k: LazyArray.of(v) for k, v in _load_bin(bins).items()}
    return converted_lazily(sources, cfg, source=str(src))


def convert(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory (expected a Hugging Face model directory)")
    cfg_dict = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else None
    if cfg_dict is None:
        raise CheckpointError(f"no config.json in {src}")
    cfg = ModelConfig.from_hf_dict(cfg_dict)
    tensors = hf_tensors(src, cfg)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_fp(tmp, cfg.to_hf_dict(), tensors, extra_files=tokenizer_files(src), progress="converting")
    return Path(out)
