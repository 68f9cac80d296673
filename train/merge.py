"""QEFT merging (paper section 4.3, Fig. 6b): Δ = tuned − base of the weak columns, added to a
target model that shares the base's origin.

`tuned` and `base` are quantized QEFT checkpoints with the same layout (the tuned one is a
fine-tune of the base: same permutations, weak indices and packed grid). Δ is first placed in the
ORIGINAL channel coordinates of each linear: which of a linear's axes carry OGR's hidden or FFN
permutation is `qeft_jax.spec`'s knowledge (`linear_axis_perms`), the permutations themselves are
stored in the checkpoint (`qeft_jax.checkpoint.layer_perms`). Then
  fp target         W[orig rows, orig weak cols] += Δ         (everything else untouched)
  quantized target  Δ is mapped into the target's own channel order and added to its weak
                    columns; every column Δ touches must be a weak column of the target.
All arithmetic is float64, so merging into the base itself reproduces the tuned checkpoint
bit for bit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from qeft_jax.checkpoint import (CONFIG_FILE, CheckpointInfo, aux_files, layer_perms, read_info, read_json,
                                 read_tensors, tokenizer_files, write_fp, write_quantized)
from qeft_jax.io import CheckpointError, atomic_dir
from qeft_jax.load import resolve
from qeft_jax.spec import LINEAR_NAMES, layer_prefix, linear_axis_perms


class WeakDelta(NamedTuple):
    """One linear's Δ: rows/cols are the ORIGINAL channels of Δ's rows and columns (the base's
    reordered rows and weak columns mapped back), all float64."""

    rows: np.ndarray     # [out]
    cols: np.ndarray     # [k]
    delta: np.ndarray    # [out, k]  tuned − base
    base: np.ndarray     # [out, k]  the base's weak columns
    tuned: np.ndarray    # [out, k]  the tuned weak columns


def same_config(a: CheckpointInfo, b: CheckpointInfo) -> bool:
    return a.config.to_hf_dict() == b.config.to_hf_dict()


def weak_deltas(tuned: CheckpointInfo, base: CheckpointInfo) -> dict[tuple[int, str], WeakDelta]:
    """Δ per (layer, linear name). Checks that tuned and base share the config, the recipe and the
    layout (permutations, weak indices, packed grid)."""
    if not same_config(tuned, base):
        raise CheckpointError(f"{tuned.path} and {base.path} have different model configs")
    rb, rt = base.recipe, tuned.recipe
    if (rb.bits, rb.group_size, rb.k) != (rt.bits, rt.group_size, rt.k):
        raise CheckpointError(f"{tuned.path} and {base.path} were quantized differently")
    tb, tt = read_tensors(base), read_tensors(tuned)
    layout = [k for k in tb if k.startswith("qeft.") or k.endswith(".weak_idx") or k.endswith(".qweight")]
    for k in layout:
        if not np.array_equal(tb[k], tt[k]):
            raise CheckpointError(f"{tuned.path} is not a fine-tune of {base.path}: '{k}' differs (the packed "
                                  f"base and its channel layout must be identical)")
    out: dict[tuple[int, str], WeakDelta] = {}
    for i in range(base.config.num_hidden_layers):
        perms = layer_perms(tb, i)
        for name in LINEAR_NAMES:
            p = layer_prefix(i) + name
            b_w = np.asarray(tb[p + ".weak"], np.float64)
            t_w = np.asarray(tt[p + ".weak"], np.float64)
            rows, cols = linear_axis_perms(name, perms, base.config)
            out[(i, name)] = WeakDelta(rows, cols[np.asarray(tb[p + ".weak_idx"], np.int64)], t_w - b_w, b_w, t_w)
    return out


def merge_into_quantized(target: CheckpointInfo, deltas: dict[tuple[int, str], WeakDelta]
                         ) -> tuple[dict[str, np.ndarray], int]:
    """(the target's tensors with Δ added to its weak columns, Δ's nonzero count). Δ is mapped into
    the target's own channel order; every column it touches must be a weak column of the target."""
    tx = dict(read_tensors(target))
    changed = 0
    for (i, name), d in deltas.items():
        p = layer_prefix(i) + name
        t_rows, t_cols = linear_axis_perms(name, layer_perms(tx, i), target.config)
        # original -> target-reordered position
        row_pos = np.argsort(t_rows)[d.rows]
        col_pos = np.argsort(t_cols)[d.cols]
        slot = {int(c): j for j, c in enumerate(np.asarray(tx[p + ".weak_idx"], np.int64))}
        moved = (d.tuned != d.base) | (np.signbit(d.tuned) != np.signbit(d.base))
        touched = np.flatnonzero(np.any(moved, axis=0))
        missing = [int(d.cols[j]) for j in touched if int(col_pos[j]) not in slot]
        if missing:
            raise CheckpointError(f"{p}: Δ touches original input channels {missing[:5]} that are not weak "
                                  f"columns of the quantized target; merge into the fp target instead")
        w = np.asarray(tx[p + ".weak"], np.float64)
        for j in touched:
            c = slot[int(col_pos[j])]
            cur = w[row_pos, c]
            # where the target still holds the base's value the result is the tuned value itself
            # (exact, signed zeros included); elsewhere target + Δ
            same = (cur == d.base[:, j]) & (np.signbit(cur) == np.signbit(d.base[:, j]))
            w[row_pos, c] = np.where(same, d.tuned[:, j], cur + d.delta[:, j])
        changed += int(np.count_nonzero(d.delta))
        tx[p + ".weak"] = w.astype(tx[p + ".weak"].dtype)
    return tx, changed


def merge_into_fp(target: CheckpointInfo, deltas: dict[tuple[int, str], WeakDelta]
                  ) -> tuple[dict[str, np.ndarray], int]:
    """(the target's tensors with Δ added at the weak columns' original channels, Δ's nonzero count)."""
    tensors = dict(read_tensors(target))
    changed = 0
    for (i, name), d in deltas.items():
        key = layer_prefix(i) + name + ".weight"
        w = np.asarray(tensors[key], np.float64)
        w[np.ix_(d.rows, d.cols)] += d.delta
        changed += int(np.count_nonzero(d.delta))
        tensors[key] = w.astype(tensors[key].dtype)
    return tensors, changed


def merge(tuned: str | Path, base: str | Path, target: str | Path, out: str | Path, *,
          overwrite: bool = False) -> dict[str, Any]:
    """Write target + Δ(tuned − base) to `out` (atomic). Returns a summary."""
    tuned_i, base_i, target_i = (read_info(resolve(p)) for p in (tuned, base, target))
    for info in (tuned_i, base_i):
        if not info.quantized:
            raise CheckpointError(f"{info.path} is not a quantized QEFT checkpoint (merge takes the tuned and "
                                  f"base QEFT checkpoints)")
    deltas = weak_deltas(tuned_i, base_i)
    if not same_config(target_i, base_i):
        raise CheckpointError(f"target {target_i.path} has a different model config from the base {base_i.path}")
    record = {"tuned": str(tuned_i.path), "base": str(base_i.path), "target": str(target_i.path)}
    carried = {**aux_files(target_i.path), **tokenizer_files(target_i.path)}
    if target_i.quantized:
        tensors, changed = merge_into_quantized(target_i, deltas)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write_quantized(tmp, target_i.config, tensors, {**target_i.derived_meta(), "merge": record}, carried)
    else:
        tensors, changed = merge_into_fp(target_i, deltas)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            # the target's own config.json, verbatim
            write_fp(tmp, read_json(target_i.path / CONFIG_FILE), tensors, extra_files=carried,
                     extra_json={"merge.json": record})
    return {"out": str(out), "target_kind": "quantized" if target_i.quantized else "fp", "delta_entries": changed,
            "delta_abs_max": float(max((np.abs(d.delta).max() if d.delta.size else 0.0) for d in deltas.values()))}
