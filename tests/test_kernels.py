"""The fused QEFT Pallas kernel (interpret mode on CPU) equals the plain reference, and lowers for CUDA.

Tolerance. Kernel and reference compute the same dequantized weight, ``(code - zero) * scale`` in
f32 rounded to the activation dtype, multiply 16-bit values (exact in f32) and accumulate in f32;
they differ only in summation order (~1e-6 relative) and in where that order flips the final
rounding of y to 16 bits. That flip is at most one ulp of |y_i| <= max|ref|: 2^-8 = 3.9e-3 for
bf16 (8 significant bits), 2^-11 = 4.9e-4 for fp16 (11 bits). The bounds below leave 2x margin:
max|diff| <= 1e-2·max|ref| (bf16) and 1e-3·max|ref| (fp16).
"""
from __future__ import annotations

import itertools
import json

import jax.numpy as jnp
import pytest

from pallas_kernels import block_table
from pallas_kernels.qeft_gemv import qeft_matmul
from pallas_kernels.testing import lower_for_cuda, random_inputs, rel_err
from qeft_jax.packing import qeft_matmul_ref

TOL = {jnp.bfloat16: 1e-2, jnp.float16: 1e-3}
BF, F16 = jnp.bfloat16, jnp.float16


def _check(bits, g, out, n, k, m, dtype, scattered, seed=0, lead=None, **kw):
    x, qw, s, z, weak, idx = random_inputs(out, n, bits=bits, group_size=g, k=k, m=m, dtype=dtype,
                                           scattered=scattered, seed=seed, lead=lead)
    y = qeft_matmul(x, qw, s, z, weak, idx, bits=bits, group_size=g, interpret=True, **kw)
    ref = qeft_matmul_ref(x, qw, s, z, weak, idx, bits=bits, group_size=g)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = rel_err(y, ref)
    assert err <= TOL[dtype], (bits, g, out, n, k, m, err)
    return err


# Every bits x group once; the other axes (out not a block multiple, n = 300 / 301 / 576 with partial
# groups and partial words, k in {0, 5, 16}, M in {1, 3, 8}, dtype, contiguous / scattered
# weak_idx) are each covered several times across the rows.
#          bits  g    out  n    k   M  dtype scattered
CASES = [(2, 32, 200, 300, 5, 1, BF, True),
         (2, 64, 200, 576, 0, 3, F16, False),
         (2, 128, 200, 576, 16, 8, BF, False),
         (3, 32, 200, 576, 16, 1, F16, True),
         (3, 64, 200, 300, 5, 8, BF, False),
         (3, 128, 200, 576, 0, 3, BF, False),
         (3, 32, 70, 301, 5, 3, F16, True),
         (4, 32, 200, 576, 0, 8, BF, False),
         (4, 64, 200, 300, 16, 1, F16, True),
         (4, 128, 200, 576, 5, 3, BF, True)]


@pytest.mark.parametrize("bits,g,out,n,k,m,dtype,scattered", CASES)
def test_gemv_matches_reference(bits, g, out, n, k, m, dtype, scattered):
    _check(bits, g, out, n, k, m, dtype, scattered)


@pytest.mark.parametrize("kw", [
    dict(use_dot=False),                           # broadcast-multiply + reduce inner product
    dict(split_k=3),                               # split over input words, f32 partials
    dict(block_n=16, block_w=16, use_dot=False),   # many word blocks, small tiles
], ids=["reduce", "split_k", "small_blocks"])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_variants(kw, m):
    _check(3, 128, 150, 576, 5, m, BF, True, seed=1, **kw)


def test_weak_wider_than_one_block():
    """k = 100 -> padded to 128, two 64-wide weak tiles."""
    _check(4, 64, 100, 300, 100, 2, F16, True, seed=2)


def test_weak_none_and_leading_dims():
    x, qw, s, z, _, _ = random_inputs(40, 300, bits=2, group_size=32, k=0, lead=(2, 3), seed=3)
    y = qeft_matmul(x, qw, s, z, None, None, bits=2, group_size=32, interpret=True)
    ref = qeft_matmul_ref(x, qw, s, z, jnp.zeros((40, 0), x.dtype), jnp.zeros((0,), jnp.int32),
                          bits=2, group_size=32)
    assert y.shape == (2, 3, 40)
    assert rel_err(y, ref) <= TOL[BF]


@pytest.mark.parametrize("prefill", ["xla", "pallas"])
def test_prefill(prefill):
    _check(3, 64, 100, 300, 5, None, BF, True, seed=4, lead=(2, 10), prefill=prefill)


@pytest.mark.parametrize("bits,g,dtype", list(itertools.product((2, 3, 4), (32, 64, 128), (BF, F16))))
def test_lowers_for_cuda(bits, g, dtype):
    lower_for_cuda(out=200, n=576, bits=bits, group_size=g, k=5, m=3, dtype=dtype)


@pytest.mark.parametrize("kw", [dict(k=0), dict(use_dot=False, m=1), dict(split_k=2, k=16),
                                dict(m=32, prefill="pallas"), dict(block_n=128, block_w=128)])
def test_variants_lower_for_cuda(kw):
    kw = dict(dict(out=4096, n=4096, bits=4, group_size=128, k=128, m=1), **kw)
    lower_for_cuda(**kw)


def test_block_table(tmp_path):
    path = tmp_path / "table.json"
    default = block_table.lookup(n=4096, out=11008, bits=4, gpu="X", path=path)
    assert default["block_n"] > 0 and default["prefill"] == "xla"
    block_table.update({block_table.key("X", 4096, 11008, 4): dict(block_n=128, num_warps=8, us=1.0)},
                       path=path)
    hit = block_table.lookup(n=4096, out=11008, bits=4, gpu="X", path=path)
    assert hit["block_n"] == 128 and hit["num_warps"] == 8 and "us" not in hit
    assert hit["block_w"] == default["block_w"]
    assert block_table.lookup(n=4096, out=11008, bits=4, gpu="Y", path=path) == default
    assert json.loads(path.read_text())["format"] == 1


def test_block_table_user_over_shipped(tmp_path, monkeypatch):
    shipped, user = tmp_path / "shipped.json", tmp_path / "user.json"
    k = block_table.key("X", 4096, 11008, 4)
    block_table.update({k: dict(block_n=128, num_warps=8)}, path=shipped)
    monkeypatch.setattr(block_table, "SHIPPED", shipped)
    monkeypatch.setenv(block_table.TABLE_ENV, str(user))
    block_table._load.cache_clear()
    assert block_table.lookup(n=4096, out=11008, bits=4, gpu="X")["block_n"] == 128
    assert block_table.update({k: dict(block_n=16)}) == user     # autotune writes the user's table only
    got = block_table.lookup(n=4096, out=11008, bits=4, gpu="X")
    assert got["block_n"] == 16 and got["num_warps"] != 8        # the user's entry wins, whole
    assert json.loads(shipped.read_text())["entries"][k]["block_n"] == 128


def test_shipped_block_table_entries_are_valid():
    for name, entry in block_table.entries(block_table.SHIPPED).items():
        gpu, n, out, bits = name.split("|")
        assert gpu and int(n) > 0 and int(out) > 0 and int(bits) in (2, 3, 4)
        assert set(block_table.CONFIG_KEYS) <= set(entry), name
