"""The tiny guided-diffusion UNet of ../shared/golden/ddfm (ddfm_unet_tiny.pth: image_size 64, 32
channels, 1 res block, channel_mult 1,2,2, attention at downsample factors 2 and 4, 16 channels per
head, learn_sigma, scale-shift norm, resblock_updown; 1,422,278 params) with DDFM's sampler, 10
respaced steps of the 1000-step linear schedule, the authors' EM settings and seed. For tests.
"""
from dmfuse_jax.ddfm.config import ddfm_config


def get_config():
    return ddfm_config(prior="guided_diffusion", model=dict(
        image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", learn_sigma=True,
        attention_resolutions="32,16", num_head_channels=16, use_scale_shift_norm=True,
        resblock_updown=True, dropout=0.0), timestep_respacing="10")
