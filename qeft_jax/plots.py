"""Figures for QEFT checkpoints, quality/kernel benchmarks and fine-tuning runs (PNG, no display).
The CLI is `python -m qeft_jax.plot`.

Every ``plot_*`` function returns a matplotlib Figure (rendered with the Agg canvas; pyplot is not
used, so nothing opens a window and no global figure state builds up) and saves a PNG when `out`
is given. Inputs are files other programs wrote, never their printed tables:

* weak-channels: a QEFT checkpoint directory. Its ``selection.safetensors`` holds ``attn_lambda``
  and ``ffn_lambda`` [layers, hidden], the per-layer sensitivities λ = diag(H) of the inputs of
  q/k/v and gate/up in original channel order; ``quantization.json`` holds ``global_weak_index``.
* ppl-vs-bits: the dict printed last by ``benchmarks/quality.py`` ({"fp": ppl, "rtn_4": ppl, ...,
  "qeft_4_k32": ppl}), or a file holding it (e.g. the script's whole stdout: the last line that
  parses as a JSON object is used).
* loss-curves: ``metrics.jsonl`` files written by the trainer (one record per step with "step"
  and "loss"; "eval_loss" on evaluation steps).
* kernel-speed: the JSON ``benchmarks/kernel.py`` prints last (a dict, a .json file, or a file
  holding the script's output): "gpu", "timed" and "rows" {"<out>x<in>_M<m>": {"us", "us_bf16",
  "us_dequant", "gbps", "speedup_vs_bf16", "speedup_vs_dequant", "copies", "l2_resident",
  "rel_err"}}; only GPU runs carry timings.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qeft_jax.checkpoint import read_selection
from qeft_jax.io import parse_jsonl
from qeft_jax.recipes import METHODS

METHOD_COLORS = {"rtn": "tab:gray", "gptq": "tab:blue", "awq": "tab:orange", "owq": "tab:green", "qeft": "tab:red"}
LABEL_BOX = dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.75)
RESULT_KEY = re.compile(r"^(?P<method>[a-z]+)_(?P<bits>\d+)(?:_(?P<variant>\w+))?$")
KERNEL_ROW_KEY = re.compile(r"^(?P<out>\d+)x(?P<inp>\d+)_M(?P<m>\d+)$")  # a "rows" key of kernel.py's JSON
KERNEL_SPEEDUPS = ("speedup_vs_bf16", "speedup_vs_dequant")  # what each row must carry (the bars)


def _new_figure(w: float, h: float, layout: str | None = None) -> Figure:
    fig = Figure(figsize=(w, h), dpi=110, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: str | Path | None) -> Figure:
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", bbox_inches="tight")
    return fig


def _is_number(v: Any) -> bool:
    """A JSON number (bools are ints to Python, not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_text(path: str | Path, what: str) -> str:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist")
    if p.is_dir():
        raise ValueError(f"{what} {p} is a directory, expected a file")
    return p.read_text()


def _last_json_object(text: str, source: str) -> dict[str, Any]:
    """The whole text as a JSON object, else its last line that parses as one."""
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            return obj
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    raise ValueError(f"{source}: no line parses as a JSON object")


# ------------------------------------------------------------------ weak channels
def _interleave(attn: np.ndarray, ffn: np.ndarray) -> np.ndarray:
    """[2L, D]: rows block0-attn, block0-ffn, block1-attn, ..."""
    rows = np.empty((2 * attn.shape[0], attn.shape[1]), np.float64)
    rows[0::2], rows[1::2] = attn, ffn
    return rows


def _top_rows(lam: np.ndarray, top: int) -> np.ndarray:
    """[rows, top] channel ids of each row's largest λ (ties to the lower index)."""
    order = np.argsort(-lam, axis=1, kind="stable")
    return order[:, :top]


def weak_channel_summary(ckpt_dir: str | Path, top: int = 8) -> dict[str, Any]:
    """How consistent the sensitive channels are across blocks: per-row top-`top` overlap with the
    global index and the channels that are most often in a row's top-`top`."""
    attn, ffn, gidx, _ = read_selection(ckpt_dir)
    return _summary(_interleave(attn, ffn), gidx, top)


def _summary(lam: np.ndarray, gidx: np.ndarray, top: int) -> dict[str, Any]:
    tops = _top_rows(lam, top)
    counts = np.bincount(tops.ravel(), minlength=lam.shape[1])
    gset = set(int(v) for v in gidx)
    in_global = np.array([len(gset.intersection(map(int, r))) / top for r in tops])
    frequent = np.argsort(-counts, kind="stable")[:top]
    return {"rows": int(lam.shape[0]), "top": top, "k": len(gset),
            "mean_top_in_global": float(in_global.mean()) if gset else 0.0,
            "distinct_top_channels": int((counts > 0).sum()),
            "most_frequent": [(int(c), int(counts[c])) for c in frequent]}


def plot_weak_channels(ckpt_dir: str | Path, top: int = 8, out: str | Path | None = None) -> Figure:
    """Top-`top` channels by λ per block and sublayer (attn: input of q/k/v; ffn: input of gate/up)
    with the global weak index overlaid, above a heatmap of log10(λ / mean λ) per row."""
    attn, ffn, gidx, info = read_selection(ckpt_dir)
    n_layers, d = attn.shape
    if not 1 <= top <= d:
        raise ValueError(f"top must be in [1, {d}], got {top}")
    lam = _interleave(attn, ffn)
    rows = lam.shape[0]
    tops = _top_rows(lam, top)
    stats = _summary(lam, gidx, top)

    h = max(6.0, min(16.0, 2.0 + 0.22 * rows))
    fig = _new_figure(13, h, layout="constrained")
    ax_top, ax_map = fig.subplots(2, 1, sharex=True)
    # --- panel 1: top channels
    for off, name, color, mk in ((0, "attn (q/k/v input)", "tab:blue", "o"),
                                 (1, "ffn (gate/up input)", "tab:orange", "s")):
        r = np.arange(off, rows, 2)
        ax_top.scatter(tops[r].ravel(), np.repeat(r, top), s=14, marker=mk, color=color,
                       label=f"top-{top} λ, {name}", zorder=3, linewidths=0)
    for j, c in enumerate(gidx):
        ax_top.axvline(c, color="crimson", alpha=0.25, lw=1.0, zorder=1,
                       label=f"global weak index (k={len(gidx)})" if j == 0 else None)
    ax_top.set_ylim(rows - 0.5, -0.5)  # block 0 at the top
    step = max(1, math.ceil(n_layers / 16))
    ticks = np.arange(0, n_layers, step)
    ax_top.set_yticks(2 * ticks + 0.5, [f"{i}" for i in ticks], fontsize=8)
    ax_top.set_ylabel("block (2 rows: attn, ffn)")
    ax_top.grid(axis="y", color="0.9", lw=0.5)
    model = Path(str(info.get("source", ""))).name or "model"
    method = (info.get("recipe") or {}).get("method", "qeft")
    fig.suptitle(
        f"{model} ({method}): the most sensitive input channels per block, λ = diag(H)\n"
        f"{100 * stats['mean_top_in_global']:.0f}% of each row's top-{top} channels are in the global "
        f"weak index; {stats['distinct_top_channels']} distinct channels over {rows} rows", fontsize=11)
    fig.legend(*ax_top.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=9)
    ax_top.set_title(f"top-{top} channels by λ per block and sublayer", fontsize=10)
    # --- panel 2: heatmap of per-row normalised log10 λ
    norm = np.log10(np.maximum(lam, 1e-30) / np.maximum(lam.mean(axis=1, keepdims=True), 1e-30))
    vmin, vmax = np.percentile(norm, 1), norm.max()
    im = ax_map.imshow(norm, aspect="auto", interpolation="nearest", cmap="magma", vmin=vmin,
                       vmax=vmax, extent=(-0.5, d - 0.5, rows - 0.5, -0.5))
    ax_map.plot(gidx, np.full(len(gidx), -0.5), "v", color="deepskyblue", ms=6, clip_on=False,
                zorder=4, label="global weak index")
    ax_map.set_yticks(2 * ticks + 0.5, [f"{i}" for i in ticks], fontsize=8)
    ax_map.set_ylabel("block (2 rows: attn, ffn)")
    ax_map.set_xlabel("hidden channel (original order)")
    ax_map.set_xlim(-0.5, d - 0.5)
    ax_map.set_title("log10(λ / mean λ of the row)", fontsize=10)
    # one colorbar beside both panels keeps their x axes aligned; drawn next to the heatmap only
    cbar = fig.colorbar(im, ax=[ax_top, ax_map], pad=0.01, fraction=0.03, shrink=0.48, anchor=(0.0, 0.0))
    cbar.set_label("log10(λ / row mean)")
    return _save(fig, out)


# ------------------------------------------------------------------ perplexity vs bits
def load_results(results: str | Path | Mapping[str, Any]) -> dict[str, float]:
    """The quality.py result dict: given as a dict, or a file (JSON, or text whose last JSON line is it)."""
    if isinstance(results, Mapping):
        obj = dict(results)
        source = "results"
    else:
        source = str(results)
        obj = _last_json_object(_read_text(results, "results file"), source)
    out = {}
    for k, v in obj.items():
        if not _is_number(v):
            raise ValueError(f"{source}: value of {k!r} is {v!r}, expected a perplexity number")
        out[str(k)] = float(v)
    return out


def plot_ppl_vs_bits(results: str | Path | Mapping[str, Any], out: str | Path | None = None,
                     variants: bool = True) -> Figure:
    """Perplexity vs bit width, one line per method (rtn/gptq/owq/qeft: keys "<method>_<bits>"),
    fp as a horizontal line; variants ("qeft_4_k32") as separate markers (or skipped)."""
    res = load_results(results)
    base: dict[str, dict[int, float]] = {}
    extra: list[tuple[str, int, str, float]] = []
    for key, ppl in res.items():
        m = RESULT_KEY.match(key)
        if not m or m["method"] not in METHODS:
            continue
        bits = int(m["bits"])
        if m["variant"]:
            extra.append((m["method"], bits, m["variant"], ppl))
        else:
            base.setdefault(m["method"], {})[bits] = ppl
    if not base and not extra:
        raise ValueError(f"no '<method>_<bits>' keys for methods {', '.join(METHODS)} in the results "
                         f"(keys: {sorted(res)})")
    extra = sorted(extra) if variants else []
    if not base and not extra:
        raise ValueError("only variant keys (like qeft_4_k32) in the results and variants are off")
    all_bits = sorted({b for d in base.values() for b in d} | {b for _, b, _, _ in extra})
    vals = [v for d in base.values() for v in d.values()] + [e[3] for e in extra] + \
        ([res["fp"]] if "fp" in res else [])

    fig = _new_figure(7, 4.6)
    ax = fig.add_subplot()
    present = [m for m in METHODS if m in base]
    # one bit width: dodge the methods sideways so markers and labels do not collide
    slots = len(present) + len(extra)
    dodge = (lambda i: 0.12 * (i - (slots - 1) / 2)) if len(all_bits) == 1 else (lambda i: 0.0)
    for i, method in enumerate(present):
        pts = sorted(base[method].items())
        xs, ys = [b + dodge(i) for b, _ in pts], [p for _, p in pts]
        ax.plot(xs, ys, "-o", color=METHOD_COLORS[method], label=method.upper(), ms=7, zorder=3)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.2f}", (x, y), xytext=(-8, 0), textcoords="offset points", va="center",
                        ha="right", fontsize=8, color=METHOD_COLORS[method], bbox=LABEL_BOX)
    marker_of: dict[tuple[str, str], str] = {}
    for j, (method, bits, variant, ppl) in enumerate(extra):
        c, x = METHOD_COLORS[method], bits + (dodge(len(present) + j) if len(all_bits) == 1 else 0.1)
        first = (method, variant) not in marker_of
        mk = marker_of.setdefault((method, variant), "D^v<>Pp*hX"[len(marker_of) % 10])
        ax.scatter([x], [ppl], marker=mk, s=55, facecolors="none", edgecolors=c, linewidths=1.5,
                   zorder=4, label=f"{method.upper()} {variant}" if first else None)
        ax.annotate(f"{ppl:.2f}", (x, ppl), xytext=(8, 0), textcoords="offset points", va="center",
                    fontsize=8, color=c, bbox=LABEL_BOX)
    if "fp" in res:
        ax.axhline(res["fp"], color="black", ls="--", lw=1, label=f"fp ({res['fp']:.2f})")
    if len(vals) and max(vals) / max(min(vals), 1e-9) > 4:
        ax.set_yscale("log")
    ax.set_xticks(all_bits, [str(b) for b in all_bits])
    lo, hi = min(all_bits), max(all_bits)
    pad = 0.6 if lo == hi else 0.25 * (hi - lo)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("weight bits")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Perplexity vs bit width", fontsize=11)
    ax.grid(color="0.9")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out)


# ------------------------------------------------------------------ training curves
def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (blank lines skipped; a bad line is an error)."""
    return [rec for _, rec in parse_jsonl(_read_text(path, "metrics file"), path)]


def _series(recs: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted({int(r["step"]): float(r[key]) for r in recs
                  if isinstance(r.get("step"), (int, float)) and _is_number(r.get(key))}.items())
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _ema(y: np.ndarray, alpha: float) -> np.ndarray:
    out, acc = np.empty_like(y), None
    for i, v in enumerate(y):
        acc = v if acc is None or not np.isfinite(acc) else alpha * acc + (1 - alpha) * v
        out[i] = acc
    return out


def _run_label(path: Path) -> str:
    return path.parent.name if path.stem == "metrics" and path.parent.name else path.stem


def plot_loss_curves(metrics_jsonl_paths: Sequence[str | Path], labels: Sequence[str] | None = None,
                     out: str | Path | None = None, smooth: float = 0.0) -> Figure:
    """Train loss (solid) and held-out loss (dashed with markers, when recorded) vs step, one colour
    per run. `smooth` in [0, 1): EMA weight for the train loss (the raw curve is then drawn faintly)."""
    paths = [Path(p) for p in ([metrics_jsonl_paths] if isinstance(metrics_jsonl_paths, (str, Path))
                               else metrics_jsonl_paths)]
    if not paths:
        raise ValueError("no metrics files given")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} metrics files")
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    labels = list(labels) if labels is not None else [_run_label(p) for p in paths]

    fig = _new_figure(8, 4.8)
    ax = fig.add_subplot()
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink",
              "tab:gray", "tab:olive", "tab:cyan"]
    for i, (p, label) in enumerate(zip(paths, labels)):
        recs = load_metrics(p)
        xs, ys = _series(recs, "loss")
        if not len(xs):
            raise ValueError(f"{p}: no records with numeric 'step' and 'loss'")
        c = colors[i % len(colors)]
        if smooth > 0:
            ax.plot(xs, ys, color=c, alpha=0.25, lw=0.8)
            ax.plot(xs, _ema(ys, smooth), color=c, lw=1.6, label=f"{label} train (EMA {smooth:g})")
        else:
            ax.plot(xs, ys, color=c, lw=1.4, label=f"{label} train")
        ex, ey = _series(recs, "eval_loss")
        if len(ex):
            ax.plot(ex, ey, "--o", color=c, lw=1.2, ms=4, label=f"{label} held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title("Fine-tuning loss", fontsize=11)
    ax.grid(color="0.9")
    ax.legend(fontsize=8)
    return _save(fig, out)


# ------------------------------------------------------------------ kernel speed
def load_kernel(kernel: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-shape rows) of a benchmarks/kernel.py run, from the JSON it prints last (a
    dict, a .json file, or a file holding the script's output). Each row is one "rows" entry with
    "out", "in" and "m" added from its "<out>x<in>_M<m>" key, in the JSON's order."""
    if isinstance(kernel, Mapping):
        summary, source = dict(kernel), "kernel results"
    else:
        source = str(kernel)
        summary = _last_json_object(_read_text(kernel, "kernel results file"), source)
    if summary.get("timed") is False or ("gpu" in summary and not summary["gpu"]):
        raise ValueError(f"{source}: the kernel benchmark ran without a GPU (gpu: "
                         f"{summary.get('gpu')!r}, timed: {summary.get('timed')!r}), so it has no "
                         f"timings to plot; rerun benchmarks/kernel.py on a CUDA GPU")
    table = summary.get("rows")
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"{source}: no GPU timings found (its JSON has no \"rows\"): the input is not "
                         f"the output of benchmarks/kernel.py run on a GPU")
    rows = []
    for name, r in table.items():
        m = KERNEL_ROW_KEY.match(str(name))
        if not m or not isinstance(r, Mapping) or not all(_is_number(r.get(k)) for k in KERNEL_SPEEDUPS):
            raise ValueError(f"{source}: bad per-shape entry {name!r}: {r!r} (expected \"<out>x<in>_M<m>\": "
                             f"{{{', '.join(KERNEL_SPEEDUPS)}, ...}})")
        rows.append({**r, "out": int(m["out"]), "in": int(m["inp"]), "m": int(m["m"])})
    return summary, rows


def _hatch(bars, hatches: Sequence[str]) -> None:
    for patch, h in zip(bars.patches, hatches):
        patch.set_hatch(h)


def plot_kernel_speed(kernel_json: str | Path | Mapping[str, Any], out: str | Path | None = None) -> Figure:
    """Bars of the fused kernel's speedup over a bf16 dense GEMV and over dequantize + dot per
    shape and M; L2-resident shapes hatched."""
    summary, rows = load_kernel(kernel_json)
    names = [f"{r['out']}x{r['in']}" + (f"\nM={r['m']}" if any(q["m"] != 1 for q in rows) else "")
             for r in rows]
    x = np.arange(len(rows))
    w = 0.38
    fig = _new_figure(max(6.0, 0.9 * len(rows) + 2), 4.6)
    ax = fig.add_subplot()
    hatch = ["//" if r.get("l2_resident") else "" for r in rows]
    for key, shift, color, label in (("speedup_vs_bf16", -w / 2, "tab:red", "vs bf16 dense dot"),
                                     ("speedup_vs_dequant", w / 2, "tab:blue", "vs dequantize + dot")):
        bars = ax.bar(x + shift, [r[key] for r in rows], w, color=color, label=label)
        _hatch(bars, hatch)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylim(0, 1.2 * max(1.0, *(r[k] for r in rows for k in KERNEL_SPEEDUPS)))  # room for the legend
    ax.set_xticks(x, names, fontsize=8)
    ax.set_xlabel("GEMV shape (out x in)" + ("; hatched: L2-resident" if any(hatch) else ""))
    ax.set_ylabel("speedup of the fused QEFT kernel (x)")
    gpu = summary.get("gpu")
    ax.set_title("Fused QEFT GEMV kernel speed" + (f" on {gpu}" if gpu else ""), fontsize=11)
    ax.grid(axis="y", color="0.9")
    ax.legend(fontsize=8)
    return _save(fig, out)
