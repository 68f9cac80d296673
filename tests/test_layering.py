"""Imports run one way: the import-linter contracts in pyproject.toml hold, the linter really sees
an upward import when there is one, and every function-local import says why it is local."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qeft_jax", "pallas_kernels", "convert", "train")


def test_import_contracts_hold(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename="pyproject.toml", no_cache=True, no_logo=True) == 0


def test_linter_catches_an_upward_import(tmp_path, monkeypatch):
    """The same linter on a contract that is known to be broken (the kernels read qeft_jax.packing,
    so putting packing above the kernels must fail): the passing test above is not vacuous."""
    (tmp_path / "broken.toml").write_text(
        '[tool.importlinter]\nroot_packages = ["qeft_jax", "pallas_kernels"]\n'
        '[[tool.importlinter.contracts]]\nname = "inverted"\ntype = "layers"\n'
        'layers = ["qeft_jax.packing", "pallas_kernels"]\n')
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(tmp_path / "broken.toml"), no_cache=True, no_logo=True) == 1


def test_every_layered_module_exists():
    """A contract naming a module that was renamed away would silently check nothing."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    for contract in conf["contracts"]:
        for layer in contract.get("layers", []):
            for name in layer.replace("|", ":").split(":"):
                path = ROOT / name.strip().replace(".", "/")
                assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), name


def _local_imports() -> list[tuple[str, int, bool]]:
    rows = []
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            lines = f.read_text().splitlines()
            for fn in ast.walk(ast.parse("\n".join(lines))):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for node in ast.walk(fn):
                        if isinstance(node, (ast.Import, ast.ImportFrom)):
                            said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                            rows.append((f"{f.relative_to(ROOT)}:{node.lineno}", node.lineno, said))
    return rows


def test_function_local_imports_say_why():
    """Library code imports at module level; a local import (an optional dependency, a slow import
    kept off the start-up path) carries a comment saying so."""
    silent = [where for where, _, said in _local_imports() if not said]
    assert not silent, f"function-local imports without a comment: {silent}"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_sys_path_edits(pkg):
    """Library and benchmarks import the installed package; nobody edits sys.path."""
    for f in [*sorted((ROOT / pkg).rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]:
        assert "sys.path.insert" not in f.read_text(), f
