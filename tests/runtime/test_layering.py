"""Which package may import which: the runtime never imports the export side, and has no import
circle (imports under `if TYPE_CHECKING:` are for annotations only and are not followed)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"runtime": "sd35trt.runtime", "export": "sd35trt.export", "sd35trt": "sd35trt"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (at any depth, TYPE_CHECKING blocks excepted)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from . import x` may name a module
    return found


def _runtime_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "runtime").rglob("*.py"))
    names = {_module_name(f): f for f in files}
    return {name: {m for m in _imports(f) if m in names and m != name} for name, f in names.items()}


def _outside(folder: str, allowed: tuple[str, ...]) -> dict[str, list[str]]:
    """sd35trt modules imported from `folder` that are not under one of `allowed`."""
    out = {}
    for f in sorted((ROOT / folder).rglob("*.py")):
        bad = sorted(m for m in _imports(f) if m.startswith("sd35trt.") and not m.startswith(allowed))
        if bad:
            out[str(f.relative_to(ROOT))] = bad
    return out


def test_runtime_never_imports_the_export_side() -> None:
    assert _outside("runtime", ("sd35trt.runtime",)) == {}
    assert _outside("export", ("sd35trt.runtime", "sd35trt.export")) == {}


def test_runtime_has_no_import_circle() -> None:
    graph = _runtime_graph()
    assert len(graph) > 20  # the walk found the runtime's modules
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]) \
                if nxt in path else f"import circle through {nxt}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_manifests_are_parsed_only_by_their_readers() -> None:
    """`VariantConfig.from_dict` (the variant inside a manifest) is called only by the two manifest
    readers, so each artifact format is read in one place."""
    callers = set()
    for folder in ("runtime", "export", "sd35trt"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            if "VariantConfig.from_dict(" in f.read_text():
                callers.add(str(f.relative_to(ROOT)))
    assert callers == {"runtime/manifest.py", "runtime/engine_manifest.py"}
