"""A killed `qeft_jax.quantize` resumes from the last finished block and writes the same checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]


def _cmd(model: Path, out: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "qeft_jax.quantize", "--model", str(model), "--method", "qeft",
            "--bits", "4", "--group-size", "16", "--k", "4", "--calib-samples", "4", "--seq-len", "32",
            "--calib-data", str(data), "--batch-size", "1", "--out", str(out)]


def _state(partial: Path) -> str:
    """The resume state file's text ('' before it exists); it is replaced atomically."""
    try:
        return (partial / "state.json").read_text()
    except FileNotFoundError:
        return ""


def test_kill_and_resume_quantize_gives_same_checkpoint(tiny_with_tokenizer, tmp_path):
    model, data = tiny_with_tokenizer
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    straight = tmp_path / "straight"
    subprocess.run(_cmd(model, straight, data), check=True, env=env, cwd=REPO, capture_output=True)

    out = tmp_path / "resumed"
    partial = tmp_path / ".resumed.partial"
    proc = subprocess.Popen(_cmd(model, out, data), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while '"done": -1' in _state(partial) or not _state(partial):  # kill once a block is recorded
        assert proc.poll() is None, "quantize finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave a (partial) output checkpoint"
    state = (partial / "state.json").read_text()
    assert '"done": 0' in state or '"done": 1' in state

    done = subprocess.run(_cmd(model, out, data), env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not partial.exists()
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class _Stop(Exception):
    pass


def test_resume_after_the_last_block_writes_the_same_checkpoint(converted, tmp_path):
    """The last block's outputs feed nothing, so none are kept: a run stopped after the last block
    (before the checkpoint was written) resumes without activations and writes the same files."""
    from qeft_jax.checkpoint import read_info
    from qeft_jax.quant.pipeline import quantize_checkpoint
    from qeft_jax.recipes import make_recipe

    src = converted["gqa_untied"]
    last = read_info(src).config.num_hidden_layers - 1
    recipe = make_recipe("gptq", bits=4, group_size=32)
    ids = np.random.default_rng(0).integers(0, 101, (3, 16))
    quantize_checkpoint(src, tmp_path / "straight", recipe, ids, progress=False)

    def stop_after_last(i, seconds):
        if i == last:
            raise _Stop

    out = tmp_path / "resumed"
    with pytest.raises(_Stop):
        quantize_checkpoint(src, out, recipe, ids, progress=False, on_block=stop_after_last)
    partial = tmp_path / ".resumed.partial"
    assert f'"done": {last}' in (partial / "state.json").read_text()
    assert not list(partial.glob("x_*.npy")), "no activations are kept after the last block"
    quantize_checkpoint(src, out, recipe, ids, progress=False)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
