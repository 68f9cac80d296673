"""Checkpoints: the one module that reads, validates and writes fp and quantized checkpoints.

A checkpoint is a directory:
  config.json          Hugging Face config (what transformers reads)
  model.safetensors    tensors by Hugging Face name, PyTorch layouts
  tokenizer files      optional (tokenizer.json, tokenizer_config.json, ...)
  quantization.json    quantized checkpoints only: format_version, recipe, calibration settings,
                       and the sha256 of model.safetensors
A quantized model.safetensors holds
  model.embed_tokens.weight, model.norm.weight, [lm_head.weight]   fp, hidden dim reordered (OGR)
  model.layers.{i}.{input,post_attention}_layernorm.weight         fp, reordered
  model.layers.{i}.{linear}.{qweight,scales,zeros,weak,weak_idx[,bias]}   see qeft_jax.packing
  qeft.hidden_perm, qeft.layers.{i}.ffn_perm   the OGR permutations (qeft_jax.spec.PERM_TENSORS)
selection.safetensors (QEFT only): attn_lambda / ffn_lambda [layers, hidden], the per-layer
  sensitivities λ = diag(H) that Algorithm 1 voted with (original channel order; for plots).

`read_info` answers "what is this checkpoint?" (`CheckpointInfo`) for every caller; tensors are
validated against `qeft_jax.spec` by one validator, `check_tensors`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Sharding
from safetensors.numpy import load_file

from qeft_jax import families, spec
from qeft_jax.config import ModelConfig
from qeft_jax.io import (CheckpointError, LazyArray, SafetensorsReader, grouped_lazily, parse_json,
                         write_safetensors)
from qeft_jax.model import CausalLM, abstract_model, named_variables, place_tensors, swap_linears
from qeft_jax.packing import FORMAT_VERSION, QuantSpec, dense_weight
from qeft_jax.qlinear import QEFTLinear
from qeft_jax.recipes import QuantRecipe

CONFIG_FILE = "config.json"
TENSORS_FILE = "model.safetensors"
QUANTIZATION_FILE = "quantization.json"
SELECTION_FILE = "selection.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")
# Files a derived checkpoint rewrites itself (or a training run's own records): never carried over.
OWN_FILES = (TENSORS_FILE, QUANTIZATION_FILE, CONFIG_FILE, "train_config.json", "metrics.jsonl",
             "train_done.json", "finetune.json", "merge.json", "adapter_model.safetensors",
             "adapter_config.json")
STORAGE_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
ANY_FLOAT = None   # dtype rule of fp tensors: any floating type, finite


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory is, from its small files (no tensor is read); `load_checkpoint`
    adds how many tensor bytes this process read to load it."""

    path: Path
    config: ModelConfig
    recipe: QuantRecipe | None      # None: an fp checkpoint
    meta: Mapping[str, Any]         # quantization.json (empty for fp)
    bytes_read: int = 0

    @property
    def quantized(self) -> bool:
        return self.recipe is not None

    @property
    def k(self) -> int:
        return self.recipe.k if self.recipe is not None else 0

    @property
    def format_version(self) -> int | None:
        return self.meta.get("format_version")

    def derived_meta(self) -> dict[str, Any]:
        """quantization.json's settings without what a rewrite recomputes (checksum, version)."""
        return {k: v for k, v in self.meta.items() if k not in ("format_version", "sha256")}


def read_json(path: Path) -> Any:
    return parse_json(path.read_text(), path, CheckpointError)


def read_info(path: str | Path) -> CheckpointInfo:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is not a directory (expected a qeft-jax checkpoint "
                              f"directory or 'default')")
    if not (path / CONFIG_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise CheckpointError(f"{path} is not a qeft-jax checkpoint: expected {CONFIG_FILE} and "
                              f"{TENSORS_FILE} (convert Hugging Face models with convert.from_hf)")
    cfg = ModelConfig.from_json_file(path / CONFIG_FILE)
    if not (path / QUANTIZATION_FILE).is_file():
        return CheckpointInfo(path, cfg, None, {})
    meta = read_json(path / QUANTIZATION_FILE)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: packed format version {meta.get('format_version')!r}, this "
                              f"qeft-jax reads version {FORMAT_VERSION}")
    try:
        recipe = QuantRecipe(**meta["recipe"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/{QUANTIZATION_FILE} has no valid recipe ({e})") from None
    return CheckpointInfo(path, cfg, recipe, meta)


def read_selection(ckpt_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(attn_lambda [L, D], ffn_lambda [L, D], global_weak_index [k], quantization.json) of a QEFT
    checkpoint, validated."""
    d = Path(ckpt_dir)
    if not d.exists():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"{d} is not a directory (expected a quantized checkpoint directory)")
    qpath = d / QUANTIZATION_FILE
    if not qpath.is_file():
        raise FileNotFoundError(f"{d} has no quantization.json: not a quantized checkpoint (make one "
                                f"with `python -m qeft_jax.quantize --method qeft ...`)")
    info = read_json(qpath)
    spath = d / SELECTION_FILE
    if not spath.is_file():
        method = (info.get("recipe") or {}).get("method", "unknown")
        raise FileNotFoundError(
            f"{d} has no selection.safetensors: it was quantized with method {method!r}, and only "
            f"qeft checkpoints store the per-layer sensitivities (requantize with --method qeft)")
    try:
        sel = load_file(str(spath))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{spath} is not a readable safetensors file: {e}") from None
    missing = [k for k in ("attn_lambda", "ffn_lambda") if k not in sel]
    if missing:
        raise ValueError(f"{spath} lacks {missing} (has {sorted(sel)})")
    attn = np.asarray(sel["attn_lambda"], np.float64)
    ffn = np.asarray(sel["ffn_lambda"], np.float64)
    if attn.ndim != 2 or attn.shape != ffn.shape:
        raise ValueError(f"{spath}: attn_lambda {attn.shape} and ffn_lambda {ffn.shape} must both be "
                         f"[layers, hidden]")
    gidx = np.asarray(info.get("global_weak_index", []), np.int64)
    if gidx.size and (gidx.min() < 0 or gidx.max() >= attn.shape[1]):
        raise ValueError(f"{qpath}: global_weak_index has channels outside [0, {attn.shape[1]})")
    return attn, ffn, gidx, info


# ------------------------------------------------------------------------------- the tensors
def linear_spec(cfg: ModelConfig, recipe: QuantRecipe, name: str) -> QuantSpec:
    """A block linear's packed layout. Under OGR (global weak columns) a linear reading a permuted
    dimension has its weak columns first (weak_first); o_proj reads the heads and keeps an index."""
    out, inp = spec.linear_shape(cfg, name)
    weak_first = recipe.weak == "global" and spec.LINEAR[name].inp in spec.PERMUTED_DIMS
    return QuantSpec(bits=recipe.bits, group_size=recipe.group_size or inp, in_features=inp,
                     out_features=out, k=recipe.k, weak_first=weak_first)


def expected_tensors(cfg: ModelConfig, recipe: QuantRecipe | None = None
                     ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """name -> (shape, dtype) of every tensor the checkpoint must hold (dtype ANY_FLOAT: an fp tensor).
    Quantized: every block linear is replaced by its packed fields, plus the OGR permutations."""
    if recipe is None:
        return {k: (v, ANY_FLOAT) for k, v in spec.fp_shapes(cfg).items()}
    sdt = np.dtype(STORAGE_DTYPES[recipe.storage_dtype])
    field_dtypes = {"qweight": np.uint32, "scales": sdt, "zeros": sdt, "weak_idx": np.int32,
                    "weak": np.dtype(STORAGE_DTYPES[recipe.weak_storage])}
    want: dict[str, tuple[tuple[int, ...], Any]] = {
        k: (spec.shape(cfg, d), ANY_FLOAT) for k, d in spec.top_dims(cfg).items()}
    want[spec.PERM_TENSORS["hidden"]] = ((cfg.hidden_size,), np.int32)
    for i in range(cfg.num_hidden_layers):
        p = spec.layer_prefix(i)
        want[spec.PERM_TENSORS["ffn"].format(i=i)] = ((cfg.intermediate_size,), np.int32)
        for name, dims in spec.norm_dims(cfg).items():
            want[p + name] = (spec.shape(cfg, dims), ANY_FLOAT)
        for name in spec.LINEAR_NAMES:
            qs = linear_spec(cfg, recipe, name)
            for field, shape in qs.shapes().items():
                want[p + name + "." + field] = (shape, field_dtypes[field])
            if spec.has_bias(cfg, name):
                want[p + name + ".bias"] = ((qs.out_features,), sdt)
    return want


def check_tensors(want: Mapping[str, tuple[tuple[int, ...], Any]], tensors: Mapping[str, np.ndarray | LazyArray],
                  *, source: str, finite: bool = True) -> None:
    """Every wanted tensor present with its shape and dtype; fp tensors floating point and (unless
    `finite` is False: the caller checks what it reads) finite."""
    missing = [k for k in want if k not in tensors]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) the config needs are missing, e.g. "
                              f"{', '.join(missing[:3])}")
    for k, (shape, dtype) in want.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: tensor '{k}' has shape {tuple(t.shape)}, the config "
                                  f"expects {shape}")
        if dtype is ANY_FLOAT:
            if not np.issubdtype(np.dtype(t.dtype), np.floating) and np.dtype(t.dtype).name != "bfloat16":
                raise CheckpointError(f"{source}: tensor '{k}' has dtype {t.dtype}, expected a float type")
            if finite:
                check_finite(t, k, source)
        elif t.dtype != dtype:
            raise CheckpointError(f"{source}: tensor '{k}' has dtype {t.dtype}, expected {np.dtype(dtype)}")


def all_finite(t: np.ndarray, chunk: int = 1 << 22) -> bool:
    """No NaN/Inf in `t`, checked a chunk at a time (never a whole float32 copy of a large tensor)."""
    flat = t.reshape(-1)
    return all(np.isfinite(np.asarray(flat[a:a + chunk], np.float32)).all() for a in range(0, flat.size, chunk))


def read_subset(reader: SafetensorsReader, cfg: ModelConfig, select: Callable[[str], bool], *,
                source: str, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The fp tensors whose names `select` keeps, validated (streaming: one block at a time), as
    `dtype` (None: as stored, e.g. bfloat16 embeddings at half the bytes of float32)."""
    want = {k: v for k, v in expected_tensors(cfg).items() if select(k)}
    tensors = {k: np.asarray(reader.get(k), dtype) for k in want if k in reader}
    check_tensors(want, tensors, source=source)
    return tensors


def check_finite(a: np.ndarray, name: str, source: str) -> np.ndarray:
    """`a` (tensor or slice `name` of `source`), or a CheckpointError if it holds NaN or Inf."""
    if not all_finite(a):
        raise CheckpointError(f"{source}: tensor '{name}' contains NaN or Inf")
    return a


def stand_in(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zero-stride array of this shape and dtype (no memory): run a tensor mapping on stand-ins to
    learn the shapes and dtypes it makes without reading anything."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def converted_lazily(sources: Mapping[str, LazyArray], cfg: ModelConfig, *, source: str) -> dict[str, LazyArray]:
    """A source checkpoint's tensors (Hugging Face names, e.g. Phi-3's fused linears) as the tensors
    `expected_tensors(cfg)` names, validated, each read only when `write_safetensors` writes it, so a
    conversion holds one source tensor (and the parts split from it) at a time, never the model.

    `families.tensors_from_hf` maps each source tensor on its own (a split, a rename); shapes and
    dtypes come from running it on stand-ins, so nothing is read to check them. Every fp tensor is
    checked for NaN/Inf when it is read."""
    want = expected_tensors(cfg)
    layout: dict[str, tuple[str, tuple[int, ...], Any]] = {}  # name -> (source tensor, shape, dtype)
    for k, t in sources.items():
        for name, v in families.tensors_from_hf(cfg.model_type, {k: stand_in(t.shape, t.dtype)}, cfg).items():
            if name in want:
                layout[name] = (k, tuple(v.shape), np.dtype(v.dtype))
    check_tensors(want, {k: stand_in(s, d) for k, (_, s, d) in layout.items()}, source=source, finite=False)

    def load(k: str) -> dict[str, np.ndarray]:
        parts = families.tensors_from_hf(cfg.model_type, {k: sources[k].read()}, cfg)
        return {name: np.ascontiguousarray(check_finite(a, name, source) if want[name][1] is ANY_FLOAT else a)
                for name, a in parts.items() if name in want}

    return grouped_lazily(layout, load)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class CheckedReader:
    """A checkpoint's tensor file, read in parts and validated: names, shapes and dtypes from the
    header, the weak indices whole (they are small), the whole-file checksum of a quantized
    checkpoint when `checksum` (it reads every byte once, a chunk at a time), and every fp tensor or
    slice for NaN/Inf as it is read."""

    def __init__(self, info: CheckpointInfo, *, checksum: bool):
        f = info.path / TENSORS_FILE
        if info.quantized and checksum and sha256_file(f) != info.meta.get("sha256"):
            raise CheckpointError(f"{f} does not match the checksum in {QUANTIZATION_FILE}: the packed "
                                  f"tensors were modified or corrupted")
        self.reader = SafetensorsReader([f])
        self.source = str(info.path)
        self.want = expected_tensors(info.config, info.recipe)
        check_tensors(self.want, {k: self.reader.lazy(k) for k in self.reader.keys()}, source=self.source,
                      finite=False)
        if info.recipe is not None:
            idx = {k: self.reader.get(k) for k in self.want if k.endswith(".weak_idx")}
            check_weak_indices(info.config, info.recipe, idx, source=self.source)

    def keys(self) -> list[str]:
        return self.reader.keys()

    def _checked(self, name: str, a: np.ndarray) -> np.ndarray:
        return check_finite(a, name, self.source) if self.want.get(name, (None, 0))[1] is ANY_FLOAT else a

    def get(self, name: str) -> np.ndarray:
        return self._checked(name, self.reader.get(name))

    __getitem__ = get  # a read-on-demand mapping for the helpers that take tensors by name

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._checked(name, self.reader.get_slice(name, index))


def read_tensors(info: CheckpointInfo, *, verify: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint, validated against the config (and the checksum if quantized)."""
    r = CheckedReader(info, checksum=verify)
    return {k: r.get(k) for k in r.keys()}


def read_sharded(info: CheckpointInfo, sharding: Callable[[tuple[int, ...]], Sharding]
                 ) -> tuple[dict[str, jax.Array], int]:
    """Every tensor of the checkpoint as a global array laid out by `sharding(shape)`, and the bytes
    this process read: each process reads from the file only the slices its own devices hold
    (`SafetensorsReader.get_slice`), so no host ever holds the whole model. Validated as
    `CheckedReader` does, but without the whole-file checksum: it would read every byte on every
    process (`read_tensors` checks it; `load_checkpoint` without a sharding)."""
    r = CheckedReader(info, checksum=False)
    arrays = {k: jax.make_array_from_callback(shape, sharding(shape), partial(r.get_slice, k))
              for k, (shape, _) in r.want.items()}
    return arrays, r.reader.bytes_read


def check_weak_indices(cfg: ModelConfig, recipe: QuantRecipe, tensors: Mapping[str, np.ndarray], *,
                       source: str) -> None:
    """Every weak_idx holds distinct input columns, and is 0..k-1 where the layout promises it
    (QuantSpec.weak_first: the model then reads those inputs as a slice and never looks at the index)."""
    for i in range(cfg.num_hidden_layers):
        for name in spec.LINEAR_NAMES:
            qs = linear_spec(cfg, recipe, name)
            key = f"{spec.layer_prefix(i)}{name}.weak_idx"
            idx = np.asarray(tensors[key])
            if qs.weak_first and not np.array_equal(idx, np.arange(qs.k)):
                raise CheckpointError(f"{source}: '{key}' must be 0..{qs.k - 1} (the weak columns come first "
                                      f"after OGR), got {idx[:8].tolist()}...")
            if len(idx) and (idx.min() < 0 or idx.max() >= qs.in_features or len(np.unique(idx)) != len(idx)):
                raise CheckpointError(f"{source}: '{key}' must hold {qs.k} distinct columns in "
                                      f"[0, {qs.in_features})")


def layer_perms(tensors: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """The OGR permutations layer i's tensors were reordered with ({dim: perm})."""
    return {"hidden": np.asarray(tensors[spec.PERM_TENSORS["hidden"]], np.int64),
            "ffn": np.asarray(tensors[spec.PERM_TENSORS["ffn"].format(i=i)], np.int64)}


def dense_linear(tensors: Mapping[str, np.ndarray], prefix: str, qs: QuantSpec) -> np.ndarray:
    """Ŵ [out, in] of one packed linear: dequantized grid with the weak columns put back."""
    packed = (jnp.asarray(tensors[prefix + f]) for f in (".qweight", ".scales", ".zeros", ".weak", ".weak_idx"))
    return np.array(dense_weight(*packed, bits=qs.bits, group_size=qs.group_size, n=qs.in_features))


def dense_lazily(info: CheckpointInfo, transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
                 = dict) -> dict[str, LazyArray]:
    """The model as fp tensors in the ORIGINAL channel order (what convert.to_hf writes), each made
    when it is read and a decoder layer at a time: a quantized checkpoint is dequantized, its weak
    columns put back and OGR undone (inverse permutations). `transform` maps each group's tensors
    (a layer's, or one top-level tensor) before they are handed out: convert.to_hf's dtype and the
    family's Hugging Face layout (e.g. Phi-3's fused linears)."""
    r = CheckedReader(info, checksum=True)
    cfg, recipe = info.config, info.recipe
    shapes = spec.fp_shapes(cfg)
    members: dict[str, list[str]] = {}  # group (a layer's prefix, or a top-level tensor's name) -> tensors
    for k in shapes:
        i = spec.layer_of(k)
        members.setdefault(k if i is None else spec.layer_prefix(i), []).append(k)
    inv = lambda perms: {d: np.argsort(p) for d, p in perms.items()}

    def dense(group: str) -> dict[str, np.ndarray]:
        if not info.quantized:
            return {k: r[k] for k in members[group]}
        i = spec.layer_of(group)
        if i is None:  # one top-level tensor
            return spec.permute({group: np.asarray(r[group], np.float32)}, spec.top_dims(cfg), inv(layer_perms(r, 0)))
        t = {name: np.asarray(r[group + name], np.float32) for name in spec.norm_dims(cfg)}
        for name in spec.LINEAR_NAMES:
            t[name + ".weight"] = dense_linear(r, group + name, linear_spec(cfg, recipe, name))
            if group + name + ".bias" in r.want:
                t[name + ".bias"] = np.asarray(r[group + name + ".bias"], np.float32)
        t = spec.permute(t, spec.layer_dims(cfg), inv(layer_perms(r, i)))
        return {group + k: v for k, v in t.items()}

    layout = {}
    for g, names in members.items():
        dtypes = {k: r.reader.lazy(k).dtype if not info.quantized else np.float32 for k in names}
        made = transform({k: stand_in(shapes[k], dtypes[k]) for k in names})
        layout.update({k: (g, tuple(v.shape), np.dtype(v.dtype)) for k, v in made.items()})
    return grouped_lazily(layout, lambda g: transform(dense(g)))


def dense_tensors(info: CheckpointInfo) -> dict[str, np.ndarray]:
    """`dense_lazily`'s tensors, all read (for comparisons on small models)."""
    return {k: t.read() for k, t in dense_lazily(info).items()}


# ---------------------------------------------------------------------------------- writing
def write_fp(out: Path, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray | LazyArray],
             extra_files: Mapping[str, bytes] | None = None,
             extra_json: Mapping[str, Any] | None = None, progress: str | None = None) -> None:
    """config.json + model.safetensors (+ extra files) into an existing (atomic temp) directory;
    the tensors are written one at a time (a LazyArray is read only when written)."""
    (out / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    write_safetensors(out / TENSORS_FILE, tensors, metadata={"format": "pt"}, progress=progress)
    for name, data in (extra_files or {}).items():
        (out / name).write_bytes(data)
    for name, obj in (extra_json or {}).items():
        (out / name).write_text(json.dumps(obj, indent=2, sort_keys=True))


def write_quantized(out: Path, cfg: ModelConfig, tensors: Mapping[str, np.ndarray | LazyArray],
                    meta: Mapping[str, Any], extra_files: Mapping[str, bytes]) -> None:
    """A quantized checkpoint into an (atomic temp) directory; the checksum covers model.safetensors
    byte for byte."""
    write_fp(out, cfg.to_hf_dict(), tensors, extra_files=extra_files)
    record = {"format_version": FORMAT_VERSION, **meta, "sha256": sha256_file(out / TENSORS_FILE)}
    (out / QUANTIZATION_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))


def tokenizer_files(src: Path) -> dict[str, bytes]:
    """The tokenizer files of a directory (ours or a Hugging Face one)."""
    return {n: (src / n).read_bytes() for n in TOKENIZER_FILES if (src / n).is_file()}


def aux_files(src: Path) -> dict[str, bytes]:
    """Every other file a checkpoint carries (tokenizer, selection.safetensors, generation_config.json,
    ...) that an output derived from it keeps; not the tensors/config it rewrites nor a run's records."""
    return {f.name: f.read_bytes() for f in sorted(src.iterdir())
            if f.is_file() and not f.name.startswith(".") and f.name not in OWN_FILES
            and not f.name.endswith(".tmp")}


# ----------------------------------------------------------------------------------- models
def build_model(cfg: ModelConfig, recipe: QuantRecipe | None, *, dtype: Any = jnp.float32,
                param_dtype: Any = jnp.float32) -> CausalLM:
    """An unfilled model skeleton: fp, or with every block linear a QEFTLinear for `recipe`."""
    model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
    if recipe is not None:
        sdt, wdt = jnp.dtype(recipe.storage_dtype), jnp.dtype(recipe.weak_storage)
        swap_linears(model, lambda name, _: QEFTLinear(linear_spec(cfg, recipe, name), bias=spec.has_bias(cfg, name),
                                                       dtype=dtype, storage_dtype=sdt, weak_dtype=wdt))
    return model


def load_checkpoint(path: str | Path, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    sharding: Callable[[tuple[int, ...]], Sharding] | None = None
                    ) -> tuple[CausalLM, CheckpointInfo]:
    """(model, info) of an fp or quantized checkpoint directory. With `sharding` (shape -> its
    layout), every variable is a global array placed straight from the file (`read_sharded`: each
    process reads and holds only its own slices); info.bytes_read says how much this process read."""
    info = read_info(path)
    model = build_model(info.config, info.recipe, dtype=dtype, param_dtype=param_dtype)
    if sharding is None:
        tensors = read_tensors(info)
        info = dataclasses.replace(info, bytes_read=sum(t.nbytes for t in tensors.values()))
    else:
        tensors, n = read_sharded(info, sharding)
        info = dataclasses.replace(info, bytes_read=n)
    place_tensors(model, tensors, source=str(info.path))
    return model, info


def trained_tensors(model: nnx.Module, only: Any, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`model`'s variables selected by `only`, by name, cast to the dtypes of the same names in `like`."""
    return {k: np.asarray(v, np.float32).astype(like[k].dtype) for k, v in named_variables(model, only).items()}
