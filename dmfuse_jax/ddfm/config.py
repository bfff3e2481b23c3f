"""DDFM configs: ml_collections mirrors of guided-diffusion's `create_model` and DDFM's `create_sampler`
arguments (the authors' `configs/model_config_imagenet.yaml` and `configs/diffusion_config.yaml`).
Every key is read by the sampling code (`ddfm/priors.py`, `ddfm/fuser.py`); tests/test_ddfm_config.py
changes each one and sees the result change.

  config.prior         'guided_diffusion' (the authors' prior, `config.model` = create_model arguments)
                       | 'sr3' (the DMFuse UNet; its model config and schedule come with its params)
  config.model         create_model(...) arguments (guided_diffusion only)
  config.diffusion     steps, noise_schedule: the prior's own beta schedule (guided_diffusion only);
                       timestep_respacing: the DDIM steps taken (`space_timesteps`, e.g. '100', 'ddim50');
                       clip_denoised: clip the x0 estimate to [-1, 1]
  config.em            lamb, rho of EM_onestep (the authors' 0.5, 0.001)
  config.seed          x_start noise seed (3407 in the authors' run)
  config.dtype         compute dtype of a guided_diffusion prior: 'float32' | 'bfloat16' (EM and DDIM
                       maths stay float32; an SR3 prior runs in its DMFuse config's dtype)

The authors' yaml also names sampler (ddim), model_mean_type (epsilon), model_var_type,
dynamic_threshold (False) and rescale_timesteps (False): DDIM with eta 0 on an epsilon model is the
only sampler here and the variance never enters it, so those are not config keys (a bundle config
that names them with another value is refused by `priors.guided_prior`).
"""
from __future__ import annotations

import ml_collections

from dmfuse_jax.ddfm.em import LAMB, RHO
from dmfuse_jax.ddfm.unet import GuidedUNet

# create_model's defaults (guided_diffusion/unet.py of MMIF-DDFM), in its argument order, less the
# arguments of NOT_KEPT_MODEL_KEYS. num_heads and num_heads_upsample count only with
# num_head_channels=-1 (as in create_model).
CREATE_MODEL_DEFAULTS = dict(
    image_size=256, num_channels=128, num_res_blocks=2, channel_mult="", learn_sigma=False,
    attention_resolutions="16", num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
    use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False,
)
# create_model arguments that change nothing at inference here: accepted (the authors' yaml names
# them) but not kept as config keys. None: any value; else the only value supported.
NOT_KEPT_MODEL_KEYS = dict(
    model_path=None,  # create_model loads it; here conversion does
    dropout=None, use_checkpoint=None,  # training only (no dropout at inference; gradient checkpointing)
    use_fp16=False,  # the compute dtype is config.dtype
    class_cond=False,  # DDFM samples an unconditional model
)

# The authors' prior: OpenAI's 256x256 unconditional ImageNet model (configs/model_config_imagenet.yaml).
OPENAI_256_UNCOND = dict(
    image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
    class_cond=False, use_checkpoint=False, attention_resolutions="32,16,8", num_heads=4,
    num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0,
    resblock_updown=True, use_fp16=False, use_new_attention_order=False,
)

# configs/diffusion_config.yaml of MMIF-DDFM, the keys that can change the run.
SAMPLER_DEFAULTS = dict(steps=1000, noise_schedule="linear", clip_denoised=True, timestep_respacing="100")
# Only these for the SR3 prior (its beta schedule is its DMFuse config's).
SR3_SAMPLER_KEYS = ("clip_denoised", "timestep_respacing")
# The authors' values of the yaml keys that are not config keys here (see the module docstring).
FIXED_SAMPLER = dict(sampler="ddim", model_mean_type="epsilon", dynamic_threshold=False, rescale_timesteps=False)
SEED = 3407  # the authors' run
PRIOR_KINDS = ("guided_diffusion", "sr3")


def model_config(**create_model_kwargs) -> ml_collections.ConfigDict:
    """create_model(**kwargs) arguments (unknown names are an error, as in Python), less those of
    NOT_KEPT_MODEL_KEYS."""
    unknown = sorted(set(create_model_kwargs) - set(CREATE_MODEL_DEFAULTS) - set(NOT_KEPT_MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown create_model arguments: {', '.join(unknown)} "
                         f"(expected some of {', '.join(CREATE_MODEL_DEFAULTS)})")
    for k, only in NOT_KEPT_MODEL_KEYS.items():
        if only is not None and k in create_model_kwargs and create_model_kwargs[k] != only:
            raise ValueError(f"create_model argument {k}={create_model_kwargs[k]!r} is not supported "
                             f"(only {only!r}; " + ("use config.dtype)" if k == "use_fp16" else "DDFM's prior is unconditional)"))
    kept = {k: v for k, v in create_model_kwargs.items() if k not in NOT_KEPT_MODEL_KEYS}
    return ml_collections.ConfigDict({**CREATE_MODEL_DEFAULTS, **kept})


def diffusion_config(prior: str = "guided_diffusion", **kwargs) -> ml_collections.ConfigDict:
    keys = SAMPLER_DEFAULTS if prior == "guided_diffusion" else SR3_SAMPLER_KEYS
    unknown = sorted(set(kwargs) - set(keys))
    if unknown:
        raise ValueError(f"unknown create_sampler arguments for a {prior} prior: {', '.join(unknown)} "
                         f"(expected some of {', '.join(keys)})")
    return ml_collections.ConfigDict({**{k: SAMPLER_DEFAULTS[k] for k in keys}, **kwargs})


def ddfm_config(prior: str = "guided_diffusion", model: dict | None = None, *, lamb: float = LAMB,
                rho: float = RHO, seed: int = SEED, **diffusion) -> ml_collections.ConfigDict:
    """A DDFM config (see the module docstring); `diffusion`: create_sampler arguments."""
    if prior not in PRIOR_KINDS:
        raise ValueError(f"prior {prior!r}: expected one of {', '.join(PRIOR_KINDS)}")
    config = dict(prior=prior, diffusion=diffusion_config(prior, **diffusion),
                  em=dict(lamb=float(lamb), rho=float(rho)), seed=int(seed))
    if prior == "guided_diffusion":
        config.update(model=model_config(**(OPENAI_256_UNCOND if model is None else model)), dtype="float32")
    elif model is not None:
        raise ValueError("an sr3 prior's model comes with its params: give no model")
    return ml_collections.ConfigDict(config)


def channel_mult_of(image_size: int, channel_mult) -> tuple:
    """create_model's channel_mult rule: '' -> by image size, else '1,2,2' (or a sequence)."""
    if channel_mult in ("", None):
        table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        if image_size not in table:
            raise ValueError(f"unsupported image size: {image_size}")
        return table[image_size]
    if isinstance(channel_mult, str):
        return tuple(int(c) for c in channel_mult.split(","))
    return tuple(channel_mult)


def attention_ds_of(image_size: int, attention_resolutions) -> tuple[int, ...]:
    """'32,16,8' (resolutions) -> downsample factors image_size // res, as create_model."""
    if isinstance(attention_resolutions, int):
        return (image_size // attention_resolutions,)
    if isinstance(attention_resolutions, str):
        return tuple(image_size // int(r) for r in attention_resolutions.split(",") if r)
    return tuple(image_size // int(r) for r in attention_resolutions)


def build_guided_unet(model: ml_collections.ConfigDict | dict, dtype: str = "float32") -> GuidedUNet:
    """create_model(**model) as a Flax module (MMIF-DDFM's create_model: 3 input channels)."""
    from dmfuse_jax.models.builders import dtype_of

    m = model_config(**dict(model))
    return GuidedUNet(
        in_channels=3, model_channels=int(m.num_channels), out_channels=6 if m.learn_sigma else 3,
        num_res_blocks=int(m.num_res_blocks),
        attention_resolutions=attention_ds_of(int(m.image_size), m.attention_resolutions),
        channel_mult=channel_mult_of(int(m.image_size), m.channel_mult),
        num_heads=int(m.num_heads), num_head_channels=int(m.num_head_channels),
        num_heads_upsample=int(m.num_heads_upsample), use_scale_shift_norm=bool(m.use_scale_shift_norm),
        resblock_updown=bool(m.resblock_updown), use_new_attention_order=bool(m.use_new_attention_order),
        dtype=dtype_of(dtype),
    )
