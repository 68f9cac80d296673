"""train.memory (what benchmarks/scale.py reports at 8B/70B) on a tiny config: the byte counts equal
what the shapes say, computed here independently, and the methods order as they must."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qeft_jax import spec
from qeft_jax.config import ModelConfig
from train.memory import abstract_state, fsdp_bytes, step_memory, tree_bytes

CFG = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64)
K, RANK, GROUP = 32, 8, 64


@pytest.fixture(scope="module")
def steps():
    return {m: step_memory(CFG, m, batch=1, seq_len=32, remat=False, dtype=jnp.bfloat16, k=K, group_size=GROUP,
                           lora_rank=RANK) for m in ("qeft", "qlora", "lora", "full")}


def _linears():
    return [spec.linear_shape(CFG, name) for name in spec.LINEAR_NAMES] * CFG.num_hidden_layers


def test_trainable_bytes_match_the_shapes(steps):
    # the trainer keeps float32 master copies of what it trains
    assert steps["qeft"].trainable == sum(out * K * 4 for out, _ in _linears())
    lora = sum(RANK * (out + inp) * 4 for out, inp in _linears())
    assert steps["lora"].trainable == steps["qlora"].trainable == lora
    assert steps["full"].trainable == sum(int(np.prod(s)) for s in spec.fp_shapes(CFG).values()) * 4
    # jit drops inputs the step never reads, e.g. a weak_first linear's weak_idx (after OGR its weak
    # inputs are the slice x[..., :k]): the compiled arguments may lack those int32 [k] arrays
    weak_idx = len(_linears()) * K * 4
    for m, s in steps.items():  # AdamW: two float32 moments (+ a step count per transform)
        assert 2 * s.trainable <= s.optimizer <= 2 * s.trainable + 64
        assert s.arguments >= s.weights + s.trainable + s.optimizer - (weak_idx if m in ("qeft", "qlora") else 0)


def test_frozen_weights_match_the_shapes(steps):
    packed = 0
    for out, inp in _linears():  # 4-bit codes in uint32 words, f16 scales/zeros per group, int32 weak_idx
        packed += out * (-(-inp // 8)) * 4 + 2 * out * (-(-inp // GROUP)) * 2 + K * 4
    top = sum(int(np.prod(spec.shape(CFG, d))) for d in spec.top_dims(CFG).values())
    norms = sum(int(np.prod(spec.shape(CFG, d))) for d in spec.norm_dims(CFG).values()) * CFG.num_hidden_layers
    rope = CFG.head_dim // 2 * 4  # the float32 rope frequencies travel with the frozen state
    assert steps["qeft"].weights == packed + (top + norms) * 2 + rope  # fp variables in bf16
    # qlora: the same packed base plus the (frozen) weak columns in float16
    assert steps["qlora"].weights == steps["qeft"].weights + sum(out * K * 2 for out, _ in _linears())


def test_methods_order(steps):
    s = steps
    assert s["full"].total > s["lora"].total
    assert s["lora"].weights > s["qlora"].weights > s["qeft"].weights
    assert s["full"].trainable > s["lora"].trainable
    assert s["full"].optimizer > s["qeft"].optimizer
    assert all(v.temporaries > 0 and v.total > v.arguments - v.aliased for v in s.values())


def test_fsdp_bytes_split_what_divides():
    _, trainable, _ = abstract_state(CFG, "full", dtype=jnp.bfloat16)
    whole = tree_bytes(trainable)
    assert fsdp_bytes(trainable, 1) == whole
    # every full-model leaf has an axis divisible by 2 (all dims here are even)
    assert fsdp_bytes(trainable, 2) == whole // 2
    # 5 divides no axis of any leaf: nothing is split
    assert fsdp_bytes(trainable, 5) == whole
