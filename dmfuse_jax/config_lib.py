"""Building blocks for the config files in `configs/` (big_vision style: configs compose these).

Every size in the model comes from here; the configs only choose values.
"""
from __future__ import annotations

import re
import warnings
from typing import Sequence

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
        caim_impl=caim_impl,  # 'auto' | 'reference' | 'blockwise' | 'pallas'
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
    C1 = 0.01^2, C2 = 0.03^2). w_colour (0 in both): the weight of the gradient term on the
    recoloured image (`fusion_loss.colour_gradient_loss`), this project's addition for colour
    visible images (medical PET / SPECT); w_edge (0 in both): the weight of 1 - Qabf of the
    recoloured image (`fusion_loss.edge_preservation_loss`), the medical head's second addition."""
    if variant == "paper":
        return ml_collections.ConfigDict(dict(w_ssim=1.0, w_intensity=4.0, w_gradient=20.0,
                                              intensity_target="mean", ssim_weighting="fixed",
                                              ssim_padding="valid", ssim_constants="data_range", w_colour=0.0,
                                              w_edge=0.0))
    if variant == "released_code":
        return ml_collections.ConfigDict(dict(w_ssim=10.0, w_intensity=14.0, w_gradient=16.0,
                                              intensity_target="max", ssim_weighting="gradient",
                                              ssim_padding="same", ssim_constants="unit", w_colour=0.0,
                                              w_edge=0.0))
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


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (`path` or `path:arg`) with `KEY=VALUE` overrides
    (e.g. "model.dtype=bfloat16"; a leading `--config.` is allowed), parsed as `config_from_flags`."""
    flags = [f"--config.{o.removeprefix('--').removeprefix('config.')}" for o in overrides]
    return config_from_flags(path, flags)


def config_from_flags(path: str, argv: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The ml_collections way: `ml_collections.config_flags` loads `--config=path[:arg]` and applies the
    `--config.KEY=VALUE` (or `--config.KEY VALUE`) flags in `argv`, each parsed as its key's type.

    Runs on a fresh absl `FlagValues`, so it can be called any number of times in one process. Every
    problem (missing or broken file, unknown key, a value of the wrong type, a stray argument) is a
    one-line `UserError` naming the file or the key, and so is a value out of its valid range
    (`validate_config`). The config comes back unlocked, as the file made it.
    """
    import os

    from absl import flags as absl_flags

    from dmfuse_jax.errors import UserError

    if not os.path.isfile(path.split(":", 1)[0]):
        raise UserError(f"config file not found: {path.split(':', 1)[0]}")
    values = absl_flags.FlagValues()
    try:
        config, rest = _parse_config_flags(path, argv, values)
    except absl_flags.IllegalFlagValueError as e:
        key = re.match(r"flag --config\.([\w.]+)=", str(e))
        if key is None:  # the file itself failed (config_flags wraps its TypeError/ValueError)
            raise _diagnose(path, argv, e) from None
        raise UserError(f"--config.{key.group(1)}: expected {_type_name(values, key.group(1))}; "
                        f"{str(e).splitlines()[0].split(': ', 1)[-1]}") from None
    except absl_flags.Error as e:  # an unknown flag, flags out of order, a key type with no parser
        raise UserError(str(e).splitlines()[0].split(" Currently supported types")[0]) from None
    except Exception as e:  # noqa: BLE001 - get_config raised, or an override named a key the config lacks
        raise _diagnose(path, argv, e) from None
    if len(rest) > 1:
        raise UserError(f"unrecognized argument(s): {' '.join(rest[1:])} (config overrides are --config.KEY=VALUE)")
    if not isinstance(config, ml_collections.ConfigDict):
        raise _diagnose(path, (), None)
    validate_config(config, path)
    return config


def _parse_config_flags(path: str, argv: Sequence[str], values=None):
    """-> (config, unparsed arguments), parsed on `values` (a fresh absl FlagValues by default);
    raises what absl / config_flags raise."""
    from absl import flags as absl_flags
    from ml_collections import config_flags

    _accept_any_literal_for_none_keys()
    full = ["dmfuse", f"--config={path}", *argv]
    values = absl_flags.FlagValues() if values is None else values
    holder = config_flags.DEFINE_config_file("config", flag_values=values, lock_config=False, sys_argv=full)
    with warnings.catch_warnings():  # config_flags loads the file with the deprecated load_module()
        warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
        rest = values(full)
    return holder.value, rest


def _diagnose(path: str, argv: Sequence[str], error: Exception | None) -> Exception:
    """config_flags reports a broken config file and an override of a key the config lacks as bare
    exceptions: loads the file alone to tell them apart, and names the file or the key."""
    from ml_collections.config_flags import config_path

    from dmfuse_jax.errors import UserError

    try:
        config = _parse_config_flags(path, ())[0]
    except Exception as e:  # noqa: BLE001 - a broken config file is the user's problem, reported with its name
        return UserError(f"could not load config {path}: {_last_line(e)}")
    error = getattr(config, "_error", None)  # config_flags' stand-in for a get_config that raised OSError
    if isinstance(error, BaseException):
        return UserError(f"could not load config {path}: {_last_line(error)}")
    if not isinstance(config, ml_collections.ConfigDict):
        return UserError(f"could not load config {path}: get_config() returned {type(config).__name__!r}, "
                         "not a ConfigDict")
    for item in argv:
        m = re.match(r"-{1,2}(?:no)?config\.([^=]+)", item)
        if m is None:
            continue
        try:
            config_path.get_value(m.group(1), config)
        except (KeyError, AttributeError, IndexError, ValueError):
            return UserError(f"config {path} has no key {m.group(1)!r} (override {item!r})")
    return UserError(f"config {path}: cannot apply {' '.join(argv)}: {_last_line(error)}")


def _last_line(e: BaseException | None) -> str:
    """One line for an exception; config_flags puts the config file's traceback in the message, whose
    last line is the original error."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[-1].strip()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _type_name(values, key: str) -> str:
    from ml_collections.config_flags import config_path
    try:
        return config_path.get_type(key, values["config"].value).__name__
    except Exception:  # noqa: BLE001 - only for the message
        return "another type"


def _accept_any_literal_for_none_keys() -> None:
    """A key set to None has no type in a ConfigDict, and config_flags has no parser for NoneType: give
    it a Python literal (or, failing that, the string), as config_flags does for `object` fields."""
    import ast

    from absl import flags as absl_flags
    from ml_collections import config_flags

    class AnyLiteral(absl_flags.ArgumentParser):
        def parse(self, argument):
            try:
                return ast.literal_eval(argument)
            except (ValueError, SyntaxError):
                return argument

    config_flags.register_flag_parser_for_type(type(None), AnyLiteral())


# ---------------------------------------------------------------------------------------------
# validation: every key with a valid range, checked when a config is built (`config_from_flags`), so
# a bad value exits 2 before any work or write. Registry: key -> (what it must be, check). Only keys
# the config has are checked; the mesh against the device count is `training.train.check_devices`.


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    import math
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(lo: int):
    return f"an integer >= {lo}", lambda v: _is_int(v) and v >= lo


def _num(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = True):
    what = f"a finite number {'>' if lo_open else '>='} {lo:g}" + (
        f" and {'<' if hi_open else '<='} {hi:g}" if hi is not None else "")
    return what, lambda v: (_is_num(v) and (v > lo if lo_open else v >= lo)
                            and (hi is None or (v < hi if hi_open else v <= hi)))


def _one_of(*names: str):
    return f"one of {', '.join(map(repr, names))}", lambda v: v in names


VALID_RANGES: dict[str, tuple[str, object]] = {
    "seed": ("an integer", _is_int),
    "batch_size": _int_at_least(1),
    "total_steps": ("an integer >= 0 (0: from num_epochs)", lambda v: _is_int(v) and v >= 0),
    "num_epochs": _num(0),
    "checkpoint_every_steps": _int_at_least(1),
    "keep_checkpoints": ("an integer >= 0 (0: keep all)", lambda v: _is_int(v) and v >= 0),
    "log_every_steps": _int_at_least(1),
    "preview_every_steps": ("an integer >= 0 (0: no previews)", lambda v: _is_int(v) and v >= 0),
    "max_nonfinite_steps": ("an integer >= 0 (0: stop at the first non-finite step)",
                            lambda v: _is_int(v) and v >= 0),
    "optimizer.name": _one_of("adam", "adamw"),
    "optimizer.learning_rate": _num(0, lo_open=True),
    "optimizer.warmup_steps": _int_at_least(0),
    "optimizer.schedule": _one_of("constant", "cosine"),
    "optimizer.b1": _num(0, 1),
    "optimizer.b2": _num(0, 1),
    "optimizer.eps": _num(0, lo_open=True),
    "optimizer.weight_decay": _num(0),
    "optimizer.grad_clip": ("a finite number >= 0 (0: no clipping)", _num(0)[1]),
    "optimizer.ema_decay": _num(0, 1),
    "model.dtype": _one_of("float32", "bfloat16"),
    "model.input_range": _one_of("-1_1", "0_1"),
    "model.unet.inner_channels": _int_at_least(1),
    "model.unet.norm_groups": _int_at_least(1),
    "model.unet.res_blocks": _int_at_least(1),
    "model.unet.image_size": _int_at_least(1),
    "model.unet.dropout": _num(0, 1),
    "diffusion.num_timesteps": _int_at_least(1),
    "data.num_threads": _int_at_least(1),
    "data.prefetch": _int_at_least(0),
    "data.worker_count": _int_at_least(0),
    "data.patch_size": _int_at_least(1),
    "data.patch_step": _int_at_least(1),
    "data.num_holdout": _int_at_least(0),
    "data.max_pairs": ("an integer >= 0 (0: all)", lambda v: _is_int(v) and v >= 0),
    "sharding.fsdp_min_size": _int_at_least(0),
    "sharding.mesh_shape": ("two integers (data, fsdp), each >= 1 or one of them -1 (the rest)",
                            lambda v: isinstance(v, (tuple, list)) and len(v) == 2
                            and all(_is_int(s) and (s >= 1 or s == -1) for s in v) and list(v).count(-1) <= 1),
    "preview.num_samples": _int_at_least(1),
    "preview.sample_steps": _int_at_least(1),
    "preview.size": _int_at_least(16),
}


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def validate_config(config, where: str = "config") -> None:
    """UserError naming the first key whose value is out of its valid range (`VALID_RANGES`), and the
    model timesteps against the diffusion schedule. Keys the config lacks are not checked."""
    from dmfuse_jax.errors import UserError

    for key, (what, ok) in VALID_RANGES.items():
        value = _get(config, key)
        if value is not _MISSING and not ok(value):
            raise UserError(f"{where}: {key} = {value!r}: must be {what}")
    steps, n = _get(config, "model.timesteps"), _get(config, "diffusion.num_timesteps")
    if steps is not _MISSING and n is not _MISSING:
        if not (isinstance(steps, (tuple, list)) and steps and all(_is_int(t) and 0 <= t < n for t in steps)):
            raise UserError(f"{where}: model.timesteps = {steps!r}: must be integers in [0, {n}) "
                            "(diffusion.num_timesteps)")
