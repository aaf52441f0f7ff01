"""The import graph of `latentddpm` has no cycle.

Every module of `latentddpm/`, `pipelines/` (installed as `latentddpm.pipelines`) and `training/` (installed as
`latentddpm.training`) is parsed with `ast`; each `import` / `from ... import` of a `latentddpm` module is an edge,
wherever it is written (module level, in a function, in a method). Two blocks are left out because they never run
when the module is imported: `if TYPE_CHECKING:` (annotations only) and `if __name__ == "__main__":` (it runs only when
the file is the program, `python -m ...`, as the module `__main__`, not as the `latentddpm.x.y` others import).
"""

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it installs as (pyproject's `package-dir`)
PACKAGE_DIRS = {"latentddpm": "latentddpm", "pipelines": "latentddpm.pipelines", "training": "latentddpm.training"}


def package_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _never_runs_on_import(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` or `if __name__ == "__main__":`."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    if isinstance(test, ast.Name) or isinstance(test, ast.Attribute):
        return (test.id if isinstance(test, ast.Name) else test.attr) == "TYPE_CHECKING"
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except in blocks that never run on import."""
    for node in ast.iter_child_nodes(tree):
        if _never_runs_on_import(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that `module` imports: `from a import b` is an edge to `a.b` when that is a module (a
    submodule import), else to `a`."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in _imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                # relative import: strip `level` components from the importing module's package
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for name in names:
            # `import latentddpm.eval.sweep` imports the deepest package module named
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = package_modules()
    return {module: imported_modules(module, path, modules) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` (its nodes, the first repeated at the end, each imported by the next), or `None`."""
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as error:
        return error.args[1]
    return None


def test_the_graph_sees_relative_function_level_and_submodule_imports():
    graph = import_graph()
    assert len(graph) > 40
    assert "latentddpm.schedulers" in graph["latentddpm.eval.likelihood"]  # from ..schedulers import ...
    assert "latentddpm.training.train_ldm" in graph["latentddpm.cli"]  # inside a function, a submodule
    assert "latentddpm.validation" in graph["latentddpm.training.train_ldm"]  # absolute
    assert "latentddpm.pipelines.model_card" in graph["latentddpm.pipelines.pipeline_latent_ddpm"]


def test_the_graph_leaves_out_type_checking_and_main_blocks():
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nif __name__ == '__main__':\n    import b\n"
    )
    assert [ast.unparse(node) for node in _imports(ast.parse(source))] == ["from typing import TYPE_CHECKING"]


@pytest.mark.parametrize(
    "graph, cycle",
    [({"a": {"b"}, "b": {"c"}}, None), ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, {"a", "b", "c"})],
)
def test_find_cycle_finds_a_planted_cycle(graph, cycle):
    found = find_cycle(graph)
    assert (None if found is None else set(found)) == cycle


def test_latentddpm_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(reversed(cycle))
