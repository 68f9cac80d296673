"""QEFT merging (paper section 4.3, Fig. 6b): Δ = tuned − base of the weak columns, added to a
target model that shares the base's origin.

`tuned` and `base` are quantized QEFT checkpoints with the same layout (the tuned one is a
fine-tune of the base: same permutations, weak indices and packed grid). Δ is first placed in the
ORIGINAL channel coordinates of each linear: reordered channel c of the hidden dimension holds
original channel `qeft.hidden_perm[c]`, of layer i's FFN dimension `qeft.layers.{i}.ffn_perm[c]`;
q/k/v/gate/up read the hidden dim, down_proj the FFN dim, o_proj the (never permuted) attention
dim; gate/up write the FFN dim, o_proj/down_proj the hidden dim. Then
  fp target         W[orig rows, orig weak cols] += Δ         (everything else untouched)
  quantized target  Δ is mapped into the target's own channel order and added to its weak
                    columns; every column Δ touches must be a weak column of the target.
All arithmetic is float64, so merging into the base itself reproduces the tuned checkpoint
bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qeft_jax.config import LlamaConfig
from qeft_jax.io import CheckpointError, SafetensorsReader, atomic_dir, tokenizer_files, write_checkpoint
from qeft_jax.params import LINEAR_NAMES
from qeft_jax.quant.checkpoint import read_quantized, write_quantized
from train.trainer import aux_files

HIDDEN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


def channel_maps(tensors: dict[str, np.ndarray], layer: int, name: str, shape: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(row_perm, col_perm) of one linear: reordered row r / column c is original row_perm[r] /
    column col_perm[c]."""
    out, n = shape
    hidden = np.asarray(tensors["qeft.hidden_perm"], np.int64)
    ffn = np.asarray(tensors[f"qeft.layers.{layer}.ffn_perm"], np.int64)
    ident_out, ident_in = np.arange(out), np.arange(n)
    cols = hidden if name in HIDDEN_IN else ffn if name == "mlp.down_proj" else ident_in
    rows = ffn if name in ("mlp.gate_proj", "mlp.up_proj") else hidden if name in (
        "self_attn.o_proj", "mlp.down_proj") else ident_out
    return rows, cols


def _resolve(p: str | Path) -> Path:
    from qeft_jax.load import resolve

    return resolve(p)


def weak_deltas(tuned: Path, base: Path) -> tuple[LlamaConfig, dict[str, np.ndarray], dict[str, Any]]:
    """Per linear 'model.layers.{i}.{linear}': (orig_rows [out], orig_cols [k], Δ [out, k], base weak,
    tuned weak), all float64, rows/columns of Δ in the base's order mapped to ORIGINAL channels by
    orig_rows/orig_cols. Checks that tuned and base share the layout."""
    cfg = LlamaConfig.from_json_file(base / "config.json")
    cfg_t = LlamaConfig.from_json_file(tuned / "config.json")
    if cfg_t.to_hf_dict() != cfg.to_hf_dict():
        raise CheckpointError(f"{tuned} and {base} have different model configs")
    _, rec_b, tb = read_quantized(base, cfg)
    _, rec_t, tt = read_quantized(tuned, cfg)
    if (rec_b.bits, rec_b.group_size, rec_b.k) != (rec_t.bits, rec_t.group_size, rec_t.k):
        raise CheckpointError(f"{tuned} and {base} were quantized differently")
    layout = [k for k in tb if k.startswith("qeft.") or k.endswith(".weak_idx") or k.endswith(".qweight")]
    for k in layout:
        if not np.array_equal(tb[k], tt[k]):
            raise CheckpointError(f"{tuned} is not a fine-tune of {base}: '{k}' differs (the packed base "
                                  f"and its channel layout must be identical)")
    out: dict[str, Any] = {}
    for i in range(cfg.num_hidden_layers):
        for name in LINEAR_NAMES:
            p = f"model.layers.{i}.{name}"
            delta = np.asarray(tt[p + ".weak"], np.float64) - np.asarray(tb[p + ".weak"], np.float64)
            rows, cols = channel_maps(tb, i, name, (delta.shape[0], _in_features(cfg, name)))
            out[p] = (rows, cols[np.asarray(tb[p + ".weak_idx"], np.int64)], delta,
                      np.asarray(tb[p + ".weak"], np.float64), np.asarray(tt[p + ".weak"], np.float64))
    return cfg, out, tb


def _in_features(cfg: LlamaConfig, name: str) -> int:
    from qeft_jax.params import linear_shapes

    return linear_shapes(cfg)[name][1]


def merge(tuned: str | Path, base: str | Path, target: str | Path, out: str | Path, *,
          overwrite: bool = False) -> dict[str, Any]:
    """Write target + Δ(tuned − base) to `out` (atomic). Returns a summary."""
    tuned, base, target = _resolve(tuned), _resolve(base), _resolve(target)
    for p in (tuned, base):
        if not (p / "quantization.json").is_file():
            raise CheckpointError(f"{p} is not a quantized QEFT checkpoint (merge takes the tuned and base "
                                  f"QEFT checkpoints)")
    cfg, deltas, _ = weak_deltas(tuned, base)
    cfg_x = LlamaConfig.from_json_file(target / "config.json")
    if cfg_x.to_hf_dict() != cfg.to_hf_dict():
        raise CheckpointError(f"target {target} has a different model config from the base {base}")
    changed = 0
    if (target / "quantization.json").is_file():
        info, _, tx = read_quantized(target, cfg)
        tx = dict(tx)
        for p, (rows, cols, delta, b_w, t_w) in deltas.items():
            i, name = int(p.split(".")[2]), p.split(".", 3)[3]
            out_f, n = delta.shape[0], _in_features(cfg, name)
            t_rows, t_cols = channel_maps(tx, i, name, (out_f, n))
            # original -> target-reordered position
            row_pos = np.argsort(t_rows)[rows]
            col_pos = np.argsort(t_cols)[cols]
            t_weak = np.asarray(tx[p + ".weak_idx"], np.int64)
            slot = {int(c): j for j, c in enumerate(t_weak)}
            moved = (t_w != b_w) | (np.signbit(t_w) != np.signbit(b_w))
            touched = np.flatnonzero(np.any(moved, axis=0))
            missing = [int(cols[j]) for j in touched if int(col_pos[j]) not in slot]
            if missing:
                raise CheckpointError(f"{p}: Δ touches original input channels {missing[:5]} that are not weak "
                                      f"columns of the quantized target; merge into the fp target instead")
            w = np.asarray(tx[p + ".weak"], np.float64)
            for j in touched:
                c = slot[int(col_pos[j])]
                cur = w[row_pos, c]
                # where the target still holds the base's value the result is the tuned value itself
                # (exact, signed zeros included); elsewhere target + Δ
                same = (cur == b_w[:, j]) & (np.signbit(cur) == np.signbit(b_w[:, j]))
                w[row_pos, c] = np.where(same, t_w[:, j], cur + delta[:, j])
            changed += int(np.count_nonzero(delta))
            tx[p + ".weak"] = w.astype(tx[p + ".weak"].dtype)
        meta = {k: v for k, v in info.items() if k not in ("format_version", "sha256")}
        meta["merge"] = {"tuned": str(tuned), "base": str(base), "target": str(target)}
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write_quantized(tmp, cfg, tx, meta, {**aux_files(target), **tokenizer_files(target)})
        kind = "quantized"
    else:
        reader = SafetensorsReader([target / "model.safetensors"])
        tensors = {k: reader.get(k) for k in reader.keys()}
        for p, (rows, cols, delta, _, _) in deltas.items():
            key = p + ".weight"
            if key not in tensors:
                raise CheckpointError(f"target {target} has no tensor '{key}'")
            w = np.asarray(tensors[key], np.float64)
            w[np.ix_(rows, cols)] += delta
            changed += int(np.count_nonzero(delta))
            tensors[key] = w.astype(tensors[key].dtype)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write_checkpoint(tmp, json.loads((target / "config.json").read_text()), tensors,
                             extra_files={**aux_files(target), **tokenizer_files(target)},
                             extra_json={"merge.json": {"tuned": str(tuned), "base": str(base),
                                                        "target": str(target)}})
        kind = "fp"
    return {"out": str(out), "target_kind": kind, "delta_entries": changed,
            "delta_abs_max": float(max((np.abs(d).max() if d.size else 0.0) for _, _, d, _, _ in deltas.values()))}
