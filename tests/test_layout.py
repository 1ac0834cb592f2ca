"""The package's layering: no import cycles, families reached only through the registry."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tangle_ray"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every tangle_ray module -> the tangle_ray modules it imports anywhere (functions included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
        graph[_module(path)] = {n for n in names if n.startswith("tangle_ray")}
    modules = set(graph)
    return {m: {n for n in deps if n in modules and n != m} for m, deps in graph.items()}


def test_no_import_cycles():
    graph = _imports()
    # a package imports its own modules (``__init__`` re-exports): only cycles through other modules count
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in edges[m]:
            assert state.get(d) != 1, f"import cycle: {' -> '.join(stack + [m, d])}"
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [])


def test_only_models_name_a_family():
    families = {f"tangle_ray.models.{p.stem}" for p in (PACKAGE / "models").glob("*.py")} - {
        "tangle_ray.models.__init__", "tangle_ray.models.registry"}
    for module, deps in _imports().items():
        if not module.startswith("tangle_ray.models"):
            assert not deps & families, f"{module} imports {sorted(deps & families)}: use the registry"


def test_space_imports_no_model():
    assert not {d for d in _imports()["tangle_ray.space"] if d.startswith("tangle_ray.models")}
