"""Real multi-process runs: two processes joined by JAX's own distributed runtime on this machine
(`jax.distributed.initialize` through the QEFT_* variables, CPU collectives through gloo, coordinator
on 127.0.0.1), one CPU device each. `python -m qeft_jax.quantize` and `python -m qeft_jax.train`
(qeft, killed and resumed; full) on 2 processes give the single-process results, only process 0
writes, and each process reads only its own slices of the checkpoint. Every run is a subprocess
with a timeout; a failing or hanging group is killed.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qeft_jax.io import SafetensorsReader
from tests.subprocess_runs import REPO, child_env, kill_when_paused, run_ok, watched

CHILD = Path(__file__).with_name("train_kill_child.py")
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(jax_cache: Path, rank: int | None = None, port: int | None = None) -> dict[str, str]:
    """A run's environment; with `rank`, that of process `rank` of a 2-process group."""
    if rank is None:
        return child_env(jax_cache)
    return child_env(jax_cache, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                     QEFT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", QEFT_NUM_PROCESSES="2", QEFT_PROCESS_ID=str(rank))


def _run_group(cmds: list[list[str]], jax_cache: Path, pause: str | None = None) -> None:
    """Run cmds[i] as process i of a 2-process group. With `pause`, wait until every process stalls
    there (tests/train_kill_child.py) and SIGKILL them all."""
    port = _free_port()
    procs = [subprocess.Popen(c, env=_env(jax_cache, i, port), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i, c in enumerate(cmds)]
    with watched(procs, TIMEOUT):
        if pause is not None:
            kill_when_paused(procs, pause)
            return
        for p, (o, e) in zip(procs, [p.communicate() for p in procs]):
            assert p.returncode == 0, f"rc {p.returncode}\n{o[-2000:]}\n{e[-4000:]}"


def _tensors(d: Path) -> dict[str, np.ndarray]:
    r = SafetensorsReader([d / "model.safetensors"])
    return {k: r.get(k) for k in r.keys()}


def _quantize_cmd(model: Path, calib: Path, out: Path, devices: int) -> list[str]:
    return [sys.executable, "-m", "qeft_jax.quantize", "--model", str(model), "--method", "qeft", "--bits", "4",
            "--group-size", "16", "--k", "4", "--calib-data", str(calib), "--calib-samples", "4",
            "--seq-len", "32", "--batch-size", "2", "--devices", str(devices), "--out", str(out)]


def _train_flags(model: Path, data: Path, out: Path, method: str, devices: int, steps: int) -> list[str]:
    return ["--model", str(model), "--method", method, "--data", str(data), "--seq-len", "48", "--batch-size", "4",
            "--micro-batch-size", "2", "--steps", str(steps), "--lr", "3e-2" if method == "qeft" else "1e-3",
            "--save-every", "2", "--eval-every", "2", "--eval-rows", "4", "--val-fraction", "0.1",
            "--dtype", "float32", "--no-progress", "--devices", str(devices), "--out", str(out)]


def _losses(out: Path) -> list[tuple]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in recs]


def _assert_close_losses(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert [x[0] for x in la] == [x[0] for x in lb]
    for x, y in zip(la, lb):
        for u, v in zip(x[1:], y[1:]):
            assert (u is None) == (v is None) and (u is None or abs(u - v) <= 1e-5 * abs(u)), (x, y)


@pytest.fixture(scope="module")
def setup(tiny_with_tokenizer, tmp_path_factory):
    """(fp model, calibration text, single-process quantized reference, training data, jax cache)."""
    model, calib = tiny_with_tokenizer
    root = tmp_path_factory.mktemp("multiprocess")
    cache = root / "jax_cache"
    q1 = root / "q_single"
    run_ok(_quantize_cmd(model, calib, q1, 1), _env(cache))
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(90)]
    rows = [{"instruction": " ".join(rng.choice(words, 5)), "input": "", "output": " ".join(rng.choice(words, 6))}
            for _ in range(24)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, calib, q1, data, cache


def test_quantize_multiprocess_matches_single_process(setup, tmp_path):
    model, calib, q1, _, cache = setup
    outs = [tmp_path / "q_rank0", tmp_path / "q_rank1"]
    _run_group([_quantize_cmd(model, calib, o, 0) for o in outs], cache)
    assert not outs[1].exists() and not list(tmp_path.glob(".*partial")), "only process 0 writes"
    a, b = _tensors(q1), _tensors(outs[0])
    assert a.keys() == b.keys()
    qa, qb = (json.loads((d / "quantization.json").read_text()) for d in (q1, outs[0]))
    assert qa["global_weak_index"] == qb["global_weak_index"]
    for k in a:
        if k.endswith(".weak"):  # Hessians summed in another order: OPTQ's weak updates agree to rounding
            scale = float(np.abs(a[k].astype(np.float32)).max())
            np.testing.assert_allclose(b[k].astype(np.float32), a[k].astype(np.float32), atol=2e-3 * scale, err_msg=k)
        else:  # codes, scales, zero points, permutations, norms: identical
            assert np.array_equal(a[k], b[k]), k


def test_train_multiprocess_killed_and_resumed_matches_single_process(setup, tmp_path):
    _, _, q1, data, cache = setup
    ref, out = tmp_path / "single", tmp_path / "two"
    run_ok([sys.executable, "-m", "qeft_jax.train", *_train_flags(q1, data, ref, "qeft", 1, 4)], _env(cache))
    flags = _train_flags(q1, data, out, "qeft", 0, 4)
    # both processes stall right after step 3's update (step 2 is checkpointed) and are killed there
    _run_group([[sys.executable, str(CHILD), "step:3", *flags]] * 2, cache, pause="step:3")
    assert not (out / "train_done.json").exists()
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    _run_group([[sys.executable, "-m", "qeft_jax.train", *flags]] * 2, cache)  # the same command resumes
    assert json.loads((out / "train_done.json").read_text())["step"] == 4
    _assert_close_losses(ref, out)
    # the model was loaded straight into its FSDP layout: each process read only its half of the tensors
    a, b, base = _tensors(ref), _tensors(out), _tensors(q1)
    read = [json.loads((d / "train_done.json").read_text())["checkpoint_bytes_read"] for d in (ref, out)]
    assert read[0] == sum(t.nbytes for t in base.values()) and read[1] < 0.55 * read[0], read
    for k in a:
        if k.endswith(".weak"):
            assert not np.array_equal(a[k], base[k])
            scale = float(np.abs(a[k].astype(np.float32)).max())
            np.testing.assert_allclose(b[k].astype(np.float32), a[k].astype(np.float32), atol=2e-3 * scale, err_msg=k)
        else:
            assert np.array_equal(a[k], b[k]), k


@pytest.mark.skipif(os.environ.get("QEFT_TEST_FULL") != "1", reason="~40 s; the qeft run above covers the "
                    "multi-process machinery and test_sharding full FSDP training: QEFT_TEST_FULL=1 runs it")
def test_train_multiprocess_full_matches_single_process(setup, tmp_path):
    model, _, _, data, cache = setup
    ref, out = tmp_path / "single", tmp_path / "two"
    run_ok([sys.executable, "-m", "qeft_jax.train", *_train_flags(model, data, ref, "full", 1, 2)], _env(cache))
    # one shared --out: process 0 writes the outputs, the orbax checkpoints take each process's shards
    _run_group([[sys.executable, "-m", "qeft_jax.train", *_train_flags(model, data, out, "full", 0, 2)]] * 2, cache)
    _assert_close_losses(ref, out)
    a, b, base = _tensors(ref), _tensors(out), _tensors(model)
    for k in a:
        scale = float(np.abs(a[k]).max()) or 1.0
        np.testing.assert_allclose(b[k], a[k], atol=1e-4 * scale, err_msg=k)
    assert sum(not np.array_equal(a[k], base[k]) for k in a) > len(a) // 2  # full fine-tuning moved most tensors
