"""The fine-tuning loop: QEFT weak-column tuning and the LoRA / QLoRA / full baselines.

One loop for every method; a method only decides which variables are trainable:
  qeft   WeakColumns of every QEFTLinear (the packed base and everything else frozen)
  qlora  LoraParam adapters beside the QEFTLinears (weak columns frozen too)
  lora   LoraParam adapters beside the fp model's Linears
  full   every nnx.Param of the fp model

The model is split into (trainable, frozen) and gradients are taken w.r.t. `trainable` only, so
nothing else gets a gradient or optimizer state. Trainable leaves are kept as float32 master copies
(the frozen model runs in float32 on CPU, bfloat16 on GPU).

Output directory (`out`):
  train_config.json      the resolved config (a rerun must match it; then it resumes)
  metrics.jsonl          one record per step (loss, grad_norm, lr, tokens/s) and per evaluation
  checkpoints/<step>/    orbax checkpoints of (trainable, optimizer state), the last `keep` kept
  config.json, model.safetensors, ...   the final loadable checkpoint (see `export`)
  train_done.json        written last: the run is complete
Data order is a pure function of (seed, step) and the step is stateless otherwise, so an
interrupted run rerun with the same command ends with exactly the parameters of a straight run.

Several devices (`devices` != 1): a ('data',) mesh; each micro-batch is split over it and the
trainable master copy, the optimizer state and the frozen model are sharded FSDP-style
(`qeft_jax.sharding.fsdp_shardings`). The step function is unchanged: XLA inserts the all-gathers
and gradient reductions. Results equal the single-device run's up to float summation order, and
a run may be resumed on a different number of devices (checkpoints are restored into the current
layout). The checkpoint is loaded straight into that layout: each process reads from the file only
the slices its devices hold (`qeft_jax.checkpoint.read_sharded`; train_done.json records the bytes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from qeft_jax import data as qdata
from qeft_jax import sharding as shd
from qeft_jax import tokenization
from qeft_jax.checkpoint import (CONFIG_FILE, QUANTIZATION_FILE, STORAGE_DTYPES, TENSORS_FILE, CheckpointInfo,
                                 aux_files, load_checkpoint, read_info, read_tensors, tokenizer_files,
                                 trained_tensors, write_fp, write_quantized)
from qeft_jax.config import ModelConfig
from qeft_jax.io import write_json_atomic
from qeft_jax.load import resolve
from qeft_jax.lora import LoraParam, apply_lora, merged_fp_tensors, save_adapters
from qeft_jax.model import named_variables
from qeft_jax.qlinear import WeakColumns
from qeft_jax.recipes import WEAK_DTYPES
from train import data as tdata

METHODS = ("qeft", "qlora", "lora", "full")
# The variables each method trains (an nnx filter); everything else is frozen.
TRAINABLE = {"qeft": WeakColumns, "qlora": LoraParam, "lora": LoraParam, "full": nnx.Param}


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN/Inf; the last good state was kept."""


def _opt(default: Any, help: str, *, resume: bool, **meta: Any) -> Any:
    """A TrainConfig field: its default, help text (the CLI's too) and whether it is a resume key."""
    return dataclasses.field(default=default, metadata={"help": help, "resume": resume, **meta})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a fine-tuning run is; `python -m qeft_jax.train` has one flag per field
    (qeft_jax.cli.add_dataclass_arguments). Fields with metadata resume=True change what the run
    computes: a rerun into the same `out` must match them (RESUME_KEYS)."""

    model: str = _opt("default", "checkpoint dir or 'default' (quantized for qeft/qlora, fp for lora/full)",
                      resume=True)
    out: str = dataclasses.field(metadata={"help": "the run's directory (rerun into it to resume)",
                                           "resume": False})
    method: str = _opt("qeft", "what is trained: qeft weak columns, qlora/lora adapters, or full", resume=True,
                       choices=METHODS)
    data: str = _opt("builtin", "Alpaca/Open-Platypus .jsonl/.json (instruction, input, output) or 'builtin'",
                     resume=True)
    tasks: list[str] | None = _opt(None, "builtin data: which bundled tasks (default: all)", resume=True)
    limit_per_task: int = _opt(1000, "builtin data: examples per task", resume=True)
    val_data: str | None = _opt(None, "held-out jsonl (default: a val_fraction split of the data)", resume=True)
    val_fraction: float = _opt(0.02, "held-out share of the data when there is no val_data", resume=True)
    seq_len: int = _opt(512, "tokens per packed row", resume=True)
    batch_size: int = _opt(16, "effective batch (rows per optimizer step)", resume=True)
    micro_batch_size: int = _opt(4, "rows per forward/backward (gradient accumulation = batch / micro)",
                                 resume=True)
    steps: int | None = _opt(None, "optimizer steps (default: `epochs` passes over the packed rows)", resume=True)
    epochs: float = _opt(1.0, "passes over the data when steps is not given", resume=True)
    lr: float | None = _opt(None, "default: qeft 1e-4 (k<128) / 5e-5 (k>=128), lora/qlora 2e-4, full 1e-5",
                            resume=True)
    warmup_steps: int = _opt(0, "linear learning-rate warmup steps", resume=True)
    weight_decay: float = _opt(0.0, "AdamW weight decay", resume=True)
    clip_norm: float = _opt(0.3, "global gradient-norm clip", resume=True)
    adam_b1: float = _opt(0.9, "Adam beta1", resume=True)
    adam_b2: float = _opt(0.999, "Adam beta2", resume=True)
    seed: int = _opt(0, "data order, split and adapter init", resume=True)
    remat: bool = _opt(False, "rematerialise each decoder block (less memory)", resume=False)
    dtype: str = _opt("auto", "compute dtype: auto (bf16 on GPU, f32 elsewhere)", resume=True,
                      choices=("auto", "float32", "bfloat16"))
    weak_dtype: str | None = _opt(None, "qeft: the dtype the tuned weak columns are stored in (default: the "
                                  "checkpoint's; float32 keeps a small tuning delta from rounding away)",
                                  resume=True, choices=WEAK_DTYPES)
    lora_rank: int = _opt(64, "lora/qlora adapter rank", resume=True)
    lora_alpha: float = _opt(16.0, "lora/qlora adapter alpha", resume=True)
    save_every: int = _opt(200, "checkpoint every this many steps", resume=False)
    keep: int = _opt(3, "checkpoints kept", resume=False)
    eval_every: int = _opt(200, "held-out loss every this many steps (0: never)", resume=False)
    eval_rows: int = _opt(64, "held-out rows per evaluation", resume=False)
    progress: bool = _opt(True, "show a progress bar", resume=False)
    devices: int = _opt(1, "data parallel + FSDP over this many devices (0 = all, 1 = single device)",
                        resume=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.batch_size <= 0 or self.micro_batch_size <= 0 or self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of "
                             f"micro_batch_size ({self.micro_batch_size})")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.save_every <= 0 or self.keep <= 0:
            raise ValueError("save_every and keep must be positive")
        if self.devices < 0:
            raise ValueError(f"devices must be >= 0 (0 = all), got {self.devices}")


# What the trainer resolves and records beside the config; a rerun must match these too.
RESOLVED_RESUME_KEYS = ("data_sha256", "resolved_lr", "resolved_steps")
# Settings that change what the run computes: a rerun into the same --out must match them.
RESUME_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"]) + RESOLVED_RESUME_KEYS


def compute_dtype(name: str) -> Any:
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return jnp.dtype(name)


def default_lr(method: str, k: int) -> float:
    """qeft: 1e-4 (k < 128) / 5e-5 (k >= 128). The paper's 1e-5 / 5e-6 were set for a full epoch on a
    7B model; on runs of a few hundred steps the sweep in benchmarks/finetune_table.py found 1e-4
    best for k = 16 and k = 64 (held-out loss 2.53 / 2.49 vs 2.76 / 2.67 at 1e-5); the k >= 128
    value keeps the paper's halving. lora/qlora 2e-4, full 1e-5 (the paper's, also best there)."""
    if method == "qeft":
        return 5e-5 if k >= 128 else 1e-4
    return 2e-4 if method in ("lora", "qlora") else 1e-5


def check_method(info: CheckpointInfo, method: str) -> None:
    """The checkpoint is one `method` can train (before anything is loaded)."""
    if method in ("qeft", "qlora") and not info.quantized:
        raise ValueError(f"--method {method} needs a quantized QEFT checkpoint (python -m qeft_jax.quantize); "
                         f"{info.path} is an fp checkpoint")
    if method in ("lora", "full") and info.quantized:
        raise ValueError(f"--method {method} trains the fp model; {info.path} is a quantized checkpoint "
                         f"(use --method qeft or qlora)")
    if method == "qeft" and info.k == 0:
        raise ValueError(f"{info.path} was quantized with k=0 weak columns: nothing to fine-tune")


def param_dtype(method: str, dtype: Any) -> Any:
    """The dtype the model's fp (non-packed) variables are held in for `method`: fp methods export
    every tensor, so lora/full keep the frozen fp params in float32 (none is rounded); qeft/qlora
    hold them (embeddings, norms, lm_head) in the compute dtype."""
    return jnp.float32 if method in ("lora", "full") else dtype


def build_model(model_dir: Path, method: str, *, dtype: Any, lora_rank: int, lora_alpha: float,
                seed: int, mesh: Any = None) -> tuple[nnx.Module, Any, ModelConfig, CheckpointInfo]:
    """(model, tokenizer, config, checkpoint info) for a method: the checkpoint loaded (with a mesh:
    straight into its FSDP layout, each process reading only its slices), with LoRA adapters for
    lora/qlora."""
    check_method(read_info(model_dir), method)
    model, info = load_checkpoint(model_dir, dtype=dtype, param_dtype=param_dtype(method, dtype),
                                  sharding=None if mesh is None else shd.fsdp_layout(mesh))
    if method in ("lora", "qlora"):
        apply_lora(model, lora_rank, lora_alpha, seed)
    return model, tokenization.load_tokenizer(info.path), info.config, info


def split_trainable(model: nnx.Module, method: str) -> tuple[Any, nnx.State, nnx.State]:
    """(graphdef, trainable float32 master copy, frozen)."""
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE[method], ...)
    trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable)
    return graphdef, trainable, frozen


def training_mesh(cfg: TrainConfig) -> Any:
    """The ('data', 'model'=1) mesh for cfg.devices, or None for a single device."""
    if cfg.devices == 1:
        return None
    mesh = shd.make_mesh(data=cfg.devices or None)
    n = shd.data_size(mesh)
    if cfg.micro_batch_size % n:
        raise ValueError(f"micro_batch_size ({cfg.micro_batch_size}) must be a multiple of the {n} devices "
                         f"it is split over (--devices {cfg.devices})")
    return mesh


def place_state(tx: optax.GradientTransformation, trainable: Any, frozen: Any, mesh: Any) -> tuple[Any, Any, Any]:
    """(trainable, optimizer state, frozen), FSDP-sharded over `mesh` (as they are for mesh=None)."""
    if mesh is None:
        return trainable, tx.init(trainable), frozen
    trainable = shd.put_tree(trainable, shd.fsdp_shardings(trainable, mesh))
    frozen = shd.put_tree(frozen, shd.fsdp_shardings(frozen, mesh))
    opt_sh = shd.fsdp_shardings(jax.eval_shape(tx.init, trainable), mesh)
    return trainable, jax.jit(tx.init, out_shardings=opt_sh)(trainable), frozen


def segment_layout(segments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(positions [B, T], visibility [B, T, T]) of packed rows (train.data.pack's segment ids):
    every example starts at position 0 and attends only within itself, exactly as if it had a row
    of its own; padding (segment 0) sees only padding."""
    t = segments.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    positions = idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return positions, segments[:, :, None] == segments[:, None, :]


def target_logprobs(model: nnx.Module, tokens: jax.Array, remat: bool, segments: jax.Array | None = None
                    ) -> jax.Array:
    """log p(next token) [B, T-1] under the model's forward (no cache): causal over the row, or,
    given packed `segments` [B, T], within each example (`segment_layout`)."""
    positions, visible = (None, None) if segments is None else segment_layout(segments)
    h, _ = model.hidden(tokens, attention_mask=visible, positions=positions, remat=remat)
    return model.target_logprobs(h[:, :-1], tokens[:, 1:])[0]


def make_optimizer(lr: float, cfg: TrainConfig) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    if cfg.warmup_steps > 0:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, cfg.warmup_steps),
                                      optax.constant_schedule(lr)], [cfg.warmup_steps])
    else:
        sched = optax.constant_schedule(lr)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     optax.adamw(sched, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=1e-8,
                                 weight_decay=cfg.weight_decay))
    return tx, sched


_STEP_FNS: dict[Any, Any] = {}


def step_fns(graphdef: Any, lr: float, cfg: TrainConfig, mesh: Any = None):
    """Memoised make_step_fns: repeated runs of one model/optimizer in a process reuse the compiled
    step (graph definitions compare by structure)."""
    key = (graphdef, lr, cfg.warmup_steps, cfg.weight_decay, cfg.clip_norm, cfg.adam_b1, cfg.adam_b2, cfg.remat,
           mesh)
    if key not in _STEP_FNS:
        if len(_STEP_FNS) > 8:
            _STEP_FNS.clear()
        _STEP_FNS[key] = make_step_fns(graphdef, make_optimizer(lr, cfg)[0], cfg.remat, mesh)
    return _STEP_FNS[key]


def memory_figures(compiled: Any) -> dict[str, int] | None:
    """XLA's memory figures of a compiled program: arguments, outputs, temporaries and the peak they
    add up to (donated arguments alias outputs); None where the backend reports none."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    m = {"argument_bytes": int(stats.argument_size_in_bytes), "output_bytes": int(stats.output_size_in_bytes),
         "alias_bytes": int(stats.alias_size_in_bytes), "temp_bytes": int(stats.temp_size_in_bytes)}
    m["peak_bytes"] = m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
    return m


def make_step_fns(graphdef: Any, tx: optax.GradientTransformation, remat: bool, mesh: Any = None):
    """(train_step, eval_sums), both jitted. train_step takes micro-batches stacked [A, mb, L]:
    tokens, loss weights and (optionally) packed segment ids.

    With a mesh, the gradient accumulator and the new state are pinned to the FSDP layout of the
    state they come from, so the step maps sharded state to identically sharded state."""
    if mesh is None:
        pin = lambda tree: tree
    else:
        pin = lambda tree: jax.lax.with_sharding_constraint(tree, shd.fsdp_shardings(tree, mesh))

    def loss_sums(trainable, frozen, tokens, weights, segments=None):
        model = nnx.merge(graphdef, trainable, frozen)
        nll = -target_logprobs(model, tokens, remat, segments)
        w = weights[:, 1:]
        return jnp.sum(nll * w), jnp.sum(w)

    def train_step(trainable, opt_state, frozen, tokens, weights, segments=None):
        grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

        def micro(carry, xs):
            g_acc, l_acc, n_acc = carry
            (l, n), g = grad_fn(trainable, frozen, *xs)
            return (pin(jax.tree.map(jnp.add, g_acc, g)), l_acc + l, n_acc + n), None

        init = (pin(jax.tree.map(jnp.zeros_like, trainable)), jnp.float32(0), jnp.float32(0))
        (g, l, n), _ = jax.lax.scan(micro, init, (tokens, weights, segments))
        denom = jnp.maximum(n, 1.0)
        g = jax.tree.map(lambda x: x / denom, g)
        loss = l / denom
        gnorm = optax.tree.norm(g)
        updates, new_opt = tx.update(g, opt_state, trainable)
        new_tr = optax.apply_updates(trainable, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        keep = lambda new, old: jnp.where(ok, new, old)  # a non-finite step leaves the state untouched
        new_tr = pin(jax.tree.map(keep, new_tr, trainable))
        new_opt = pin(jax.tree.map(keep, new_opt, opt_state))
        return new_tr, new_opt, {"loss": loss, "grad_norm": gnorm, "targets": n, "ok": ok}

    return (jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(loss_sums))


# ----------------------------------------------------------------------------------------- data
def prepare_data(cfg: TrainConfig, tokenizer: Any, vocab_size: int) -> tuple[tdata.Packed, tdata.Packed | None]:
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; training needs one (pass --tokenizer DIR)")
    if cfg.data == "builtin":
        examples = tdata.builtin_examples(cfg.tasks, cfg.limit_per_task, cfg.seed)
    else:
        examples = qdata.load_instructions(cfg.data)
    if cfg.val_data:
        train_ex, val_ex = examples, qdata.load_instructions(cfg.val_data)
    else:
        train_ex, val_ex = tdata.split_examples(examples, cfg.val_fraction, cfg.seed)
    pad = tokenization.pad_id(tokenizer)
    train = tdata.pack((tdata.encode_example(tokenizer, e) for e in train_ex), cfg.seq_len, pad)
    val = tdata.pack((tdata.encode_example(tokenizer, e) for e in val_ex), cfg.seq_len, pad) if val_ex else None
    for p in (train, val):
        if p is not None and (p.tokens.min() < 0 or p.tokens.max() >= vocab_size):
            raise ValueError(f"token ids fall outside the model's vocabulary [0, {vocab_size}): "
                             f"is the tokenizer the model's?")
    return train, val


def data_fingerprint(train: tdata.Packed, val: tdata.Packed | None) -> str:
    h = hashlib.sha256()
    for p in (train, val):
        if p is not None:
            for a in (p.tokens, p.response, p.segments):
                h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """Orbax checkpoints of (trainable leaves, optimizer leaves); atomic, last `keep` kept.

    `options`: further `orbax.checkpoint.CheckpointManagerOptions` fields (e.g. a
    `temporary_path_class`); `train()` builds its checkpoints with this class, looked up when it runs."""

    def __init__(self, root: Path, keep: int, **options: Any):
        import orbax.checkpoint as ocp  # imported here: orbax is slow to import and only training needs it

        self._ocp = ocp
        self.mngr = ocp.CheckpointManager(root.resolve(), options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True, **options))  # a save killed midway leaves nothing behind

    def latest(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, trainable: Any, opt_state: Any) -> None:
        if step in self.mngr.all_steps():
            return
        tree = {"trainable": _leaf_dict(trainable), "opt": _leaf_dict(opt_state)}
        self.mngr.save(step, args=self._ocp.args.StandardSave(tree))
        self.mngr.wait_until_finished()

    def restore(self, step: int, trainable: Any, opt_state: Any) -> tuple[Any, Any]:
        abstract = {"trainable": _leaf_dict(trainable, abstract=True), "opt": _leaf_dict(opt_state, abstract=True)}
        got = self.mngr.restore(step, args=self._ocp.args.StandardRestore(abstract))
        return (_from_leaf_dict(trainable, got["trainable"]), _from_leaf_dict(opt_state, got["opt"]))

    def close(self) -> None:
        self.mngr.close()


def _leaf_dict(tree: Any, abstract: bool = False) -> dict[str, Any]:
    leaves = jax.tree.leaves(tree)
    # restoring into the current arrays' shardings lets a run resume on another device count
    f = (lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)) if abstract else (lambda x: x)
    return {f"{i:06d}": f(x) for i, x in enumerate(leaves)}


def _from_leaf_dict(like: Any, d: dict[str, Any]) -> Any:
    treedef = jax.tree.structure(like)
    return jax.tree.unflatten(treedef, [jnp.asarray(d[f"{i:06d}"]) for i in range(treedef.num_leaves)])


# ------------------------------------------------------------------------------------- export
def export(out: Path, method: str, info: CheckpointInfo, model: nnx.Module, lora: tuple[int, float],
           meta: dict[str, Any], weak_dtype: str | None = None) -> None:
    """Write the final loadable checkpoint into `out` (files replaced one by one, config.json last).

    qeft   the source quantized checkpoint with its weak columns replaced (write_quantized), stored
           in `weak_dtype` if given (else the source's)
    full   a plain fp checkpoint (source dtypes)
    lora   a plain fp checkpoint with every adapter merged into its weight
    qlora  the unchanged quantized base + adapter_model.safetensors/adapter_config.json
           (qeft_jax.load_model reads it)
    """
    tmp = out / ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    carried = {**aux_files(info.path), **tokenizer_files(info.path)}
    if method == "qeft":
        tensors = read_tensors(info)
        recipe = dataclasses.replace(info.recipe, weak_dtype=weak_dtype or info.recipe.weak_dtype)
        like = {k: v.astype(STORAGE_DTYPES[recipe.weak_storage]) if k.endswith(".weak") else v
                for k, v in tensors.items()}
        tensors = {**tensors, **trained_tensors(model, TRAINABLE["qeft"], like)}
        write_quantized(tmp, info.config, tensors,
                        {**info.derived_meta(), "recipe": recipe.to_dict(), "finetune": meta}, carried)
    elif method == "qlora":
        for f in (TENSORS_FILE, QUANTIZATION_FILE, CONFIG_FILE):
            shutil.copyfile(info.path / f, tmp / f)
        for n, b in carried.items():
            (tmp / n).write_bytes(b)
        save_adapters(tmp, model, rank=lora[0], alpha=lora[1], meta={"finetune": meta})
    else:
        src = read_tensors(info)
        fp = merged_fp_tensors(model) if method == "lora" else named_variables(model, nnx.Param)
        tensors = {k: np.asarray(v, np.float32).astype(src[k].dtype) for k, v in fp.items()}  # source dtypes
        write_fp(tmp, info.config.to_hf_dict(), tensors, extra_files=carried, extra_json={"finetune.json": meta})
    files = sorted(p.name for p in tmp.iterdir())
    for name in [f for f in files if f != CONFIG_FILE] + [CONFIG_FILE]:
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------- loop
def _check_config(out: Path, record: dict[str, Any]) -> None:
    path = out / "train_config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in RESUME_KEYS if old.get(k) != record.get(k)]
        if diff:
            raise ValueError(f"{out} holds a run with a different configuration ({', '.join(diff)}: "
                             + "; ".join(f"{k} was {old.get(k)!r}, now {record.get(k)!r}" for k in diff[:4])
                             + "); use a new --out or --overwrite")
    elif shd.is_writer():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record, indent=2, sort_keys=True)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop records past `step` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def train(cfg: TrainConfig, *, tokenizer: Any = None, overwrite: bool = False,
          on_step: Callable[[int, dict[str, float]], None] | None = None,
          after_update: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run (or resume, or find complete) the fine-tune described by `cfg`. Returns a summary.

    `tokenizer` overrides the model's own; `on_step(step, metrics)` is called after each step
    (raising KeyboardInterrupt there behaves like Ctrl-C: the state is saved, the run can resume).
    `after_update(step)` is called as soon as step `step`'s update is computed, before it is
    checked, recorded or checkpointed (e.g. to interrupt a run at an exact point).
    """
    out = Path(cfg.out)
    writer = shd.is_writer()  # every process computes; in a multi-process run process 0 alone writes
    if overwrite and out.exists() and writer:
        shutil.rmtree(out)
    shd.sync("qeft-jax: train output prepared")
    model_dir = resolve(cfg.model)
    dtype = compute_dtype(cfg.dtype)
    mesh = training_mesh(cfg)
    model, tok, model_cfg, info = build_model(model_dir, cfg.method, dtype=dtype, lora_rank=cfg.lora_rank,
                                              lora_alpha=cfg.lora_alpha, seed=cfg.seed, mesh=mesh)
    tokenizer = tokenizer if tokenizer is not None else tok
    train_rows, val_rows = prepare_data(cfg, tokenizer, model_cfg.vocab_size)
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.method, info.k)
    steps = cfg.steps or max(1, math.ceil(len(train_rows) * cfg.epochs / cfg.batch_size))
    record = {**dataclasses.asdict(cfg), "model_dir": str(model_dir), "resolved_lr": lr,
              "resolved_steps": steps, "data_sha256": data_fingerprint(train_rows, val_rows),
              "train_rows": len(train_rows), "val_rows": len(val_rows) if val_rows is not None else 0,
              "compute_dtype": jnp.dtype(dtype).name, "backend": jax.default_backend(),
              "jax_version": jax.__version__}
    _check_config(out, record)
    done = out / "train_done.json"
    if done.is_file() and json.loads(done.read_text()).get("step") == steps:
        summary = json.loads(done.read_text())
        if cfg.progress:
            print(f"{out}: already complete ({steps} steps)")
        return summary

    graphdef, trainable, frozen = split_trainable(model, cfg.method)
    tx, sched = make_optimizer(lr, cfg)
    trainable, opt_state, frozen = place_state(tx, trainable, frozen, mesh)
    train_step, eval_sums = step_fns(graphdef, lr, cfg, mesh)
    batch = (lambda x, axis: jnp.asarray(x)) if mesh is None else (lambda x, axis: shd.shard_batch(x, mesh, axis))
    ckpt = Checkpoints(out / "checkpoints", cfg.keep)
    metrics_path = out / "metrics.jsonl"
    start = ckpt.latest() or 0
    if start:
        trainable, opt_state = ckpt.restore(start, trainable, opt_state)
        if writer:
            _trim_metrics(metrics_path, start)
    elif metrics_path.exists() and writer:
        metrics_path.unlink()

    accum = cfg.batch_size // cfg.micro_batch_size
    weights_all = train_rows.loss_weights()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    n_opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(opt_state))

    def evaluate(trainable) -> float:
        rows = val_rows.take(np.arange(min(len(val_rows), cfg.eval_rows)))
        w = rows.loss_weights()
        tot, cnt = 0.0, 0.0
        mb = cfg.micro_batch_size
        for i in range(0, len(rows), mb):
            parts = [rows.tokens[i:i + mb], w[i:i + mb], rows.segments[i:i + mb]]
            if len(parts[0]) < mb:  # keep one compiled shape: pad with zero-weight rows
                parts = [np.concatenate([x, np.zeros((mb - len(x), x.shape[1]), x.dtype)]) for x in parts]
            s, c = eval_sums(trainable, frozen, *(batch(x, 0) for x in parts))
            tot, cnt = tot + float(s), cnt + float(c)
        return tot / max(cnt, 1.0)

    bar = tqdm(total=steps, initial=start, desc=f"train ({cfg.method})", disable=not cfg.progress,
               dynamic_ncols=True)
    step = start
    last_loss = float("nan")
    step_times: list[float] = []
    step_memory: dict[str, int] | None = None
    t_run = time.time()
    try:
        with open(metrics_path if writer else os.devnull, "a") as mf:
            if start == 0 and val_rows is not None and cfg.eval_every:
                mf.write(json.dumps({"step": 0, "eval_loss": evaluate(trainable)}) + "\n")  # the baseline
            while step < steps:
                idx = tdata.rows_for_step(len(train_rows), cfg.batch_size, cfg.seed, step)
                shape = (accum, cfg.micro_batch_size, cfg.seq_len)
                tokens = train_rows.tokens[idx].reshape(shape)
                weights = weights_all[idx].reshape(shape)
                segments = train_rows.segments[idx].reshape(shape)
                t0 = time.time()
                args = (batch(tokens, 1), batch(weights, 1), batch(segments, 1))
                trainable, opt_state, m = train_step(trainable, opt_state, frozen, *args)
                loss, gnorm, ok = float(m["loss"]), float(m["grad_norm"]), bool(m["ok"])
                dt = time.time() - t0
                if after_update is not None:
                    after_update(step + 1)
                if not ok:
                    ckpt.save(step, trainable, opt_state)  # the state before this step: still good
                    raise NonFiniteLoss(
                        f"non-finite loss ({loss}) or gradient norm ({gnorm}) at step {step + 1}; stopped. "
                        f"The last good state (after step {step}) is saved in {out / 'checkpoints'}; "
                        f"lower the learning rate or check the data, then rerun into a new --out")
                if step == start:  # the step just run is compiled: lowering it again costs nothing
                    step_memory = memory_figures(train_step.lower(trainable, opt_state, frozen, *args).compile())
                step_times.append(dt)
                step += 1
                last_loss = loss
                rec = {"step": step, "loss": loss, "grad_norm": gnorm, "lr": float(sched(step - 1)),
                       "targets": int(m["targets"]), "tokens": int(tokens.size), "step_s": round(dt, 4),
                       "tok_per_s": round(tokens.size / dt, 1)}
                if val_rows is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == steps):
                    rec["eval_loss"] = evaluate(trainable)
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tok_per_s']:.0f}",
                                **({"eval": f"{rec['eval_loss']:.4f}"} if "eval_loss" in rec else {}))
                bar.update(1)
                if step % cfg.save_every == 0 or step == steps:
                    ckpt.save(step, trainable, opt_state)
                if on_step is not None:
                    on_step(step, rec)
    except KeyboardInterrupt:
        ckpt.save(step, trainable, opt_state)
        ckpt.close()
        bar.close()
        raise
    bar.close()
    ckpt.close()

    # the f32 master copy goes to the exporter as is (export rounds it to the stored dtype once)
    nnx.update(model, jax.tree.map(lambda t: jnp.asarray(shd.to_host(t), jnp.float32), trainable))
    if cfg.method == "lora":  # the exporter merges the adapters into the (sharded) frozen base weights
        nnx.update(model, jax.tree.map(shd.to_host, frozen))
    meta = {"method": cfg.method, "steps": steps, "lr": lr, "seed": cfg.seed, "data": cfg.data,
            "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "base": str(model_dir)}
    if writer:
        export(out, cfg.method, info, model, (cfg.lora_rank, cfg.lora_alpha), meta, cfg.weak_dtype)
    summary = {"step": steps, "method": cfg.method, "final_loss": last_loss, "trainable_params": n_params,
               "optimizer_state_elems": n_opt, "train_rows": len(train_rows), "seconds_this_run":
               round(time.time() - t_run, 2), "out": str(out),
               # medians over this process's steps, the first (compiling) one excluded where there are more
               "step_s_median": float(np.median(step_times[1:] or step_times)) if step_times else None,
               "step_memory": step_memory, "checkpoint_bytes_read": info.bytes_read}
    if writer:
        write_json_atomic(done, summary, indent=2)
    return summary
