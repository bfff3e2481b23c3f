"""Config -> module. The one place that reads `config.model` / `config.diffusion`."""
from __future__ import annotations

import jax.numpy as jnp

from dmfuse_jax.diffusion.gaussian import Schedule, make_schedule
from dmfuse_jax.models.dmfuse import DMFuse
from dmfuse_jax.models.fusion_head import FusionHead
from dmfuse_jax.models.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (expected one of {sorted(DTYPES)})") from None


def build_unet(config, dtype: str | None = None) -> UNet:
    u = config.model.unet
    attention_impl = u.get("attention_impl", "xla")
    return UNet(
        in_channels=u.in_channels, out_channels=u.out_channels, inner_channels=u.inner_channels,
        channel_mults=tuple(u.channel_mults), res_blocks=u.res_blocks, attn_res=tuple(u.attn_res),
        image_size=u.image_size, norm_groups=u.norm_groups, dropout=u.dropout,
        attention_impl=attention_impl,
        dtype=dtype_of(dtype or config.model.get("dtype", "float32")),
    )


def build_fusion_head(config, dtype: str | None = None) -> FusionHead:
    h = config.model.head
    return FusionHead(
        features=h.features, decoder_features=h.decoder_features, qk_features=h.qk_features,
        num_levels=len(config.model.unet.channel_mults), shared_last_reducer=h.shared_last_reducer,
        caim_impl=h.get("caim_impl", "auto"),
        dtype=dtype_of(dtype or config.model.get("dtype", "float32")),
    )


def build_schedule(config) -> Schedule:
    d = config.diffusion
    return make_schedule(d.schedule, d.num_timesteps, cosine_s=d.get("cosine_s", 8e-3))


def build_dmfuse(config, dtype: str | None = None) -> DMFuse:
    return DMFuse(unet=build_unet(config, dtype), head=build_fusion_head(config, dtype),
                  schedule=build_schedule(config), timesteps=tuple(config.model.timesteps))


def portable_config(config):
    """`config` with the portable implementations (XLA self-attention, jnp criss-cross), whose matmuls
    the counting can see; FLOP-for-FLOP the same work as the kernels."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.head.caim_impl = "reference"
        config.model.unet.attention_impl = "xla"
    return config
