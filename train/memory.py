"""What one training step costs in memory, without allocating the model: abstract compilation.

`abstract_model(cfg, method, ...)` builds the model a method trains exactly as `train.trainer`
would load it (qeft/qlora: every block linear a QEFTLinear, fp variables in the compute dtype;
lora/full: the fp model with float32 frozen params, `trainer.param_dtype`; lora/qlora: adapters
of rank r), but under `nnx.eval_shape`: every variable is a `jax.ShapeDtypeStruct`. `step_memory`
splits it as the trainer does (`split_trainable`: float32 master copies of the trainable leaves),
derives the AdamW state with `jax.eval_shape(tx.init, ...)`, and lowers and compiles the trainer's
own jitted step (`make_step_fns`) on shape-only inputs; nothing of the model's size is allocated.

The fields of a `StepMemory` (bytes):
  weights      the frozen state: every variable that is not trained (packed codes, scales, zeros,
               weak_idx, fp embeddings/norms/lm_head; for lora the fp base) -- sum of leaf nbytes
  trainable    the float32 master copy of the trained variables -- sum of leaf nbytes
  optimizer    the optimizer state (AdamW: two float32 moments per trainable value) -- nbytes
  arguments / outputs / aliased / temporaries
               XLA's `compiled.memory_analysis()`: argument_size_in_bytes (weights + trainable +
               optimizer + the token/weight batch), output_size_in_bytes (new trainable + optimizer
               state + metrics), alias_size_in_bytes (outputs written into the donated trainable and
               optimizer arguments), temp_size_in_bytes (everything live only inside the step:
               activations saved for the backward pass, gradients and their accumulator, the
               dequantized weights of the backward, logits, fusion scratch)
  total        arguments + outputs + temporaries - aliased: the step's peak footprint as XLA
               plans it (the same formula as benchmarks/train_step.py's mem_mb)

These are the backend's compiled plan, not a measured peak. On CPU two things inflate the
temporaries against an accelerator: XLA:CPU upcasts bf16 matmul operands to float32 (float32 copies
of weights and activations), and its default scheduler optimises for concurrency, keeping much more
alive at once (4 blocks of the 8B with remat: 17.0 GB of temporaries, 6.8 GB with
XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false, which benchmarks/scale.py sets).

With a mesh (`qeft_jax.sharding.make_mesh`), the inputs carry the trainer's FSDP shardings and
the compiled SPMD program's memory_analysis is per device; `fsdp_bytes` gives the per-device
share of a state tree under the same rule without compiling.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qeft_jax import sharding as shd
from qeft_jax.checkpoint import build_model
from qeft_jax.config import ModelConfig
from qeft_jax.recipes import make_recipe
from qeft_jax.lora import apply_lora
from train.trainer import (
    METHODS,
    TRAINABLE,
    TrainConfig,
    make_optimizer,
    make_step_fns,
    memory_figures,
    param_dtype,
    split_trainable,
)

QUANTIZED = ("qeft", "qlora")


@dataclasses.dataclass(frozen=True)
class StepMemory:
    method: str
    remat: bool
    batch: int
    seq_len: int
    weights: int
    trainable: int
    optimizer: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    total: int           # arguments + outputs + temporaries - aliased (trainer.memory_figures' peak)
    trainable_params: int
    compile_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tree_bytes(tree: Any) -> int:
    """Sum of nbytes over the leaves (arrays or shape-structs)."""
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def fsdp_bytes(tree: Any, n: int) -> int:
    """Bytes one of n devices holds of `tree` under `sharding.fsdp_spec` (a split leaf: 1/n of it;
    a leaf no axis of which n divides: all of it)."""
    total = 0
    for x in jax.tree.leaves(tree):
        nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        total += nbytes // n if len(shd.fsdp_spec(x.shape, n)) else nbytes
    return total


def abstract_model(cfg: ModelConfig, method: str, *, dtype: Any = jnp.bfloat16, k: int = 128,
                   group_size: int = 128, bits: int = 4, lora_rank: int = 64, lora_alpha: float = 16.0,
                   storage_dtype: str = "float16") -> nnx.Module:
    """The model `method` trains (see the module docstring), shape-only."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    recipe = (make_recipe("qeft", bits=bits, group_size=group_size, k=k, storage_dtype=storage_dtype)
              if method in QUANTIZED else None)

    def make() -> nnx.Module:
        model = build_model(cfg, recipe, dtype=dtype, param_dtype=param_dtype(method, dtype))
        if method in ("lora", "qlora"):
            apply_lora(model, lora_rank, lora_alpha, seed=0)
        return model

    return nnx.eval_shape(make)


def abstract_state(cfg: ModelConfig, method: str, **model_kw: Any) -> tuple[Any, Any, Any]:
    """(graphdef, trainable, frozen) of `split_trainable` on the abstract model: shape-structs."""
    model = abstract_model(cfg, method, **model_kw)
    graphdef = nnx.split(model, TRAINABLE[method], ...)[0]
    whole, state = nnx.split(model)
    # split_trainable itself (its float32 cast included) traced on the shape-only state
    trainable, frozen = jax.eval_shape(lambda st: split_trainable(nnx.merge(whole, st), method)[1:], state)
    return graphdef, trainable, frozen


def optimizer_state(trainable: Any) -> Any:
    """The trainer's optimizer state for `trainable`, shape-only (jax.eval_shape of its init)."""
    tx, _ = make_optimizer(1e-5, TrainConfig(model="", out=""))
    return jax.eval_shape(tx.init, trainable)


def _with_sharding(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def step_memory(cfg: ModelConfig, method: str, *, batch: int = 1, seq_len: int = 2048, remat: bool = False,
                mesh: Any = None, **model_kw: Any) -> StepMemory:
    """Compile the trainer's step (one micro-batch [batch, seq_len], AdamW) abstractly; see the
    module docstring for the fields. With `mesh`, `batch` is the global micro-batch (split over
    'data') and the XLA figures are per device."""
    graphdef, trainable, frozen = abstract_state(cfg, method, **model_kw)
    tx, _ = make_optimizer(1e-5, TrainConfig(model="", out=""))
    opt = optimizer_state(trainable)
    tokens = jax.ShapeDtypeStruct((1, batch, seq_len), jnp.int32)
    weights = jax.ShapeDtypeStruct((1, batch, seq_len), jnp.float32)
    args = [trainable, opt, frozen, tokens, weights]
    if mesh is not None:
        args = [_with_sharding(t, shd.fsdp_shardings(t, mesh)) for t in args[:3]]
        batch_sh = shd.batch_sharding(mesh, 1, 3)
        args += [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sh) for x in (tokens, weights)]
    step, _ = make_step_fns(graphdef, tx, remat, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - t0
    m = memory_figures(compiled)
    if m is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory_analysis()")
    return StepMemory(method=method, remat=remat, batch=batch, seq_len=seq_len, weights=tree_bytes(frozen),
                      trainable=tree_bytes(trainable), optimizer=tree_bytes(opt),
                      arguments=m["argument_bytes"], outputs=m["output_bytes"], aliased=m["alias_bytes"],
                      temporaries=m["temp_bytes"], total=m["peak_bytes"],
                      trainable_params=int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))),
                      compile_s=round(seconds, 2))
