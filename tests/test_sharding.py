"""Data-parallel calibration over a device mesh matches the single-device run.

The multi-device checks need XLA_FLAGS=--xla_force_host_platform_device_count=4 before JAX starts,
so they run in a subprocess that prints JSON; the pytest process itself keeps its single device.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
N_DEV = 4

# Runs with 4 fake CPU devices: run_block (single device vs mesh) on a real tiny block, then a whole
# quantization twice (mesh=None and mesh over 4 devices) into argv[2]/single and argv[2]/mesh.
CHILD = textwrap.dedent(r"""
    import json, sys, time
    T0 = time.time()
    from pathlib import Path
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from flax import nnx
    from qeft_jax.config import ModelConfig
    from qeft_jax.io import SafetensorsReader
    from qeft_jax.model import rope_inv_freq
    from qeft_jax.quant import calibrate
    from qeft_jax.quant.calibrate import build_layer, run_block
    from qeft_jax.quant.pipeline import _read_layer, quantize_checkpoint
    from qeft_jax.recipes import make_recipe
    from qeft_jax import sharding as shd

    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    res = {"devices": len(jax.devices())}
    mesh = shd.make_mesh()
    res["mesh"] = {k: int(v) for k, v in mesh.shape.items()}
    cfg = ModelConfig.from_json_file(src / "config.json")
    layer = build_layer(cfg, 0, _read_layer(SafetensorsReader([src / "model.safetensors"]), cfg, 0, {}))
    x = np.random.default_rng(1).standard_normal((10, 16, cfg.hidden_size)).astype(np.float32)

    def rel(a, b):
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    checks = []
    for stats in ("diag", "full"):
        y1, y4 = np.empty_like(x), np.empty_like(x)
        h1 = run_block(layer, x, cfg, batch_size=4, stats=stats, out=y1)
        for bs in (4, 3, 1):  # 10 = 4+4+2 (padded), 3 -> rounded up to 4, 1 -> 4
            y4[:] = np.nan  # every row must be written
            h4 = run_block(layer, x, cfg, batch_size=bs, stats=stats, mesh=mesh, out=y4)
            assert h4.keys() == h1.keys()
            checks.append({"stats": stats, "batch": bs, "y_rel": rel(y4, y1),
                           "h_rel": max(rel(h4[k], h1[k]) for k in h1),
                           "h_close": all(bool(np.allclose(h4[k], h1[k], rtol=1e-5, atol=1e-6 * np.abs(h1[k]).max()))
                                          for k in h1),
                           "y_close": bool(np.allclose(y4, y1, rtol=1e-5, atol=1e-5 * np.abs(y1).max()))})
    res["run_block"] = checks

    # the compiled sharded pass really splits the batch and all-reduces the Hessians
    graphdef, state = nnx.split(layer)
    rep = shd.replicated(mesh)
    xb, w = shd.shard_batch(x[:4], mesh), shd.shard_batch(np.ones(4, np.float32), mesh)
    comp = calibrate._run_block.lower(graphdef, jax.device_put(state, rep), xb,
                                      jax.device_put(rope_inv_freq(cfg), rep), "full", w,
                                      (shd.data_sharding(mesh), rep)).compile()
    y, h = comp(jax.device_put(state, rep), xb, jax.device_put(rope_inv_freq(cfg), rep), w)
    res["all_reduce_in_hlo"] = "all-reduce" in comp.as_text()
    res["x_shards"] = len(xb.addressable_shards)
    res["x_shard_rows"] = sorted({s.data.shape[0] for s in xb.addressable_shards})
    res["h_replicated"] = all(v.sharding.is_fully_replicated for v in h.values())
    res["y_spec_0"] = y.sharding.spec[0]  # the batch axis of the block output

    calib = np.random.default_rng(0).integers(0, cfg.vocab_size, (10, 32))
    recipe = make_recipe("qeft", bits=4, group_size=16, k=4)
    for name, m in (("single", None), ("mesh", mesh)):  # results under quant_single, quant_mesh
        t = time.time()
        s = quantize_checkpoint(src, out / name, recipe, calib, batch_size=4, progress=False, mesh=m)
        res["quant_" + name] = {"global_weak_index": s["global_weak_index"], "seconds": time.time() - t}
    res["child_seconds"] = time.time() - T0
    print("RESULT " + json.dumps(res))
""")


@pytest.fixture(scope="module")
def child(converted, tmp_path_factory):
    src = converted["mha_tied"]
    out = tmp_path_factory.mktemp("sharding")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={N_DEV}"}
    p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return src, out, json.loads(line[len("RESULT "):])


def test_mesh_really_spans_four_devices(child):
    _, _, res = child
    print("child timings:", res["child_seconds"], res["quant_single"]["seconds"], res["quant_mesh"]["seconds"],
          [(c["stats"], c["batch"], c["y_rel"], c["h_rel"]) for c in res["run_block"]])
    assert res["devices"] == N_DEV and res["mesh"] == {"data": N_DEV, "model": 1}
    assert res["x_shards"] == N_DEV and res["x_shard_rows"] == [1]  # a batch of 4 -> 1 sequence each
    assert res["all_reduce_in_hlo"] and res["h_replicated"]
    assert res["y_spec_0"] == "data"


def test_sharded_run_block_matches_single_device(child):
    _, _, res = child
    for c in res["run_block"]:
        assert c["y_close"] and c["h_close"], c
        assert c["y_rel"] < 1e-5 and c["h_rel"] < 1e-5, c


def test_sharded_quantization_matches_single_device(child):
    from safetensors.numpy import load_file

    from qeft_jax import load_model
    from qeft_jax.packing import unpack_codes

    src, out, res = child
    assert res["mesh"]["data"] == N_DEV
    assert res["quant_single"]["global_weak_index"] == res["quant_mesh"]["global_weak_index"]
    a, b = load_file(out / "single" / "model.safetensors"), load_file(out / "mesh" / "model.safetensors")
    assert a.keys() == b.keys()
    bits = 4
    same = total = 0
    for k in a:
        if k.endswith(".qweight"):  # padding fields of the last word are 0 in both
            ca = np.asarray(unpack_codes(jnp.asarray(a[k]), bits, a[k].shape[1] * 32 // bits))
            cb = np.asarray(unpack_codes(jnp.asarray(b[k]), bits, b[k].shape[1] * 32 // bits))
            same += int((ca == cb).sum())
            total += ca.size
        elif a[k].dtype.kind in "iu" or k.endswith("perm"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # weak_idx, permutations
    print("codes equal:", same, "/", total)
    assert total > 0 and same / total >= 0.999, (same, total)

    cfg = json.loads((src / "config.json").read_text())
    ids = jnp.asarray(np.random.default_rng(5).integers(0, cfg["vocab_size"], (2, 24)))
    la = np.asarray(load_model(out / "single")[0](ids), np.float64)
    lb = np.asarray(load_model(out / "mesh")[0](ids), np.float64)
    print("logits rel diff:", np.linalg.norm(lb - la) / np.linalg.norm(la), np.abs(lb - la).max())
    assert np.linalg.norm(lb - la) / np.linalg.norm(la) < 1e-3


# ---------------------------------------------------------------- in-process (one device)

def test_padding_weights_drop_copies(converted):
    """A batch padded with zero-weighted copies gives the statistics of the unpadded batch."""
    from flax import nnx

    from qeft_jax.config import ModelConfig
    from qeft_jax.io import SafetensorsReader
    from qeft_jax.model import rope_inv_freq
    from qeft_jax.quant.calibrate import _run_block, build_layer
    from qeft_jax.quant.pipeline import _read_layer

    src = converted["mha_tied"]
    cfg = ModelConfig.from_json_file(src / "config.json")
    layer = build_layer(cfg, 1, _read_layer(SafetensorsReader([src / "model.safetensors"]), cfg, 1, {}))
    graphdef, state = nnx.split(layer)
    x = np.random.default_rng(2).standard_normal((3, 8, cfg.hidden_size)).astype(np.float32)
    padded = np.concatenate([x, x[:1]])
    inv = jnp.asarray(rope_inv_freq(cfg))
    for stats in ("diag", "full"):
        y, h = _run_block(graphdef, state, jnp.asarray(x), inv, stats)
        yp, hp = _run_block(graphdef, state, jnp.asarray(padded), inv, stats, jnp.asarray([1.0, 1, 1, 0]))
        np.testing.assert_allclose(np.asarray(yp)[:3], np.asarray(y), rtol=1e-6, atol=1e-6)
        for k in h:
            np.testing.assert_allclose(np.asarray(hp[k]), np.asarray(h[k]), rtol=1e-5,
                                       atol=1e-6 * float(np.abs(h[k]).max()))


def test_one_device_mesh_matches_plain(converted):
    from qeft_jax.config import ModelConfig
    from qeft_jax.io import SafetensorsReader
    from qeft_jax.quant.calibrate import build_layer, run_block
    from qeft_jax.quant.pipeline import _read_layer
    from qeft_jax.sharding import make_mesh

    src = converted["gqa_untied"]
    cfg = ModelConfig.from_json_file(src / "config.json")
    layer = build_layer(cfg, 0, _read_layer(SafetensorsReader([src / "model.safetensors"]), cfg, 0, {}))
    x = np.random.default_rng(3).standard_normal((5, 8, cfg.hidden_size)).astype(np.float32)
    y, ym = np.empty_like(x), np.empty_like(x)
    h = run_block(layer, x, cfg, batch_size=2, stats="full", out=y)
    hm = run_block(layer, x, cfg, batch_size=2, stats="full", mesh=make_mesh(devices=jax.devices()[:1]), out=ym)
    np.testing.assert_allclose(ym, y, rtol=1e-6, atol=1e-6)
    for k in h:
        np.testing.assert_allclose(hm[k], h[k], rtol=1e-5, atol=1e-7)


def test_make_mesh_validates():
    from qeft_jax.sharding import data_sharding, make_mesh, replicated

    n = len(jax.devices())
    mesh = make_mesh()
    assert mesh.shape == {"data": n, "model": 1}
    assert data_sharding(mesh).spec == jax.sharding.PartitionSpec("data")
    assert replicated(mesh).is_fully_replicated
    with pytest.raises(ValueError):
        make_mesh(data=n + 1)
    with pytest.raises(ValueError):
        make_mesh(model=0)
    with pytest.raises(ValueError):
        make_mesh(data=1, model=1, devices=jax.devices() * 2)


def test_maybe_initialize_distributed_env(monkeypatch):
    from qeft_jax import sharding

    for k in (sharding.ENV_ADDRESS, sharding.ENV_NUM, sharding.ENV_ID, sharding.ENV_AUTO):
        monkeypatch.delenv(k, raising=False)
    assert sharding.maybe_initialize_distributed() is False  # single host: nothing to do
    monkeypatch.setenv(sharding.ENV_ADDRESS, "localhost:12345")
    with pytest.raises(ValueError, match="missing"):
        sharding.maybe_initialize_distributed()
    monkeypatch.setenv(sharding.ENV_NUM, "2")
    monkeypatch.setenv(sharding.ENV_ID, "2")
    with pytest.raises(ValueError, match="must lie in"):
        sharding.maybe_initialize_distributed()
    monkeypatch.setenv(sharding.ENV_NUM, "1")
    monkeypatch.setenv(sharding.ENV_ID, "0")
    assert sharding.maybe_initialize_distributed() is False  # one process: no coordinator needed


# ------------------------------------------------------------ FSDP training (4 fake devices)

# argv: fp dir, quantized dir, data jsonl, out root. Trains qeft and full on 1 and 4 devices, and a
# qeft run interrupted on 4 devices and resumed on 2; reports how the state is laid out and
# whether the compiled step communicates.
TRAIN_CHILD = textwrap.dedent(r"""
    import json, sys
    from pathlib import Path
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp
    import numpy as np
    from train import trainer as T

    class Tok:  # characters -> ids in [3, 101); bos 1, eos 2, pad 0; a short fake chat template
        bos_token_id, eos_token_id, pad_token_id, chat_template = 1, 2, 0, "stub"
        def encode(self, text, add_special_tokens=True):
            return ([1] if add_special_tokens else []) + [3 + ord(c) % 98 for c in text]
        def apply_chat_template(self, msgs, add_generation_prompt=False, tokenize=False):
            return "".join(f"<{m['role']}>{m['content']}</>" for m in msgs) + ("<a>" if add_generation_prompt else "")

    fp, q, data, out = map(Path, sys.argv[1:5])

    def cfg(model, name, method, devices):
        return T.TrainConfig(model=str(model), out=str(out / name), data=str(data), method=method,
                             seq_len=48, batch_size=8, micro_batch_size=4, steps=3,
                             lr=3e-2 if method == "qeft" else 1e-3, save_every=2, eval_every=3,
                             eval_rows=8, val_fraction=0.1, progress=False, devices=devices)

    res = {"devices": len(jax.devices())}
    for method, model in (("qeft", q), ("full", fp)):
        for name, dev in (("single", 1), ("mesh", 4)):
            T.train(cfg(model, f"{method}_{name}", method, dev), tokenizer=Tok())

    def stop_after_2(step, rec):
        if step == 2:
            raise KeyboardInterrupt
    try:
        T.train(cfg(q, "qeft_resumed", "qeft", 4), tokenizer=Tok(), on_step=stop_after_2)
        res["interrupted"] = False
    except KeyboardInterrupt:
        res["interrupted"] = True
    T.train(cfg(q, "qeft_resumed", "qeft", 2), tokenizer=Tok())

    # the layout: per-device share of each part of the state, and the collectives in the step
    c = cfg(q, "layout", "qeft", 4)
    model, _, _, info = T.build_model(q, "qeft", dtype=jnp.float32, lora_rank=4, lora_alpha=16.0, seed=0)
    graphdef, tr, fr = T.split_trainable(model, "qeft")
    tx, _ = T.make_optimizer(1e-3, c)
    mesh = T.training_mesh(c)
    tr, opt, fr = T.place_state(tx, tr, fr, mesh)

    def share(tree):
        leaves = jax.tree.leaves(tree)
        dev0 = jax.devices()[0]
        local = sum(s.data.size for x in leaves for s in x.addressable_shards if s.device == dev0)
        return local / sum(x.size for x in leaves)

    res["share"] = {"trainable": share(tr), "opt": share(opt), "frozen": share(fr)}
    # loaded straight into the layout (each process would read only its slices): the same values,
    # already sharded before place_state
    m2, _, _, info2 = T.build_model(q, "qeft", dtype=jnp.float32, lora_rank=4, lora_alpha=16.0, seed=0, mesh=mesh)
    _, tr2, fr2 = T.split_trainable(m2, "qeft")
    res["loaded_share"] = {"trainable": share(tr2), "frozen": share(fr2)}
    res["loaded_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                              zip(jax.tree.leaves((fr, tr)), jax.tree.leaves((fr2, tr2))))
    res["loaded_bytes"] = [info2.bytes_read, info.bytes_read]
    step, _ = T.make_step_fns(graphdef, tx, False, mesh)
    from qeft_jax import sharding as shd
    toks = shd.shard_batch(np.ones((2, 4, 48), np.int32), mesh, 1)
    hlo = step.lower(tr, opt, fr, toks, shd.shard_batch(np.ones((2, 4, 48), np.float32), mesh, 1)).compile().as_text()
    res["collectives"] = sorted({op for op in ("all-gather", "all-reduce", "reduce-scatter") if op in hlo})
    print("RESULT " + json.dumps(res))
""")


@pytest.fixture(scope="module")
def train_child(converted, tmp_path_factory):
    from qeft_jax.quant.pipeline import quantize_checkpoint
    from qeft_jax.recipes import make_recipe

    fp = Path(converted["gqa_untied"])
    root = tmp_path_factory.mktemp("fsdp")
    q = root / "qeft"
    ids = np.random.default_rng(0).integers(0, 101, (4, 32))
    quantize_checkpoint(fp, q, make_recipe("qeft", bits=4, group_size=32, k=8), ids, progress=False)
    words = ["cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird"]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Repeat {i % 5}", "input": words[i % 8] if i % 2 else "",
                                        "output": words[i % 8] * 2}) + "\n" for i in range(40)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={N_DEV}"}
    p = subprocess.run([sys.executable, "-c", TRAIN_CHILD, str(fp), str(q), str(data), str(root / "runs")],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return root / "runs", json.loads(line[len("RESULT "):]), {"qeft": q, "full": fp}


def _losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in recs]


def _tensors(run: Path) -> dict[str, np.ndarray]:
    from qeft_jax.io import SafetensorsReader

    r = SafetensorsReader([run / "model.safetensors"])
    return {k: r.get(k) for k in r.keys()}


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> None:
    """Equal up to float32 summation order. Adam divides by sqrt(v), so a rounding-level change in a
    small gradient moves its element by up to ~1e-3 of the step; allow 2e-3 of how far training moved
    the tensor from `base`, or one unit in the last place of the stored dtype."""
    assert got.keys() == want.keys()
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype, k
        if g.dtype.kind in "iu":
            np.testing.assert_array_equal(g, w, err_msg=k)
            continue
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        moved = float(np.abs(w64 - base[k]).max()) if k in base else 0.0
        ulp = np.maximum(np.spacing(np.abs(w)), np.spacing(np.abs(g))).astype(np.float64)
        tol = np.maximum(ulp, 2e-3 * moved) + 1e-6 * max(1.0, float(np.abs(w64).max()))
        bad = np.abs(g64 - w64) > tol
        assert not bad.any(), (k, int(bad.sum()), float(np.abs(g64 - w64).max()), moved)


def test_fsdp_training_really_shards(train_child):
    _, res, _ = train_child
    assert res["devices"] == N_DEV
    # each device holds about a quarter (leaves with no axis divisible by 4 are replicated)
    assert 0.25 <= res["share"]["trainable"] < 0.3, res["share"]
    assert 0.25 <= res["share"]["opt"] < 0.3, res["share"]
    assert 0.25 <= res["share"]["frozen"] < 0.4, res["share"]
    assert res["collectives"], "the compiled FSDP step has no collectives"
    assert res["loaded_equal"], "the sharded load differs from the plain load"
    assert 0.25 <= res["loaded_share"]["trainable"] < 0.3, res["loaded_share"]
    assert 0.25 <= res["loaded_share"]["frozen"] < 0.4, res["loaded_share"]
    read, whole = res["loaded_bytes"]  # one process holds all 4 devices: it reads every tensor once
    assert whole <= read < 1.01 * whole, res["loaded_bytes"]  # (+ the weak indices, read whole to check them)


def test_safetensors_get_slice_reads_only_the_slice(tmp_path):
    from qeft_jax.io import SafetensorsReader, write_safetensors

    rng = np.random.default_rng(0)
    ts = {"a": rng.normal(size=(6, 10, 3)).astype(np.float32), "b": np.arange(7, dtype=np.int32),
          "c": rng.normal(size=(5, 9)).astype(np.float16)}
    write_safetensors(tmp_path / "t.safetensors", ts)
    r = SafetensorsReader([tmp_path / "t.safetensors"])
    for k, t in ts.items():  # every combination of whole, inner, leading, trailing and empty slices
        cuts = [[slice(None), slice(1, 3), slice(0, d - 1), slice(d - 1, None), slice(2, 2)] for d in t.shape]
        for idx in itertools.product(*cuts):
            before = r.bytes_read
            got = r.get_slice(k, idx)
            np.testing.assert_array_equal(got, t[idx], err_msg=f"{k}{idx}")
            assert got.dtype == t.dtype and r.bytes_read - before == t[idx].nbytes
    with pytest.raises(ValueError, match="step-1"):
        r.get_slice("a", (slice(0, 6, 2),))


@pytest.mark.parametrize("method", ["qeft", "full"])
def test_fsdp_training_matches_single_device(train_child, method):
    runs, _, sources = train_child
    single, mesh = runs / f"{method}_single", runs / f"{method}_mesh"
    ls, lm = _losses(single), _losses(mesh)
    print(method, "losses single", ls, "mesh", lm)
    assert [s for s, _ in ls] == [s for s, _ in lm] and len(ls) >= 4
    np.testing.assert_allclose([v for _, v in lm], [v for _, v in ls], rtol=1e-5)
    a, b, base = _tensors(single), _tensors(mesh), _tensors(sources[method])
    _assert_close(b, a, base)
    moved = [k for k in a if k in base and not np.array_equal(a[k], base[k])]
    assert moved, "training did not change any tensor: the comparison proves nothing"
    if method == "qeft":
        assert all(k.endswith(".weak") for k in moved), moved


def test_fsdp_run_resumes_on_another_device_count(train_child):
    runs, res, sources = train_child
    assert res["interrupted"]
    ls, lr = _losses(runs / "qeft_single"), _losses(runs / "qeft_resumed")
    assert [s for s, _ in ls] == [s for s, _ in lr]
    np.testing.assert_allclose([v for _, v in lr], [v for _, v in ls], rtol=1e-5)
    _assert_close(_tensors(runs / "qeft_resumed"), _tensors(runs / "qeft_single"), _tensors(sources["qeft"]))


def test_fsdp_spec_rules():
    from jax.sharding import PartitionSpec as P

    from qeft_jax.sharding import fsdp_spec

    assert fsdp_spec((64, 8), 4) == P("data")            # the largest divisible axis
    assert fsdp_spec((101, 64), 4) == P(None, "data")    # 101 is not divisible: the next one
    assert fsdp_spec((8, 8), 4) == P("data")             # ties: the first
    assert fsdp_spec((7, 3), 4) == P()                   # nothing divisible: replicated
    assert fsdp_spec((), 4) == P()
    assert fsdp_spec((64, 8), 1) == P()
