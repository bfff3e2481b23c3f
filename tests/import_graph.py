"""The package drawn as a house from its own imports: `python tests/import_graph.py [--arrows]`.

Every `import` of a dmfuse_jax module anywhere in a file counts (a function-local import is still a
dependency). A *room* is a top-level module (`flops.py`) or a sub-package (`inference/`); an *arrow*
joins two rooms when a file of one imports a file of the other. Prints:
- rooms, arrows and floors: a room's floor is 0 when it imports no other room, else one more than
  the highest room it imports (rooms in a loop are drawn as one, on one floor);
- file circles: groups of files that import each other, directly or around a ring;
- folder loops: groups of rooms that do;
- arrows that run back up: the arrows inside a loop (with no loop, none can);
- library rooms that import a command room (`commands/`, `cli.py`, `__main__.py`, `train.py`: the
  `python -m dmfuse_jax.train` entry).
Exit code 1 when any of the last four is non-empty. `tests/test_import_graph.py` runs it.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "dmfuse_jax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
COMMAND_ROOMS = ("commands", "cli", "__main__", "train")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file}."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules a file imports (`from a import b` counts as a.b when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith(PACKAGE):
                found.add(t)
    # `from pkg.sub import x` also names pkg.sub; keep the deepest module of each chain only
    return {t for t in found if not any(o != t and o.startswith(t + ".") for o in found)} | \
        {t for t in found if t in known and ROOT.joinpath(*t.split(".")[1:], "__init__.py").exists() is False}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def sccs(nodes, edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan), as sorted lists."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def house(root: Path = ROOT) -> dict:
    mods = modules(root)
    known = set(mods)
    file_edges = {m: imports_of(m, p, known) for m, p in mods.items()}
    room_edges: dict[str, set[str]] = {}
    for m, targets in file_edges.items():
        for t in targets:
            if room(t) != room(m) and room(m) != "__init__" and room(t) != "__init__":
                room_edges.setdefault(room(m), set()).add(room(t))
    rooms = sorted({room(m) for m in mods} - {"__init__"})
    file_circles = [c for c in sccs(mods, file_edges) if len(c) > 1]
    room_loops = [c for c in sccs(rooms, room_edges) if len(c) > 1]
    comp_of = {r: i for i, c in enumerate(sccs(rooms, room_edges)) for r in c}
    floors: dict[str, int] = {}

    def floor(r, seen=()):
        if r not in floors:
            above = [t for t in room_edges.get(r, ()) if comp_of[t] != comp_of[r]]
            floors[r] = 1 + max((floor(t) for t in above), default=-1)
            for other in rooms:  # a loop's rooms share one floor
                if comp_of[other] == comp_of[r] and other != r:
                    floors[other] = max(floors.get(other, 0), floors[r])
        return floors[r]

    for r in rooms:
        floor(r)
    arrows = sorted((a, b) for a, ts in room_edges.items() for b in ts)
    back_up = [(a, b) for a, b in arrows if comp_of[a] == comp_of[b]]
    commands = [(m, t) for m, ts in sorted(file_edges.items()) for t in sorted(ts)
                if room(m) not in COMMAND_ROOMS and room(t) in COMMAND_ROOMS and room(m) != "__init__"]
    return dict(rooms=rooms, arrows=arrows, floors=floors, n_floors=1 + max(floors.values(), default=-1),
                file_circles=file_circles, folder_loops=room_loops, back_up=back_up, library_imports_command=commands)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arrows", action="store_true", help="list every arrow and every room's floor")
    args = p.parse_args(argv)
    h = house()
    print(f"{len(h['rooms'])} rooms on {h['n_floors']} floors, {len(h['arrows'])} arrows")
    if args.arrows:
        for f in range(h["n_floors"]):
            print(f"  floor {f}: " + ", ".join(r for r in h["rooms"] if h["floors"][r] == f))
        for a, b in h["arrows"]:
            print(f"  {a} -> {b}")
    bad = 0
    for key, what in (("file_circles", "file circles"), ("folder_loops", "folder loops"),
                      ("back_up", "arrows that run back up"), ("library_imports_command", "library modules importing a command")):
        items = h[key]
        bad += bool(items)
        print(f"{what}: {len(items)}" + "".join(f"\n  {i}" for i in items))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
