"""Shared test fixtures. Tests run on CPU; heavy cases are marked `slow` and run with --runslow."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DMFUSE_SHARED", ROOT.parent / "shared"))
GOLDEN = SHARED / "golden"
DATA = SHARED / "data"
WEIGHTS = SHARED / "weights"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared not found at {SHARED} (set DMFUSE_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_config():
    from dmfuse_jax.config_lib import load_config
    return load_config(str(ROOT / "configs" / "tiny.py"))


@pytest.fixture(scope="session")
def quarter_config():
    from dmfuse_jax.config_lib import load_config
    return load_config(str(ROOT / "configs" / "dmfuse_quarter.py"))


# XLA's CPU backend spends most of a test's time compiling; its LLVM optimisation level 0 compiles
# ~3x faster and the tiny test models still run in milliseconds. Set before jax is imported, and
# inherited by the subprocesses tests start. Export XLA_FLAGS yourself to override.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# With the `tpu` extra installed (CI installs it for `dmfuse compile`), every JAX process on a machine
# without TPUs would start libtpu's probe for chips: warnings on stderr and ~230 MB more resident per
# process. The suite runs on CPU, so it (and the subprocesses it starts) asks for CPU unless told
# otherwise or an accelerator is present; `dmfuse compile` reaches libtpu's compile-only client anyway.
def _no_accelerator() -> bool:
    import glob
    return not any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*"))


if "JAX_PLATFORMS" not in os.environ and _no_accelerator():
    os.environ["JAX_PLATFORMS"] = "cpu"

# `dmfuse train/fuse` turn on JAX's persistent compilation cache in ~/.cache by default; tests that run
# them in this process must not write there. Subprocess tests that want a cache give JAX a folder
# (testing.subprocess_env), which takes precedence; the cache's own tests set their folders.
os.environ.setdefault("DMFUSE_COMPILATION_CACHE", "off")
