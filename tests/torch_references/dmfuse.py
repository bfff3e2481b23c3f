"""DMFuse in PyTorch (NCHW), written from DESIGN.md, for side-by-side checks and benchmarks.

State_dict key names are the authors' (SR3 UNet: `init_conv`, `noise_level_mlp.1/.3`, `downs.N`,
`mid.N`, `ups.N`, `final_conv`; fusion head: `en0..en3`, `crossatten`, `conv_in1..5`, `conv_t1..t4`,
including the keys the forward pass never uses), so the released head loads with `strict=True` and
`torch_to_flax` converts these weights into our Flax params (`to_flax_params`).

Numerics follow the JAX model exactly (same noise layout, padding, timestep concatenation order), and
the feature extraction takes the noise from outside (`noisy=(x_t, g)`, or `g` and `eps`), so outputs
can be compared exactly. Mixed precision is PyTorch's own: `torch.autocast(dtype=torch.bfloat16)` with
float32 parameters; the criss-cross softmax runs in float32 either way.

Needs torch (`pip install 'dmfuse-jax[torch]'`); nothing else in the package imports this module.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_IMPLS = ("einsum", "sdpa")  # einsum: the SR3 code as shipped; sdpa: F.scaled_dot_product_attention


# ----------------------------------------------------------------------------------------------
# SR3 UNet


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, g):  # (B,) -> (B, dim)
        count = self.dim // 2
        step = torch.arange(count, dtype=torch.float32, device=g.device) / count
        enc = g.float()[:, None] * torch.exp(-math.log(1e4) * step[None, :])
        return torch.cat([torch.sin(enc), torch.cos(enc)], dim=-1)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class FeatureWiseAffine(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.noise_func = nn.Sequential(nn.Linear(in_channels, out_channels))

    def forward(self, x, emb):
        return x + self.noise_func(emb)[:, :, None, None]


class Block(nn.Module):
    """GroupNorm -> Swish -> Dropout (Identity at 0) -> Conv3x3: keys block.0 (norm), block.3 (conv)."""

    def __init__(self, dim: int, dim_out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(groups, dim), Swish(),
                                   nn.Dropout(dropout) if dropout else nn.Identity(),
                                   nn.Conv2d(dim, dim_out, 3, padding=1))

    def forward(self, x):
        return self.block(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.noise_func = FeatureWiseAffine(emb_dim, dim_out)
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups, dropout)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, emb):
        h = self.noise_func(self.block1(x), emb)
        return self.block2(h) + self.res_conv(x)


class SelfAttention(nn.Module):
    def __init__(self, channels: int, groups: int, attention: str = "einsum"):
        super().__init__()
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {attention!r} (expected one of {ATTENTION_IMPLS})")
        self.attention = attention
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        if self.attention == "sdpa":
            q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        else:  # as the SR3 code: explicit energies, softmax over all positions
            e = torch.einsum("bchw,bcyx->bhwyx", q, k) / math.sqrt(c)
            p = torch.softmax(e.reshape(b, h, w, h * w), -1).reshape(b, h, w, h, w)
            a = torch.einsum("bhwyx,bcyx->bchw", p, v)
        return self.out(a) + x


class ResnetBlocWithAttn(nn.Module):
    def __init__(self, dim, dim_out, emb_dim, groups, dropout, with_attn, attention):
        super().__init__()
        self.res_block = ResnetBlock(dim, dim_out, emb_dim, groups, dropout)
        self.attn = SelfAttention(dim_out, groups, attention) if with_attn else None

    def forward(self, x, emb):
        x = self.res_block(x, emb)
        return self.attn(x) if self.attn is not None else x


class Downsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, 2, 1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TorchUNet(nn.Module):
    """SR3 UNet. forward(x (B, C, H, W), g (B,)) -> eps_hat, or with taps=True the five decoder taps
    (full resolution first), stopping after the last one."""

    def __init__(self, in_channels=3, out_channels=3, inner_channels=32, channel_mults=(1, 2, 4, 8, 8),
                 res_blocks=2, attn_res=(16,), image_size=256, norm_groups=32, dropout=0.2,
                 attention="einsum"):
        super().__init__()
        c0 = inner_channels
        self.noise_level_mlp = nn.Sequential(PositionalEncoding(c0), nn.Linear(c0, 4 * c0), Swish(),
                                             nn.Linear(4 * c0, c0))
        self.init_conv = nn.Conv2d(in_channels, c0, 3, padding=1)
        kw = dict(emb_dim=c0, groups=norm_groups, dropout=dropout, attention=attention)
        n = len(channel_mults)
        res, pre, skip_ch, downs = image_size, c0, [c0], []
        for level, mult in enumerate(channel_mults):
            for _ in range(res_blocks):
                downs.append(ResnetBlocWithAttn(pre, c0 * mult, with_attn=res in attn_res, **kw))
                pre = c0 * mult
                skip_ch.append(pre)
            if level != n - 1:
                downs.append(Downsample(pre))
                skip_ch.append(pre)
                res //= 2
        self.downs = nn.ModuleList(downs)
        self.mid = nn.ModuleList([ResnetBlocWithAttn(pre, pre, with_attn=True, **kw),
                                  ResnetBlocWithAttn(pre, pre, with_attn=False, **kw)])
        ups = []
        for level in reversed(range(n)):
            for _ in range(res_blocks + 1):
                ups.append(ResnetBlocWithAttn(pre + skip_ch.pop(), c0 * channel_mults[level],
                                              with_attn=res in attn_res, **kw))
                pre = c0 * channel_mults[level]
            if level != 0:
                ups.append(Upsample(pre))
                res *= 2
        self.ups = nn.ModuleList(ups)
        self.final_conv = Block(pre, out_channels, norm_groups)
        self.res_blocks = res_blocks
        self.num_levels = n

    @property
    def total_stride(self) -> int:
        return 2 ** (self.num_levels - 1)

    def forward(self, x, g, taps: bool = False):
        emb = self.noise_level_mlp(g)
        x = self.init_conv(x)
        skips = [x]
        for layer in self.downs:
            x = layer(x, emb) if isinstance(layer, ResnetBlocWithAttn) else layer(x)
            skips.append(x)
        for layer in self.mid:
            x = layer(x, emb)
        tapped, first = [], True
        for layer in self.ups:
            if isinstance(layer, ResnetBlocWithAttn):
                x = layer(torch.cat([x, skips.pop()], dim=1), emb)
                if first:
                    tapped.append(x)
                    if taps and len(tapped) == self.num_levels:
                        return tapped[::-1]
                first = False
            else:
                x = layer(x)
                first = True
        return self.final_conv(x)


# ----------------------------------------------------------------------------------------------
# Fusion head (the released weights' layout)


class ConvLayer(nn.Module):
    """Reflection pad (k // 2) -> conv -> activation; key `conv2d`."""

    def __init__(self, c_in, c_out, kernel, activation="leaky_relu"):
        super().__init__()
        self.pad = kernel // 2
        self.conv2d = nn.Conv2d(c_in, c_out, kernel)
        self.activation = activation

    def forward(self, x):
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, mode="reflect")
        x = self.conv2d(x)
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, 0.2)
        return x


class ChannelSELayer(nn.Module):
    def __init__(self, c, reduction=2):
        super().__init__()
        self.fc1 = nn.Linear(c, c // reduction)
        self.fc2 = nn.Linear(c // reduction, c)

    def forward(self, x):
        s = x.float().mean(dim=(2, 3)).to(x.dtype)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class SpatialSELayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


class ChannelSpatialSELayer(nn.Module):
    def __init__(self, c, reduction=2):
        super().__init__()
        self.cSE = ChannelSELayer(c, reduction)
        self.sSE = SpatialSELayer(c)

    def forward(self, x):
        return self.cSE(x) + self.sSE(x)


class Encoder(nn.Module):
    """Reducer R(c_in): reflection pad -> Conv3x3 -> ReLU -> scSE."""

    def __init__(self, c_in, c_out=32):
        super().__init__()
        self.conv1 = ConvLayer(c_in, c_out, 3, activation="relu")
        self.ChannelSpatialSELayer = ChannelSpatialSELayer(c_out)

    def forward(self, x):
        return self.ChannelSpatialSELayer(self.conv1(x))


def criss_cross_torch(q, k, v):
    """q, k: (B, Cq, H, W); v: (B, Cv, H, W) -> (B, Cv, H, W). One float32 softmax over the column
    (centre masked) and the row of each position; materialises the (B, H, W, H + W) energies."""
    h = q.shape[2]
    e_col = torch.einsum("bchw,bcgw->bhwg", q, k)
    e_col = e_col.masked_fill(torch.eye(h, dtype=torch.bool, device=q.device)[None, :, None, :],
                              float("-inf"))
    e_row = torch.einsum("bchw,bchv->bhwv", q, k)
    a = torch.softmax(torch.cat([e_col, e_row], dim=-1), dim=-1, dtype=torch.float32).to(v.dtype)
    return (torch.einsum("bhwg,bcgw->bchw", a[..., :h], v)
            + torch.einsum("bhwv,bchv->bchw", a[..., h:], v))


class CrissCrossCAIM(nn.Module):
    """forward(x infrared, y visible) -> (out_x, out_y): out_x uses the visible query with the
    infrared keys/values, out_y the other way; gamma * attention + input."""

    def __init__(self, c=32, qk=4):
        super().__init__()
        self.query_conv = nn.Conv2d(c, qk, 1)
        self.key_conv = nn.Conv2d(c, qk, 1)
        self.value_conv = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x, y):
        xy, yx = torch.cat([x, y], 0), torch.cat([y, x], 0)
        att = criss_cross_torch(self.query_conv(yx), self.key_conv(xy), self.value_conv(xy))
        return (self.gamma.to(att.dtype) * att + xy).chunk(2, 0)


class FinalConv(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.conv1 = ConvLayer(c_in, 1, 1, activation="none")

    def forward(self, x):
        return torch.tanh(self.conv1(x).float())


class TorchFusionHead(nn.Module):
    """Reducers (en0..en3, en3 shared by levels 4 and 5), CAIM, decoder (U = conv_in1, T = conv_t4,
    final conv_t1). conv_in2..5, conv_t2 and conv_t3 exist only so the released state_dict loads."""

    def __init__(self, level_channels: Sequence[int] = (32, 64, 128, 256, 256), n_timesteps: int = 3):
        super().__init__()
        for i, c in enumerate(level_channels[:4]):
            setattr(self, f"en{i}", Encoder(n_timesteps * c))
        self.crossatten = CrissCrossCAIM()
        self.conv_in1 = ConvLayer(64, 64, 3)
        for name, (ci, co) in dict(conv_in2=(32, 16), conv_in3=(64, 32), conv_in4=(128, 64),
                                   conv_in5=(128, 128)).items():
            setattr(self, name, ConvLayer(ci, co, 1))  # unused by the forward pass
        self.conv_t4 = ConvLayer(128, 64, 3)
        self.conv_t3 = ConvLayer(128, 64, 3)  # unused
        self.conv_t2 = ConvLayer(64, 32, 3)  # unused
        self.conv_t1 = FinalConv(64)

    def forward(self, ir_feats, vi_feats):
        b = ir_feats[0].shape[0]
        encoders = [self.en0, self.en1, self.en2, self.en3]
        fused = []
        for i, (a, v) in enumerate(zip(ir_feats, vi_feats)):
            r = encoders[min(i, 3)](torch.cat([a, v], 0))
            out_x, out_y = self.crossatten(r[:b], r[b:])
            fused.append(torch.cat([out_x, out_y], 1))
        d = fused[-1]
        for f in reversed(fused[:-1]):
            up = self.conv_in1(F.interpolate(d, scale_factor=2, mode="nearest"))
            d = self.conv_t4(torch.cat([up, f], 1))
        return self.conv_t1(d)


# ----------------------------------------------------------------------------------------------
# The whole model

LUMA = (0.299, 0.587, 0.114)


def _pad_to_multiple(x, multiple):
    h, w = x.shape[2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class TorchDMFuse(nn.Module):
    """forward(ir, vi) -> fused (B, 1, H, W), tanh range; ir, vi (B, 1 | 3, H, W) in model range.

    Noise: `noisy=(x_t, g)` as made by the JAX model (exact comparison), or `g` (T*2*B,) and `eps`
    (T*2*B, C, Hp, Wp), or neither (drawn here with `generator`). Batch order of x_t: timestep-major,
    then modality (infrared first), then image, as `dmfuse.noisy_inputs`.
    """

    def __init__(self, unet: TorchUNet, head: TorchFusionHead, sqrt_alphas_cumprod_prev: np.ndarray,
                 timesteps: Sequence[int] = (5, 50, 100)):
        super().__init__()
        self.unet, self.head, self.timesteps = unet, head, tuple(timesteps)
        self.register_buffer("sqrt_acp_prev", torch.as_tensor(np.asarray(sqrt_alphas_cumprod_prev),
                                                              dtype=torch.float32), persistent=False)

    def noisy_inputs(self, ir, vi, g=None, eps=None, generator=None):
        """ir, vi (B, 1, Hp, Wp) -> x_t (T * 2 * B, C, Hp, Wp), g (T * 2 * B,)."""
        b, n_t = ir.shape[0], len(self.timesteps)
        c = self.unet.init_conv.in_channels
        x0 = torch.cat([ir, vi], 0).float().repeat(1, c, 1, 1)
        x0 = x0[None].expand(n_t, *x0.shape).reshape(n_t * 2 * b, *x0.shape[1:])
        if g is None:
            t = torch.as_tensor(np.repeat(np.asarray(self.timesteps), 2 * b), device=ir.device)
            lo, hi = self.sqrt_acp_prev[t], self.sqrt_acp_prev[t - 1]
            u = torch.rand(lo.shape, generator=generator, device=ir.device)
            g = lo + (hi - lo) * u
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, device=ir.device)
        g = g.float()
        return g[:, None, None, None] * x0 + torch.sqrt(1 - g * g)[:, None, None, None] * eps, g

    def extract_features(self, x_t, g, b):
        n_t = len(self.timesteps)
        ir_feats, vi_feats = [], []
        for tap in self.unet(x_t, g, taps=True):
            tap = tap.reshape(n_t, 2, b, *tap.shape[1:])
            per_mod = torch.cat([tap[i] for i in range(n_t)], dim=2)  # (2, B, T C, h, w)
            ir_feats.append(per_mod[0])
            vi_feats.append(per_mod[1])
        return ir_feats, vi_feats

    def forward(self, ir, vi, *, noisy=None, g=None, eps=None, generator=None):
        h, w = ir.shape[2:]
        stride = self.unet.total_stride
        ir = _pad_to_multiple(to_grey(ir), stride)
        vi = _pad_to_multiple(to_grey(vi), stride)
        x_t, g = noisy if noisy is not None else self.noisy_inputs(ir, vi, g, eps, generator)
        ir_feats, vi_feats = self.extract_features(x_t, g, ir.shape[0])
        return self.head(ir_feats, vi_feats)[:, :, :h, :w]


def to_grey(x):
    if x.shape[1] == 1:
        return x
    if x.shape[1] == 3:
        return (x * torch.as_tensor(LUMA, dtype=x.dtype, device=x.device)[None, :, None, None]).sum(1, keepdim=True)
    raise ValueError(f"expected 1 or 3 channels, got an input of shape {tuple(x.shape)}")


def build_torch_dmfuse(config, attention: str = "einsum") -> TorchDMFuse:
    """The same model as `dmfuse_jax.models.build_dmfuse(config)`, in PyTorch (eval mode)."""
    from dmfuse_jax.models.builders import build_schedule

    u = config.model.unet
    unet = TorchUNet(u.in_channels, u.out_channels, u.inner_channels, tuple(u.channel_mults),
                     u.res_blocks, tuple(u.attn_res), u.image_size, u.norm_groups, u.dropout, attention)
    h = config.model.head
    if (h.features, h.decoder_features, h.qk_features, h.shared_last_reducer) != (32, 64, 4, True):
        raise ValueError("the PyTorch reference implements the released head layout only "
                         "(features 32, decoder 64, qk 4, shared last reducer)")
    level_channels = [u.inner_channels * m for m in u.channel_mults]
    if len(level_channels) != 5:
        raise ValueError("the PyTorch reference implements the 5-level DMFuse only")
    head = TorchFusionHead(level_channels, len(config.model.timesteps))
    model = TorchDMFuse(unet, head, build_schedule(config).sqrt_alphas_cumprod_prev, config.model.timesteps)
    return model.eval()


def state_dict_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in module.state_dict().items()}


def to_flax_params(model: TorchDMFuse, config) -> dict:
    """The PyTorch model's weights as Flax params of `build_dmfuse(config)`: {'params': {'unet', 'head'}},
    through the project's converters (so this also exercises `torch_to_flax`)."""
    import jax
    import jax.numpy as jnp

    from dmfuse_jax.conversion.torch_to_flax import convert_fusion_head, convert_unet
    from dmfuse_jax.models.builders import build_dmfuse

    jm = build_dmfuse(config, "float32")
    s = jm.unet.total_stride
    x = jnp.zeros((1, s, s, 1), jnp.float32)
    keys = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(0)}
    template = jax.eval_shape(lambda: jm.init(keys, x, x, method=jm.init_all))["params"]
    return {"params": {"unet": convert_unet(state_dict_numpy(model.unet), template["unet"]),
                       "head": convert_fusion_head(state_dict_numpy(model.head), template["head"])}}
