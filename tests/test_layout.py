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


def _branches_on(tree: ast.AST, names: set[str]) -> list[str]:
    """Where code decides by a method's name: a comparison with it, a dict keyed by two or more of them, or a
    ``method=<name>`` setting written out."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            found += [f"line {node.lineno}: compares with {v!r}" for v in consts if v in names]
        elif isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
            if len(keys) >= 2:
                found.append(f"line {node.lineno}: a dict keyed by {keys}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [f"line {node.lineno}: {node.value!r}" for n in names if f"method={n}" in node.value]
        defaults = ([node.value] if isinstance(node, ast.AnnAssign) and node.value is not None else
                    [*node.defaults, *node.kw_defaults] if isinstance(node, ast.arguments) else
                    [node.body] if isinstance(node, ast.Lambda) else [])
        for default in defaults:  # a setting's or argument's default spelled out
            consts = [c.value for c in ast.walk(default) if isinstance(c, ast.Constant)] if default else []
            found += [f"line {default.lineno}: defaults to {v!r}" for v in consts if v in names]
    return found


def test_only_methods_name_a_method():
    """Methods are plugins: the runner, exporter, report and CLI ask the method, never test its name."""
    from tangle_ray.methods import METHODS

    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "methods"):
            continue
        found = _branches_on(ast.parse(path.read_text()), set(METHODS))
        assert not found, f"{path.relative_to(PACKAGE.parent)} names a method: {found}"
    for code in ('x = m == "spos"', 'y = {"spos": 1, "fixed": 2}', 'z = "method=fixed"', 'method: str = "spos"',
                 'def f(reference="tanglenas"): pass', 'm = field(default_factory=lambda: ["tanglenas"])'):
        assert _branches_on(ast.parse(code), set(METHODS)), code


def test_campaign_pipelines_come_from_the_methods():
    from tangle_ray.campaign.pipelines import PIPELINES, REFERENCE
    from tangle_ray.methods import DEFAULT_METHOD, METHODS

    assert DEFAULT_METHOD in METHODS and REFERENCE in METHODS[DEFAULT_METHOD].pipelines
    assert {p.train for p in PIPELINES.values()} <= {m.command for m in METHODS.values()}
