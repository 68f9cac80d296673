"""Device meshes for data-parallel calibration (`jax.sharding`).

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
so all processes quantize identically. Every process also writes the output checkpoint and its
resume state: give each process its own --out (or a process-local disk) and keep process 0's.

What is tested: a single host with 4 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=4, tests/test_sharding.py): block outputs and
Hessians match the single-device run, and a whole quantization gives the same weak index, codes
and logits. What is NOT tested: real multi-host runs (`jax.distributed`, the all-gather of
activations across processes), real GPUs/TPUs, and a 'model' axis > 1 (the mesh helper accepts it,
but calibration only uses the 'data' axis; weights are replicated over 'model').
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
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


def shard_batch(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array (identical on every process) as a global array split over 'data'.

    Each process only transfers the slices its own devices hold, so this works across hosts."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, data_sharding(mesh), lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly sharded) global array as a full numpy array on this process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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
