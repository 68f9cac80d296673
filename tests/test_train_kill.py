"""A SIGKILLed `qeft_jax.train`, rerun with the same command, ends bit-identical to a straight run.

The runs are subprocesses (CPU, float32). The killed run is tests/train_kill_child.py: the same
training command with a stall injected from outside the trainer: `step:N` (train()'s `after_update`
hook) stalls the run right after step N's update is computed (before it is recorded or
checkpointed), `save:N` (a Checkpoints subclass with a pausing orbax temporary path) stalls it inside
the orbax save of step N (data written to the temporary directory, not yet committed). The child
announces the stall on stderr; the test then SIGKILLs the process there. The reference run and the
resuming rerun are the plain `python -m qeft_jax.train` command.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qeft_jax.io import SafetensorsReader
from tests.subprocess_runs import REPO, child_env, kill_when_paused, run_ok, watched

STEPS = 6
CHILD = Path(__file__).with_name("train_kill_child.py")
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _flags(model: Path, data: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--method", "qeft", "--data", str(data), "--seq-len", "32",
            "--batch-size", "4", "--micro-batch-size", "2", "--steps", str(STEPS), "--lr", "3e-2",
            "--save-every", "1", "--eval-every", "3", "--eval-rows", "4", "--val-fraction", "0.1",
            "--dtype", "float32", "--no-progress", "--out", str(out)]


def _cmd(model: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "qeft_jax.train", *_flags(model, data, out)]


def _kill_at(flags: list[str], env: dict[str, str], where: str) -> None:
    """Start the training command `flags` with a stall at `where` (tests/train_kill_child.py) and
    SIGKILL it once it stalls there."""
    proc = subprocess.Popen([sys.executable, str(CHILD), where, *flags], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with watched([proc], 240):
        kill_when_paused([proc], where)


def _tensors(d: Path) -> dict[str, np.ndarray]:
    r = SafetensorsReader([d / "model.safetensors"])
    return {k: r.get(k) for k in r.keys()}


def _steps_saved(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def _metric_steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tiny_with_tokenizer, tmp_path_factory):
    """(quantized model, data file, reference run dir, env): the reference is an uninterrupted subprocess run."""
    from qeft_jax.quant.pipeline import quantize_checkpoint
    from qeft_jax.recipes import make_recipe

    model, _ = tiny_with_tokenizer
    root = tmp_path_factory.mktemp("train_kill")
    q = root / "qeft"
    ids = np.random.default_rng(0).integers(2, 92, (4, 32))  # the tokenizer's word ids
    quantize_checkpoint(model, q, make_recipe("qeft", bits=4, group_size=16, k=4), ids, progress=False)
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(90)]
    rows = [{"instruction": " ".join(rng.choice(words, 5)), "input": " ".join(rng.choice(words, 3)) if i % 2 else "",
             "output": " ".join(rng.choice(words, 6))} for i in range(24)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = child_env(root / "jax_cache")
    ref = root / "ref"
    run_ok(_cmd(q, data, ref), env)
    assert (ref / "train_done.json").is_file()
    assert _metric_steps(ref) == list(range(STEPS + 1))  # step 0: the baseline held-out loss
    return q, data, ref, env


def _assert_same_as_reference(q: Path, ref: Path, out: Path) -> None:
    assert json.loads((out / "train_done.json").read_text())["step"] == STEPS
    a, b = _tensors(ref), _tensors(out)
    assert a.keys() == b.keys()
    for k in a:  # every tensor bit for bit (signed zeros and NaN payloads too)
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    weak = [k for k in a if k.endswith(".weak")]
    base = _tensors(q)
    assert weak and all(not np.array_equal(a[k], base[k]) for k in weak)  # training did move them
    assert (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    ma = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss")) for r in ma] == \
           [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss")) for r in mb]
    left = [p.name for p in (out / "checkpoints").iterdir() if TMP_SUFFIX in p.name]
    assert not left, f"unfinished checkpoint directories left behind: {left}"
    assert not (out / ".export-tmp").exists()


def test_kill_mid_step_and_resume_bit_identical(setup, tmp_path):
    q, data, ref, env = setup
    out = tmp_path / "run"
    cmd = _cmd(q, data, out)
    _kill_at(_flags(q, data, out), env, "step:4")  # step 4's update computed in memory, not yet recorded or saved
    assert not (out / "train_done.json").exists() and not (out / "model.safetensors").exists()
    assert _steps_saved(out)[-1] == 3 and _metric_steps(out) == [0, 1, 2, 3]
    run_ok(cmd, env)
    _assert_same_as_reference(q, ref, out)


def test_kill_mid_save_and_resume_bit_identical(setup, tmp_path):
    q, data, ref, env = setup
    out = tmp_path / "run"
    cmd = _cmd(q, data, out)
    # inside the orbax save of step 3: written to its temporary dir, not committed
    _kill_at(_flags(q, data, out), env, "save:3")
    ckpts = out / "checkpoints"
    assert not (out / "train_done.json").exists() and not (out / "model.safetensors").exists()
    assert _steps_saved(out)[-1] == 2, "the interrupted save must not count as a checkpoint"
    partial = [p for p in ckpts.iterdir() if p.name.startswith("3" + TMP_SUFFIX)]
    assert partial and any(f.is_file() for f in partial[0].rglob("*")), "the kill should leave a partial save"
    assert _metric_steps(out) == [0, 1, 2, 3]  # step 3 was recorded before its save: the rerun must drop it
    run_ok(cmd, env)
    _assert_same_as_reference(q, ref, out)
