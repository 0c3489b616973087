"""The layout's rules, checked on the import graph (docs/architecture.md).

Read from the source with ``ast``, so a rule broken in a function body, where
an import runs late, is caught as well as one at the top of a module. Imports
under ``if TYPE_CHECKING:`` are type hints only and never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAEMON_CORE = {"ckptd.daemon.server", "ckptd.daemon.handlers", "ckptd.daemon.__main__",
               "ckptd.daemon"}


def _module(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "client":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                ids.update(id(n) for n in ast.walk(sub))
    return ids


def imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module imported, names, at module level) for every runtime import."""
    tree = ast.parse(path.read_text())
    hints = _type_checking_nodes(tree)
    top = {id(n) for n in tree.body}
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            out.append((target, names, id(node) in top))
            # `from pkg import mod` imports the module pkg.mod
            out += [(f"{target}.{n}", [], id(node) in top) for n in names]
    return out


def sources(*roots: str) -> list[Path]:
    return sorted(p for r in roots for p in (REPO / r).rglob("*.py"))


def test_features_never_import_the_server_at_run_time() -> None:
    bad = [(_module(p), t) for p in sources("ckptd/daemon", "ckptd/analysis")
           if _module(p) not in DAEMON_CORE
           for t, _, _ in imports(p) if t in ("ckptd.daemon.server", "ckptd.daemon.handlers")]
    assert not bad, f"feature modules import the server (pass the Daemon instead): {bad}"


def test_the_store_imports_neither_daemon_nor_cli() -> None:
    bad = [(_module(p), t) for p in sources("ckptd/store")
           for t, _, _ in imports(p) if t.startswith(("ckptd.daemon", "ckptd.cli"))]
    assert not bad, bad


def test_only_the_store_writer_is_imported_for_writing() -> None:
    """The writer (``Store``) is the daemon's: nothing else may hold one at run time."""
    allowed = ("ckptd.daemon", "ckptd.store")
    bad = [(_module(p), t) for p in sources("ckptd")
           if not _module(p).startswith(allowed)
           for t, names, _ in imports(p) if t == "ckptd.store.writer" and "Store" in names]
    assert not bad, bad


def test_the_server_side_takes_no_client_internals() -> None:
    bad = [(_module(p), t, names) for p in sources("ckptd")
           for t, names, _ in imports(p)
           if t.startswith("ckptd_client") and (
               t == "ckptd_client.run" or any(n.startswith("_") for n in names))]
    assert not bad, f"use the client's shared modules (identity, protocol, ...): {bad}"


def test_the_client_imports_nothing_of_the_daemon() -> None:
    bad = [(_module(p), t) for p in sources("client/ckptd_client")
           for t, _, _ in imports(p) if t == "ckptd" or t.startswith("ckptd.")]
    assert not bad, bad


def test_no_import_circle_at_module_level() -> None:
    """Module-level imports between our own modules form no circle (a late
    import inside a function is how an intended back-reference is written)."""
    graph: dict[str, set[str]] = {}
    mods = {_module(p): p for p in sources("ckptd", "client/ckptd_client")}
    for mod, path in mods.items():
        graph[mod] = {t for t, _, top in imports(path) if top and t in mods and t != mod}
    # a package's __init__ is part of its modules' import; ignore edges to parents
    for mod in graph:
        graph[mod] = {t for t in graph[mod] if not mod.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(
                    stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_rules_see_real_imports() -> None:
    """The checker itself: it finds the server's import of the handler table and a
    feature's import of the store, so the rules above cannot pass by finding nothing."""
    server = imports(REPO / "ckptd/daemon/server.py")
    assert any(t == "ckptd.daemon.handlers" for t, _, _ in server)
    ckpt = imports(REPO / "ckptd/daemon/checkpoints.py")
    assert any(t.startswith("ckptd_client.checkpoint") for t, _, _ in ckpt)


def test_tests_follow_the_layout() -> None:
    """Every test lives in the folder of the part it proves (tests/<part>/), so a
    newcomer finds the tests of the room they are in; only shared helpers sit at
    the top of tests/."""
    top = sorted(p.name for p in (REPO / "tests").glob("test_*.py"))
    assert top == [], f"tests at the top of tests/, move them into a part's folder: {top}"
    parts = {p.name for p in (REPO / "tests").iterdir()
             if p.is_dir() and not p.name.startswith((".", "_"))}
    for part in parts - {"boot"}:
        assert (REPO / "tests" / part / "README.md").exists(), f"tests/{part}/ says what it holds"
