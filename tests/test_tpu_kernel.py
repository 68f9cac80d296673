"""The Mosaic TPU QEFT kernel (pallas_kernels/qeft_tpu.py): TPU interpret mode on CPU equals the plain
reference, the load-time layout round-trips, every config exports for TPU (a Mosaic custom call),
backend dispatch, and a quantized model's logits through the TPU-interpret path.

Tolerance: as in tests/test_kernels.py (kernel and reference dequantize identically and accumulate
in f32; only the summation order differs): max|diff| <= 1e-2 · max|ref| for bf16.

CI runs a representative grid (every bits x group once, M in {1, 8, 24}, ragged shapes, k = 0 and
not); QEFT_TEST_FULL=1 runs the full product bits {2,3,4} x g {32,64,128} x M {1,8,24} x
shapes {200x576, 70x301} x k {0, 16 scattered}.
"""
from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import qeft_tpu
from pallas_kernels.testing import lower_for_tpu, random_inputs, rel_err
from qeft_jax import qeft_op
from qeft_jax.packing import qeft_matmul_ref

FULL = os.environ.get("QEFT_TEST_FULL") == "1"
TOL = 1e-2
BF = jnp.bfloat16

#        bits  g   out  n    k   M   scattered
CASES = [(2, 32, 200, 576, 16, 1, True),
         (2, 64, 70, 301, 0, 24, False),
         (2, 128, 200, 576, 5, 8, True),
         (3, 32, 70, 301, 5, 8, True),
         (3, 64, 200, 576, 0, 1, False),
         (3, 128, 200, 576, 16, 24, True),
         (4, 32, 200, 576, 0, 24, False),
         (4, 64, 200, 576, 16, 8, True),
         (4, 128, 70, 301, 5, 1, True)]
if FULL:
    CASES = [(b, g, o, n, k, m, bool(k)) for b, g, m, (o, n), k in itertools.product(
        (2, 3, 4), (32, 64, 128), (1, 8, 24), ((200, 576), (70, 301)), (0, 16))]


def _check(bits, g, out, n, k, m, scattered, seed=0, dtype=BF, **kw):
    x, qw, s, z, weak, idx = random_inputs(out, n, bits=bits, group_size=g, k=k, m=m, dtype=dtype,
                                           scattered=scattered, seed=seed)
    y = qeft_tpu.qeft_matmul(x, qw, s, z, weak, idx, bits=bits, group_size=g, interpret=True, **kw)
    ref = qeft_matmul_ref(x, qw, s, z, weak, idx, bits=bits, group_size=g)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = rel_err(y, ref)
    assert err <= TOL, (bits, g, out, n, k, m, err)
    return err


@pytest.mark.parametrize("bits,g,out,n,k,m,scattered", CASES)
def test_mosaic_interpret_matches_reference(bits, g, out, n, k, m, scattered):
    print(f"rel_err={_check(bits, g, out, n, k, m, scattered):.3e}")  # shown with pytest -s


#                  bits g    n     M   kernel keywords
VARIANTS = {"prefill_multi_block": (4, 64, 2000, 24, {"words_per_block": 128, "block_n": 128,
                                                      "block_m": 16}),  # 2 M x 2 out x 2 K blocks
            "decode_multi_block": (4, 64, 2000, 3, {"words_per_block": 128, "block_n": 128}),
            "g16": (2, 16, 576, 3, {}),          # g < 32 (and = vpw at 2 bits)
            "per_channel": (4, 576, 576, 3, {})}  # one group per row, stored as groups of 128


@pytest.mark.parametrize("name", list(VARIANTS))
def test_mosaic_interpret_variants(name):
    bits, g, n, m, kw = VARIANTS[name]
    _check(bits, g, 200, n, 16, m, True, seed=1, **kw)


@pytest.mark.parametrize("bits,g,n", [(2, 32, 576), (3, 128, 301), (4, 64, 4100), (3, 576, 576)])
def test_layout_round_trip(bits, g, n):
    """prepare -> unprepare gives the packed tensors back bit for bit (fp16 storage, bf16 weak
    equal to the stored values), and the padded parts are zero."""
    _x, qw, s, z, weak, idx = random_inputs(150, n, bits=bits, group_size=g, k=7, dtype=jnp.float16,
                                           scattered=True)
    lay = qeft_tpu.prepare(qw, s, z, weak, idx, bits=bits, group_size=g, in_features=n,
                           dtype=jnp.float16)
    m = lay.meta
    assert lay.qweight.shape == (m.k_blocks * m.words_per_block, m.out_pad)
    assert lay.scales.shape == (m.k_blocks, m.groups_per_block, m.out_pad)
    assert m.out_pad % 128 == 0 and m.in_pad % (m.vpw * 128) == 0
    back = qeft_tpu.unprepare(lay)
    for a, b in zip(back, (qw, s, z, weak, idx)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.any(np.asarray(lay.qweight)[:, m.out_features:])
    assert not np.any(np.asarray(lay.scales)[..., m.out_features:])


@pytest.mark.parametrize("bits,g", list(itertools.product((2, 3, 4), (32, 64, 128))))
def test_lowers_for_tpu(bits, g):
    """jax.export for TPU (no TPU needed): the module holds a Mosaic custom call, per M regime."""
    for m, k in ((1, 5), (8, 0), (24, 16)):
        lower_for_tpu(out=200, n=576, bits=bits, group_size=g, k=k, m=m)


def test_big_shapes_lower_for_tpu():
    for out, n in ((4096, 4096), (14336, 4096), (4096, 14336)):
        lower_for_tpu(out=out, n=n, bits=4, group_size=128, k=128, m=1)
    lower_for_tpu(out=4096, n=4096, bits=4, group_size=128, k=128, m=512)


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv(qeft_op.BACKEND_ENV, raising=False)
    plat = {"gpu": "triton", "tpu": "mosaic"}.get(jax.default_backend(), "xla")
    assert qeft_op.resolve_backend(None) == qeft_op.resolve_backend("auto") == plat
    assert qeft_op.resolve_backend("pallas") == "triton"
    for b in ("xla", "triton", "mosaic", "mosaic_interpret", "triton_interpret"):
        assert qeft_op.resolve_backend(b) == b
    monkeypatch.setenv(qeft_op.BACKEND_ENV, "mosaic_interpret")
    assert qeft_op.resolve_backend(None) == "mosaic_interpret"
    assert qeft_op.resolve_backend("xla") == "xla"          # an explicit choice beats the variable
    with pytest.raises(ValueError, match="mosaik"):
        qeft_op.resolve_backend("mosaik")
    monkeypatch.setenv(qeft_op.BACKEND_ENV, "tpu")
    with pytest.raises(ValueError, match="QEFT_JAX_BACKEND"):
        qeft_op.resolve_backend(None)


def test_op_dispatches_to_the_mosaic_kernel(monkeypatch):
    """backend='mosaic_interpret' runs qeft_tpu (counted), and configs it does not take fall back."""
    calls = []
    real = qeft_tpu.qeft_matmul
    monkeypatch.setattr(qeft_tpu, "qeft_matmul", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    x, qw, s, z, weak, idx = random_inputs(70, 301, bits=3, group_size=64, k=5, m=2, scattered=True)
    y = qeft_op.qeft_linear(x, qw, s, z, weak, idx, 3, 64, "mosaic_interpret")
    assert calls and calls[0]["interpret"] is True
    assert rel_err(y, qeft_matmul_ref(x, qw, s, z, weak, idx, bits=3, group_size=64)) <= TOL
    calls.clear()
    assert not qeft_tpu.supports(bits=3, group_size=12, in_features=301)
    x, qw, s, z, weak, idx = random_inputs(70, 301, bits=3, group_size=12, k=5, m=2)
    qeft_op.qeft_linear(x, qw, s, z, weak, idx, 3, 12, "mosaic_interpret")
    assert not calls


# ------------------------------------------------------------------ a quantized model end to end
def _random_quantized_model(dtype, bits=4, group_size=128, k=16, layers=1):
    """The default model's architecture (SmolLM2-135M: hidden 576, MLP 1536 = 3 out blocks of 512,
    k/v 192) cut to `layers` layers and a 256-token vocabulary, every block linear a QEFTLinear with
    random packed tensors."""
    # local imports: the model stack stays off the kernel tests' import path
    from flax import nnx

    from qeft_jax.checkpoint import build_model
    from qeft_jax.config import ModelConfig
    from qeft_jax.model import Buffer, dotted, place_tensors
    from qeft_jax.qlinear import QEFTLinear
    from qeft_jax.recipes import make_recipe

    cfg = ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "num_hidden_layers": layers, "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "max_position_embeddings": 256, "hidden_act": "silu"})
    recipe = make_recipe("qeft", bits=bits, group_size=group_size, k=k)
    model = build_model(cfg, recipe, dtype=dtype)
    rng = np.random.default_rng(0)
    tensors = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QEFTLinear):
            sp = node.spec
            _, qw, s, z, weak, idx = random_inputs(
                sp.out_features, sp.in_features, bits=sp.bits, group_size=sp.group_size, k=sp.k,
                dtype=jnp.float16, scattered=not sp.weak_first, seed=len(tensors))  # OGR: weak first
            s = s / 16  # keep the random network's activations in a sane range
            weak = weak / 16
            for name, v in zip(("qweight", "scales", "zeros", "weak", "weak_idx"), (qw, s, z, weak, idx)):
                tensors[dotted(path) + "." + name] = v
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Not(Buffer))):
        name = dotted(path)
        if name not in tensors:
            noise = rng.standard_normal(var.shape).astype(np.float32)
            tensors[name] = 1 + 0.1 * noise if "norm" in name else 0.5 * noise
    place_tensors(model, tensors)
    return model, cfg


# CI: one layer, bf16, prefill, load-time layout; QEFT_TEST_FULL=1: two layers, bf16 and f32, a decode
# step, and the per-call layout too
MODEL_DTYPES = [(BF, 3e-2)] + ([(jnp.float32, 1e-5)] if FULL else [])


@pytest.mark.parametrize("dtype,tol", MODEL_DTYPES, ids=[jnp.dtype(d).name for d, _ in MODEL_DTYPES])
def test_model_logits_mosaic_interpret_equal_reference(dtype, tol, monkeypatch):
    """Prefill (M = 2 x 5 rows; full: and a decode-shaped step, M = 1) of the quantized model,
    jitted: logits through the TPU-interpret kernel on the layout made once by prepare_tpu (full:
    and re-laid out per call) equal the XLA reference path's. (Jitted: run eagerly, the
    interpreter's callbacks compete with the model's queued eager ops and crawl.)"""
    # local imports: as in _random_quantized_model
    from flax import nnx

    from qeft_jax.qlinear import prepare_tpu, set_backend

    layers = 2 if FULL else 1
    model, cfg = _random_quantized_model(dtype, layers=layers)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 5)))
    forward = nnx.jit(lambda m, ids: m(ids))

    def logits():
        out = [np.asarray(forward(model, ids), np.float32)]
        if FULL:
            out.append(np.asarray(forward(model, ids[:1, :1]), np.float32))
        return out

    assert set_backend(model, "xla") == 7 * layers
    ref = logits()
    runs = []
    if FULL:
        set_backend(model, "mosaic_interpret")
        runs.append(logits())
    assert prepare_tpu(model) == 7 * layers
    assert set_backend(model, "mosaic_interpret") == 7 * layers

    def no_relayout(*a, **kw):
        raise AssertionError("prepared linears must not re-lay their weights out per call")

    monkeypatch.setattr(qeft_tpu, "qeft_matmul", no_relayout)
    runs.append(logits())
    for got in runs:
        for r, g in zip(ref, got):
            assert np.all(np.isfinite(r)) and np.abs(r).max() > 1e-3
            err = float(np.abs(g - r).max() / np.abs(r).max())
            assert err <= tol, err


def test_prepared_layout_through_the_op_and_its_gradient():
    """qeft_linear with a prepared layout (weak passed separately, as the model does): forward equals
    the reference and the custom backward still gives dX and dW_weak."""
    bits, g = 4, 32
    x, qw, s, z, weak, idx = random_inputs(70, 301, bits=bits, group_size=g, k=5, m=3, scattered=True,
                                           dtype=jnp.float32)
    lay = qeft_tpu.prepare(qw, s, z, None, None, bits=bits, group_size=g, in_features=301)
    assert lay.weak is None and lay.meta.k == 0

    def loss(backend, layout):
        def f(x, weak):
            y = qeft_op.qeft_linear(x, qw, s, z, weak, idx, bits, g, backend, layout)
            return jnp.sum(y * jnp.arange(70, dtype=y.dtype))
        return f

    got = jax.value_and_grad(loss("mosaic_interpret", lay), argnums=(0, 1))(x, weak)
    want = jax.value_and_grad(loss("xla", None), argnums=(0, 1))(x, weak)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
