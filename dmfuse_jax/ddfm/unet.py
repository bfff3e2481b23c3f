"""The guided-diffusion UNet (OpenAI improved/guided diffusion `UNetModel`), Flax Linen, NHWC.

The prior of DDFM (the authors run OpenAI's `256x256_diffusion_uncond.pt`). Maths as
`guided_diffusion/unet.py` + `nn.py` (github.com/openai/guided-diffusion, MIT; MMIF-DDFM ships the
same file): sinusoidal timestep embedding (cos first), ResBlocks with `use_scale_shift_norm` and
`resblock_updown` (average-pool down, nearest up inside the block), multi-head attention with the
legacy QKV ordering (per head: q, k, v) or the new one, GroupNorm32 computed in float32.

Submodule names mirror the PyTorch state_dict with '.' between indices replaced by '_'
(`input_blocks.3.1.qkv` -> `input_blocks_3_1/qkv`), so conversion is a rename plus layout changes.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """(B,) timesteps (may be fractional) -> (B, dim): concat(cos(t w), sin(t w)), as guided-diffusion."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def group_norm32(x, name: str):
    """GroupNorm(32 groups, eps 1e-5) computed in float32 and cast back, as guided-diffusion's
    GroupNorm32 (two-pass variance, as PyTorch). Call inside a compact method."""
    y = nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                     use_fast_variance=False, name=name)(x.astype(jnp.float32))
    return y.astype(x.dtype)


def _conv(features, dtype, name, kernel=3, stride=1):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=kernel // 2,
                   dtype=dtype, param_dtype=jnp.float32, name=name)


def avg_pool2(x):
    """(B, H, W, C) -> (B, H/2, W/2, C): 2x2 average pool, stride 2."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample_nearest2(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nn.Module):
    """(B, H, W, C_in), emb (B, E) -> (B, H', W', out_channels); H' = H/2 (down) or 2H (up)."""

    out_channels: int
    use_scale_shift_norm: bool = True
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        c_in = x.shape[-1]
        h = nn.silu(group_norm32(name="in_layers_0", x=x))
        if self.up or self.down:
            resample = upsample_nearest2 if self.up else avg_pool2
            h, x = resample(h), resample(x)
        h = _conv(self.out_channels, self.dtype, "in_layers_2")(h)
        emb_out = nn.Dense(2 * self.out_channels if self.use_scale_shift_norm else self.out_channels,
                           dtype=self.dtype, param_dtype=jnp.float32, name="emb_layers_1")(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = group_norm32(name="out_layers_0", x=h) * (1 + scale) + shift
            h = nn.silu(h)
        else:
            h = nn.silu(group_norm32(name="out_layers_0", x=h + emb_out))
        h = _conv(self.out_channels, self.dtype, "out_layers_3")(h)  # dropout (index 2) is 0 at inference
        if c_in != self.out_channels:
            x = _conv(self.out_channels, self.dtype, "skip_connection", kernel=1)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions, residual. (B, H, W, C) -> (B, H, W, C).

    qkv channel order: 'legacy' (QKVAttentionLegacy, what the OpenAI checkpoints use): per head
    [q, k, v]; 'new' (QKVAttention): [q of all heads, k..., v...]. Softmax in float32.
    """

    num_heads: int
    new_order: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        heads, ch = self.num_heads, c // self.num_heads
        t = hh * ww
        qkv = nn.Dense(3 * c, dtype=self.dtype, param_dtype=jnp.float32, name="qkv")(
            group_norm32(name="norm", x=x).reshape(b, t, c))
        if self.new_order:
            q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, heads, ch), 2, 0)
        else:
            q, k, v = jnp.moveaxis(qkv.reshape(b, t, heads, 3, ch), 3, 0)
        scale = 1.0 / math.sqrt(math.sqrt(ch))  # applied to q and k, as guided-diffusion
        w = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale)
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(w.dtype)
        a = jnp.einsum("bhts,bshc->bthc", w, v).reshape(b, t, c)
        h = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name="proj_out")(a)
        return x + h.reshape(b, hh, ww, c).astype(x.dtype)


class Downsample(nn.Module):
    """Without resblock_updown: Conv3x3 stride 2 ('op') or a 2x2 average pool."""

    use_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.use_conv:
            return _conv(x.shape[-1], self.dtype, "op", stride=2)(x)
        return avg_pool2(x)


class Upsample(nn.Module):
    use_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = upsample_nearest2(x)
        return _conv(x.shape[-1], self.dtype, "conv")(x) if self.use_conv else x


class GuidedUNet(nn.Module):
    """guided-diffusion `UNetModel` (no class conditioning). `__call__(x (B, H, W, in_channels),
    t (B,) timesteps)` -> (B, H, W, out_channels) float32 (learn_sigma: eps then the variance values).

    attention_resolutions are downsample factors (1, 2, 4, ...), as UNetModel takes them;
    H and W must be multiples of `total_stride`.
    """

    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 6
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (8, 16, 32)
    channel_mult: Sequence[float] = (1, 1, 2, 2, 4, 4)
    conv_resample: bool = True
    num_heads: int = 4
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    dtype: Dtype = jnp.float32

    @property
    def total_stride(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def _heads(self, ch: int, num_heads: int) -> int:
        return num_heads if self.num_head_channels == -1 else ch // self.num_head_channels

    @nn.compact
    def __call__(self, x, t):
        dt = self.dtype
        mc = self.model_channels
        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        emb = timestep_embedding(t, mc)
        emb = nn.Dense(4 * mc, dtype=dt, param_dtype=jnp.float32, name="time_embed_0")(emb)
        emb = nn.Dense(4 * mc, dtype=dt, param_dtype=jnp.float32, name="time_embed_2")(nn.silu(emb))

        rb = dict(use_scale_shift_norm=self.use_scale_shift_norm, dtype=dt)
        attn = dict(new_order=self.use_new_attention_order, dtype=dt)
        ch = int(self.channel_mult[0] * mc)
        h = _conv(ch, dt, "input_blocks_0_0")(x.astype(dt))
        hs, chans = [h], [ch]
        ds, i = 1, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                ch = int(mult * mc)
                h = ResBlock(ch, name=f"input_blocks_{i}_0", **rb)(h, emb)
                if ds in self.attention_resolutions:
                    h = AttentionBlock(self._heads(ch, self.num_heads), name=f"input_blocks_{i}_1", **attn)(h)
                hs.append(h)
                chans.append(ch)
                i += 1
            if level != len(self.channel_mult) - 1:
                if self.resblock_updown:
                    h = ResBlock(ch, down=True, name=f"input_blocks_{i}_0", **rb)(h, emb)
                else:
                    h = Downsample(self.conv_resample, dtype=dt, name=f"input_blocks_{i}_0")(h)
                hs.append(h)
                chans.append(ch)
                i += 1
                ds *= 2

        h = ResBlock(ch, name="middle_block_0", **rb)(h, emb)
        h = AttentionBlock(self._heads(ch, self.num_heads), name="middle_block_1", **attn)(h)
        h = ResBlock(ch, name="middle_block_2", **rb)(h, emb)

        i = 0
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for r in range(self.num_res_blocks + 1):
                chans.pop()
                ch = int(mc * mult)
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = ResBlock(ch, name=f"output_blocks_{i}_0", **rb)(h, emb)
                j = 1
                if ds in self.attention_resolutions:
                    h = AttentionBlock(self._heads(ch, heads_up), name=f"output_blocks_{i}_{j}", **attn)(h)
                    j += 1
                if level and r == self.num_res_blocks:
                    if self.resblock_updown:
                        h = ResBlock(ch, up=True, name=f"output_blocks_{i}_{j}", **rb)(h, emb)
                    else:
                        h = Upsample(self.conv_resample, dtype=dt, name=f"output_blocks_{i}_{j}")(h)
                    ds //= 2
                i += 1
        h = nn.silu(group_norm32(name="out_0", x=h))
        return _conv(self.out_channels, dt, "out_2")(h).astype(jnp.float32)
