"""DDFM as the authors ran it: OpenAI's 256x256 unconditional ImageNet model (guided-diffusion
`256x256_diffusion_uncond.pt`, 552.8 M params) as the prior; DDIM, eta 0, 100 respaced steps of the
1000-step linear schedule, x0 clipped to [-1, 1]; EM with lamb 0.5, rho 0.001; seed 3407. The
ml_collections mirror of MMIF-DDFM's configs/model_config_imagenet.yaml + configs/diffusion_config.yaml
(every key is read: see dmfuse_jax/ddfm/config.py; `--steps` and `--seed` override
diffusion.timestep_respacing and seed when given).

  dmfuse convert-torch --guided-diffusion 256x256_diffusion_uncond.pt --config configs/ddfm_openai256.py --out bundles/ddfm_openai256
  dmfuse fuse --method ddfm --prior bundles/ddfm_openai256 --ir IR --vis VIS --out OUT
"""
from dmfuse_jax.ddfm.config import OPENAI_256_UNCOND, ddfm_config


def get_config():
    return ddfm_config(prior="guided_diffusion", model=OPENAI_256_UNCOND, steps=1000, noise_schedule="linear",
                       timestep_respacing="100", clip_denoised=True, lamb=0.5, rho=0.001, seed=3407)
