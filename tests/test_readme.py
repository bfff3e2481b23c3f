"""The README is true: its Python examples run as written, its layout matches the package tree, and it
stays short."""
from __future__ import annotations

import re
import subprocess
import sys

import helpers as T
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_readme_layout_lists_every_package_room_and_nothing_that_is_not_there():
    (block,) = re.findall(r"```text\n(.*?)```", _section("Layout"), re.S)
    pkg = ROOT / "dmfuse_jax"
    named = set()
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        first = line.split("   ")[0].strip()
        if not first:
            continue
        for token in first.split():
            if token.endswith("/") or token.endswith(".py"):
                path = (pkg if indent == 2 else ROOT) / token.rstrip("/") if token != "dmfuse_jax/" else pkg
                assert path.exists(), f"README layout names {token}, which is not in the tree"
                named.add(path)
    rooms = {p for p in pkg.iterdir() if p.name not in ("__init__.py", "__pycache__")}
    missing = sorted(p.name for p in rooms - named)
    assert not missing, f"README layout does not list dmfuse_jax/{missing}"
    for top in ("configs", "launch", "benchmarks", "tests", "docs"):
        assert ROOT / top in named, f"README layout does not list {top}/"


def test_readme_is_about_250_lines_and_opens_with_the_two_commands():
    lines = README.splitlines()
    assert len(lines) <= 260, f"README has {len(lines)} lines; move detail to docs/"
    head = "\n".join(lines[:20])
    assert "dmfuse fuse --ir samples/ir --vis samples/vi --out outputs/fused" in head
    assert "python -m pytest" in head


def test_readme_python_examples_run_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no Python example"
    for i, code in enumerate(blocks):
        script = tmp_path / f"readme_{i}.py"
        script.write_text(code)
        env = T.subprocess_env(xla_flags="")
        res = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=900)
        assert res.returncode == 0, f"README Python example {i + 1} failed:\n{code}\n{res.stdout}\n{res.stderr[-3000:]}"
