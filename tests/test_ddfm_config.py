"""Every key of configs/ddfm_*.py changes what DDFM runs (issue 21): a micro guided-diffusion prior
(configs/ddfm_tiny.py with 2 levels, 828 k random params) sampled for 2 respaced steps on one 8x12
crop of TNO pair 07; each key changed alone either changes the fused image or is refused with an
error that names the problem. (The golden-parity tests of tests/test_ddfm.py use the real tiny prior.)"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import DATA, ROOT

CONFIGS = ("ddfm_tiny", "ddfm_openai256", "ddfm_sr3")


def _config(name="ddfm_tiny"):
    from dmfuse_jax.config_lib import load_config
    return load_config(str(ROOT / "configs" / f"{name}.py"))


def _base():
    config = _config()
    config.diffusion.timestep_respacing = "2"  # fast; the key itself is tested below
    config.model.channel_mult, config.model.attention_resolutions = "1,2", "32"  # 2 levels: compiles in ~2 s
    return config


@pytest.fixture(scope="module")
def params():
    import jax
    import jax.numpy as jnp
    from dmfuse_jax.ddfm.config import build_guided_unet
    module = build_guided_unet(_base().model)
    return jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))["params"]


@pytest.fixture(scope="module")
def pair():
    from dmfuse_jax.data.images import read_image
    ir, vi = (read_image(DATA / "tno" / s / "07.png")[120:128, 200:212, :1] for s in ("ir", "vi"))
    return ir, vi


def fuse(config, params, pair, **kw):
    from dmfuse_jax.ddfm.fuser import DDFMFuser
    from dmfuse_jax.ddfm.priors import guided_prior
    fuser = DDFMFuser(prior=guided_prior(config, params, "micro prior"), bucket=4, progress=False, **kw)
    [out] = fuser.fuse_luma([pair[0]], [pair[1]])
    return out


@pytest.fixture(scope="module")
def baseline(pair, params):
    out = fuse(_base(), params, pair)
    np.testing.assert_array_equal(fuse(_base(), params, pair), out)  # deterministic: any change is the key's
    return out


def _set(config, key, value):
    *path, leaf = key.split(".")
    node = config
    for p in path:
        node = node[p]
    node[leaf] = value


# key -> a changed value that runs (the fused image must change). lamb acts through the TV term,
# whose weight is rho: at the authors' rho 0.001 it moves the image by ~1e-5, so it is tested at rho 1.
CONTEXT = {"em.lamb": {"em.rho": 1.0}}
CHANGES_RESULT = {
    "em.lamb": 1e-4, "em.rho": 1.0, "seed": 1, "diffusion.timestep_respacing": "3",
    "diffusion.clip_denoised": False, "diffusion.steps": 500, "diffusion.noise_schedule": "cosine",
    "dtype": "bfloat16",
    # the same params fit; attention changes
    "model.num_head_channels": 8, "model.use_new_attention_order": True,
}
# with num_head_channels=-1 (create_model: heads counted by num_heads, upsampling ones by num_heads_upsample)
BY_HEAD_COUNT = {"model.num_heads": 4, "model.num_heads_upsample": 4}
# key -> (a changed value, what the error says): the tiny prior's params no longer fit, or it is refused
REFUSED = {
    "prior": ("sr3", "the DDFM config is for prior 'sr3'"),
    "model.image_size": (128, "do not fit"), "model.num_channels": (64, "do not fit"),
    "model.num_res_blocks": (2, "do not fit"), "model.channel_mult": ("1,1", "do not fit"),
    "model.learn_sigma": (False, "do not fit"), "model.attention_resolutions": ("16", "do not fit"),
    "model.use_scale_shift_norm": (False, "do not fit"), "model.resblock_updown": (False, "do not fit"),
}


def _leaf_keys(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_of_the_ddfm_configs_is_tested_here(name):
    keys = set(_leaf_keys(_config(name).to_dict()))
    untested = keys - set(CHANGES_RESULT) - set(BY_HEAD_COUNT) - set(REFUSED)
    assert not untested, f"configs/{name}.py keys with no test that they change the result: {sorted(untested)}"


@pytest.mark.parametrize("key", list(CHANGES_RESULT))
def test_changing_a_config_key_changes_the_fused_image(key, params, pair, baseline):
    config = _base()
    for k, v in CONTEXT.get(key, {}).items():
        _set(config, k, v)
    ref = fuse(config, params, pair) if key in CONTEXT else baseline
    _set(config, key, CHANGES_RESULT[key])
    out = fuse(config, params, pair)
    assert out.shape == ref.shape
    diff = float(np.abs(out - ref).max())
    assert diff > 1e-4, f"config.{key} = {CHANGES_RESULT[key]!r} left the fused image unchanged (max diff {diff})"


@pytest.mark.parametrize("key", list(BY_HEAD_COUNT))
def test_head_counts_change_the_image_when_heads_are_counted(key, params, pair):
    config = _base()
    config.model.num_head_channels = -1
    ref = fuse(config, params, pair)
    _set(config, key, BY_HEAD_COUNT[key])
    diff = float(np.abs(fuse(config, params, pair) - ref).max())
    assert diff > 1e-4, f"config.{key} = {BY_HEAD_COUNT[key]} left the fused image unchanged (max diff {diff})"


@pytest.mark.parametrize("key", list(REFUSED))
def test_a_config_key_the_prior_cannot_take_is_refused(key, params, pair):
    from dmfuse_jax.errors import UserError
    config = _base()
    value, message = REFUSED[key]
    _set(config, key, value)
    with pytest.raises(UserError, match=message):
        fuse(config, params, pair)


def test_steps_and_seed_override_the_config_only_when_given(params, pair, baseline):
    """DDFMFuser(steps=None, seed=None) is the config's respacing and seed; given, they win."""
    from dmfuse_jax.ddfm.fuser import DDFMFuser
    from dmfuse_jax.ddfm.priors import guided_prior
    config = _base()
    config.seed = 11
    prior = guided_prior(config, params, "micro prior")
    f = DDFMFuser(prior=prior, progress=False)
    assert (f.sampler.num_steps, f.seed_used) == (2, 11)
    f = DDFMFuser(prior=prior, steps=3, seed=3407, progress=False)
    assert (f.sampler.num_steps, f.seed_used) == (3, 3407)
    np.testing.assert_array_equal(fuse(config, params, pair, seed=3407), baseline)


def test_one_em_default_the_authors():
    """em.py, the Sampler and the config share the authors' lamb 0.5, rho 0.001 (MMIF-DDFM sample.py)."""
    import inspect
    from dmfuse_jax.ddfm import em
    from dmfuse_jax.ddfm.config import ddfm_config
    from dmfuse_jax.ddfm.sampler import Sampler
    sig = inspect.signature(em.em_onestep).parameters
    assert (sig["lamb"].default, sig["rho"].default) == (0.5, 0.001)
    assert (Sampler.lamb, Sampler.rho) == (0.5, 0.001)
    for prior in ("guided_diffusion", "sr3"):
        assert dict(ddfm_config(prior).em) == {"lamb": 0.5, "rho": 0.001}


def test_an_sr3_ddfm_config_sets_the_default_priors_sampling():
    """configs/ddfm_sr3.py with the default prior (the bundled model's SR3 UNet): its settings are the
    sampler's; without a DDFM config the same defaults apply."""
    from dmfuse_jax.ddfm.config import ddfm_config
    from dmfuse_jax.ddfm.fuser import DDFMFuser
    from dmfuse_jax.ddfm.priors import load_prior
    config = _config("ddfm_sr3")
    assert config == ddfm_config(prior="sr3")
    config.diffusion.timestep_respacing, config.em.lamb, config.em.rho, config.seed = "7", 0.25, 0.02, 5
    config.diffusion.clip_denoised = False
    prior = load_prior(None, config=config)
    assert prior.kind == "sr3" and prior.config is config
    f = DDFMFuser(prior=prior, progress=False)
    assert (f.sampler.num_steps, f.sampler.lamb, f.sampler.rho, f.sampler.clip, f.seed_used) == (7, 0.25, 0.02, False, 5)
    f = DDFMFuser(prior=load_prior(None), progress=False)
    assert (f.sampler.num_steps, f.sampler.lamb, f.sampler.rho, f.sampler.clip, f.seed_used) == (100, 0.5, 0.001, True, 3407)
