"""Helpers for tests that run the CLIs as subprocesses (tests/test_train_kill.py,
tests/test_multiprocess.py): their environment, a checked run, and killing runs at a stall that
tests/train_kill_child.py announces."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def child_env(jax_cache: Path, **extra: str) -> dict[str, str]:
    """A run's environment: this checkout first on the path, CPU, and a persistent XLA compilation
    cache shared by the runs (the first compiles, the others load the executables). Multi-process
    variables (QEFT_*) and XLA_FLAGS of the parent are not passed on; `extra` is added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QEFT_") and k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(jax_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               **extra)
    return env


def run_ok(cmd: list[str], env: dict[str, str], timeout: float = 300) -> None:
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@contextlib.contextmanager
def watched(procs: list[subprocess.Popen], timeout: float) -> Iterator[list[subprocess.Popen]]:
    """Kill the processes after `timeout` seconds (never hang the suite), and when the block ends."""
    watchdog = threading.Timer(timeout, lambda: [p.kill() for p in procs])
    watchdog.start()
    try:
        yield procs
    finally:
        watchdog.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()


def kill_when_paused(procs: list[subprocess.Popen], where: str) -> None:
    """Wait until every process announces `PAUSED where` on stderr, then SIGKILL them all."""
    for p in procs:
        seen = []
        for line in p.stderr:
            seen.append(line)
            if line.strip() == f"PAUSED {where}":
                break
        else:
            pytest.fail(f"a run ended (rc {p.wait()}) without reaching {where}:\n" + "".join(seen[-40:]))
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        assert p.wait(timeout=60) == -signal.SIGKILL
