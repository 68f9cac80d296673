"""qeft_jax.plots (every figure from synthetic inputs, written as PNG; clear errors on bad inputs)
and its CLI, qeft_jax.plot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from qeft_jax import plot, plots
from qeft_jax.cli import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

QUALITY = {"fp": 19.82, "rtn_4": 30.4, "gptq_4": 27.15, "owq_4": 23.29, "qeft_4": 21.79,
           "qeft_4_k32": 21.6}


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def _fake_ckpt(tmp: Path, layers: int = 4, hidden: int = 64, method: str = "qeft",
               with_selection: bool = True) -> tuple[Path, np.ndarray]:
    d = tmp / f"ckpt_{method}"
    d.mkdir()
    rng = np.random.default_rng(0)
    attn = rng.gamma(2.0, 1.0, (layers, hidden)).astype(np.float32)
    ffn = rng.gamma(2.0, 1.0, (layers, hidden)).astype(np.float32)
    hot = np.array([3, 17, 40])  # the same outlier channels in every layer
    attn[:, hot] *= 50
    ffn[:, hot] *= 30
    gidx = np.sort(np.concatenate([hot, [5, 9, 60, 61, 62]]))
    if with_selection:
        save_file({"attn_lambda": attn, "ffn_lambda": ffn}, str(d / "selection.safetensors"))
    (d / "quantization.json").write_text(json.dumps(
        {"format_version": 1, "recipe": {"method": method, "bits": 4, "k": 8},
         "global_weak_index": [int(v) for v in gidx], "source": "/models/tiny"}))
    return d, hot


def test_weak_channels(tmp_path):
    ckpt, hot = _fake_ckpt(tmp_path)
    out = tmp_path / "img" / "weak.png"
    fig = plots.plot_weak_channels(ckpt, top=4, out=out)
    assert _is_png(out)
    ax_top, ax_map = fig.axes[:2]
    assert len(fig.axes) == 3  # two panels + colorbar
    assert len(ax_top.collections) == 2  # attn and ffn markers
    assert len(ax_top.lines) == 8  # one vertical line per global weak channel
    assert len(ax_map.images) == 1 and ax_map.images[0].get_array().shape == (8, 64)
    st = plots.weak_channel_summary(ckpt, top=3)
    assert st["rows"] == 8 and st["k"] == 8
    assert st["mean_top_in_global"] == 1.0  # every row's top-3 are the hot channels
    assert sorted(c for c, _ in st["most_frequent"]) == sorted(hot.tolist())


def test_weak_channels_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plots.plot_weak_channels(tmp_path / "nope")
    gptq, _ = _fake_ckpt(tmp_path, method="gptq", with_selection=False)
    with pytest.raises(FileNotFoundError, match="method 'gptq'.*only qeft"):
        plots.plot_weak_channels(gptq)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a quantized checkpoint"):
        plots.plot_weak_channels(tmp_path / "empty")
    ok, _ = _fake_ckpt(tmp_path)
    with pytest.raises(ValueError, match="top must be"):
        plots.plot_weak_channels(ok, top=0)


def test_ppl_vs_bits_dict_and_single_bit_width(tmp_path):
    out = tmp_path / "ppl.png"
    fig = plots.plot_ppl_vs_bits(QUALITY, out=out)
    assert _is_png(out)
    ax = fig.axes[0]
    assert len(ax.lines) == 4 + 1  # rtn, gptq, owq, qeft + the fp line
    assert len(ax.collections) == 1  # qeft_4_k32 as a separate marker
    assert [t for t in ax.get_xticks()] == [4]
    fig = plots.plot_ppl_vs_bits(QUALITY, variants=False)
    assert len(fig.axes[0].collections) == 0


def test_ppl_vs_bits_from_stdout_file(tmp_path):
    res = {**QUALITY, "rtn_3": 95.0, "gptq_3": 40.0, "owq_3": 30.0, "qeft_3": 27.0}
    f = tmp_path / "quality.txt"
    f.write_text("model x | calibration ...\n  rtn_4 ppl 30.4\n{not json\n" + json.dumps(res) + "\n\n")
    fig = plots.plot_ppl_vs_bits(f, out=tmp_path / "ppl.png")
    ax = fig.axes[0]
    assert len(ax.lines) == 5
    assert all(len(line.get_xdata()) == 2 for line in ax.lines[:4])  # 3 and 4 bits per method
    assert ax.get_yscale() == "log"  # rtn_3 is far off
    assert _is_png(tmp_path / "ppl.png")


def test_ppl_vs_bits_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        plots.plot_ppl_vs_bits(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("no json here\n{broken")
    with pytest.raises(ValueError, match="no line parses as a JSON object"):
        plots.plot_ppl_vs_bits(bad)
    with pytest.raises(ValueError, match="no '<method>_<bits>' keys"):
        plots.plot_ppl_vs_bits({"fp": 10.0, "foo": 3.0})
    with pytest.raises(ValueError, match="expected a perplexity number"):
        plots.plot_ppl_vs_bits({"fp": 10.0, "qeft_4": "high"})


def _metrics(path: Path, steps: int, start: float, eval_every: int | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        rec = {"step": s, "loss": start * 0.97 ** s, "grad_norm": 1.0, "lr": 1e-4}
        if eval_every and s % eval_every == 0:
            rec["eval_loss"] = start * 0.98 ** s + 0.1
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_loss_curves(tmp_path):
    a = _metrics(tmp_path / "qeft" / "metrics.jsonl", 20, 3.0, eval_every=5)
    b = _metrics(tmp_path / "lora" / "metrics.jsonl", 20, 3.2, eval_every=None)
    out = tmp_path / "loss.png"
    fig = plots.plot_loss_curves([a, b], out=out)
    assert _is_png(out)
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # qeft train + held-out, lora train
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["qeft train", "qeft held-out", "lora train"]
    assert len(ax.lines[1].get_xdata()) == 4
    fig = plots.plot_loss_curves([a, b], labels=["x", "y"], smooth=0.8)
    assert len(fig.axes[0].lines) == 5  # raw + EMA per run, + held-out


def test_loss_curves_errors(tmp_path):
    a = _metrics(tmp_path / "m.jsonl", 3, 3.0, None)
    with pytest.raises(ValueError, match="2 labels for 1"):
        plots.plot_loss_curves([a], labels=["x", "y"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        plots.plot_loss_curves([bad])
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="no records with numeric 'step' and 'loss'"):
        plots.plot_loss_curves([empty])
    with pytest.raises(FileNotFoundError):
        plots.plot_loss_curves([tmp_path / "missing.jsonl"])


def _kernel_row(us: float, bf16: float, deq: float, l2: bool) -> dict:
    return {"us": us, "us_bf16": bf16, "us_dequant": deq, "gbps": 1500.0, "speedup_vs_bf16": round(bf16 / us, 4),
            "speedup_vs_dequant": round(deq / us, 4), "copies": 8, "l2_resident": l2, "rel_err": 1e-3}


KERNEL_JSON = {"interpret_max_rel_err": 0.001, "lowers_for_cuda": True, "gpu": "NVIDIA H100 80GB HBM3",
               "timed": True, "speedup_vs_bf16": 3.2,
               "rows": {"4096x4096_M1": _kernel_row(12.0, 30.0, 50.0, False),
                        "11008x4096_M1": _kernel_row(25.0, 80.0, 120.0, False),
                        "576x576_M1": _kernel_row(4.0, 5.0, 9.0, True)}}
# what benchmarks/kernel.py prints: a table for people, then its JSON as the last line
KERNEL_STDOUT = ("jax 0.6.0, backend gpu, GPU: NVIDIA H100 80GB HBM3\nchecks took 12.0s\n\n"
                 "     out x in  M kernel us ...\n  4096x4096    1      99.0 ...\n" + json.dumps(KERNEL_JSON) + "\n\n")


def test_kernel_speed_from_output_and_json(tmp_path):
    f = tmp_path / "kernel.txt"
    f.write_text(KERNEL_STDOUT)
    out = tmp_path / "kernel.png"
    fig = plots.plot_kernel_speed(f, out=out)
    assert _is_png(out)
    ax = fig.axes[0]
    assert len(ax.patches) == 6  # 3 shapes x (vs bf16, vs dequant)
    assert [bool(p.get_hatch()) for p in ax.patches[:3]] == [False, False, True]
    _, rows = plots.load_kernel(f)
    assert [r["speedup_vs_bf16"] for r in rows] == [2.5, 3.2, 1.25]
    assert [(r["out"], r["in"], r["m"]) for r in rows] == [(4096, 4096, 1), (11008, 4096, 1), (576, 576, 1)]
    js = tmp_path / "kernel.json"
    js.write_text(json.dumps(KERNEL_JSON, indent=2))  # a plain (pretty-printed) .json file
    assert plots.load_kernel(js) == plots.load_kernel(f) == plots.load_kernel(KERNEL_JSON)


def test_kernel_speed_one_row_and_no_gpu(tmp_path):
    fig = plots.plot_kernel_speed({"gpu": "H100", "timed": True,
                                   "rows": {"11008x4096_M8": _kernel_row(31.0, 96.1, 124.0, False)}})
    assert len(fig.axes[0].patches) == 2
    assert fig.axes[0].get_xticklabels()[0].get_text() == "11008x4096\nM=8"
    cpu = tmp_path / "cpu.json"
    cpu.write_text('interpret ...\n{"interpret_max_rel_err": 0.0, "lowers_for_cuda": true, '
                   '"gpu": null, "timed": false}\n')
    with pytest.raises(ValueError, match="ran without a GPU"):
        plots.plot_kernel_speed(cpu)
    with pytest.raises(ValueError, match="no GPU timings"):
        plots.plot_kernel_speed({"interpret_max_rel_err": 0.0})
    with pytest.raises(ValueError, match="bad per-shape entry '11008x4096'"):
        plots.plot_kernel_speed({"gpu": "H100", "timed": True, "rows": {"11008x4096": _kernel_row(1, 2, 3, False)}})


def test_cli(tmp_path, capsys):
    ckpt, _ = _fake_ckpt(tmp_path)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(QUALITY))
    m = _metrics(tmp_path / "run" / "metrics.jsonl", 5, 3.0, 2)
    kernel = tmp_path / "kernel.json"
    kernel.write_text(json.dumps(KERNEL_JSON))
    outs = {"weak-channels": [str(ckpt), "--top", "4"], "ppl-vs-bits": [str(res)],
            "loss-curves": [str(m), "--labels", "qeft"], "kernel-speed": [str(kernel)]}
    for cmd, args in outs.items():
        out = tmp_path / f"{cmd}.png"
        plot.main([cmd, *args, "--out", str(out)])
        assert _is_png(out)
    # clean errors through run_cli: one line on stderr, exit status 2, no traceback
    gptq, _ = _fake_ckpt(tmp_path, method="gptq", with_selection=False)
    capsys.readouterr()
    for args, msg in [(["weak-channels", str(gptq)], "only qeft"),
                      (["ppl-vs-bits", str(tmp_path / "nope.json")], "does not exist"),
                      (["kernel-speed", str(m)], "no GPU timings")]:
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: plot.main([*args, "--out", str(tmp_path / "x.png")]))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()

