"""Nothing on the serving or archiving path can unpickle arbitrary objects or run strings as code."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*REPO.joinpath("aitune_core").rglob("*.py"), *REPO.joinpath("handler").glob("*.py")])


def parsed():
    return [(path, ast.parse(path.read_text(), filename=str(path))) for path in SOURCES]


def test_sources_are_found():
    assert len(SOURCES) > 10
    assert any(path.name == "aitune_handler.py" for path in SOURCES)


@pytest.mark.parametrize("forbidden", ["pickle", "dill", "cloudpickle", "marshal", "shelve"])
def test_no_pickle_like_module_is_imported(forbidden):
    for path, tree in parsed():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name.split(".")[0] == forbidden for name in names), f"{path} imports {forbidden}"


def test_no_eval_or_exec():
    for path, tree in parsed():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec", "compile"), f"{path}:{node.lineno} calls {node.func.id}"


def test_every_torch_load_is_weights_only():
    calls = 0
    for path, tree in parsed():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                calls += 1
                flags = {kw.arg: kw.value for kw in node.keywords}
                assert "weights_only" in flags, f"{path}:{node.lineno}: torch.load without weights_only"
                assert isinstance(flags["weights_only"], ast.Constant) and flags["weights_only"].value is True, \
                    f"{path}:{node.lineno}: torch.load must say weights_only=True"
    assert calls >= 2  # the checkpoint loader and the archive's --weights/--sample loader
