"""The house rules of the layout: rooms import downwards only, and importing changes nothing.

    kruising <- pretrain <- eval <- merger

Every module of every room is read (not imported) and each of its imports, including the
ones inside functions, is checked against that order: an import of a room above is an error,
and with it any cycle between rooms.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: room -> the rooms it may import (besides itself)
ALLOWED = {
    "kruising": set(),
    "pretrain": {"kruising"},
    "eval": {"kruising", "pretrain"},
    "merger": {"kruising", "pretrain", "eval"},
}


def _modules(room: str) -> list[Path]:
    return sorted((REPO / room).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    module = module if module is not None else _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def _room_graph() -> tuple[dict[str, set[str]], list[str]]:
    graph: dict[str, set[str]] = {room: set() for room in ALLOWED}
    wrong = []
    for room in ALLOWED:
        for path in _modules(room):
            for line, name in _imports(path):
                target = name.split(".")[0]
                if target not in ALLOWED or target == room:
                    continue
                graph[room].add(target)
                if target not in ALLOWED[room]:
                    wrong.append(f"{path.relative_to(REPO)}:{line}: {room} imports {name}")
    return graph, wrong


def test_every_room_has_modules():
    for room in ALLOWED:
        assert _modules(room), f"no modules found under {room}/"


def test_rooms_import_only_the_rooms_below_them():
    _, wrong = _room_graph()
    assert not wrong, "imports against kruising <- pretrain <- eval <- merger:\n" + "\n".join(wrong)


def test_no_import_cycle_between_rooms():
    graph, _ = _room_graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            if nxt == goal or reaches(nxt, goal, seen | {nxt}):
                return True
        return False

    cycles = [room for room in graph if reaches(room, room, set())]
    assert not cycles, f"rooms on an import cycle: {cycles} (graph {graph})"


def test_the_walk_sees_lazy_imports(tmp_path):
    """The checker itself: an import inside a function body counts."""
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from merger.core import engine\n    import eval.api\n")
    assert [name for _, name in _imports(module, "probe")] == ["merger.core", "eval.api"]


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_the_rooms_changes_no_environment_and_loads_no_torch():
    code = (
        "import os, sys; before = dict(os.environ)\n"
        "import kruising, pretrain, eval, merger\n"
        "changed = sorted(k for k in set(before) | set(os.environ) "
        "if before.get(k) != os.environ.get(k))\n"
        "print(changed, sorted({'torch', 'transformers', 'mergekit'} & set(sys.modules)))"
    )
    assert _run(code) == "[] []"


def test_importing_every_module_changes_no_environment():
    """Every module of every room, imported after torch & co (what their imports set is theirs)."""
    names = [_module_name(p) for room in ALLOWED for p in _modules(room)]
    code = (
        "import importlib, os\n"
        "import torch, transformers\n"
        "before = dict(os.environ)\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(k for k in set(before) | set(os.environ) "
        "if before.get(k) != os.environ.get(k)))"
    )
    assert _run(code) == "[]"
