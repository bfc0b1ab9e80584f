"""The core's imports, read from the source: no array framework anywhere in sts_edge/, and no cycles."""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "sts_edge"
FRAMEWORKS = ("torch", "mlx", "triton", "jax", "tensorflow")


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module a file imports, at any depth (functions and branches included), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, node.lineno)] + [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def core_modules() -> dict[str, Path]:
    return {"sts_edge." + path.relative_to(CORE).with_suffix("").as_posix().replace("/", "."): path
            for path in CORE.rglob("*.py") if path.name != "__init__.py"}


def test_the_core_imports_no_array_framework_anywhere():
    offending = [f"{path.relative_to(CORE.parent)}:{line} imports {name}"
                 for path in CORE.rglob("*.py") for name, line in imports(path)
                 if name.split(".")[0] in FRAMEWORKS or name.startswith(("sts_edge.backends", "sts_edge.triton_kernels",
                                                                          "sts_edge.metal_kernels", "sts_edge.cpu_kernels"))]
    assert not offending, "\n".join(offending)


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("def f():\n    if True:\n        import torch.nn as nn\n        from mlx import core\n")
    assert [name for name, _ in imports(source)] == ["torch.nn", "mlx", "mlx.core"]


def test_no_import_cycles_among_core_modules():
    modules = core_modules()
    graph = {name: sorted({other for imported, _ in imports(path) for other in modules
                           if imported == other and other != name}) for name, path in modules.items()}
    visiting, done, cycles = set(), set(), []

    def visit(name: str, trail: list[str]) -> None:
        if name in done:
            return
        if name in visiting:
            cycles.append(" -> ".join(trail[trail.index(name):] + [name]))
            return
        visiting.add(name)
        for other in graph[name]:
            visit(other, trail + [name])
        visiting.discard(name)
        done.add(name)

    for name in graph:
        visit(name, [])
    assert not cycles, "\n".join(cycles)
    assert graph["sts_edge.api"], "the graph was built (api imports core modules)"


@pytest.mark.parametrize("module", ["sts_edge.mask", "sts_edge.speculative"])
def test_cycle_check_would_see_a_planted_cycle(module, tmp_path, monkeypatch):
    """A copy of the core with `mask` importing `api` (which imports mask) must fail the check."""
    import shutil

    copy = tmp_path / "sts_edge"
    shutil.copytree(CORE, copy)
    target = copy / (module.split(".")[1] + ".py")
    target.write_text(target.read_text() + "\n\ndef _late():\n    import sts_edge.api\n")
    monkeypatch.setattr(f"{__name__}.CORE", copy)
    with pytest.raises(AssertionError, match="sts_edge.api"):
        test_no_import_cycles_among_core_modules()
