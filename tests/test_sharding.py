"""One training step on a mesh of 8 forced host devices equals the 1-device step (float32
tolerance), for both stages. The (data=2, fsdp=4) mesh has both kinds of parallelism at once: the
batch is split over all 8 devices and params / Adam moments over the 4-device 'fsdp' axis. The pure
data-parallel mesh (8, 1) is checked too with --runslow.

XLA_FLAGS must be set before jax starts, so the 8-device part runs in a subprocess.
Tolerances: metrics (loss, grad norm) to 1e-5 relative. Params to 5e-4 of each array's scale: Adam
divides every gradient by its own magnitude, so an element whose gradient is at float32 rounding
level (reductions are split differently over devices) may move by a fraction of a learning-rate step.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import helpers as T

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    MESHES = [(1, 1), (2, 4)] + ([(8, 1)] if "--slow" in sys.argv else [])
    sys.path.insert(0, "tests")  # for tests/helpers.py (the cwd is the repo root)
    from helpers import one_step_on_meshes
    assert jax.device_count() == 8, jax.devices()
    report = {}
    for stage in ("pretrain", "fusion"):
        out = one_step_on_meshes(stage, MESHES)
        ref = out[(1, 1)]
        for shape in MESHES[1:]:
            got = out[shape]
            diffs = {}
            for part in ("params", "ema_params", "metrics"):
                a = jax.tree_util.tree_leaves(ref[part]); b = jax.tree_util.tree_leaves(got[part])
                diffs[part] = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / (1e-3 + np.max(np.abs(np.asarray(x)))))
                                  for x, y in zip(a, b))
            report[f"{stage} {shape}"] = dict(diffs=diffs, specs=got["specs"], batch_spec=got["batch_spec"],
                                              seconds=got["seconds"])
    print("REPORT " + json.dumps(report))
""")


@pytest.fixture(scope="module")
def report(tmp_path_factory, request):
    env = T.subprocess_env(tmp_path_factory.mktemp("xla_cache"),
                           xla_flags=T.FAST_COMPILE + " --xla_force_host_platform_device_count=8")
    slow = ["--slow"] if request.config.getoption("--runslow") else []
    proc = subprocess.run([sys.executable, "-c", SCRIPT] + slow, env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(T.REPO_ROOT))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("REPORT "):])


TOLERANCE = {"metrics": 1e-5, "params": 5e-4, "ema_params": 5e-4}


def check(report, stage, mesh):
    r = report[f"{stage} {mesh}"]
    for part, d in r["diffs"].items():
        assert d < TOLERANCE[part], f"{stage} on mesh {mesh}: {part} differ from 1 device by {d:.2e} (relative)"
    assert "data" in r["batch_spec"], f"batch not sharded on the data axis: {r['batch_spec']}"


@pytest.mark.parametrize("stage", ["pretrain", "fusion"])
def test_eight_device_fsdp_step_equals_one_device_step(report, stage):
    check(report, stage, "(2, 4)")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "fusion"])
def test_eight_device_data_parallel_step_equals_one_device_step(report, stage):
    check(report, stage, "(8, 1)")


@pytest.mark.parametrize("stage", ["pretrain", "fusion"])
def test_fsdp_mesh_shards_optimizer_state(report, stage):
    specs = report[f"{stage} (2, 4)"]["specs"]
    assert any("fsdp" in s for s in specs.values()), f"no optimizer state sharded on 'fsdp': {specs}"
