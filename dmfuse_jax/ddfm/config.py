"""DDFM configs: ml_collections mirrors of guided-diffusion's `create_model` and DDFM's `create_sampler`
arguments (the authors' `configs/model_config_imagenet.yaml` and `configs/diffusion_config.yaml`).

  config.prior         'guided_diffusion' (the authors' prior, `config.model` = create_model arguments)
                       | 'sr3' (the DMFuse UNet; its config comes with its params)
  config.model         create_model(...) arguments
  config.diffusion     create_sampler(...) arguments (DDIM, eta 0)
  config.em            lamb, rho of EM_onestep
  config.seed          x_start noise seed (3407 in the authors' run)
  config.dtype         compute dtype of the prior: 'float32' | 'bfloat16' (EM and DDIM maths stay float32)
"""
from __future__ import annotations

import ml_collections

from dmfuse_jax.ddfm.unet import GuidedUNet

# create_model's defaults (guided_diffusion/unet.py of MMIF-DDFM), in its argument order.
CREATE_MODEL_DEFAULTS = dict(
    image_size=256, num_channels=128, num_res_blocks=2, channel_mult="", learn_sigma=False,
    class_cond=False, use_checkpoint=False, attention_resolutions="16", num_heads=1,
    num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, dropout=0.0,
    resblock_updown=False, use_fp16=False, use_new_attention_order=False,
)
IGNORED_MODEL_KEYS = ("model_path",)  # create_model loads it; here conversion does

# The authors' prior: OpenAI's 256x256 unconditional ImageNet model (configs/model_config_imagenet.yaml).
OPENAI_256_UNCOND = dict(
    image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
    class_cond=False, use_checkpoint=False, attention_resolutions="32,16,8", num_heads=4,
    num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0,
    resblock_updown=True, use_fp16=False, use_new_attention_order=False,
)

# configs/diffusion_config.yaml of MMIF-DDFM.
SAMPLER_DEFAULTS = dict(
    sampler="ddim", steps=1000, noise_schedule="linear", model_mean_type="epsilon",
    model_var_type="learned_range", dynamic_threshold=False, clip_denoised=True,
    rescale_timesteps=False, timestep_respacing="100",
)


def model_config(**create_model_kwargs) -> ml_collections.ConfigDict:
    """create_model(**kwargs) arguments (unknown names are an error, as in Python)."""
    kw = {k: v for k, v in create_model_kwargs.items() if k not in IGNORED_MODEL_KEYS}
    unknown = sorted(set(kw) - set(CREATE_MODEL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown create_model arguments: {', '.join(unknown)} "
                         f"(expected some of {', '.join(CREATE_MODEL_DEFAULTS)})")
    return ml_collections.ConfigDict({**CREATE_MODEL_DEFAULTS, **kw})


def diffusion_config(**kwargs) -> ml_collections.ConfigDict:
    unknown = sorted(set(kwargs) - set(SAMPLER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown create_sampler arguments: {', '.join(unknown)}")
    return ml_collections.ConfigDict({**SAMPLER_DEFAULTS, **kwargs})


def ddfm_config(prior: str = "guided_diffusion", model: dict | None = None, **diffusion) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="ddfm",
        prior=prior,
        model=model_config(**(OPENAI_256_UNCOND if model is None else model)),
        diffusion=diffusion_config(**diffusion),
        em=dict(lamb=0.5, rho=0.001),
        seed=3407,
        dtype="float32",
    ))


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
    if m.class_cond:
        raise ValueError("class-conditional guided-diffusion models are not supported (DDFM is unconditional)")
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
