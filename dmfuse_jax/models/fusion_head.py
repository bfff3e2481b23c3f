"""DMFuse's fusion head (DESIGN.md section 3): reducers with scSE, CAIM and the multi-level decoder.

All shapes NHWC. Submodule names follow the released PyTorch weights so conversion is a table.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmfuse_jax.models.criss_cross import criss_cross_attention
from dmfuse_jax.models.unet import DtypeModule, upsample_nearest


def reflect_pad(x: jax.Array, pad: int) -> jax.Array:
    """Reflection padding of H and W, as torch.nn.ReflectionPad2d. (B, H, W, C)."""
    if pad == 0:
        return x
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


class ConvLayer(DtypeModule):
    """Reflection pad (k // 2) -> Conv k x k (valid) -> activation ('relu', 'leaky_relu', 'none')."""

    features: int
    kernel: int = 3
    activation: str = "leaky_relu"

    @nn.compact
    def __call__(self, x):
        x = reflect_pad(x, self.kernel // 2)
        x = nn.Conv(self.features, (self.kernel, self.kernel), padding="VALID", name="conv2d",
                    **self.dtypes)(x)
        if self.activation == "relu":
            return nn.relu(x)
        if self.activation == "leaky_relu":
            return nn.leaky_relu(x, 0.2)
        return x


class ChannelSpatialSE(DtypeModule):
    """scSE (Roy et al. 2018): cSE(x) + sSE(x). (B, H, W, C) -> (B, H, W, C)."""

    reduction: int = 2

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kw = self.dtypes
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)  # (B, C)
        s = nn.relu(nn.Dense(c // self.reduction, name="cSE_fc1", **kw)(s))
        s = nn.sigmoid(nn.Dense(c, name="cSE_fc2", **kw)(s))
        cse = x * s[:, None, None, :]
        sse = x * nn.sigmoid(nn.Conv(1, (1, 1), name="sSE_conv", **kw)(x))
        return cse + sse


class Reducer(DtypeModule):
    """Concatenated diffusion features of one level (B, h, w, 3 C_l) -> (B, h, w, features)."""

    features: int = 32

    @nn.compact
    def __call__(self, x):
        kw = self.dtypes
        x = ConvLayer(self.features, 3, activation="relu", name="conv1", **kw)(x)
        return ChannelSpatialSE(name="scSE", **kw)(x)


def pair_batch(a: jax.Array, b: jax.Array) -> jax.Array:
    """(B, ...) twice -> (2 B, ...) image-major: a[0], b[0], a[1], b[1], ... Unlike concatenating
    along the batch, each device of a batch-sharded input keeps its own images."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def unpair_batch(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of `pair_batch`."""
    x = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
    return x[:, 0], x[:, 1]


class CAIM(DtypeModule):
    """Criss-cross cross-attention interactive module.

    x: infrared features, y: visible features, both (B, H, W, C). Returns (out_x, out_y), each
    (B, H, W, C): out_x attends with the visible query over infrared keys/values, out_y the other way.
    """

    qk_features: int = 4
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, y):
        c = x.shape[-1]
        kw = self.dtypes
        query = nn.Conv(self.qk_features, (1, 1), name="query_conv", **kw)
        key = nn.Conv(self.qk_features, (1, 1), name="key_conv", **kw)
        value = nn.Conv(c, (1, 1), name="value_conv", **kw)
        gamma = self.param("gamma", nn.initializers.zeros, (1,), self.param_dtype)
        # One batched call for both directions, image-major (B, 2): (infrared out, visible out) per
        # image, so a batch sharded over devices stays where it is.
        xy, yx = pair_batch(x, y), pair_batch(y, x)
        att = criss_cross_attention(query(yx), key(xy), value(xy), impl=self.impl)
        return unpair_batch(gamma.astype(att.dtype)[0] * att + xy)


class FusionHead(DtypeModule):
    """Reducers + CAIM + decoder. Inputs: per level l = 1..5, infrared and visible features
    (B, H / 2^(l-1), W / 2^(l-1), 3 C_l). Output: the fused image (B, H, W, 1) in tanh range.

    `shared_last_reducer` (as the released weights): R3 serves levels 4 and 5.
    """

    features: int = 32
    decoder_features: int = 64
    qk_features: int = 4
    num_levels: int = 5
    shared_last_reducer: bool = True
    caim_impl: str = "auto"

    def setup(self):
        kw = self.dtypes
        n_reducers = self.num_levels - 1 if self.shared_last_reducer else self.num_levels
        self.reducers = [Reducer(self.features, name=f"en{i}", **kw) for i in range(n_reducers)]
        self.caim = CAIM(self.qk_features, self.caim_impl, name="crossatten", **kw)
        self.up_conv = ConvLayer(self.decoder_features, 3, name="conv_in1", **kw)  # U
        self.merge_conv = ConvLayer(self.decoder_features, 3, name="conv_t4", **kw)  # T
        self.out_conv = nn.Conv(1, (1, 1), padding="VALID", name="conv_t1", **kw)

    def reduce(self, feats: Sequence[jax.Array]) -> list[jax.Array]:
        return [self.reducers[min(i, len(self.reducers) - 1)](f) for i, f in enumerate(feats)]

    def interact(self, ir: Sequence[jax.Array], vi: Sequence[jax.Array]) -> list[jax.Array]:
        return [jnp.concatenate(self.caim(a, b), axis=-1) for a, b in zip(ir, vi)]

    def decode(self, fused: Sequence[jax.Array]) -> jax.Array:
        d = fused[-1]
        for f in reversed(fused[:-1]):
            d = self.merge_conv(jnp.concatenate([self.up_conv(upsample_nearest(d)), f], axis=-1))
        return jnp.tanh(self.out_conv(d).astype(jnp.float32))

    def __call__(self, ir_feats: Sequence[jax.Array], vi_feats: Sequence[jax.Array]) -> jax.Array:
        # Both modalities share the reducers: run them batched.
        ir, vi = zip(*(unpair_batch(r) for r in self.reduce([pair_batch(a, v) for a, v in zip(ir_feats, vi_feats)])))
        return self.decode(self.interact(ir, vi))
