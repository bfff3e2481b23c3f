"""Helpers for the training tests (test-only, not part of the package): tiny configs and training
runs in subprocesses.

Subprocesses share a persistent XLA compilation cache (per test session), so identical programs
compile once across the runs of a test.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dmfuse_jax.data.pipeline import REPO_ROOT

PRETRAIN_CONFIG = str(REPO_ROOT / "configs" / "quickstart_pretrain.py")
FUSION_CONFIG = str(REPO_ROOT / "configs" / "quickstart_fusion.py")

# A 3-level width-8 UNet at 16x16 (attention at 8x8; levels 2 and 3 share the last reducer): every code path, compiles in seconds.
TINY_MODEL = ["model.unet.channel_mults=(1, 2, 2)", "model.unet.image_size=16", "model.unet.attn_res=(8,)",
              "model.unet.norm_groups=4",
              "diffusion.num_timesteps=200"]
TINY = {
    "pretrain": TINY_MODEL + ["batch_size=4", "total_steps=6", "checkpoint_every_steps=2", "log_every_steps=2",
                              "preview_every_steps=0", "model.unet.dropout=0.1", "optimizer.warmup_steps=2",
                              "data.num_threads=1", "evals.tno.every_steps=0", "evals.samples.every_steps=0",
                              "checkpoint.best.metric="],
    "fusion": TINY_MODEL + ["batch_size=4", "total_steps=4", "checkpoint_every_steps=2", "log_every_steps=2",
                            "preview_every_steps=0", "data.patch_size=16", "data.patch_step=64",
                            "data.max_pairs=2", "init.unet_workdir=", "data.num_threads=1",
                            "evals.holdout.every_steps=0", "checkpoint.best.metric="],
}


def tiny_config(stage: str, extra: list[str] | None = None):
    from dmfuse_jax.config_lib import load_config
    path = PRETRAIN_CONFIG if stage == "pretrain" else FUSION_CONFIG
    return load_config(path, TINY[stage] + list(extra or []))


# Unoptimised XLA CPU code compiles about 3x faster; every run of one test uses the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def subprocess_env(cache_dir: str | os.PathLike | None = None, xla_flags: str = FAST_COMPILE, **extra: str) -> dict:
    env = dict(os.environ)
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                "XLA_FLAGS": xla_flags})
    if cache_dir is not None:
        env.update({"JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    env.update(extra)
    return env


def train_command(stage: str, workdir: str | os.PathLike, extra: list[str] | None = None,
                  hang_after: int | None = None) -> list[str]:
    """hang_after: run through tests/hang_train.py, which waits for a signal after that step."""
    path = PRETRAIN_CONFIG if stage == "pretrain" else FUSION_CONFIG
    launcher = ["-m", "dmfuse_jax.train"] if hang_after is None else \
        [str(Path(__file__).with_name("hang_train.py")), str(int(hang_after))]
    return ([sys.executable, *launcher, "--config", path, "--workdir", str(workdir)]
            + [f"--config.{o}" for o in TINY[stage] + list(extra or [])])


def start_training(stage: str, workdir, extra=None, env=None, log: str | os.PathLike | None = None,
                   hang_after: int | None = None) -> subprocess.Popen:
    """Starts a training run; stdout+stderr go to `log` (default: workdir.log). hang_after: after that
    step (and its checkpoint) the run prints "HANG at step N" and waits for a signal (tests/hang_train.py)."""
    log = Path(log or f"{workdir}.log")
    f = open(log, "w")
    return subprocess.Popen(train_command(stage, workdir, extra, hang_after), stdout=f, stderr=subprocess.STDOUT,
                            env=env or subprocess_env(), cwd=str(REPO_ROOT))


def read_log(workdir) -> str:
    return Path(f"{workdir}.log").read_text()


def one_step_on_meshes(stage_name: str, mesh_shapes, batch_size: int = 8) -> dict:
    """One training step of the tiny `stage_name` config from the same initial state and the same
    real batch on several (data, fsdp) meshes (1 device when the shape is (1, 1)), for the sharding
    test. Returns {mesh_shape: dict(params, ema_params, metrics, specs)} as numpy."""
    import jax
    import numpy as np

    from dmfuse_jax.data.pipeline import train_dataset
    from dmfuse_jax.sharding import make_mesh
    from dmfuse_jax.training.train import build_stage
    from dmfuse_jax.training.trainer import Trainer

    import time
    # No warmup: the first step must move the params.
    config = tiny_config(stage_name, [f"batch_size={batch_size}", "sharding.fsdp_min_size=0",
                                      "optimizer.warmup_steps=0"])
    stage = build_stage(config)
    source, transform = stage.train_source("/tmp")
    batch = train_dataset(source, transform, seed=0, global_batch=batch_size)[0]
    state0 = None
    out = {}
    for shape in mesh_shapes:
        t0 = time.perf_counter()
        n = int(np.prod(shape))
        trainer = Trainer(config, stage, mesh=make_mesh(shape, jax.devices()[:n]))
        if state0 is None:
            state0 = jax.device_get(trainer.init_state())
        state = jax.device_put(state0, trainer.state_sharding)
        new, metrics = trainer.train_step(state, trainer.place(batch))
        specs = {jax.tree_util.keystr(k): str(v.sharding.spec)
                 for k, v in jax.tree_util.tree_flatten_with_path(new.opt_state)[0]
                 if hasattr(v, "sharding") and getattr(v, "ndim", 0) >= 2}
        out[tuple(shape)] = dict(params=jax.device_get(new.params), ema_params=jax.device_get(new.ema_params),
                                 metrics=jax.device_get(metrics), specs=specs,
                                 batch_spec=str(trainer.place(batch)[next(iter(batch))].sharding.spec),
                                 seconds=time.perf_counter() - t0)
    return out


def init_params(module, seed: int, *args, method=None, **kwargs):
    """Params of `module` for inputs `args` (as `module.init(...)['params']`), drawn host-side in numpy
    (`dmfuse_jax.models.init`) from shapes that `jax.eval_shape` traces: no compiled `init`."""
    import jax

    from dmfuse_jax.models.init import params_from_shapes

    key = jax.random.PRNGKey(0)
    shapes = jax.eval_shape(
        lambda: module.init({"params": key, "noise": key, "dropout": key}, *args, method=method, **kwargs))["params"]
    return params_from_shapes(shapes, seed)


def init_dmfuse_params(model, seed: int = 0, size: int = 32):
    """All DMFuse params ({'unet', 'head'}), drawn host-side. `size` only needs to be a valid input size."""
    import jax.numpy as jnp

    x = jnp.zeros((1, size, size, 1), jnp.float32)
    return init_params(model, seed, x, x, method=model.init_all)


def golden_caim_params():
    """(CAIM params of the released head with gamma = 1, the golden CAIM vectors): the authors'
    PyTorch CAIM inputs and outputs, for every criss-cross implementation's parity test."""
    import jax
    import numpy as np

    from conftest import GOLDEN, WEIGHTS
    from dmfuse_jax.conversion import convert_fusion_head, load_torch_state_dict
    from dmfuse_jax.models.fusion_head import FusionHead

    golden = np.load(GOLDEN / "caim_gamma1_io.npz")
    h = np.load(GOLDEN / "fusion_head_io.npz")
    ir = [h[f"ir_level{i}"] for i in range(1, 6)]
    vi = [h[f"vi_level{i}"] for i in range(1, 6)]
    template = jax.eval_shape(lambda: FusionHead().init(jax.random.PRNGKey(0), ir, vi))["params"]
    head = convert_fusion_head(load_torch_state_dict(str(WEIGHTS / "dmfuse_fusion_head.pth")), template)
    return dict(head["crossatten"], gamma=np.ones(1, np.float32)), golden


def caim_inputs(shape, cq=4, cv=32, seed=0, dtype=None):
    """CAIM's attention inputs at its channel sizes: q, k ~ N(0, 0.5^2), v ~ N(0, 1) (B, H, W, C), cast
    to `dtype` when given, and a float32 output cotangent (scaled by 1/sqrt(H + W))."""
    import jax
    import numpy as np

    b, h, w = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = 0.5 * jax.random.normal(ks[0], (b, h, w, cq))
    k = 0.5 * jax.random.normal(ks[1], (b, h, w, cq))
    v = jax.random.normal(ks[2], (b, h, w, cv))
    ct = jax.random.normal(ks[3], (b, h, w, cv)) / np.sqrt(h + w)
    if dtype is not None:
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    return q, k, v, ct
