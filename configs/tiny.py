"""A tiny DMFuse (inner channels 8, GroupNorm 8 groups, config image size 64) for tests and quick starts.

Same layout as the paper's model, about 1.5 M UNet params; runs in seconds on 2 CPU cores.
  dmfuse info --config configs/tiny.py
"""
from dmfuse_jax import config_lib


def get_config():
    config = config_lib.base_config(width=8, norm_groups=8, image_size=64)
    config.diffusion.num_timesteps = 2000
    config.name = "tiny"
    return config
