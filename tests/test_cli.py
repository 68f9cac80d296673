"""qeft_jax.cli: flags derived from a frozen dataclass (qeft_jax.train's TrainConfig and a toy one)."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from qeft_jax.cli import add_dataclass_arguments, comma_list, dataclass_from_args, flag_name


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings}


def test_every_train_config_field_has_a_flag():
    from qeft_jax.train import parser
    from train.trainer import TrainConfig

    flags = _flags(parser())
    for f in dataclasses.fields(TrainConfig):
        name = "--no-progress" if f.name == "progress" else flag_name(f.name)
        assert name in flags, f"no flag for TrainConfig.{f.name}"
        assert flags[name].dest == f.name
        assert flags[name].help, f"{name} has no help text"
    # the CLI's own flags, and every flag the CLI had before it was derived from TrainConfig
    for name in ("--model", "--method", "--data", "--tasks", "--limit-per-task", "--val-data",
                 "--val-fraction", "--tokenizer", "--seq-len", "--batch-size", "--micro-batch-size",
                 "--steps", "--epochs", "--lr", "--warmup-steps", "--weight-decay", "--clip-norm",
                 "--seed", "--remat", "--dtype", "--lora-rank", "--lora-alpha", "--save-every", "--keep",
                 "--eval-every", "--eval-rows", "--out", "--overwrite", "--devices", "--no-progress"):
        assert name in flags, name
    assert flags["--out"].required and not flags["--model"].required
    assert tuple(flags["--method"].choices) == ("qeft", "qlora", "lora", "full")
    assert tuple(flags["--dtype"].choices) == ("auto", "float32", "bfloat16")


def test_train_defaults_round_trip():
    from qeft_jax.train import parse
    from train.trainer import TrainConfig

    cfg, a = parse(["--out", "runs/x"])
    assert cfg == TrainConfig(out="runs/x")
    assert cfg.model == "default" and cfg.progress is True and cfg.remat is False
    assert a.tokenizer is None and a.overwrite is False
    with pytest.raises(SystemExit):  # --out is required
        parse([])


def test_train_flags_parse():
    from qeft_jax.train import parse

    cfg, a = parse(["--out", "o", "--model", "q4", "--method", "lora", "--tasks", "boolq,,piqa",
                    "--steps", "7", "--lr", "3e-4", "--val-data", "v.jsonl", "--epochs", "2",
                    "--remat", "--no-progress", "--dtype", "bfloat16", "--devices", "0",
                    "--adam-b2", "0.95", "--tokenizer", "tok", "--overwrite"])
    assert (cfg.model, cfg.method, cfg.tasks, cfg.steps, cfg.lr, cfg.val_data, cfg.epochs) == \
           ("q4", "lora", ["boolq", "piqa"], 7, 3e-4, "v.jsonl", 2.0, )
    assert cfg.remat is True and cfg.progress is False and cfg.dtype == "bfloat16" and cfg.devices == 0
    assert cfg.adam_b2 == 0.95 and isinstance(cfg.steps, int) and isinstance(cfg.lr, float)
    assert a.tokenizer == "tok" and a.overwrite
    assert parse(["--out", "o", "--tasks", ""])[0].tasks is None
    for bad in (["--method", "nope"], ["--dtype", "float64"], ["--steps", "x"]):
        with pytest.raises(SystemExit):
            parse(["--out", "o", *bad])
    with pytest.raises(ValueError, match="multiple of"):  # TrainConfig's own validation
        parse(["--out", "o", "--batch-size", "6", "--micro-batch-size", "4"])


def test_train_config_is_frozen():
    from train.trainer import TrainConfig

    cfg = TrainConfig(out="o")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3
    assert dataclasses.replace(cfg, steps=3).steps == 3 and cfg.steps is None


def test_resume_keys_come_from_field_metadata():
    from train.trainer import RESUME_KEYS, TrainConfig

    fields = dataclasses.fields(TrainConfig)
    assert all(isinstance(f.metadata.get("resume"), bool) for f in fields)
    marked = {f.name for f in fields if f.metadata["resume"]}
    assert set(RESUME_KEYS) == marked | {"data_sha256", "resolved_lr", "resolved_steps"}
    assert len(RESUME_KEYS) == len(set(RESUME_KEYS))
    # what changes the computation is a resume key; bookkeeping and layout are not
    assert {"model", "method", "data", "seed", "lr", "steps", "batch_size", "adam_b1"} <= marked
    assert not marked & {"out", "progress", "save_every", "keep", "devices", "remat", "eval_every"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Toy:
    name: str = dataclasses.field(metadata={"help": "required"})
    count: int = dataclasses.field(default=3, metadata={"help": "a count"})
    ratio: float | None = None
    limit: int | None = dataclasses.field(default=None, metadata={"help": "maybe"})
    words: list[str] | None = None
    mode: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})
    fast: bool = False
    color: bool = True
    internal: int = 9


def test_generic_dataclass_flags():
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, Toy, skip=("internal",), defaults={"count": 5})
    flags = _flags(p)
    assert "--internal" not in flags and "--no-color" in flags and "--color" not in flags
    a = p.parse_args(["--name", "n"])
    assert dataclass_from_args(Toy, a, skip=("internal",)) == Toy(name="n", count=5)
    a = p.parse_args(["--name", "n", "--count", "1", "--ratio", "0.5", "--limit", "4", "--words", "x, y",
                      "--mode", "b", "--fast", "--no-color"])
    t = dataclass_from_args(Toy, a, skip=("internal",), internal=1)
    assert t == Toy(name="n", count=1, ratio=0.5, limit=4, words=["x", "y"], mode="b", fast=True, color=False,
                    internal=1)
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "n", "--mode", "c"])
    with pytest.raises(SystemExit):
        p.parse_args([])


def test_unsupported_field_type_is_an_error():
    @dataclasses.dataclass(frozen=True)
    class Bad:
        shape: tuple[int, int] = (1, 2)

    with pytest.raises(TypeError, match="no flag"):
        add_dataclass_arguments(argparse.ArgumentParser(), Bad)


def test_comma_list():
    assert comma_list("a,b") == ["a", "b"] and comma_list(" a , ,b ") == ["a", "b"] and comma_list("") is None
