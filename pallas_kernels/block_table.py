"""Block sizes for the QEFT kernel: tables keyed by (gpu name, n, out, bits) over a heuristic.

Two tables, the user's over the shipped one: ``block_table.json`` beside this file holds entries
measured by the project (``SHIPPED``: an H200 so far), and ``benchmarks/kernel.py --autotune`` (on
a GPU) writes this user's own to ``table_path()``: ``$QEFT_JAX_BLOCK_TABLE`` if set, else
``block_table.json`` in qeft_jax's cache directory (``$QEFT_JAX_CACHE``, default
``~/.cache/qeft_jax``). Every function also takes an explicit ``path`` (that table alone). The file:

    {"format": 1,
     "entries": {"NVIDIA H100 80GB HBM3|4096|11008|4": {"block_n": 32, "block_w": 64,
                                                     "num_warps": 4, "num_stages": 2,
                                                     "split_k": 1, "use_dot": true,
                                                     "prefill": "xla", "us": 12.3}, ...}}

A shape/GPU without an entry (or no table at all) falls back to ``default_blocks`` (a heuristic);
extra keys in an entry (timings) are ignored. Imports only jax and the packed format
(``qeft_jax.packing``); ``qeft_gemv`` imports this module, never the reverse.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jax

from qeft_jax.packing import values_per_word

TABLE_ENV = "QEFT_JAX_BLOCK_TABLE"
SHIPPED = Path(__file__).with_name("block_table.json")
CONFIG_KEYS = ("block_n", "block_w", "num_warps", "num_stages", "split_k", "use_dot", "prefill")


def table_path() -> Path:
    """Where this user's table is read and written: $QEFT_JAX_BLOCK_TABLE, else block_table.json in
    qeft_jax's cache dir (the same $QEFT_JAX_CACHE / ~/.cache/qeft_jax rule as qeft_jax.io.cache_dir,
    computed here because kernels do not import the io layer)."""
    if os.environ.get(TABLE_ENV):
        return Path(os.environ[TABLE_ENV])
    cache = os.environ.get("QEFT_JAX_CACHE") or Path.home() / ".cache" / "qeft_jax"
    return Path(cache) / "block_table.json"


def default_blocks(m: int, n: int, out: int, bits: int) -> dict[str, Any]:
    """Heuristic block sizes when the table has no entry."""
    del m  # the GEMV heuristic is the same for every M <= 8
    n_words = -(-n // values_per_word(bits))
    block_w = min(64, max(16, 1 if n_words <= 1 else 1 << (n_words - 1).bit_length()))
    # enough programs to fill ~132 SMs (H100) before growing the row block
    block_n = 64 if out >= 64 * 264 else 32 if out >= 32 * 132 else 16
    return dict(block_n=block_n, block_w=block_w, num_warps=4, num_stages=2, split_k=1,
                use_dot=True)


def gpu_name() -> str | None:
    """Device kind of the first GPU (e.g. 'NVIDIA H100 80GB HBM3'), or None without a GPU."""
    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        return None
    return devs[0].device_kind if devs else None


def key(gpu: str, n: int, out: int, bits: int) -> str:
    return f"{gpu}|{n}|{out}|{bits}"


@functools.lru_cache(maxsize=1)
def _load(path: str) -> dict[str, dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return {}
    data = json.loads(p.read_text())
    return dict(data.get("entries", {}))


def entries(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The table at `path`; by default the shipped entries overlaid by this user's table."""
    if path is not None:
        return dict(_load(str(path)))
    return {**_load(str(SHIPPED)), **_load(str(table_path()))}


def lookup(*, n: int, out: int, bits: int, m: int = 1, gpu: str | None = None,
           path: Path | None = None) -> dict[str, Any]:
    """The config for this shape on this GPU: the table entry (`entries(path)`) over the heuristic
    default."""
    cfg = default_blocks(m, n, out, bits)
    cfg["prefill"] = "xla"
    gpu = gpu if gpu is not None else gpu_name()
    if gpu is not None:
        hit = entries(path).get(key(gpu, n, out, bits))
        if hit:
            cfg.update({k: v for k, v in hit.items() if k in CONFIG_KEYS})
    return cfg


def update(new: dict[str, dict[str, Any]], path: Path | None = None) -> Path:
    """Merge entries into the json table at `path` (default: this user's, table_path()), written
    atomically, and drop the cache; returns its path."""
    path = Path(path or table_path())
    table = entries(path)
    table.update(new)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": 1, "entries": dict(sorted(table.items()))}, indent=1) + "\n")
    tmp.replace(path)
    _load.cache_clear()
    return path


def format_table(path: Path | None = None) -> str:
    rows = entries(path)
    if not rows:
        where = path or f"{SHIPPED} or {table_path()}"
        return f"(no entries in {where}; every shape uses the heuristic default)"
    lines = []
    for k, v in rows.items():
        gpu, n, out, bits = k.split("|")
        cfg = " ".join(f"{c}={v[c]}" for c in CONFIG_KEYS if c in v)
        us = f" {v['us']:.1f}us" if "us" in v else ""
        lines.append(f"{gpu:28s} n={n:>6} out={out:>6} bits={bits}: {cfg}{us}")
    return "\n".join(lines)
