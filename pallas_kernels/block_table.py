"""Block sizes for the QEFT kernel, from a table keyed by (gpu name, n, out, bits).

The table lives next to this file as ``block_table.json``:

    {"format": 1,
     "entries": {"NVIDIA H100 80GB HBM3|4096|11008|4": {"block_n": 32, "block_w": 64,
                                                     "num_warps": 4, "num_stages": 2,
                                                     "split_k": 1, "use_dot": true,
                                                     "prefill": "xla", "us": 12.3}, ...}}

``benchmarks/kernel.py --autotune`` fills it on a GPU. A shape/GPU without an entry falls back to
``qeft_gemv.default_blocks`` (a heuristic); extra keys in an entry (timings) are ignored.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax

TABLE_PATH = Path(__file__).with_name("block_table.json")
CONFIG_KEYS = ("block_n", "block_w", "num_warps", "num_stages", "split_k", "use_dot", "prefill")


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


def entries(path: Path = TABLE_PATH) -> dict[str, dict[str, Any]]:
    return dict(_load(str(path)))


def lookup(*, n: int, out: int, bits: int, m: int = 1, gpu: str | None = None,
           path: Path = TABLE_PATH) -> dict[str, Any]:
    """The config for this shape on this GPU: the table entry over the heuristic default."""
    from pallas_kernels.qeft_gemv import default_blocks

    cfg = default_blocks(m, n, out, bits)
    cfg["prefill"] = "xla"
    gpu = gpu if gpu is not None else gpu_name()
    if gpu is not None:
        hit = _load(str(path)).get(key(gpu, n, out, bits))
        if hit:
            cfg.update({k: v for k, v in hit.items() if k in CONFIG_KEYS})
    return cfg


def update(new: dict[str, dict[str, Any]], path: Path = TABLE_PATH) -> None:
    """Merge entries into the json table (written atomically) and drop the cache."""
    table = entries(path)
    table.update(new)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": 1, "entries": dict(sorted(table.items()))}, indent=1) + "\n")
    tmp.replace(path)
    _load.cache_clear()


def format_table(path: Path = TABLE_PATH) -> str:
    rows = entries(path)
    if not rows:
        return f"(no entries in {path}; every shape uses the heuristic default)"
    lines = []
    for k, v in rows.items():
        gpu, n, out, bits = k.split("|")
        cfg = " ".join(f"{c}={v[c]}" for c in CONFIG_KEYS if c in v)
        us = f" {v['us']:.1f}us" if "us" in v else ""
        lines.append(f"{gpu:28s} n={n:>6} out={out:>6} bits={bits}: {cfg}{us}")
    return "\n".join(lines)
