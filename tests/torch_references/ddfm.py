"""DDFM in PyTorch: the authors' algorithm, for parity tests and the same-run CPU benchmark.

A compact port of guided-diffusion's `UNetModel` (github.com/openai/guided-diffusion, MIT License,
Copyright (c) 2021 OpenAI; the same file ships in MMIF-DDFM) with the state_dict names of the
original, MMIF-DDFM's `EM_Initial` / `EM_onestep` (TV proximal step by FFT) and its DDIM + EM
`p_sample` loop (eta 0), with skimage's BT.601 rgb2ycbcr / ycbcr2rgb as the authors call them
(float32 forward, float64 inverse). NCHW, float32. Reproduces ../shared/golden/ddfm (see
tests/test_ddfm.py). Needs torch (the `torch` extra).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

from dmfuse_jax.ddfm.config import attention_ds_of, channel_mult_of, model_config
from dmfuse_jax.ddfm.sampler import RGB_FROM_YCBCR, YCBCR_FROM_RGB, YCBCR_OFFSET


class GroupNorm32(tnn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def _norm(ch):
    return GroupNorm32(32, ch)


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Downsample(tnn.Module):
    def __init__(self, ch, use_conv):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.op = tnn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x) if self.use_conv else F.avg_pool2d(x, 2, 2)


class Upsample(tnn.Module):
    def __init__(self, ch, use_conv):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = tnn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(tnn.Module):
    def __init__(self, ch, emb_ch, out_ch, use_scale_shift_norm, up=False, down=False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = tnn.Sequential(_norm(ch), tnn.SiLU(), tnn.Conv2d(ch, out_ch, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(ch, False), Upsample(ch, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(ch, False), Downsample(ch, False)
        self.emb_layers = tnn.Sequential(tnn.SiLU(), tnn.Linear(emb_ch, 2 * out_ch if use_scale_shift_norm else out_ch))
        self.out_layers = tnn.Sequential(_norm(out_ch), tnn.SiLU(), tnn.Dropout(0.0),
                                         tnn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = tnn.Identity() if out_ch == ch else tnn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(tnn.Module):
    def __init__(self, ch, num_heads, new_order):
        super().__init__()
        self.n_heads, self.new_order = num_heads, new_order
        self.norm = _norm(ch)
        self.qkv = tnn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = tnn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        if self.new_order:  # QKVAttention
            q, k, v = (t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:  # QKVAttentionLegacy
            q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)
        return (x + self.proj_out(a)).reshape(b, c, *spatial)


class Seq(tnn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(tnn.Module):
    """guided-diffusion UNetModel (unconditional), built from create_model arguments."""

    def __init__(self, **create_model_kwargs):
        super().__init__()
        m = model_config(**create_model_kwargs)
        mc = m.num_channels
        mult = channel_mult_of(m.image_size, m.channel_mult)
        attn_ds = attention_ds_of(m.image_size, m.attention_resolutions)
        heads_up = m.num_heads if m.num_heads_upsample == -1 else m.num_heads_upsample

        def heads(ch, n):
            return n if m.num_head_channels == -1 else ch // m.num_head_channels

        def attn(ch, n):
            return AttentionBlock(ch, heads(ch, n), m.use_new_attention_order)

        ted = 4 * mc
        self.model_channels = mc
        self.time_embed = tnn.Sequential(tnn.Linear(mc, ted), tnn.SiLU(), tnn.Linear(ted, ted))
        ch = int(mult[0] * mc)
        self.input_blocks = tnn.ModuleList([Seq([tnn.Conv2d(3, ch, 3, padding=1)])])
        chans, ds = [ch], 1
        rb = dict(use_scale_shift_norm=m.use_scale_shift_norm)
        for level, mu in enumerate(mult):
            for _ in range(m.num_res_blocks):
                layers = [ResBlock(ch, ted, int(mu * mc), **rb)]
                ch = int(mu * mc)
                if ds in attn_ds:
                    layers.append(attn(ch, m.num_heads))
                self.input_blocks.append(Seq(layers))
                chans.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(Seq([ResBlock(ch, ted, ch, down=True, **rb) if m.resblock_updown
                                              else Downsample(ch, True)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = Seq([ResBlock(ch, ted, ch, **rb), attn(ch, m.num_heads), ResBlock(ch, ted, ch, **rb)])
        self.output_blocks = tnn.ModuleList([])
        for level, mu in list(enumerate(mult))[::-1]:
            for i in range(m.num_res_blocks + 1):
                ich = chans.pop()
                layers = [ResBlock(ch + ich, ted, int(mc * mu), **rb)]
                ch = int(mc * mu)
                if ds in attn_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == m.num_res_blocks:
                    layers.append(ResBlock(ch, ted, ch, up=True, **rb) if m.resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(Seq(layers))
        self.out = tnn.Sequential(_norm(ch), tnn.SiLU(), tnn.Conv2d(int(mult[0] * mc), 6 if m.learn_sigma else 3, 3,
                                                                    padding=1))

    def forward(self, x, t):
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# ---- EM (MMIF-DDFM guided_diffusion/EM_onestep.py) ----

def psf2otf(psf, shape):
    psf_size = torch.tensor(psf.shape)
    pad = torch.tensor(shape[-2:]) - psf_size
    psf = F.pad(psf, (0, int(pad[1]), 0, int(pad[0])), "constant")
    for i in range(len(psf_size)):
        psf = torch.roll(psf, -int(psf_size[i] / 2), i)
    return torch.fft.fftn(psf)


def em_initial(I):
    k1 = psf2otf(torch.tensor([[1, -1]]), I.shape)
    k2 = psf2otf(torch.tensor([[1], [-1]]), I.shape)
    return {"C": torch.ones_like(I), "D": torch.ones_like(I), "F2": torch.zeros_like(I), "F1": torch.zeros_like(I),
            "H": torch.zeros_like(I), "tau_a": 1, "tau_b": 1, "fft_k1": k1, "fft_k2": k2,
            "fft_k1sq": torch.conj(k1) * k1, "fft_k2sq": torch.conj(k2) * k2}


def em_onestep(f_pre, I, V, hp, lamb=0.5, rho=0.01):
    k1, k2, k1sq, k2sq = hp["fft_k1"], hp["fft_k2"], hp["fft_k1sq"], hp["fft_k2sq"]
    tau_a, tau_b = hp["tau_a"], hp["tau_b"]
    Y = I - V
    X = f_pre - V
    D = torch.sqrt(2 / tau_b / (X ** 2 + 1e-6))
    C = torch.sqrt(2 / tau_a / ((Y - X + 1e-6) ** 2))
    D[D > 2 * C] = 2 * C[D > 2 * C]
    tau_b = torch.mean(1.0 / (D + 1e-10) + tau_b / 2)
    tau_a = torch.mean(1.0 / (C + 1e-10) + tau_a / 2)
    Hf = torch.fft.fft2(Y - X) + torch.conj(k1) * torch.fft.fft2(hp["F1"]) + torch.conj(k2) * torch.fft.fft2(hp["F2"])
    H = torch.real(torch.fft.ifft2(Hf / (1 + k1sq + k2sq)))
    a1 = torch.zeros_like(H)
    a1[:, :, :, :-1] = H[:, :, :, :-1] - H[:, :, :, 1:]
    a1[:, :, :, -1] = H[:, :, :, -1]
    a2 = torch.zeros_like(H)
    a2[:, :, :-1, :] = H[:, :, :-1, :] - H[:, :, 1:, :]
    a2[:, :, -1, :] = H[:, :, -1, :]
    k = rho / (2 * lamb + rho)
    X = (2 * C * Y + rho * (Y - H)) / (2 * C + 2 * D + rho)
    return I - X, {**hp, "C": C, "D": D, "F1": k * a1, "F2": k * a2, "H": H, "tau_a": tau_a, "tau_b": tau_b}


def rgb_to_ycbcr(x):
    """The authors' util.pytorch_colors.rgb_to_ycbcr: skimage rgb2ycbcr on NHWC float32."""
    a = x.permute(0, 2, 3, 1)
    a = a @ torch.from_numpy(YCBCR_FROM_RGB.T.astype(np.float32)) + torch.from_numpy(YCBCR_OFFSET.astype(np.float32))
    return a.permute(0, 3, 1, 2)


def ycbcr_to_rgb(x):
    """util.pytorch_colors.ycbcr_to_rgb: skimage ycbcr2rgb in float64, returned as float32."""
    a = x.double().permute(0, 2, 3, 1)
    a = (a - torch.from_numpy(YCBCR_OFFSET)) @ torch.from_numpy(RGB_FROM_YCBCR.T)
    return a.float().permute(0, 3, 1, 2)


def ddim_em_sample(model, x_start, I, V, timestep_map, alphas_cumprod, lamb=0.5, rho=0.001, record=False):
    """MMIF-DDFM's DDIM.p_sample_loop (eta 0, epsilon, clip_denoised, no timestep rescaling).
    alphas_cumprod: the respaced schedule (float64 numpy). -> final sample [, list of every step's]."""
    acp = np.asarray(alphas_cumprod, np.float64)
    acp_prev = np.append(1.0, acp[:-1])
    f32 = lambda a, i: torch.tensor(float(a[i]), dtype=torch.float32)  # noqa: E731  (extract_and_expand)
    sqrt_recip, sqrt_recipm1 = np.sqrt(1.0 / acp), np.sqrt(1.0 / acp - 1)
    img, hp, steps = x_start, em_initial(I), []
    tmap = torch.as_tensor(np.asarray(timestep_map))
    for i in reversed(range(len(acp))):
        out = model(img, tmap[[i] * img.shape[0]])
        eps = out[:, :3]
        x0 = (f32(sqrt_recip, i) * img - f32(sqrt_recipm1, i) * eps).clamp(-1, 1)
        ycc = rgb_to_ycbcr(x0) / 255
        y, hp = em_onestep(ycc[:, :1], I, V, hp, lamb=lamb, rho=rho)
        ycc[:, 0] = y[:, 0]
        x0 = ycbcr_to_rgb(ycc * 255)
        eps = (f32(sqrt_recip, i) * img - x0) / f32(sqrt_recipm1, i)
        a_prev = f32(acp_prev, i)
        img = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev) * eps
        if record:
            steps.append(img.clone())
    return (img, steps) if record else img
