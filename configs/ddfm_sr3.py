"""DDFM with an SR3 prior (the DMFuse UNet: the default prior, or a DMFuse bundle/workdir's UNet): the
sampler settings only, since the UNet and its beta schedule come with its params. The defaults are
those of the authors' run: 100 respaced steps, x0 clipped, EM lamb 0.5, rho 0.001, seed 3407.

  dmfuse fuse --method ddfm --config configs/ddfm_sr3.py --ir IR --vis VIS --out OUT
  dmfuse fuse --method ddfm --prior runs/fusion --config configs/ddfm_sr3.py --ir IR --vis VIS --out OUT
"""
from dmfuse_jax.ddfm.config import ddfm_config


def get_config():
    return ddfm_config(prior="sr3", timestep_respacing="100", clip_denoised=True, lamb=0.5, rho=0.001, seed=3407)
