"""The one quantization pipeline (every recipe): select -> reorder -> [AWQ scales] -> grid search +
OPTQ -> pack.

Weights are read a tensor at a time from the safetensors file, so only one block is resident; the
calibration activations live in one buffer that every block updates in place (`activation_buffer`:
in memory, or on disk); each finished block is written to the resume state's files and the output
is assembled from them a tensor at a time, so host memory does not grow with the number of blocks.
Pass 1 (global weak columns only) runs the fp model to get each block's Hessian diagonal and picks
the global index (Algorithm 1). Pass 2 is layer-sequential as in OPTQ: block l is calibrated on the
outputs of the already-quantized blocks before it. With an AWQ recipe (`awq_grid` > 0), each block's
input-channel scales are searched on the same pass's statistics and folded into its fp tensors
before its linears are quantized (`apply_awq`).

`mesh` (qeft_jax.sharding.make_mesh) makes the calibration passes data-parallel; None (default)
runs them on one device exactly as before.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from qeft_jax import spec
from qeft_jax.checkpoint import (SELECTION_FILE, STORAGE_DTYPES, TENSORS_FILE, linear_spec, read_info, read_subset,
                                 tokenizer_files, write_quantized)
from qeft_jax.config import ModelConfig
from qeft_jax.io import (LazyArray, SafetensorsReader, atomic_dir, atomic_file, check_output_dir, load_npy_rows,
                         save_npy_rows, write_json_atomic)
from qeft_jax.sharding import is_writer, sync
from qeft_jax.packing import pack_codes
from qeft_jax.model import embedding_scale
from qeft_jax.qlinear import QEFTLinear
from qeft_jax.quant.awq import fold_scales, hessian_loss, scale_hessian, search_scale
from qeft_jax.quant.calibrate import (CalibrationError, Rows, absmean_key, activation_buffer,
                                     attention_output_errors, build_layer, run_block)
from qeft_jax.quant.groupwise import rtn, search_group_params
from qeft_jax.quant.optq import optq
from qeft_jax.recipes import QuantRecipe
from qeft_jax.quant.reorder import weak_first_permutation
from qeft_jax.quant.select import global_weak_index, owq_sensitivity, top_k


def check_calibration(ids: np.ndarray, cfg: ModelConfig) -> None:
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise CalibrationError(f"calibration data must be [samples >= 1, seq_len >= 2] token ids, got "
                               f"shape {ids.shape}")
    if ids.shape[1] > cfg.max_position_embeddings:
        raise CalibrationError(f"calibration seq_len {ids.shape[1]} exceeds the model's "
                               f"max_position_embeddings {cfg.max_position_embeddings}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise CalibrationError(f"calibration token ids must lie in [0, {cfg.vocab_size})")


def quantize_linear(w: np.ndarray | jax.Array, h: np.ndarray | jax.Array | None, weak_idx: np.ndarray,
                    recipe: QuantRecipe) -> dict[str, np.ndarray]:
    """Grid search + (OPTQ or RTN) of one linear -> its packed tensors. h: its input's Hessian (OPTQ
    only; None for a recipe without calibration). A caller can hand over `w` and `h` as device
    arrays and drop its host copies (the pipeline does)."""
    out, n = w.shape
    g = recipe.group_size or n
    sdt = STORAGE_DTYPES[recipe.storage_dtype]
    weak_mask = np.zeros(n, bool)
    weak_mask[weak_idx] = True
    w = jnp.asarray(w, jnp.float32)
    w_dense = jnp.where(jnp.asarray(weak_mask)[None, :], jnp.float32(0), w)  # weak positions -> exact 0
    scales, zeros = search_group_params(w_dense, bits=recipe.bits, group_size=g,
                                        grid=recipe.grid, max_shrink=recipe.max_shrink,
                                        storage_dtype=jnp.dtype(recipe.storage_dtype))
    if recipe.optq:
        del w_dense  # OPTQ starts from w itself
        codes, w_final = optq(w, jnp.asarray(h), scales, zeros,
                              jnp.asarray(weak_mask), bits=recipe.bits, group_size=g,
                              act_order=recipe.act_order, percdamp=recipe.percdamp)
        weak = np.asarray(w_final[:, weak_idx])  # only the weak columns come to the host
        del w_final
    else:
        codes = rtn(w_dense, scales, zeros, bits=recipe.bits, group_size=g)
        weak = np.asarray(w[:, weak_idx])
    return {"qweight": np.asarray(pack_codes(codes, recipe.bits)),
            "scales": np.asarray(scales).astype(sdt), "zeros": np.asarray(zeros).astype(sdt),
            "weak": np.ascontiguousarray(np.asarray(weak, np.float32).astype(STORAGE_DTYPES[recipe.weak_storage])),
            "weak_idx": np.asarray(weak_idx, np.int32)}


def apply_awq(cfg: ModelConfig, i: int, t: dict[str, np.ndarray], hs: dict[str, np.ndarray], recipe: QuantRecipe,
              x: Rows, *, batch_size: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """AWQ on block i: fp tensors `t` (names relative to the layer), the block's calibration
    statistics `hs` (Hessians and `absmean_key` entries, from the fp block on its inputs `x`).

    For every activation that has a producer to fold into (`spec.producers(cfg)`, in block order:
    q/k/v's input -> input norm, o_proj's input -> v_proj's rows (skipped under GQA, where query
    heads share a v row, as AutoAWQ does), gate/up's input -> the MLP's input norm, down_proj's input
    -> up_proj's rows), the scale is searched on the current weights of the linears reading it
    (`spec.readers`) and folded at once, so later searches see earlier folds (AutoAWQ's order).
    q/k/v's candidates are scored at the attention output on `x` (`attention_output_errors`), the
    others by their own output errors (`hessian_loss`). The Hessians of folded inputs become
    diag(s)^-1 H diag(s)^-1 (what OPTQ would need).

    Returns (folded tensors, updated statistics, chosen α per activation)."""
    t, hs, alphas = dict(t), dict(hs), {}
    for reads in spec.producers(cfg):
        names = spec.readers(reads)
        ws = [t[name + ".weight"] for name in names]
        if reads == spec.ATTN_IN:
            loss = partial(attention_output_errors, build_layer(cfg, i, t), x, cfg, names, batch_size=batch_size)
        else:
            loss = hessian_loss(ws, hs[reads])
        found = search_scale(ws, hs[absmean_key(reads)], loss, n_grid=recipe.awq_grid, bits=recipe.bits,
                             group_size=recipe.group_size or ws[0].shape[1], grid=recipe.grid,
                             max_shrink=recipe.max_shrink, storage_dtype=jnp.dtype(recipe.storage_dtype))
        t = fold_scales(cfg, t, {reads: found.scale})
        hs[reads] = scale_hessian(hs[reads], found.scale)
        alphas[reads] = found.alpha
    return t, hs, alphas


def _weak_indices(recipe: QuantRecipe, t: dict[str, np.ndarray], hs: dict[str, np.ndarray]
                  ) -> dict[str, np.ndarray]:
    """Weak input columns per linear of one (already reordered) block."""
    k = recipe.k
    if recipe.weak == "none":
        return {name: np.zeros(0, np.int32) for name in spec.LINEAR_NAMES}
    if recipe.weak == "per_layer":  # OWQ: Eq. (3) per linear
        return {lin.name: top_k(np.asarray(owq_sensitivity(jnp.asarray(t[lin.name + ".weight"]),
                                                           jnp.asarray(np.diag(hs[lin.reads])), recipe.bits)), k)
                for lin in spec.LINEARS}
    # QEFT: after OGR the weak columns of every linear that reads a permuted dimension (the residual
    # stream: the global index; the FFN dim: the layer's own) are its first k; a linear reading an
    # unpermuted dimension (o_proj: the heads) keeps its own, gathered by index.
    first = np.arange(k, dtype=np.int32)
    return {lin.name: first if lin.inp in spec.PERMUTED_DIMS else top_k(np.diag(hs[lin.reads]), k)
            for lin in spec.LINEARS}


def select_global_index(reader: SafetensorsReader, cfg: ModelConfig, x: Rows, k: int, *,
                        batch_size: int, progress: bool, mesh: Any = None
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pass 1 (fp model): per-layer λ = diag(H) of the residual-stream readers' inputs, then
    Algorithm 1 (every such linear votes with its input's λ). `x` (the embedded calibration
    tokens) is overwritten block by block with the fp model's activations.

    Returns the global index and λ per block ('attn_lambda', 'ffn_lambda': [layers, hidden],
    original channel order) for inspection, plots and reuse at another k (`quantize_checkpoint`'s
    `selection`)."""
    attn, ffn = [], []
    for i in tqdm(range(cfg.num_hidden_layers), desc="selecting weak channels", disable=not progress):
        layer = build_layer(cfg, i, _read_layer(reader, cfg, i, {}))
        stats = run_block(layer, x, cfg, batch_size=batch_size, stats="diag", out=x, mesh=mesh)
        attn.append(stats[spec.ATTN_IN])
        ffn.append(stats[spec.FFN_IN])
    selection = {"attn_lambda": np.stack(attn), "ffn_lambda": np.stack(ffn)}
    return selection_index(selection, k), selection


SELECTION_KEYS = {spec.ATTN_IN: "attn_lambda", spec.FFN_IN: "ffn_lambda"}  # pass 1's λ per activation


def selection_index(selection: dict[str, np.ndarray], k: int) -> np.ndarray:
    """Algorithm 1 on pass 1's λ: every residual-stream reader of every layer votes with its
    input's λ (layer by layer, readers in block order)."""
    voters = [SELECTION_KEYS[spec.LINEAR[name].reads] for name in spec.hidden_readers()]
    layers = len(selection["attn_lambda"])
    return global_weak_index([selection[key][i] for i in range(layers) for key in voters], k)


def _check_selection(selection: dict[str, np.ndarray], cfg: ModelConfig) -> None:
    want = (cfg.num_hidden_layers, cfg.hidden_size)
    for key in SELECTION_KEYS.values():
        if key not in selection or np.shape(selection[key]) != want:
            raise ValueError(f"selection[{key!r}] must be λ of shape {want} (pass 1 of this model), got "
                             f"{np.shape(selection[key]) if key in selection else 'nothing'}")


def _read_reordered(reader: SafetensorsReader, cfg: ModelConfig, name: str, dims: tuple[str, ...],
                    perms: dict[str, np.ndarray], dtype: Any = np.float32) -> np.ndarray:
    """One fp tensor of the source, validated, as `dtype` (None: as stored), its axes reordered by
    `perms`: one tensor at a time, so a block is never held twice (read + reordered)."""
    t = read_subset(reader, cfg, lambda k: k == name, source="source checkpoint", dtype=dtype)
    return spec.permute(t, {name: dims}, perms)[name]


def _read_layer(reader: SafetensorsReader, cfg: ModelConfig, i: int, perms: dict[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
    """Layer i's fp tensors (names relative to the layer), float32, reordered by `perms`."""
    prefix = spec.layer_prefix(i)
    return {k: _read_reordered(reader, cfg, prefix + k, dims, perms) for k, dims in spec.layer_dims(cfg).items()}


def embed_calibration(reader: SafetensorsReader, cfg: ModelConfig, ids: np.ndarray, perm: np.ndarray | None,
                      out: Rows) -> None:
    """The calibration tokens' embeddings × the model's embedding scale, hidden dim reordered by
    `perm` (None: original order), written into `out` a sequence at a time. The embedding
    is read in its storage dtype (bfloat16: half of float32) and dropped when this returns."""
    name = "model.embed_tokens.weight"
    embed = _read_reordered(reader, cfg, name, spec.top_dims(cfg)[name], {}, dtype=None)
    scale = np.float32(embedding_scale(cfg))
    for a in range(len(ids)):  # a sequence at a time: never a second copy of all the activations
        s = slice(a, a + 1)
        x = np.asarray(embed[ids[s]], np.float32) * scale
        if not np.all(np.isfinite(x)):
            raise CalibrationError("embeddings of the calibration tokens contain NaN/Inf")
        out[s] = x if perm is None else x[..., perm]


def _output_tensors(reader: SafetensorsReader, cfg: ModelConfig, perm: np.ndarray, blocks: SafetensorsReader
                    ) -> dict[str, np.ndarray | LazyArray]:
    """The quantized checkpoint's tensors, each read only when the writer comes to it: the top
    tensors reordered by OGR (float32, read in their storage dtype), the hidden permutation, and
    every finished block from the resume state's files. Nothing of the model stays resident."""
    def top(name: str, dims: tuple[str, ...]) -> LazyArray:
        return LazyArray(spec.shape(cfg, dims), np.dtype(np.float32), lambda: np.asarray(
            _read_reordered(reader, cfg, name, dims, {"hidden": perm}, dtype=None), np.float32))
    tensors: dict[str, np.ndarray | LazyArray] = {name: top(name, dims) for name, dims in spec.top_dims(cfg).items()}
    tensors[spec.PERM_TENSORS["hidden"]] = perm
    tensors.update({k: blocks.lazy(k) for k in blocks.keys()})
    return tensors


def quantize_checkpoint(src: Path, out: Path, recipe: QuantRecipe, calib_ids: np.ndarray, *,
                        batch_size: int = 8, progress: bool = True, overwrite: bool = False,
                        meta: dict[str, Any] | None = None,
                        on_block: Callable[[int, float], None] | None = None, mesh: Any = None,
                        activations: str = "float32", selection: dict[str, np.ndarray] | None = None
                        ) -> dict[str, Any]:
    """Quantize the fp checkpoint at `src` into a packed checkpoint at `out`. Returns a summary.

    mesh: a jax.sharding.Mesh with a 'data' axis for data-parallel calibration (see run_block).
    selection: pass 1's λ ('attn_lambda', 'ffn_lambda' [layers, hidden]; `checkpoint.read_selection`
    of an earlier QEFT run) from the same source, calibration ids, batch size and mesh: pass 1 does
    not depend on bits or k, so QEFT runs that differ only there share it instead of rerunning the
    fp model.
    activations: how the calibration activations are held between blocks (`activation_buffer`):
    'float32' (default), 'bfloat16' (half the memory, slightly different codes) or 'disk' (float32
    in a file beside `out`: the same codes as 'float32', ~one batch resident).

    Host memory: one block's fp weights and Hessians, the activations, one linear's working set.
    The embeddings are read only to embed the calibration tokens and again when written, and every
    finished block lives in the resume state's files until the output is assembled from them.

    Host BLAS is limited to one thread while this runs: XLA's CPU Cholesky calls LAPACK, whose
    threads spin against XLA's own (measured: 6.6 s vs 0.33 s for one 1536² factorisation on two
    busy cores). That LAPACK (scipy's OpenBLAS) is loaded by the first factorisation in the process
    and threadpoolctl limits only libraries already loaded, so it is loaded first: otherwise the
    first quantization in a process ran it multi-threaded and rounded differently from every later
    one (523 of 1143 tensors differed on the default model)."""
    jnp.linalg.cholesky(jnp.eye(2, dtype=jnp.float32)).block_until_ready()
    with threadpool_limits(limits=1, user_api="blas"):
        return _quantize_checkpoint(src, out, recipe, calib_ids, batch_size=batch_size, progress=progress,
                                    overwrite=overwrite, meta=meta, on_block=on_block, mesh=mesh,
                                    activations=activations, selection=selection)


def _quantize_checkpoint(src: Path, out: Path, recipe: QuantRecipe, calib_ids: np.ndarray, *,
                         batch_size: int, progress: bool, overwrite: bool, meta: dict[str, Any] | None,
                         on_block: Callable[[int, float], None] | None, mesh: Any, activations: str,
                         selection: dict[str, np.ndarray] | None) -> dict[str, Any]:
    t0 = time.time()
    out = Path(out)
    check_output_dir(out, overwrite=overwrite)
    info = read_info(src)
    if info.quantized:
        raise ValueError(f"{src} is already quantized; quantize an fp checkpoint")
    cfg = info.config
    check_calibration(calib_ids, cfg)
    for name in spec.LINEAR_NAMES:
        linear_spec(cfg, recipe, name)  # raises if k exceeds an input dim
    reader = SafetensorsReader([src / TENSORS_FILE])
    for name, dims in spec.top_dims(cfg).items():  # validated before any long work, one at a time
        _read_reordered(reader, cfg, name, dims, {}, dtype=None)

    d = cfg.hidden_size
    work = ResumeState(out, _run_key(src, recipe, calib_ids, batch_size, mesh, activations), write=is_writer())
    sync("qeft-jax: resume state read")  # nobody writes it before every process has read it
    out.parent.mkdir(parents=True, exist_ok=True)
    with activation_buffer((*calib_ids.shape, d), activations, out.parent) as x:
        if work.global_idx is not None:
            global_idx = work.global_idx
        elif recipe.weak == "global" and recipe.k:
            if selection is None:
                embed_calibration(reader, cfg, calib_ids, None, x)
                global_idx, selection = select_global_index(reader, cfg, x, recipe.k, batch_size=batch_size,
                                                            progress=progress, mesh=mesh)
            else:
                _check_selection(selection, cfg)
                global_idx = selection_index(selection, recipe.k)
            work.save_selection(selection)
        else:
            global_idx = np.zeros(0, np.int32)
        work.save_global_idx(global_idx)
        perm = weak_first_permutation(global_idx, d) if recipe.weak == "global" else np.arange(d, dtype=np.int32)

        start = work.done + 1  # resume after the last finished block
        if recipe.calibrated and start == 0:  # plain RTN reads no activations
            embed_calibration(reader, cfg, calib_ids, perm, x)
        elif recipe.calibrated and start < cfg.num_hidden_layers:  # (after the last block none were kept)
            work.load_activations(x)
        bar = tqdm(range(start, cfg.num_hidden_layers), desc=f"quantizing ({recipe.method}, {recipe.bits}-bit)",
                   disable=not progress, initial=start, total=cfg.num_hidden_layers)
        for i in bar:
            tb = time.time()
            feeds = recipe.calibrated and i + 1 < cfg.num_hidden_layers  # the last block's outputs feed nothing
            block, record = _quantize_block(reader, cfg, recipe, i, perm, x, batch_size=batch_size, mesh=mesh,
                                            next_inputs=feeds)
            work.finish_block(i, block, x if feeds else None, record)  # in its file from here on
            del block
            if on_block:
                on_block(i, time.time() - tb)

    summary = {"recipe": recipe.to_dict(), "calibration": {"samples": int(calib_ids.shape[0]),
               "seq_len": int(calib_ids.shape[1]), "activations": activations},
               "global_weak_index": [int(v) for v in global_idx],
               "source": str(src), "seconds": round(time.time() - t0, 2), **(meta or {})}
    if recipe.awq_grid:  # the α AWQ chose, per layer and activation
        summary["awq_alpha"] = [work.records[str(i)]["awq_alpha"] for i in range(cfg.num_hidden_layers)]
    if is_writer():
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write_quantized(tmp, cfg, _output_tensors(reader, cfg, perm, work.blocks(cfg.num_hidden_layers)),
                            summary, {**tokenizer_files(src), **work.extra_files()})
        work.clear()
    return summary


def _quantize_block(reader: SafetensorsReader, cfg: ModelConfig, recipe: QuantRecipe, i: int, perm: np.ndarray,
                    x: Rows, *, batch_size: int, mesh: Any, next_inputs: bool
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Block i calibrated on `x` (its inputs, hidden dim reordered by `perm`), quantized, and (with
    `next_inputs`) run again to overwrite `x` with its outputs (the next block's inputs). Returns its
    packed tensors (full names, with its FFN permutation) and what the summary records of it."""
    dims = spec.layer_dims(cfg)
    sdt = STORAGE_DTYPES[recipe.storage_dtype]
    t = _read_layer(reader, cfg, i, {"hidden": perm})
    hs = {}
    if recipe.calibrated:  # the fp block's statistics (its outputs are not needed: out=None)
        hs = run_block(build_layer(cfg, i, t), x, cfg, batch_size=batch_size, stats="full", mesh=mesh,
                       absmean=recipe.awq_grid > 0)
    record: dict[str, Any] = {}
    if recipe.awq_grid:
        t, hs, record["awq_alpha"] = apply_awq(cfg, i, t, hs, recipe, x, batch_size=batch_size)
    ffn_perm = np.arange(cfg.intermediate_size, dtype=np.int32)
    if recipe.weak == "global" and recipe.k:
        ffn_in = spec.ffn_reader_input()
        ffn_perm = weak_first_permutation(top_k(np.diag(hs[ffn_in]), recipe.k), cfg.intermediate_size)
        t = spec.permute(t, dims, {"ffn": ffn_perm})
        hs[ffn_in] = hs[ffn_in][ffn_perm][:, ffn_perm]
    weak = _weak_indices(recipe, t, hs)
    replace, layer_t = {}, {name: t[name] for name in spec.norm_dims(cfg)}
    last = {lin.reads: lin.name for lin in spec.LINEARS}  # the last linear reading each activation
    for lin in spec.LINEARS:
        # handed over on the device: the host weight, and a Hessian after its last reader, go now
        w = jnp.asarray(t.pop(lin.name + ".weight"), jnp.float32)
        h = hs.pop(lin.reads, None) if last[lin.reads] == lin.name else hs.get(lin.reads)
        h = None if h is None else jnp.asarray(h)
        packed = quantize_linear(w, h, weak[lin.name], recipe)
        del w, h
        if lin.name + ".bias" in t:
            packed["bias"] = t[lin.name + ".bias"].astype(sdt)
        replace[lin.name] = QEFTLinear(linear_spec(cfg, recipe, lin.name), bias="bias" in packed,
                                       storage_dtype=jnp.dtype(recipe.storage_dtype))
        layer_t.update({f"{lin.name}.{f}": v for f, v in packed.items()})
    del t, hs  # the fp block and its Hessians are not needed for the quantized block's pass
    if next_inputs:  # the next block's inputs: this block quantized (layer-sequential, as OPTQ)
        run_block(build_layer(cfg, i, layer_t, replace), x, cfg, batch_size=batch_size, out=x, mesh=mesh)
    block = {spec.layer_prefix(i) + k: v for k, v in layer_t.items()}
    block[spec.PERM_TENSORS["ffn"].format(i=i)] = ffn_perm
    return block, record


def _run_key(src: Path, recipe: QuantRecipe, calib_ids: np.ndarray, batch_size: int, mesh: Any = None,
             activations: str = "float32") -> str:
    key: list[Any] = [str(Path(src).resolve()), recipe.to_dict(), batch_size]
    if mesh is not None:  # a different device split changes float rounding: don't mix partial runs
        key.append({str(a): int(n) for a, n in mesh.shape.items()})
    if activations == "bfloat16":  # rounded activations change the codes ('disk' holds float32: same run)
        key.append("bfloat16 activations")
    h = hashlib.sha256(json.dumps(key).encode())
    h.update(np.ascontiguousarray(calib_ids, np.int64).tobytes())
    return h.hexdigest()


class ResumeState:
    """Per-block progress beside the output (`.{out}.partial/`): a killed run resumes from the last
    finished block and produces the same checkpoint. Every file is written to a temp name and
    renamed, and the state file is renamed last, so a kill at any point leaves a consistent state.
    With write=False (a multi-process run's other processes) it reads the state but never changes
    the directory: process 0 alone writes it."""

    def __init__(self, out: Path, key: str, write: bool = True):
        self.dir = out.parent / f".{out.name}.partial"
        self.key = key
        self.write = write
        self.done = -1
        self.global_idx: np.ndarray | None = None
        self.records: dict[str, Any] = {}   # per finished block (str(i)): what the summary reports
        state = self._read_state()
        if state and state.get("key") == key:
            self.done = int(state["done"])
            self.global_idx = np.asarray(state["global_idx"], np.int32)
            self.records = state.get("records", {})
        elif self.dir.exists() and write:
            shutil.rmtree(self.dir)  # another run's leftovers: start over

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write_state(self) -> None:
        if not self.write:
            return
        write_json_atomic(self.dir / "state.json",
                          {"key": self.key, "done": self.done, "global_idx": [int(v) for v in self.global_idx],
                           "records": self.records})

    def save_global_idx(self, idx: np.ndarray) -> None:
        if self.write:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.global_idx = np.asarray(idx, np.int32)
        self._write_state()

    def save_selection(self, stats: dict[str, np.ndarray]) -> None:
        """Per-layer sensitivities of pass 1, shipped in the checkpoint as selection.safetensors."""
        if not self.write:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_file(self.dir / SELECTION_FILE, lambda p: save_file(
            {k: np.ascontiguousarray(v, np.float32) for k, v in stats.items()}, str(p)))

    def extra_files(self) -> dict[str, bytes]:
        f = self.dir / SELECTION_FILE
        return {f.name: f.read_bytes()} if f.is_file() else {}

    def finish_block(self, i: int, tensors: dict[str, np.ndarray], x: Rows | None,
                     record: dict[str, Any] | None = None) -> None:
        """Block i is done: its tensors, the next block's inputs x (None: a recipe without
        calibration has none to keep) and what the summary reports."""
        self.done = i
        self.records[str(i)] = record or {}
        if not self.write:
            return
        atomic_file(self.dir / f"block_{i}.safetensors", lambda p: save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(p)))
        if x is not None:
            atomic_file(self.dir / f"x_{i}.npy", lambda p: save_npy_rows(p, x, np.float32))
        self._write_state()
        (self.dir / f"x_{i - 1}.npy").unlink(missing_ok=True)

    def blocks(self, n: int) -> SafetensorsReader:
        """The packed tensors of finished blocks 0..n-1, read from their files when asked."""
        return SafetensorsReader([self.dir / f"block_{i}.safetensors" for i in range(n)])

    def load_activations(self, into: Rows) -> None:
        """The activations after the last finished block, copied into `into`."""
        load_npy_rows(self.dir / f"x_{self.done}.npy", into)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
