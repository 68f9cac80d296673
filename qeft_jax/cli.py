"""Shared CLI plumbing: one clear message and a non-zero exit instead of a traceback, and flags
derived from a (frozen) dataclass's fields so a library config and its CLI cannot drift apart."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from typing import Any, Callable, Collection

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError,
                                                 NotADirectoryError, RuntimeError, KeyError)


def run_cli(main: Callable[[], None]) -> None:
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("QEFT_JAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def conversion_parser(prog: str, doc: str | None, source_help: str) -> argparse.ArgumentParser:
    """The converters' shared command line: SOURCE OUT_DIR [--overwrite] (callers add their own flags)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help=source_help)
    p.add_argument("out_dir", help="the directory to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    return p


# ------------------------------------------------------------------ dataclass <-> argparse
def flag_name(field_name: str) -> str:
    """'micro_batch_size' -> '--micro-batch-size'."""
    return "--" + field_name.replace("_", "-")


def comma_list(text: str) -> list[str] | None:
    """'a,b,,c' -> ['a', 'b', 'c']; '' -> None."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None` / Optional[X]; (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: Collection[str] = (),
                            defaults: dict[str, Any] | None = None) -> None:
    """One flag per field of dataclass `cls` (fields named in `skip` excepted).

    The flag is the field name in kebab case (`--seq-len`); its type comes from the annotation:
    str/int/float (`X | None` too: the default may be None), `bool` (a False default gives a
    store_true `--x`, a True default a `--no-x` that stores False), `list[str]` (comma-separated).
    Field metadata: "help" (the help text) and "choices" (allowed values). A field without a
    default is a required flag. `defaults` overrides fields' defaults for the CLI only.
    The parsed namespace keeps the field names as dests; `dataclass_from_args` builds `cls` from it.
    """
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        kw: dict[str, Any] = {"dest": f.name}
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if tp is bool:
            if default is True:
                parser.add_argument("--no-" + f.name.replace("_", "-"), action="store_false",
                                    default=True, help=f"turn off: {help_text or f.name}", **kw)
            else:
                parser.add_argument(flag_name(f.name), action="store_true", default=False,
                                    help=help_text, **kw)
            continue
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp) or (str,)
            if item is not str:
                raise TypeError(f"{cls.__name__}.{f.name}: only list[str] fields are supported, got {tp}")
            kw["type"] = comma_list
            kw["metavar"] = "A,B,..."
            help_text = (help_text + " " if help_text else "") + "(comma-separated)"
        elif tp in (str, int, float):
            kw["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for a field of type {hints[f.name]}")
        if "choices" in f.metadata:
            kw["choices"] = tuple(f.metadata["choices"])
        if default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = default
            if default is not None:
                help_text = (help_text + " " if help_text else "") + f"(default: {default})"
        parser.add_argument(flag_name(f.name), help=help_text.replace("%", "%%"), **kw)


def dataclass_from_args(cls: type, namespace: argparse.Namespace, *, skip: Collection[str] = (),
                        **overrides: Any) -> Any:
    """`cls` built from a namespace parsed with `add_dataclass_arguments(parser, cls, skip=skip)`:
    every field not in `skip` from the namespace; skipped fields keep their defaults unless given
    in `overrides` (which also win over the namespace)."""
    kwargs = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
              if f.init and f.name not in skip and hasattr(namespace, f.name)}
    kwargs.update(overrides)
    return cls(**kwargs)
