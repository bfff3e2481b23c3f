"""The SR3 diffusion UNet (DESIGN.md section 2), NHWC, conditioned on a continuous noise level.

Submodule names mirror the PyTorch state_dict (`init_conv`, `downs_N`, `mid_N`, `ups_N`, `final_conv`)
so that conversion is a rename plus layout transposes.
"""
from __future__ import annotations

import dataclasses
import functools
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def sum_and_sum_of_squares(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(sum x, sum x^2) over `axes` in ONE variadic reduction (one read of x, on every backend)."""
    zero = jnp.zeros((), x.dtype)
    return jax.lax.reduce((x, x * x), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), axes)


@sum_and_sum_of_squares.defjvp
def _sum_and_sum_of_squares_jvp(axes, primals, tangents):
    # Plain sums for the tangents: JAX's generic reduce JVP would build a pairwise tree of slices.
    (x,), (t,) = primals, tangents
    return sum_and_sum_of_squares(x, axes), (jnp.sum(t, axes), jnp.sum(2 * x * t, axes))


class GroupNorm(DtypeModule):
    """GroupNorm with one-pass float32 statistics. (B, ..., C) -> (B, ..., C) in `dtype`.

    Same parameters (scale, bias: (C,)) and the same maths as flax's `nn.GroupNorm` (biased variance
    as E[x^2] - E[x]^2, float32), but the sum and the sum of squares come from ONE variadic reduction,
    so the statistics read the input once on every backend, and the apply is one multiply-add per
    element with per-(image, channel) coefficients, which XLA fuses with the activation that follows.
    On CPU (XLA:CPU otherwise splits the two sums into windowed tree reductions over a float32 copy)
    GroupNorm + SiLU of a bf16 (6, 96, 128, 64) tensor went from 108 to 27 MiB accessed.
    """

    num_groups: int
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c, g = x.shape[-1], self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {g} groups")
        scale = self.param("scale", nn.initializers.ones_init(), (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), self.param_dtype)
        f32 = jnp.float32
        xf = x.astype(f32).reshape(x.shape[0], -1, g, c // g)
        total, total_sq = sum_and_sum_of_squares(xf, (1, 3))  # (B, G) each
        n = xf.shape[1] * xf.shape[3]
        mean = total / n
        var = jnp.maximum(total_sq / n - mean * mean, 0.0)
        mul = jax.lax.rsqrt(var + self.epsilon)[..., None] * scale.astype(f32).reshape(g, c // g)  # (B, G, C/G)
        add = bias.astype(f32).reshape(g, c // g) - mean[..., None] * mul
        return (xf * mul[:, None] + add[:, None]).reshape(x.shape).astype(self.dtype)


class Block(DtypeModule):
    """GroupNorm -> Swish -> Dropout -> Conv3x3. (B, H, W, C_in) -> (B, H, W, features)."""

    features: int
    groups: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = GroupNorm(num_groups=self.groups, epsilon=1e-5, name="norm", **self.dtypes)(x)
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


# 'xla' attends densely up to this many tokens and chunks over query blocks above it: the dense
# (B, N, N) float32 logits of a 4096x4096 pair at 1/16 (N = 65,536, B = 6) would take 103 GB.
CHUNK_ABOVE_TOKENS = 8192
QUERY_BLOCK = 1024


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """One head, all tokens at once: q, k, v (B, N, C) -> (B, N, C). Logits and softmax in float32,
    matmuls in the inputs' dtype (as `jax.nn.dot_product_attention`'s XLA path)."""
    return jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], scale=scale)[:, :, 0]


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                      block: int = QUERY_BLOCK) -> jax.Array:
    """`dense_attention` one block of queries at a time (`lax.map`): live memory O(block N) instead of
    O(N^2). Each block's softmax runs over all keys, so the result is the dense one (same float32
    logits); the block body is rematerialised in the backward pass, so training holds no N^2 either."""
    b, n, c = q.shape
    block = min(block, n)
    n_blocks = -(-n // block)
    qb = jnp.pad(q, ((0, 0), (0, n_blocks * block - n), (0, 0)))
    qb = jnp.moveaxis(qb.reshape(b, n_blocks, block, c), 1, 0)  # (n_blocks, B, block, C)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(qi):
        logits = jnp.einsum("bqc,bkc->bqk", qi, k, preferred_element_type=jnp.float32) * scale
        p = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bqk,bkc->bqc", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)

    out = jax.lax.map(one, qb)
    return jnp.moveaxis(out, 0, 1).reshape(b, n_blocks * block, c)[:, :n]


def _xla_attention(q, k, v, scale):
    n = q.shape[1]
    # A symbolic token count (the jax.export artefact's symbolic H, W) cannot be compared: dense.
    big = isinstance(n, int) and n > CHUNK_ABOVE_TOKENS
    return (chunked_attention if big else dense_attention)(q, k, v, scale)


CUDNN_MAX_HEAD_DIM = 128  # jax's cuDNN fused attention takes head dims <= 128, multiples of 8


def _cudnn_attention(q, k, v, scale):
    # cuDNN's fused attention is 16-bit only, and refuses wide heads (the paper-size UNet's 256-channel
    # attention at 16x16): those layers take the XLA path
    c = q.shape[-1]
    if q.dtype not in (jnp.bfloat16, jnp.float16) or c > CUDNN_MAX_HEAD_DIM or c % 8:
        return _xla_attention(q, k, v, scale)
    return jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], scale=scale,
                                        implementation="cudnn")[:, :, 0]


# config.model.unet.attention_impl -> fn(q, k, v, scale), q, k, v (B, N, C) -> (B, N, C)
ATTENTION_IMPLS = {
    "xla": _xla_attention,  # dense up to CHUNK_ABOVE_TOKENS tokens, query-chunked above
    "chunked": chunked_attention,  # always query-chunked
    "cudnn": _cudnn_attention,  # cuDNN flash attention (GPU; bf16/fp16, head dim <= 128; else 'xla')
}


def attention_fn(impl: str | None):
    try:
        return ATTENTION_IMPLS[impl or "xla"]
    except KeyError:
        raise ValueError(f"unknown attention_impl {impl!r} (expected one of {sorted(ATTENTION_IMPLS)})") from None


class SelfAttention(DtypeModule):
    """One-head self-attention over all positions, residual. (B, H, W, C) -> (B, H, W, C).

    `implementation` picks the kernel (`ATTENTION_IMPLS`); q, k, v come out of the qkv convolution in
    the compute dtype (bf16 under dtype=bfloat16), softmax statistics stay in float32.
    """

    groups: int
    implementation: str | None = None

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        n = GroupNorm(num_groups=self.groups, epsilon=1e-5, name="norm", **self.dtypes)(x)
        qkv = _conv(3 * c, 1, self.dtype, self.param_dtype, "qkv", use_bias=False)(n)
        q, k, v = jnp.split(qkv.reshape(b, h * w, 3 * c), 3, axis=-1)
        a = attention_fn(self.implementation)(q, k, v, 1.0 / math.sqrt(c))
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
