"""The floor plan (issue 27, docs/architecture.md): packages by stage, imports one way, no circles.

Read from the source with :mod:`ast`, imports inside functions included (a circle hidden by
an import in a function body is still a circle), so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import n2v_chunked

ROOT = Path(n2v_chunked.__file__).parent

#: Each package may import only packages of a lower rank (and itself); errors.py is the floor.
RANK = {
    "errors": 0,
    "cluster": 1,  # where dask runs and how far a run is (progress): used by io's writers
    "io": 2,
    "model": 3,
    "engine": 4,
    "sampling": 5,  # pinned host buffers come from engine.transfer
    "zoo": 5,
    "training": 6,
    "prediction": 6,
    "cli": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module ``name`` (a module or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, top_only: bool = False) -> set[str]:
    """Modules of the package that ``module`` imports (``top_only``: at module level, outside functions)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_only else list(ast.walk(tree))
    if top_only:  # what runs at import: module level with top-level if/try, but not ``if TYPE_CHECKING:``
        nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.ClassDef))
                 and not (isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test))
                 for n in ast.walk(top)]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "n2v_chunked":
                target = _resolve(name)
                if target and target != module:
                    out.add(target)
    # "from . import x" resolves both to x and to the package; keep the most specific
    return {t for t in out if not any(o.startswith(t + ".") for o in out) or t == "n2v_chunked"}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_only_init_and_errors_at_the_top():
    loose = sorted(p.name for p in ROOT.glob("*.py"))
    assert loose == ["__init__.py", "errors.py"]
    assert set(RANK) == {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} | {"errors"}


def test_the_top_level_package_imports_only_the_errors():
    """``import n2v_chunked`` stays cheap (the CLI's start-up); the public functions load on first use."""
    assert imports("n2v_chunked", top_only=True) == {"n2v_chunked.errors"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "n2v_chunked"))
def test_imports_go_down_the_stages(module):
    here = package_of(module)
    for target in imports(module):
        there = package_of(target)
        if target == "n2v_chunked" or there == here:
            continue  # __version__ from the top (which imports only errors), or within a stage
        assert RANK[there] < RANK[here], f"{module} imports {target}: {here} may not depend on {there}"


def test_no_import_circle():
    graph = {m: imports(m) - {"n2v_chunked"} for m in MODULES if m != "n2v_chunked"}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The two checks above can fail: a hidden circle and an upward import are reported."""
    pkg = tmp_path / "n2v_chunked"
    (pkg / "io").mkdir(parents=True)
    (pkg / "cli").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "io" / "a.py").write_text("from .b import x\n")
    (pkg / "io" / "b.py").write_text("def f():\n    from . import a\n    from ..cli import main\n")
    monkeypatch.setattr(f"{__name__}.ROOT", pkg)
    monkeypatch.setattr(f"{__name__}.MODULES", _modules())
    assert imports("n2v_chunked.io.b") == {"n2v_chunked.io.a", "n2v_chunked.cli"}
    with pytest.raises(AssertionError, match="import circle: n2v_chunked.io.a -> n2v_chunked.io.b -> n2v_chunked.io.a"):
        test_no_import_circle()
    with pytest.raises(AssertionError, match="io may not depend on cli"):
        test_imports_go_down_the_stages("n2v_chunked.io.b")


def test_public_names_are_the_functions_whatever_was_imported_before():
    """The top-level ``predict`` is the function, also after the prediction package was imported
    (a subpackage named ``predict`` would have shadowed it: the reason for ``prediction/``)."""
    import importlib

    importlib.import_module("n2v_chunked.prediction.plan")
    from n2v_chunked import N2VError, denoise, fit, load_model, open_image, predict
    from n2v_chunked.engine.inference import denoise as denoise_
    from n2v_chunked.io.sources import open_image as open_image_
    from n2v_chunked.model.checkpoint import load_model as load_model_
    from n2v_chunked.prediction.run import predict as predict_
    from n2v_chunked.training.fit import fit as fit_

    assert (open_image, fit, predict, load_model, denoise) == (open_image_, fit_, predict_, load_model_, denoise_)
    assert getattr(n2v_chunked, "predict") is predict_ and issubclass(N2VError, Exception)
    assert set(n2v_chunked.__all__) <= set(dir(n2v_chunked))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        n2v_chunked.nothing  # noqa: B018
