"""One workdir, one default (issue 21): `dmfuse_jax.load(workdir)` and `dmfuse_jax.load_params(workdir)`
both give the EMA params when the checkpoint has them. The workdir is written here by the training
code's own Checkpointer from a tiny fusion state whose EMA params differ from its raw ones."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import helpers as T


def _workdir(path):
    from dmfuse_jax.data.pipeline import train_dataset, train_iterator
    from dmfuse_jax.training.checkpoint import Checkpointer
    from dmfuse_jax.training.train import build_stage, prepare_workdir
    from dmfuse_jax.training.trainer import Trainer

    config = T.tiny_config("fusion")
    stage = build_stage(config)
    trainer = Trainer(config, stage, total_steps=4)
    state = trainer.init_state()
    state = state.replace(ema_params=jax.tree_util.tree_map(lambda a: a + 1.0, state.ema_params))
    prepare_workdir(config, path)
    source, transform = stage.train_source(path)
    it = train_iterator(train_dataset(source, transform, seed=0, global_batch=int(config.batch_size)),
                        num_threads=1, prefetch=1)
    ckpt = Checkpointer(path, every=1, stage=stage.name, config=config, async_save=False)
    try:
        ckpt.save(1, state, it, force=True)
    finally:
        ckpt.close()
        trainer.close()
    return jax.device_get(state)


@pytest.mark.filterwarnings("ignore:init.unet_workdir")  # the tiny fusion stage's random UNet
def test_load_and_load_params_give_the_same_weights_by_default(tmp_path):
    import dmfuse_jax

    wd = tmp_path / "fusion"
    state = _workdir(wd)
    by_load = dmfuse_jax.load(str(wd)).params
    by_params = dmfuse_jax.load_params(wd)
    jax.tree_util.tree_map(np.testing.assert_array_equal, by_load, by_params)
    ema = {**(state.frozen or {}), **state.ema_params}
    jax.tree_util.tree_map(np.testing.assert_array_equal, by_params, ema)
    # and they are not the raw params: those are 1 less in every trained leaf
    raw = dmfuse_jax.load_params(wd, ema=False)
    gaps = {float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves({k: raw[k] for k in state.ema_params}),
                                                       jax.tree_util.tree_leaves(state.ema_params))}
    assert gaps == {1.0}, f"ema=False should give the raw params (gaps {gaps})"
