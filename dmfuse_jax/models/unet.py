"""The SR3 diffusion UNet (DESIGN.md section 2), NHWC, conditioned on a continuous noise level.

Submodule names mirror the PyTorch state_dict (`init_conv`, `downs_N`, `mid_N`, `ups_N`, `final_conv`)
so that conversion is a rename plus layout transposes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class DtypeModule(nn.Module):
    """Base of the UNet's and the fusion head's modules: the compute dtype and the param dtype, declared
    once, keyword-only (so each module's own fields come first, with or without defaults) and handed
    on to submodules as `**self.dtypes`."""

    _: dataclasses.KW_ONLY
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def dtypes(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


def _conv(features, kernel, dtype, param_dtype, name, stride=1, use_bias=True):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=kernel // 2,
                   use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def noise_level_encoding(g: jax.Array, dim: int) -> jax.Array:
    """(B,) noise levels -> (B, dim): concat(sin(g w_k), cos(g w_k)), w_k = 1e4^(-k / (dim/2))."""
    count = dim // 2
    step = jnp.arange(count, dtype=jnp.float32) / count
    enc = g.astype(jnp.float32)[:, None] * jnp.exp(-math.log(1e4) * step[None, :])
    return jnp.concatenate([jnp.sin(enc), jnp.cos(enc)], axis=-1)


class Block(DtypeModule):
    """GroupNorm -> Swish -> Dropout -> Conv3x3. (B, H, W, C_in) -> (B, H, W, features)."""

    features: int
    groups: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.GroupNorm(num_groups=self.groups, epsilon=1e-5, name="norm", **self.dtypes)(x)
        x = nn.swish(x)
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return _conv(self.features, 3, self.dtype, self.param_dtype, "conv")(x)


class ResnetBlock(DtypeModule):
    features: int
    groups: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        kw = dict(groups=self.groups, **self.dtypes)
        h = Block(self.features, name="block1", **kw)(x)
        h = h + nn.Dense(self.features, name="noise_func", **self.dtypes)(emb)[:, None, None, :]
        h = Block(self.features, dropout=self.dropout, name="block2", **kw)(h, train)
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.dtype, self.param_dtype, "res_conv")(x)
        return h + x


class SelfAttention(DtypeModule):
    """One-head self-attention over all positions, residual. (B, H, W, C) -> (B, H, W, C).

    Runs through `jax.nn.dot_product_attention` (cuDNN fused attention when `implementation` is
    'cudnn'); softmax statistics stay in float32.
    """

    groups: int
    implementation: str | None = None

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        n = nn.GroupNorm(num_groups=self.groups, epsilon=1e-5, name="norm", **self.dtypes)(x)
        qkv = _conv(3 * c, 1, self.dtype, self.param_dtype, "qkv", use_bias=False)(n)
        q, k, v = jnp.split(qkv.reshape(b, h * w, 1, 3 * c), 3, axis=-1)
        a = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c),
                                         implementation=self.implementation)
        out = _conv(c, 1, self.dtype, self.param_dtype, "out")(a.reshape(b, h, w, c))
        return out + x


class ResnetBlocWithAttn(DtypeModule):
    features: int
    groups: int
    dropout: float = 0.0
    with_attn: bool = False
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        kw = self.dtypes
        x = ResnetBlock(self.features, self.groups, self.dropout, name="res_block", **kw)(x, emb, train)
        if self.with_attn:
            x = SelfAttention(self.groups, self.attention_impl, name="attn", **kw)(x)
        return x


class Downsample(DtypeModule):

    @nn.compact
    def __call__(self, x):
        return _conv(x.shape[-1], 3, self.dtype, self.param_dtype, "conv", stride=2)(x)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """(B, H, W, C) -> (B, fH, fW, C), nearest neighbour."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class Upsample(DtypeModule):

    @nn.compact
    def __call__(self, x):
        return _conv(x.shape[-1], 3, self.dtype, self.param_dtype, "conv")(upsample_nearest(x))


class UNet(DtypeModule):
    """SR3 UNet. `__call__(x (B, H, W, in_channels), g (B,))` -> eps_hat (B, H, W, out_channels).

    With `taps=True` it returns the five decoder taps instead (the output of the first residual block
    of each decoder level, full resolution first) and computes nothing after the last one.
    H and W must be multiples of `total_stride`. Attention placement is decided from `image_size`
    (the config's), never from the runtime input size.
    """

    in_channels: int = 3
    out_channels: int = 3
    inner_channels: int = 32
    channel_mults: Sequence[int] = (1, 2, 4, 8, 8)
    res_blocks: int = 2
    attn_res: Sequence[int] = (16,)
    image_size: int = 256
    norm_groups: int = 32
    dropout: float = 0.2
    attention_impl: str | None = None

    @property
    def total_stride(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    def level_channels(self) -> list[int]:
        return [self.inner_channels * m for m in self.channel_mults]

    @nn.compact
    def __call__(self, x, g, *, train: bool = False, taps: bool = False):
        kw = self.dtypes
        blk = dict(groups=self.norm_groups, dropout=self.dropout, attention_impl=self.attention_impl, **kw)
        c0 = self.inner_channels
        emb = noise_level_encoding(g, c0)
        emb = nn.Dense(4 * c0, name="noise_level_mlp_1", **kw)(emb)
        emb = nn.Dense(c0, name="noise_level_mlp_3", **kw)(nn.swish(emb))

        x = _conv(c0, 3, self.dtype, self.param_dtype, "init_conv")(x.astype(self.dtype))
        skips = [x]
        n_levels = len(self.channel_mults)
        res = self.image_size
        idx = 0
        for level, width in enumerate(self.level_channels()):
            for _ in range(self.res_blocks):
                x = ResnetBlocWithAttn(width, with_attn=res in self.attn_res, name=f"downs_{idx}", **blk)(
                    x, emb, train)
                skips.append(x)
                idx += 1
            if level != n_levels - 1:
                x = Downsample(name=f"downs_{idx}", **kw)(x)
                skips.append(x)
                idx += 1
                res //= 2

        x = ResnetBlocWithAttn(x.shape[-1], with_attn=True, name="mid_0", **blk)(x, emb, train)
        x = ResnetBlocWithAttn(x.shape[-1], with_attn=False, name="mid_1", **blk)(x, emb, train)

        tapped = []
        idx = 0
        for level in reversed(range(n_levels)):
            width = self.level_channels()[level]
            for i in range(self.res_blocks + 1):
                x = ResnetBlocWithAttn(width, with_attn=res in self.attn_res, name=f"ups_{idx}", **blk)(
                    jnp.concatenate([x, skips.pop()], axis=-1), emb, train)
                idx += 1
                if i == 0:
                    tapped.append(x)
                    if taps and level == 0:
                        return tapped[::-1]
            if level != 0:
                x = Upsample(name=f"ups_{idx}", **kw)(x)
                idx += 1
                res *= 2
        return Block(self.out_channels, self.norm_groups, name="final_conv", **kw)(x)
