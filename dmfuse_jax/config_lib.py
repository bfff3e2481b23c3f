"""Building blocks for the config files in `configs/` (big_vision style: configs compose these).

Every size in the model comes from here; the configs only choose values.
"""
from __future__ import annotations

import ml_collections


def unet_config(width: int = 32, *, in_channels: int = 3, out_channels: int = 3,
                channel_mults=(1, 2, 4, 8, 8), res_blocks: int = 2, attn_res=(16,),
                image_size: int = 256, norm_groups: int = 32, dropout: float = 0.2,
                attention_impl: str = "xla") -> ml_collections.ConfigDict:
    """The SR3 UNet. width = inner channels (paper's 1/4 model: 32; original: 128)."""
    return ml_collections.ConfigDict(dict(
        in_channels=in_channels, out_channels=out_channels, inner_channels=width,
        channel_mults=tuple(channel_mults), res_blocks=res_blocks, attn_res=tuple(attn_res),
        image_size=image_size, norm_groups=norm_groups, dropout=dropout,
        attention_impl=attention_impl,  # 'xla' | 'chunked' | 'cudnn' (models.unet.ATTENTION_IMPLS)
    ))


def head_config(caim_impl: str = "auto") -> ml_collections.ConfigDict:
    """The fusion head, as the released weights (32-channel reducers, R3 shared by levels 4 and 5)."""
    return ml_collections.ConfigDict(dict(
        features=32, decoder_features=64, qk_features=4, shared_last_reducer=True,
        caim_impl=caim_impl,  # 'auto' | 'reference' | 'pallas'
    ))


def model_config(width: int = 32, **unet_kwargs) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        unet=unet_config(width, **unet_kwargs),
        head=head_config(),
        timesteps=(5, 50, 100),
        input_range="-1_1",  # '-1_1' (paper) | '0_1' (released test code)
        dtype="float32",  # compute dtype: 'float32' | 'bfloat16'; params stay float32
    ))


def diffusion_config(num_timesteps: int = 2000) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(schedule="cosine", num_timesteps=num_timesteps, cosine_s=8e-3,
                                          loss_type="l2"))


def fusion_loss_config(variant: str = "paper") -> ml_collections.ConfigDict:
    """DESIGN.md sections 4-5: 'paper' (1, 4, 20; mean target; fixed 0.5/0.5 SSIM weights; 'valid' SSIM
    with C from the data range) or 'released_code', the authors' loss.py (10, 14, 16; max target; SSIM
    weights from the sources' batch-mean Sobel magnitudes; zero-padded 'same' SSIM with
    C1 = 0.01^2, C2 = 0.03^2)."""
    if variant == "paper":
        return ml_collections.ConfigDict(dict(w_ssim=1.0, w_intensity=4.0, w_gradient=20.0,
                                              intensity_target="mean", ssim_weighting="fixed",
                                              ssim_padding="valid", ssim_constants="data_range"))
    if variant == "released_code":
        return ml_collections.ConfigDict(dict(w_ssim=10.0, w_intensity=14.0, w_gradient=16.0,
                                              intensity_target="max", ssim_weighting="gradient",
                                              ssim_padding="same", ssim_constants="unit"))
    raise ValueError(f"unknown fusion loss variant {variant!r}")


def base_config(width: int = 32, **unet_kwargs) -> ml_collections.ConfigDict:
    """The keys every config has; training configs add `stage`, `data`, `optimizer` etc."""
    return ml_collections.ConfigDict(dict(
        seed=0,
        model=model_config(width, **unet_kwargs),
        diffusion=diffusion_config(),
        loss=fusion_loss_config("paper"),
    ))


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """JSON (as written by `ConfigDict.to_json`) -> ConfigDict, lists back to tuples (configs use
    tuples for multipliers, timesteps and shapes). Raises ValueError on invalid JSON."""
    import json

    def tuples(o):
        if isinstance(o, dict):
            return {k: tuples(v) for k, v in o.items()}
        if isinstance(o, list):
            return tuple(tuples(v) for v in o)
        return o
    return ml_collections.ConfigDict(tuples(json.loads(text)))


def load_config(path: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file (optionally `path:arg`) and applies `key=value` overrides."""
    import ast
    import importlib.util
    import os

    from dmfuse_jax.errors import UserError

    arg = None
    if ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location("dmfuse_user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config(arg) if arg is not None else module.get_config()
    except Exception as e:  # a broken config file is the user's problem, reported with its name
        raise UserError(f"could not load config {path}: {type(e).__name__}: {e}") from e
    for item in overrides or []:
        key, _, raw = item.partition("=")
        key = key.removeprefix("--").removeprefix("config.")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        *parents, leaf = key.split(".")
        try:
            for p in parents:
                node = node[p]
            old = node[leaf]
        except (KeyError, AttributeError):
            raise UserError(f"config {path} has no key {key!r} (override {item!r})") from None
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, float) and isinstance(value, int):
            value = float(value)
        with config.unlocked() if hasattr(config, "unlocked") else _null():
            node[leaf] = value
    return config


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
