"""Device meshes: data-parallel calibration and data-parallel + FSDP training (`jax.sharding`).

Quantization is calibration-bound: every block pushes all calibration sequences through itself
and accumulates Hessians H = 2XᵀX. With a mesh, `quant.calibrate.run_block` splits each batch of
sequences over the mesh's 'data' axis, replicates the block's weights, and lets XLA reduce the
per-device partial Hessians with an all-reduce (the Hessian outputs are constrained to be
replicated). The host-side work (grid search, OPTQ, packing) is unchanged. Without a mesh
(`mesh=None`, the default everywhere) nothing here is used and the single-device path is unchanged.

Batches with a mesh: the batch is rounded up to a multiple of the 'data' axis size, and a final
partial batch is padded with copies of real sequences whose Hessian weight is zero, so every
sequence counts exactly once. Summation order differs from the single-device run, so Hessians and
activations agree to float32 rounding (≈1e-6 relative), not bit for bit.

Training (`train.trainer`, `python -m qeft_jax.train --devices N`) uses the same 'data' axis twice:
every micro-batch is split over it (data parallel), and every parameter, frozen tensor and
optimizer moment is split over it too, FSDP-style (`fsdp_shardings`: each leaf's largest axis that
the axis size divides; leaves with no such axis are replicated). Inside the jitted step XLA
all-gathers a weight where a matmul needs it and reduce-scatters the gradients back to the
shards, so each device holds 1/N of the trainable state and of the frozen packed base. The step
function is the single-device one; only where the arrays live changes. The checkpoint is loaded
straight into that layout (`fsdp_layout` -> `checkpoint.read_sharded`): each process reads from
the file only the slices its own devices hold, so no host ever holds the whole model.

Multi-host (several processes, one per host)
--------------------------------------------
Call `maybe_initialize_distributed()` first thing in every process (before any other JAX call).
It reads

    QEFT_COORDINATOR_ADDRESS   host:port of process 0, reachable from every host
    QEFT_NUM_PROCESSES         number of processes (hosts)
    QEFT_PROCESS_ID            this process's index, 0 .. QEFT_NUM_PROCESSES-1

and calls `jax.distributed.initialize(coordinator_address, num_processes, process_id)`; with none
of them set it does nothing (single host). Setting QEFT_DISTRIBUTED_AUTO=1 instead calls
`jax.distributed.initialize()` without arguments, which lets JAX detect SLURM / Open MPI / TPU pods.
After that, `jax.devices()` lists the devices of all hosts and `make_mesh()` spans all of them.

Every process runs the same (deterministic) pipeline on the same calibration ids, so the
host-side calibration set is identical everywhere, but each process only transfers its own shard
of every batch to its local devices (`jax.make_array_from_callback` asks each process only for
the slices its addressable devices hold). The block outputs are all-gathered back to every
host (`multihost_utils.process_allgather`), and the Hessians are replicated by the all-reduce,
so all processes quantize identically. Only process 0 writes the output checkpoint and the resume
state (`is_writer`); the others read that state when a killed run resumes, so --out must be on a
file system every process sees (the same path everywhere). Training likewise: every process
computes, process 0 writes metrics, configs and the exported model, and the orbax checkpoints are
written by all processes together (each its own shards) into the shared --out.

What is tested: a single host with 4 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=4, tests/test_sharding.py): block outputs and
Hessians match the single-device run, a whole quantization gives the same weak index, codes
and logits, and FSDP training (qeft and full) gives the losses and tuned weights of the
single-device run, also when resumed on a different number of devices; and 2 real processes on
one machine (jax.distributed + gloo, tests/test_multiprocess.py): quantize and train (qeft killed
and resumed, full) give the single-process results. What is NOT tested: several hosts, real
GPUs/TPUs, and a 'model' axis > 1 (the mesh helper accepts it, but calibration and training only
use the 'data' axis; arrays are replicated over 'model').
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
ENV_ADDRESS, ENV_NUM, ENV_ID, ENV_AUTO = ("QEFT_COORDINATOR_ADDRESS", "QEFT_NUM_PROCESSES",
                                          "QEFT_PROCESS_ID", "QEFT_DISTRIBUTED_AUTO")


def make_mesh(data: int | None = None, model: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh over `devices` (default: all devices, of every process).

    data=None uses every device not taken by `model`; data * model must equal the device count
    when `devices` is given, and must not exceed it otherwise (the first data*model are used)."""
    devs = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devs) % model:
        raise ValueError(f"model axis {model} must be >= 1 and divide the {len(devs)} devices")
    if data is None:
        data = len(devs) // model
    if data < 1 or data * model > len(devs) or (devices is not None and data * model != len(devs)):
        raise ValueError(f"mesh data={data} x model={model} does not fit {len(devs)} devices")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devs[:data * model])


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'; everything else replicated."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_size(mesh: Mesh) -> int:
    return int(mesh.shape[DATA])


def batch_sharding(mesh: Mesh, axis: int, ndim: int) -> NamedSharding:
    """Axis `axis` of an ndim-dimensional array split over 'data'; the others replicated."""
    return NamedSharding(mesh, P(*([None] * axis + [DATA] + [None] * (ndim - axis - 1))))


def shard_batch(x: np.ndarray, mesh: Mesh, axis: int = 0) -> jax.Array:
    """A host array (identical on every process) as a global array split over 'data' along `axis`.

    Each process only transfers the slices its own devices hold, so this works across hosts."""
    return put(x, batch_sharding(mesh, axis, np.ndim(x)))


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """A value placed as a global array with `sharding`: one that every process holds in full, or a
    global array already (kept if laid out so, else resharded by XLA: no process gathers it)."""
    if isinstance(x, jax.Array) and (x.sharding == sharding or not x.is_fully_addressable):
        return x if x.sharding == sharding else jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def fsdp_layout(mesh: Mesh) -> Callable[[tuple[int, ...]], NamedSharding]:
    """shape -> its FSDP NamedSharding on `mesh` (`fsdp_spec`): what `checkpoint.load_checkpoint`
    places each tensor with, so a multi-process run loads straight into the layout it trains in."""
    n = data_size(mesh)
    return lambda shape: NamedSharding(mesh, fsdp_spec(shape, n))


def fsdp_spec(shape: Sequence[int], n: int) -> P:
    """Split the largest axis that n divides over 'data' (the first of equals); P() if none does."""
    axes = [i for i, d in enumerate(shape) if d >= n and d % n == 0]
    if n == 1 or not axes:
        return P()
    best = max(axes, key=lambda i: (shape[i], -i))
    return P(*([None] * best + [DATA]))


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding per leaf of `tree` (arrays or shape-structs): see `fsdp_spec`."""
    layout = fsdp_layout(mesh)
    return jax.tree.map(lambda x: layout(np.shape(x)), tree)


def put_tree(tree: Any, shardings: Any) -> Any:
    """`put` over a pytree of host-identical values."""
    return jax.tree.map(put, tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly sharded) global array as a full numpy array on this process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_writer() -> bool:
    """Whether this process writes outputs: in a multi-process run every process computes and only
    process 0 writes (checkpoints, resume state, logs)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process reaches this point (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def maybe_initialize_distributed() -> bool:
    """jax.distributed.initialize from QEFT_* env vars (see the module docstring).

    Returns True when this process joined a multi-process run, False when single-process."""
    if os.environ.get(ENV_AUTO, "") not in ("", "0"):
        if not jax.distributed.is_initialized():
            jax.distributed.initialize()
        return True
    given = {k: os.environ.get(k) for k in (ENV_ADDRESS, ENV_NUM, ENV_ID)}
    if not any(given.values()):
        return False
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ValueError(f"multi-host setup needs {', '.join(given)}; missing {', '.join(missing)}")
    try:
        num, pid = int(given[ENV_NUM]), int(given[ENV_ID])
    except ValueError as e:
        raise ValueError(f"{ENV_NUM} and {ENV_ID} must be integers") from e
    if not 0 <= pid < num:
        raise ValueError(f"{ENV_ID}={pid} must lie in [0, {ENV_NUM}={num})")
    if num == 1:
        return False
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address=given[ENV_ADDRESS], num_processes=num, process_id=pid)
    return True
