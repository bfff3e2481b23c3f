"""The Pallas criss-cross kernel under a batch-sharded mesh of 8 forced host devices (interpret mode):
it runs per batch shard (`criss_cross.batch_parallel`, a shard_map over the context mesh), for the
forward pass and its custom VJP.

  - sharded output and gradients equal the 1-device ones;
  - the compiled program has no all-gather: every device computes its own examples only. The same
    program traced without the context mesh (the partitioner left alone with the opaque kernel)
    does all-gather the batch, so this check can fail;
  - the fusion train step (CAIM through the kernel, pure data parallel (8, 1) mesh) is traced under
    the mesh by the Trainer: its compiled program has no all-gather in CAIM either (without the
    mesh it has 90, all in the six kernels' loops).

XLA_FLAGS must be set before jax starts, so the 8-device part runs in a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import helpers as T

SCRIPT = textwrap.dedent("""
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    from dmfuse_jax.models.criss_cross import criss_cross_attention
    from dmfuse_jax.sharding import batch_sharding, make_mesh
    assert jax.device_count() == 8, jax.devices()
    report = {}

    # -- the kernel alone: (B, H, W) = (8, 5, 6), on a (data=2, fsdp=4) mesh (batch over both axes)
    mesh = make_mesh((2, 4))
    s = batch_sharding(mesh)
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k = (0.5 * jax.random.normal(x, (8, 5, 6, 4)) for x in ks[:2])
    v, ct = (jax.random.normal(x, (8, 5, 6, 8)) for x in ks[2:])

    def run(q, k, v, ct):
        out, vjp = jax.vjp(lambda q, k, v: criss_cross_attention(q, k, v, "pallas"), q, k, v)
        return (out, *vjp(ct))

    ref = jax.jit(run)(q, k, v, ct)  # 1 device
    f = jax.jit(run, in_shardings=s, out_shardings=s)
    args = [jax.device_put(x, s) for x in (q, k, v, ct)]
    report["gathers_without_mesh"] = f.lower(*args).compile().as_text().count("all-gather(")
    with jax.set_mesh(mesh):
        compiled = f.lower(*args).compile()
    got = compiled(*args)
    report["gathers_kernel"] = compiled.as_text().count("all-gather(")
    report["diffs"] = {n: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                       for n, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
    report["out_spec"] = str(got[0].sharding.spec)

    # -- the fusion train step with CAIM through the kernel, data parallel over 8 devices
    sys.path.insert(0, "tests")  # for tests/helpers.py (the cwd is the repo root)
    from helpers import tiny_config
    from dmfuse_jax.training.train import build_stage
    from dmfuse_jax.training.trainer import Trainer
    config = tiny_config("fusion", ["model.head.caim_impl=pallas", "batch_size=8"])
    trainer = Trainer(config, build_stage(config), mesh=make_mesh((8, 1)))
    lowered = trainer.lower()
    report["train_step_shard_map"] = "manual_computation" in lowered.as_text()
    report["gathers_train_step"] = [re.search(r'op_name="([^"]*)"', l).group(1)
                                    for l in lowered.compile().as_text().splitlines() if "all-gather(" in l]
    print("REPORT " + json.dumps(report))
""")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    env = T.subprocess_env(tmp_path_factory.mktemp("xla_cache"),
                           xla_flags=T.FAST_COMPILE + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(T.REPO_ROOT))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("REPORT "):])


def test_sharded_kernel_equals_one_device(report):
    for name, d in report["diffs"].items():
        assert d < 1e-5, f"sharded kernel: {name} differs from 1 device by {d:.2e}"
    assert "data" in report["out_spec"] and "fsdp" in report["out_spec"], report["out_spec"]


def test_sharded_kernel_gathers_nothing(report):
    assert report["gathers_without_mesh"] > 0, "control: the unsharded kernel should all-gather the batch"
    assert report["gathers_kernel"] == 0, f"{report['gathers_kernel']} all-gathers around the sharded kernel"


def test_train_step_runs_the_kernel_per_shard(report):
    assert report["train_step_shard_map"], "the fusion train step did not trace the kernel under the mesh"
    # (The UNet's feature extraction has one all-gather of its own, with either CAIM implementation.)
    around = [n for n in report["gathers_train_step"] if "crossatten" in n or "criss_cross" in n]
    assert not around, f"all-gathers around the kernel in the fusion train step: {around}"
