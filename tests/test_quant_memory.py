"""Bounded host memory of quantization (issue 14, item 2): the pipeline's host arrays do not grow
with the number of blocks (finished blocks live in the resume state's files, not in memory), hold
the calibration activations once (float32) or not at all ('disk'). Measured in a child process by
tests/quant_memory_child.py with tracemalloc (numpy reports every array allocation to it)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.subprocess_runs import REPO, child_env


@pytest.fixture(scope="module")
def peaks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant_memory")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "quant_memory_child.py"), str(tmp / "work")],
                          env=child_env(tmp / "jax_cache"), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["float32", "disk"])
def test_quantize_memory_does_not_grow_with_blocks(peaks, mode):
    # 8 more blocks kept until the final write would add 8 packed blocks to the peak
    grown = peaks[mode]["blocks_10"] - peaks[mode]["blocks_2"]
    assert grown < 4 * peaks["packed_block_bytes"], (grown, peaks)
    # when the final write starts, no finished block (nor the activations) is still in memory:
    # the writer reads each tensor from the resume state's files when it comes to it
    assert peaks[mode]["blocks_10_at_write"] < peaks["packed_block_bytes"], peaks


def test_quantize_memory_holds_activations_once(peaks):
    # float32: one copy of the activations (x0 and its reordered copy, per-batch outputs and their
    # concatenation were 4); disk: a batch at a time
    grown = peaks["float32"]["many_sequences"] - peaks["float32"]["blocks_2"]
    assert grown < 1.5 * peaks["extra_activation_bytes"], (grown, peaks)
    grown = peaks["disk"]["many_sequences"] - peaks["disk"]["blocks_2"]
    assert grown < 0.25 * peaks["extra_activation_bytes"], (grown, peaks)
