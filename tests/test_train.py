"""Fine-tuning: weak-column-only training, masking, packing, resume, baselines and merging (CPU, tiny)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qeft_jax import tokenization
from qeft_jax.io import SafetensorsReader
from train import data as tdata

VOCAB = 101  # the gqa_untied tiny model


class StubTokenizer:
    """Characters -> ids in [3, VOCAB); bos 1, eos 2, pad 0. Optionally a fake chat template."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, chat: bool = False):
        self.chat_template = "stub" if chat else None

    def encode(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % (VOCAB - 3)) for c in text]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def apply_chat_template(self, msgs, add_generation_prompt=False, tokenize=False):
        s = "".join(f"<{m['role']}>{m['content']}</>" for m in msgs)
        return s + ("<assistant>" if add_generation_prompt else "")


def examples(n: int = 24) -> list[dict[str, str]]:
    words = ["cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird"]
    out = []
    for i in range(n):
        w = words[i % len(words)]
        out.append({"instruction": f"Repeat {i % 5}", "input": w if i % 2 else "", "output": w * 2})
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_tensors(d: Path) -> dict[str, np.ndarray]:
    r = SafetensorsReader([d / "model.safetensors"])
    return {k: r.get(k) for k in r.keys()}


def trained_leaves(out: Path, step: int | None = None) -> tuple[int, list[np.ndarray]]:
    """(step, trainable leaves in tree order) of a run's latest (or given) orbax checkpoint, read with
    orbax directly (train.trainer.Checkpoints saves {"trainable": {"000000": leaf, ...}, "opt": ...})."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager((Path(out) / "checkpoints").resolve())
    try:
        step = mngr.latest_step() if step is None else step
        assert step is not None, f"{out} has no training checkpoint"
        got = mngr.restore(step, args=ocp.args.StandardRestore())
    finally:
        mngr.close()
    t = got["trainable"]
    return step, [np.asarray(t[k]) for k in sorted(t)]


@pytest.fixture(scope="module")
def qdirs(converted, tmp_path_factory):
    """(fp dir, quantized qeft dir) of the gqa_untied tiny model."""
    from qeft_jax.quant.pipeline import quantize_checkpoint
    from qeft_jax.recipes import make_recipe

    src = Path(converted["gqa_untied"])
    out = tmp_path_factory.mktemp("q") / "qeft"
    ids = np.random.default_rng(0).integers(0, VOCAB, (4, 32))
    quantize_checkpoint(src, out, make_recipe("qeft", bits=4, group_size=32, k=8), ids, progress=False)
    return src, out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", examples())


def cfg_for(model, out, data, **kw):
    from train.trainer import TrainConfig

    base = dict(model=str(model), out=str(out), data=str(data), seq_len=48, batch_size=4,
                micro_batch_size=2, steps=4, lr=3e-2, save_every=100, eval_every=2, eval_rows=4,
                val_fraction=0.1, lora_rank=4, progress=False)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------- data
def test_response_only_masking():
    tok = StubTokenizer()
    ex = {"instruction": "Say hi", "input": "", "output": "hi"}
    ids, mask = tdata.encode_example(tok, ex)
    prompt = tok.encode(tokenization.ALPACA_PROMPT.format(instruction="Say hi"), add_special_tokens=True)
    assert ids.tolist() == prompt + tok.encode("hi", add_special_tokens=False) + [2]
    assert not mask[:len(prompt)].any() and mask[len(prompt):].all()
    # chat template: the response is what the full conversation adds after the generation prompt
    chat = StubTokenizer(chat=True)
    ids, mask = tdata.encode_example(chat, {"instruction": "Q", "input": "ctx", "output": "A"})
    p = chat.encode("<user>Q\n\nctx</><assistant>", add_special_tokens=False)
    assert ids.tolist() == p + chat.encode("A</>", add_special_tokens=False)
    assert mask.tolist() == [False] * len(p) + [True] * 4
    # loss weights: targets are response tokens; none at position 0
    packed = tdata.pack([(ids, mask)], 40, 0)
    w = packed.loss_weights()[0]
    assert w.tolist() == [0.0] * len(p) + [1.0] * 4 + [0.0] * (40 - len(ids))


def test_packing():
    tok = StubTokenizer()
    enc = [tdata.encode_example(tok, e) for e in examples(12)]
    seq = 600
    packed = tdata.pack(enc, seq, 0)
    assert packed.tokens.shape[1] == seq and len(packed) < len(enc)
    # every example appears exactly once, contiguous, with its own mask
    found = []
    for r in range(len(packed)):
        for s in range(1, packed.segments[r].max() + 1):
            where = np.flatnonzero(packed.segments[r] == s)
            assert np.all(np.diff(where) == 1)
            found.append((packed.tokens[r, where].tolist(), packed.response[r, where].tolist()))
    assert sorted(found) == sorted((i.tolist(), m.tolist()) for i, m in enc)
    assert np.all(packed.tokens[packed.segments == 0] == 0) and not packed.response[packed.segments == 0].any()
    # weights never connect two examples: each weighted target's predecessor is in the same segment
    w = packed.loss_weights()
    rr, tt = np.nonzero(w)
    assert np.all(packed.segments[rr, tt] == packed.segments[rr, tt - 1])
    assert w.sum() == sum(int(m[1:].sum()) for _, m in enc)
    # deterministic; truncation to seq_len
    again = tdata.pack(enc, seq, 0)
    assert np.array_equal(again.tokens, packed.tokens)
    longest = max(len(i) for i, _ in enc)
    short = tdata.pack(enc, longest - 2, 0)  # truncated, still with response targets
    assert short.tokens.shape[1] == longest - 2 and short.loss_weights().sum() < w.sum()
    # the data order is a pure function of (seed, step) and covers each epoch once
    a = np.concatenate([tdata.rows_for_step(10, 5, 3, s) for s in range(4)])
    assert sorted(a[:10].tolist()) == list(range(10)) and sorted(a[10:].tolist()) == list(range(10))
    assert np.array_equal(tdata.rows_for_step(10, 5, 3, 2), a[10:15])
    assert not np.array_equal(tdata.rows_for_step(10, 5, 4, 0), a[:5])


def test_load_instructions_errors(tmp_path):
    from qeft_jax.data import load_instructions

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x"}])
    with pytest.raises(ValueError, match="output"):
        load_instructions(bad)
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"instruction": "x", "output": "y", "input": None}])
    assert load_instructions(ok) == [{"instruction": "x", "input": "", "output": "y"}]


# ----------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def qeft_run(qdirs, data_file, tmp_path_factory):
    from train.trainer import train

    _, q = qdirs
    out = tmp_path_factory.mktemp("runs") / "qeft"
    summary = train(cfg_for(q, out, data_file, steps=6, save_every=3), tokenizer=StubTokenizer(chat=True))
    return out, summary


def test_qeft_trains_only_weak_columns(qdirs, qeft_run):
    from qeft_jax.load import load_model

    _, q = qdirs
    out, summary = qeft_run
    before, after = read_tensors(q), read_tensors(out)
    assert before.keys() == after.keys()
    weak = [k for k in before if k.endswith(".weak")]
    assert len(weak) == 2 * 7
    for k in before:
        if k.endswith(".weak"):
            continue
        assert before[k].dtype == after[k].dtype and np.array_equal(before[k], after[k]), k
    assert sum(not np.array_equal(before[k], after[k]) for k in weak) == len(weak)
    from qeft_jax.checkpoint import OWN_FILES

    carried = [f.name for f in q.iterdir() if f.is_file() and f.name not in OWN_FILES]
    assert all((out / n).read_bytes() == (q / n).read_bytes() for n in carried)  # e.g. selection.safetensors
    model, _, _ = load_model(out)  # the output is a loadable quantized checkpoint
    logits = model(jnp.zeros((1, 5), jnp.int32))
    assert logits.shape == (1, 5, VOCAB) and bool(jnp.all(jnp.isfinite(logits)))
    assert summary["trainable_params"] == sum(before[k].size for k in weak)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # step 0 is the held-out baseline before any update
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4, 5, 6] and "eval_loss" in lines[0]
    assert "loss" not in lines[0] and "eval_loss" in lines[2]
    assert json.loads((out / "train_config.json").read_text())["method"] == "qeft"


def test_weak_dtype_float32_keeps_a_small_delta(qdirs, data_file, tmp_path):
    """At a small LR the tuning delta is below fp16's spacing of the weak values: stored in fp16 it
    rounds back to the base, stored in float32 (--weak-dtype float32) it survives and loads."""
    from qeft_jax.checkpoint import read_info
    from qeft_jax.load import load_model
    from train.trainer import train

    _, q = qdirs
    out = tmp_path / "f32"
    train(cfg_for(q, out, data_file, steps=2, lr=1e-6, weak_dtype="float32"), tokenizer=StubTokenizer(chat=True))
    before, after = read_tensors(q), read_tensors(out)
    weak = [k for k in before if k.endswith(".weak")]
    assert all(after[k].dtype == np.float32 for k in weak) and read_info(out).recipe.weak_dtype == "float32"
    moved = np.mean([np.mean(after[k] != before[k].astype(np.float32)) for k in weak])
    kept_in_fp16 = np.mean([np.mean(after[k].astype(np.float16) != before[k]) for k in weak])
    assert moved > 0.9 and kept_in_fp16 < 0.5 * moved, (moved, kept_in_fp16)
    model, _, _ = load_model(out)
    assert model.model.layers[0].mlp.down_proj.weak[...].dtype == jnp.float32
    for k in before:  # everything but the weak columns is the base, bit for bit
        if not k.endswith(".weak"):
            assert np.array_equal(before[k], after[k]), k


def test_gradients_and_optimizer_state_only_for_weak_columns(qdirs):
    from qeft_jax.qlinear import WeakColumns
    from train.trainer import TrainConfig, build_model, make_optimizer, split_trainable

    _, q = qdirs
    model, _, _, _ = build_model(q, "qeft", dtype=jnp.float32, lora_rank=4, lora_alpha=8, seed=0)
    graphdef, trainable, frozen = split_trainable(model, "qeft")
    weak = nnx_flat(trainable)
    assert weak and all(k.endswith(".weak") for k in weak)
    is_weak = lambda x: isinstance(x, WeakColumns)
    assert all(is_weak(v) for v in jax.tree.leaves(trainable, is_leaf=is_weak))
    assert not any(k.endswith(".weak") for k in nnx_flat(frozen))
    tx, _ = make_optimizer(1e-3, TrainConfig(model="", out=""))
    opt = tx.init(trainable)
    shapes = sorted(x.shape for x in jax.tree.leaves(opt) if x.ndim)
    assert shapes == sorted([v.shape for v in weak.values()] * 2)  # Adam mu and nu, nothing else
    assert sum(x.size for x in jax.tree.leaves(opt) if x.ndim == 0) <= 2  # step counters


def nnx_flat(state) -> dict:
    from flax import nnx

    return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def test_loss_decreases_on_overfit(qdirs, tmp_path):
    from train.trainer import train

    _, q = qdirs
    data = write_jsonl(tmp_path / "tiny.jsonl", examples(4))
    out = tmp_path / "overfit"
    train(cfg_for(q, out, data, steps=25, val_fraction=0.0), tokenizer=StubTokenizer(chat=True))
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(losses[-3:]) < losses[0] - 0.5, losses


def test_resume_is_bit_identical(qdirs, data_file, qeft_run, tmp_path):
    from train.trainer import train

    _, q = qdirs
    tok = StubTokenizer(chat=True)
    straight, _ = qeft_run  # the same config run straight through

    resumed = tmp_path / "resumed"
    cfg = cfg_for(q, resumed, data_file, steps=6, save_every=3)

    def interrupt(step, rec):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tokenizer=tok, on_step=interrupt)
    assert not (resumed / "train_done.json").exists()
    assert trained_leaves(resumed)[0] == 4  # state saved on interrupt
    train(cfg, tokenizer=tok)
    s1, a = trained_leaves(straight)
    s2, b = trained_leaves(resumed)
    assert s1 == s2 == 6
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    ta, tb = read_tensors(straight), read_tensors(resumed)
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    ma = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in ma] == [r.get("loss") for r in mb]
    assert [r.get("eval_loss") for r in ma] == [r.get("eval_loss") for r in mb]
    # a finished run is found complete; a different config into the same out is refused
    assert train(cfg, tokenizer=tok)["step"] == 6
    with pytest.raises(ValueError, match="different configuration"):
        train(cfg_for(q, resumed, data_file, steps=6, save_every=3, seed=1), tokenizer=tok)


def test_nonfinite_loss_stops_and_keeps_state(qdirs, data_file, tmp_path):
    from qeft_jax.checkpoint import read_info, read_tensors, tokenizer_files, write_quantized
    from qeft_jax.io import atomic_dir
    from train.trainer import NonFiniteLoss, train

    _, q = qdirs
    info = read_info(q)
    t = dict(read_tensors(info))
    t["model.layers.1.mlp.down_proj.weak"] = np.full_like(t["model.layers.1.mlp.down_proj.weak"], np.inf)
    bad = tmp_path / "bad"
    with atomic_dir(bad) as tmp:
        write_quantized(tmp, info.config, t, info.derived_meta(), tokenizer_files(q))
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match="non-finite"):
        train(cfg_for(bad, out, data_file, steps=3), tokenizer=StubTokenizer(chat=True))
    step, _ = trained_leaves(out)
    assert step == 0 and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_baselines_change_only_their_params(method, qdirs, data_file, tmp_path):
    from qeft_jax import load_model
    from qeft_jax.lora import ADAPTER_FILE, LoRALinear
    from train.trainer import train

    fp, q = qdirs
    src = q if method == "qlora" else fp
    out = tmp_path / method
    summary = train(cfg_for(src, out, data_file, steps=2, method=method, lr=1e-3), tokenizer=StubTokenizer(chat=True))
    before, after = read_tensors(src), read_tensors(out)
    assert before.keys() == after.keys()
    mem = summary["step_memory"]  # the compiled step's arguments hold f32 params + Adam's two moments
    assert mem["argument_bytes"] >= 12 * summary["trainable_params"] and mem["temp_bytes"] > 0
    assert summary["step_s_median"] > 0
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    linears = {k for k in before if k.startswith("model.layers.") and "_proj.weight" in k}
    if method == "qlora":
        assert not changed  # the 4-bit base and its weak columns stay frozen
        ad = SafetensorsReader([out / ADAPTER_FILE])
        bs = [ad.get(k) for k in ad.keys() if k.endswith("lora_B")]
        assert len(bs) == 14 and all(np.abs(b).max() > 0 for b in bs)
        model, _, _ = load_model(out)  # the QLoRA output loads with its adapters
        assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
        ids = jnp.arange(1, 9, dtype=jnp.int32)[None]
        tuned, base = model(ids), load_model(q)[0](ids)
        assert bool(jnp.all(jnp.isfinite(tuned))) and float(jnp.max(jnp.abs(tuned - base))) > 1e-4
        assert summary["trainable_params"] == sum(ad.get(k).size for k in ad.keys())
    elif method == "lora":
        assert changed == linears  # adapters merged into the linears only
    else:
        assert linears <= changed and "model.embed_tokens.weight" in changed


# -------------------------------------------------------------------------------------- merge
def test_merge_into_base_reproduces_tuned(qdirs, qeft_run, tmp_path):
    from qeft_jax.merge import main

    _, q = qdirs
    tuned, _ = qeft_run
    out = tmp_path / "merged_q"
    main(["--tuned", str(tuned), "--base", str(q), "--target", str(q), "--out", str(out)])
    a, b = read_tensors(tuned), read_tensors(out)
    assert a.keys() == b.keys()
    for k in a:  # bit for bit (signed zeros too)
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert (tuned / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_merge_into_fp_target_changes_exactly_weak_columns(qdirs, qeft_run, tmp_path):
    from qeft_jax.checkpoint import layer_perms, read_info
    from qeft_jax.spec import linear_axis_perms
    from train.merge import merge

    fp, q = qdirs
    tuned, _ = qeft_run
    out = tmp_path / "merged_fp"
    merge(tuned, q, fp, out)
    before, after, tq, bq = read_tensors(fp), read_tensors(out), read_tensors(tuned), read_tensors(q)
    cfg = read_info(q).config
    assert before.keys() == after.keys()
    for k in before:
        if not (k.startswith("model.layers.") and k.endswith("_proj.weight")):
            assert np.array_equal(before[k], after[k]), k
            continue
        i, name = int(k.split(".")[2]), k.split(".", 3)[3][: -len(".weight")]
        p = f"model.layers.{i}.{name}"
        rows, cols = linear_axis_perms(name, layer_perms(bq, i), cfg)
        weak_orig = cols[bq[p + ".weak_idx"]]
        diff = after[k].astype(np.float64) - before[k].astype(np.float64)
        mask = np.zeros(before[k].shape, bool)
        mask[:, weak_orig] = True
        assert not np.any(diff[~mask]), k  # nothing outside the weak columns moves
        delta = tq[p + ".weak"].astype(np.float64) - bq[p + ".weak"].astype(np.float64)
        expect = np.zeros_like(diff)
        expect[np.ix_(rows, weak_orig)] = delta
        np.testing.assert_allclose(diff, expect, atol=1e-6, rtol=1e-5)
        assert np.count_nonzero(diff) > 0.9 * delta.size


def test_remat_matches_plain_step(qdirs):
    from train.trainer import TrainConfig, build_model, make_optimizer, make_step_fns, split_trainable

    _, q = qdirs
    model, _, _, _ = build_model(q, "qeft", dtype=jnp.float32, lora_rank=4, lora_alpha=8, seed=0)
    graphdef, trainable, frozen = split_trainable(model, "qeft")
    tx, _ = make_optimizer(1e-3, TrainConfig(model="", out=""))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 1, 16)), jnp.int32)
    weights = jnp.ones(tokens.shape, jnp.float32)
    outs = []
    for remat in (False, True):
        step, _ = make_step_fns(graphdef, tx, remat)
        tr = jax.tree.map(jnp.copy, trainable)
        new, _, m = step(tr, tx.init(tr), frozen, tokens, weights)
        outs.append((float(m["loss"]), jax.tree.leaves(new)))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-6)
    for a, b in zip(outs[0][1], outs[1][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6)  # Adam step ~ lr = 1e-3


def test_packed_row_equals_examples_alone(qdirs):
    """A packed row's loss and weak-column gradient equal the sums over its examples, each run in a
    row of its own (positions from 0, no attention across examples)."""
    from train.trainer import TrainConfig, build_model, make_optimizer, make_step_fns, split_trainable

    _, q = qdirs
    tok = StubTokenizer(chat=True)
    enc = [tdata.encode_example(tok, e) for e in examples(3)]
    seq = sum(len(i) for i, _ in enc) + 5
    packed = tdata.pack(enc, seq, 0)
    assert len(packed) == 1 and packed.segments.max() == 3  # all three in one row, then padding
    w = packed.loss_weights()
    model, _, _, _ = build_model(q, "qeft", dtype=jnp.float32, lora_rank=4, lora_alpha=8, seed=0)
    graphdef, trainable, frozen = split_trainable(model, "qeft")
    _, loss_sums = make_step_fns(graphdef, make_optimizer(1e-3, TrainConfig(model="", out=""))[0], False)
    grad = jax.grad(lambda tr, *a: loss_sums(tr, frozen, *a)[0])

    got = loss_sums(trainable, frozen, packed.tokens, w, packed.segments)
    got_g = grad(trainable, packed.tokens, w, packed.segments)
    want, want_n, want_g = 0.0, 0.0, None
    for s in range(1, 4):
        cols = np.flatnonzero(packed.segments[0] == s)
        t = np.zeros((1, seq), np.int32)
        ww = np.zeros((1, seq), np.float32)
        t[0, :len(cols)], ww[0, :len(cols)] = packed.tokens[0, cols], w[0, cols]
        l, n = loss_sums(trainable, frozen, t, ww)  # no segments: a plain causal row
        want, want_n = want + float(l), want_n + float(n)
        g = grad(trainable, t, ww)
        want_g = g if want_g is None else jax.tree.map(jnp.add, want_g, g)
    assert float(got[1]) == want_n == w.sum()
    assert float(got[0]) == pytest.approx(want, rel=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
    # the old whole-row causal attention gives a different loss: the test can tell them apart
    plain = float(loss_sums(trainable, frozen, packed.tokens, w)[0])
    assert abs(plain - want) > 1e-3 * abs(want)


@pytest.mark.parametrize("remat", [False, True])
def test_chunked_attention_matches_whole_on_packed_rows(qdirs, remat):
    """The trainer's loss over packed rows (per-example positions and block-diagonal masks, padding)
    and its weak-column gradient are the same with query-chunked attention and chunked logits as
    with whole attention and whole logits."""
    from train.trainer import build_model, segment_layout, split_trainable

    _, q = qdirs
    tok = StubTokenizer(chat=True)
    enc = [tdata.encode_example(tok, e) for e in examples(5)]
    seq = (sum(len(i) for i, _ in enc[:3]) + 5) | 1  # odd length, up to three examples per row, padded ends
    packed = tdata.pack(enc, seq, 0)
    assert len(packed) >= 2 and packed.segments.max() >= 2 and (packed.segments == 0).any()
    tokens, w = jnp.asarray(packed.tokens), jnp.asarray(packed.loss_weights())
    positions, visible = segment_layout(jnp.asarray(packed.segments))
    model, _, _, _ = build_model(q, "qeft", dtype=jnp.float32, lora_rank=4, lora_alpha=8, seed=0)
    graphdef, trainable, frozen = split_trainable(model, "qeft")

    def loss(tr, chunk):
        m = nnx.merge(graphdef, tr, frozen)
        h, _ = m.hidden(tokens, attention_mask=visible, positions=positions, remat=remat, attn_chunk=chunk)
        return -jnp.sum(m.target_logprobs(h[:, :-1], tokens[:, 1:], chunk=chunk)[0] * w[:, 1:])

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l, g), (l_ref, g_ref) = grad(trainable, 7), grad(trainable, 1 << 20)
    assert float(l) == pytest.approx(float(l_ref), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
