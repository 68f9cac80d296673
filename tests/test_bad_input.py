"""The bad-input catalogue: each case gives one clear error, a non-zero exit, no traceback, and
writes or overwrites nothing."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qeft_jax.cli import run_cli

REPO = Path(__file__).resolve().parents[1]


def cli_error(module_main, argv: list[str], capsys) -> str:
    """Run a CLI main in-process; it must exit 2 with one 'error:' line and no traceback."""
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: module_main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err  # progress bars may precede the message on stderr
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (model / "config.json").write_text(json.dumps(cfg))


def edit_tensors(model: Path, fn) -> None:
    t = load_file(model / "model.safetensors")
    fn(t)
    save_file(t, model / "model.safetensors")


@pytest.fixture()
def model(tiny_with_tokenizer, tmp_path):
    return copy_model(tiny_with_tokenizer[0], tmp_path / "m")


def quantize_argv(model: Path, out: Path, data: Path, **over) -> list[str]:
    args = {"--model": str(model), "--method": "qeft", "--bits": "4", "--group-size": "16", "--k": "4",
            "--calib-samples": "2", "--seq-len": "16", "--calib-data": str(data), "--out": str(out)}
    args.update(over)
    return [x for k, v in args.items() for x in (k, v)]


def test_bad_input_truncated_safetensors(model, tmp_path, capsys):
    from convert import from_hf

    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    err = cli_error(from_hf.main, [str(model), str(tmp_path / "o")], capsys)
    assert "truncated" in err and "model.safetensors" in err
    assert not (tmp_path / "o").exists()


def test_bad_input_corrupt_safetensors_header(model, tmp_path, capsys):
    from qeft_jax.eval.__main__ import main

    f = model / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:16] = b"\xff" * 8  # garbage in the JSON header
    f.write_bytes(bytes(raw))
    err = cli_error(main, ["perplexity", "--model", str(model)], capsys)
    assert "corrupt" in err


def test_bad_input_huge_header_size_is_bounded(model, capsys):
    from qeft_jax import load_model
    from qeft_jax.io import CheckpointError

    f = model / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[:8] = (2**62).to_bytes(8, "little")
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="header claims"):
        load_model(model)


def test_bad_input_gguf_of_another_architecture(tmp_path, capsys):
    import gguf

    from convert import from_gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    err = cli_error(from_gguf.main, [str(path), str(tmp_path / "o")], capsys)
    assert "'gpt2'" in err and "llama" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": None}, "missing required key(s): hidden_size"),
    ({"model_type": "gpt_neox"}, "unsupported model_type 'gpt_neox'"),
    ({"model_type": "mixtral", "num_local_experts": 8}, "unsupported model_type 'mixtral'"),
    ({"num_local_experts": 8}, "not supported (mixture-of-experts layers)"),
    ({"kv_lora_rank": 512}, "multi-head latent attention"),
    ({"cross_attention_layers": [3, 8]}, "cross-attention layers"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
    ({"rope_theta": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 2.0}}, "contradictory rope_theta"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "unsupported rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act"),
])
def test_bad_input_config(model, tmp_path, capsys, change, message):
    from convert import from_hf

    edit_config(model, **change)
    err = cli_error(from_hf.main, [str(model), str(tmp_path / "o")], capsys)
    assert message in err
    assert not (tmp_path / "o").exists()


def test_bad_input_tensor_shape_and_dtype(model, tmp_path, capsys):
    from convert import from_hf

    name = "model.layers.0.mlp.up_proj.weight"
    edit_tensors(model, lambda t: t.update({name: t[name][:, :-1].copy()}))
    err = cli_error(from_hf.main, [str(model), str(tmp_path / "o")], capsys)
    assert name in err and "expects" in err
    edit_tensors(model, lambda t: t.update({name: np.zeros((72, 40), np.int32)}))
    err = cli_error(from_hf.main, [str(model), str(tmp_path / "o")], capsys)
    assert name in err and "float" in err


def test_bad_input_nan_in_weights(model, tmp_path, capsys):
    from convert import from_hf

    name = "model.layers.1.self_attn.q_proj.weight"

    def poison(t):
        t[name] = t[name].copy()
        t[name][0, 0] = np.nan
    edit_tensors(model, poison)
    err = cli_error(from_hf.main, [str(model), str(tmp_path / "o")], capsys)
    assert name in err and "NaN" in err


@pytest.mark.filterwarnings("error::RuntimeWarning")  # caught before any 0/0 in the selection
def test_bad_input_inf_in_calibration_activations(model, tiny_with_tokenizer, tmp_path, capsys):
    from qeft_jax.quantize import main

    name = "model.layers.0.mlp.down_proj.weight"
    edit_tensors(model, lambda t: t.update({name: t[name] * np.float32(3e38)}))
    err = cli_error(main, quantize_argv(model, tmp_path / "o", tiny_with_tokenizer[1]), capsys)
    assert "NaN/Inf" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("over,message", [
    ({"--k": "-1"}, "k must be >= 0"),
    ({"--k": "41"}, "k must be in [0, 40]"),
    ({"--bits": "5"}, "bits must be one of (2, 3, 4)"),
    ({"--group-size": "12"}, "group size must be a positive multiple of 8"),
    ({"--seq-len": "100000"}, "exceeds the model's max_position_embeddings"),
    ({"--calib-samples": "10000"}, "needed"),
])
def test_bad_input_quantize_arguments(tiny_with_tokenizer, tmp_path, capsys, over, message):
    from qeft_jax.quantize import main

    model, data = tiny_with_tokenizer
    err = cli_error(main, quantize_argv(model, tmp_path / "o", data, **over), capsys)
    assert message in err, err
    assert not (tmp_path / "o").exists()


def test_bad_input_empty_calibration_file(tiny_with_tokenizer, tmp_path, capsys):
    from qeft_jax.quantize import main

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    err = cli_error(main, quantize_argv(tiny_with_tokenizer[0], tmp_path / "o", empty), capsys)
    assert "empty" in err


def test_bad_input_missing_tokenizer(converted, tmp_path, capsys):
    from qeft_jax.eval.__main__ import main as eval_main
    from qeft_jax.quantize import main

    model = converted["gqa_untied"]  # converted without tokenizer files
    err = cli_error(main, quantize_argv(model, tmp_path / "o", tmp_path / "x.txt"), capsys)
    assert "no tokenizer" in err
    err = cli_error(eval_main, ["perplexity", "--model", str(model)], capsys)
    assert "no tokenizer" in err


def test_bad_input_output_dir_not_empty_is_refused(tiny_with_tokenizer, tmp_path, capsys):
    from convert import from_hf
    from qeft_jax.quantize import main

    model, data = tiny_with_tokenizer
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    err = cli_error(main, quantize_argv(model, out, data), capsys)
    assert "--overwrite" in err
    err = cli_error(from_hf.main, [str(model), str(out)], capsys)
    assert "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_bad_input_tampered_packed_tensors(tiny_with_tokenizer, tmp_path, capsys):
    from qeft_jax.eval.__main__ import main as eval_main
    from qeft_jax.quantize import main

    model, data = tiny_with_tokenizer
    out = tmp_path / "q"
    run_cli(lambda: main(quantize_argv(model, out, data)))
    f = out / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x01
    f.write_bytes(bytes(raw))
    err = cli_error(eval_main, ["perplexity", "--model", str(out)], capsys)
    assert "checksum" in err


def test_bad_input_weak_index_not_first_after_ogr(tiny_with_tokenizer, tmp_path, capsys):
    """A QEFT checkpoint (checksum intact) whose weak_idx breaks OGR's promise: the model would read
    the first k inputs as the weak ones, so loading refuses it instead of computing garbage."""
    import json

    from safetensors.numpy import load_file, save_file

    from qeft_jax.checkpoint import sha256_file
    from qeft_jax.eval.__main__ import main as eval_main
    from qeft_jax.quantize import main

    model, data = tiny_with_tokenizer
    out = tmp_path / "q"
    run_cli(lambda: main(quantize_argv(model, out, data)))
    f = out / "model.safetensors"
    tensors = load_file(str(f))
    key = "model.layers.0.mlp.gate_proj.weak_idx"
    tensors[key] = tensors[key][::-1].copy()
    save_file(tensors, str(f))
    meta = json.loads((out / "quantization.json").read_text())
    meta["sha256"] = sha256_file(f)
    (out / "quantization.json").write_text(json.dumps(meta))
    err = cli_error(eval_main, ["perplexity", "--model", str(out)], capsys)
    assert key in err and "weak columns come first" in err


def test_bad_input_cli_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "convert.from_hf", str(tmp_path / "missing"),
                           str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert "is not a directory" in proc.stderr


def test_corrupt_write_midway_leaves_previous_checkpoint(converted, tmp_path, monkeypatch):
    """A crash in the middle of writing (simulated) leaves the old checkpoint intact and loadable."""
    import qeft_jax.checkpoint as qio
    from convert import from_hf
    from qeft_jax import load_model

    out = tmp_path / "ckpt"
    shutil.copytree(converted["gqa_untied"], out)
    before = (out / "model.safetensors").read_bytes()
    real_write = qio.write_safetensors

    def crash_after_partial_write(path, tensors, metadata=None, progress=None):
        real_write(path, dict(list(tensors.items())[:3]), metadata=metadata)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(qio, "write_safetensors", crash_after_partial_write)
    with pytest.raises(OSError, match="simulated"):
        from_hf.convert(converted["mha_tied"], out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")], "temp dir left behind"
    load_model(out)


def test_bad_input_no_unsafe_loading_in_source():
    """No pickle anywhere; torch.load only with weights_only=True."""
    offenders = []
    for path in REPO.rglob("*.py"):
        if any(part.startswith(".") or part in ("tests", "build") for part in path.relative_to(REPO).parts):
            continue
        text = path.read_text()
        if re.search(r"^\s*(?:import|from)\s+(?:c?pickle|dill|joblib)\b", text, re.M):
            offenders.append(f"{path}: imports a pickle-based loader")
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path}: {line.strip()}")
    assert not offenders, offenders


def test_bad_input_nan_in_a_sharded_load(model):
    """Loading straight into a sharded layout checks each slice as it is read (no whole-tensor pass)."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from qeft_jax.checkpoint import load_checkpoint
    from qeft_jax.io import CheckpointError

    name = "model.layers.1.self_attn.q_proj.weight"

    def poison(t):
        t[name] = t[name].copy()
        t[name][-1, -1] = np.inf
    edit_tensors(model, poison)
    with pytest.raises(CheckpointError, match=re.escape(name) + ".*NaN or Inf"):
        load_checkpoint(model, sharding=lambda shape: SingleDeviceSharding(jax.devices()[0]))
