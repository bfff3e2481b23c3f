"""The house (`tests/import_graph.py`): no file circle, no folder loop, no arrow back up, and no library
module importing a command (`commands/`, `cli.py`)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import import_graph

HERE = Path(__file__).resolve().parent


def test_the_package_has_no_circles_no_folder_loops_and_commands_only_on_top():
    h = import_graph.house()
    assert h["file_circles"] == [], f"files importing each other in a ring: {h['file_circles']}"
    assert h["folder_loops"] == [], f"folders importing each other in a ring: {h['folder_loops']}"
    assert h["back_up"] == []
    assert h["library_imports_command"] == [], f"library modules importing a command: {h['library_imports_command']}"
    assert h["floors"]["commands"] == max(f for r, f in h["floors"].items() if r not in ("train", "__main__"))
    for low in ("errors", "sharding", "workdir", "models"):
        assert h["floors"][low] < h["floors"]["training"] and h["floors"][low] < h["floors"]["inference"], low


def test_the_graph_finds_a_planted_circle_and_a_command_import(tmp_path):
    """The checker itself: a two-file ring and a library module importing commands are reported."""
    pkg = tmp_path / "dmfuse_jax"
    for sub in ("", "a", "commands"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from dmfuse_jax.a import y\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from dmfuse_jax.a.x import g\n    from dmfuse_jax.commands import run\n")
    (pkg / "commands" / "run.py").write_text("X = 1\n")
    h = import_graph.house(pkg)
    assert h["file_circles"] == [["dmfuse_jax.a.x", "dmfuse_jax.a.y"]]
    assert h["folder_loops"] == []  # a -> commands only
    assert ("dmfuse_jax.a.y", "dmfuse_jax.commands.run") in h["library_imports_command"]


def test_the_script_runs_and_exits_0():
    res = subprocess.run([sys.executable, str(HERE / "import_graph.py")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "file circles: 0" in res.stdout and "folder loops: 0" in res.stdout
