"""Bounded host memory of conversion (issue 14, item 2): `convert.from_hf` reads a sharded
safetensors checkpoint one tensor at a time while it writes (`checkpoint.converted_lazily`), so its
peak host allocation is about one tensor, not the model. tracemalloc counts numpy's allocations."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np

from qeft_jax import spec
from qeft_jax.config import ModelConfig
from qeft_jax.io import SafetensorsReader, write_safetensors


def test_convert_from_hf_streams_one_tensor_at_a_time(tmp_path):
    from convert.hf import convert

    cfg = ModelConfig(vocab_size=300, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
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

    tracemalloc.start()
    try:
        convert(src, tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    total, largest = sum(t.nbytes for t in tensors.values()), max(t.nbytes for t in tensors.values())
    assert peak < 3 * largest and peak < total / 8, (peak, largest, total)  # whole model: peak > total
    r = SafetensorsReader([tmp_path / "out" / "model.safetensors"])
    assert sorted(r.keys()) == names
    for k in names:
        np.testing.assert_array_equal(r.get(k), tensors[k], err_msg=k)
