"""DMFuse as in the paper: the 1/4-width SR3 UNet (inner channels 32, 24.47 M params) + fusion head.

Model-only config: used by `dmfuse info`, conversion and inference.
  dmfuse info --config configs/dmfuse_quarter.py
  dmfuse info --config configs/dmfuse_quarter.py --config.model.unet.inner_channels=64   # the 1/2 model
"""
from dmfuse_jax import config_lib


def get_config():
    config = config_lib.base_config(width=32)
    config.name = "dmfuse_quarter"
    return config
