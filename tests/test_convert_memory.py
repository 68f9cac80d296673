"""Bounded host memory of conversion (issue 14, item 2): `convert.from_hf` reads a sharded
safetensors checkpoint one tensor at a time while it writes (`checkpoint.converted_lazily`), and
`convert.to_hf` dequantizes a decoder layer at a time (`checkpoint.dense_lazily`), so the peak host
allocation is about one tensor / one layer, not the model. tracemalloc counts numpy's allocations."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np

from qeft_jax import spec
from qeft_jax.config import ModelConfig
from qeft_jax.io import SafetensorsReader, write_safetensors

CFG = ModelConfig(vocab_size=300, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def peak_bytes(fn, *args) -> int:
    """Peak bytes numpy (and Python) allocated while fn(*args) ran."""
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_convert_from_hf_streams_one_tensor_at_a_time(tmp_path):
    from convert.hf import convert

    cfg = CFG
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in spec.fp_shapes(cfg).items()}
    src = tmp_path / "hf"
    src.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, ks in shards.items():
        write_safetensors(src / f, {k: tensors[k] for k in ks})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (src / "config.json").write_text(json.dumps(cfg.to_hf_dict()))

    peak = peak_bytes(convert, src, tmp_path / "out")
    total, largest = sum(t.nbytes for t in tensors.values()), max(t.nbytes for t in tensors.values())
    assert peak < 3 * largest and peak < total / 8, (peak, largest, total)  # whole model: peak > total
    r = SafetensorsReader([tmp_path / "out" / "model.safetensors"])
    assert sorted(r.keys()) == names
    for k in names:
        np.testing.assert_array_equal(r.get(k), tensors[k], err_msg=k)


def test_export_to_hf_streams_one_layer_at_a_time(tmp_path):
    """convert.to_hf of a quantized checkpoint dequantizes, puts back the weak columns and undoes
    OGR a decoder layer at a time (`checkpoint.dense_lazily`), each written before the next."""
    from convert.hf_export import export
    from qeft_jax.checkpoint import write_fp
    from qeft_jax.quant.pipeline import quantize_checkpoint
    from qeft_jax.recipes import make_recipe

    cfg = CFG
    rng = np.random.default_rng(0)
    fp = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in spec.fp_shapes(cfg).items()}
    src = tmp_path / "fp"
    src.mkdir()
    write_fp(src, cfg.to_hf_dict(), fp)
    q = tmp_path / "q"
    ids = rng.integers(0, cfg.vocab_size, (2, 16))
    quantize_checkpoint(src, q, make_recipe("qeft", bits=4, group_size=64, k=8), ids, progress=False)

    peak = peak_bytes(export, q, tmp_path / "hf")
    total = sum(t.nbytes for t in fp.values())  # the dense float32 model the export writes
    layer = sum(t.nbytes for k, t in fp.items() if k.startswith(spec.layer_prefix(0)))
    assert peak < 4 * layer and peak < total / 2, (peak, layer, total)  # whole model: peak > total
    r = SafetensorsReader([tmp_path / "hf" / "model.safetensors"])
    assert sorted(r.keys()) == sorted(fp)
    for k, t in fp.items():  # in the original channel order again: 4-bit g64 is close to the fp weights
        got = r.get(k)
        assert got.shape == t.shape and np.linalg.norm(got - t) <= 0.2 * np.linalg.norm(t), k
