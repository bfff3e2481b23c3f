"""What `--checkpoint` may name, and loading each kind into (config, float32 numpy params).

Kinds, detected in this order:
  torch pair      "UNET.pth,HEAD.pth" (needs `config`): SR3 UNet + DMFuse head PyTorch state_dicts,
                  converted on the fly (`dmfuse convert-torch` makes a bundle of them once)
  bundle          a folder with `dmfuse_bundle.json` (`dmfuse export`, `dmfuse convert-torch`)
  training workdir  a folder with `config.json` and `checkpoints/` (`dmfuse train`); a fusion-stage
                  run gives the whole model; a pretraining run has no fusion head: an error
None means the bundled default model, `dmfuse_jax/assets/default_bundle/`, with the head of the
fuse mode (`MODE_HEADS`: `--mode medical` swaps in the medical head; every other mode keeps the
bundle's own RoadScene head).
A `config` given beside a bundle or workdir must fit its params (else: "a checkpoint of another
config") and then replaces its config (e.g. to change the compute dtype or kernels).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmfuse_jax.errors import UserError
from dmfuse_jax.inference import bundle as bundle_lib
from dmfuse_jax.models.params import check_params_fit, param_shapes

DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "assets" / "default_bundle"
# Which fusion head the bundled default model uses per fuse mode, when no checkpoint is given: a
# head-only flat npz next to the bundle (dmfuse_jax/conversion/npz.py format, float16 values) on the
# bundle's UNet; modes not listed use the bundle's own head. The one place a shipped head is loaded
# (`default_head`). medical_head.npz: configs/harvard_fusion.py (docs/evaluation.md, "Medical head").
MODE_HEADS: dict[str, Path] = {"medical": DEFAULT_BUNDLE.parent / "medical_head.npz"}


@dataclass
class Checkpoint:
    config: Any
    params: Any
    kind: str
    source: str
    notes: list = field(default_factory=list)


def _as_config(config):
    if config is None or not isinstance(config, (str, os.PathLike)):
        return config
    from dmfuse_jax.config_lib import load_config
    return load_config(str(config))


def _float32(tree):
    import jax
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree)


def is_torch_pair(spec: str) -> bool:
    return "," in spec or spec.endswith((".pth", ".pt"))


PART_NAMES = {"unet": "SR3 UNet", "head": "fusion head"}


def load_torch_part(path: str | os.PathLike, part: str, template, config=None, notes: list | None = None) -> dict:
    """One part ('unet' or 'head') from a PyTorch state_dict .pth, converted to the tree of `template`
    (arrays or ShapeDtypeStructs). -> float32 numpy tree."""
    from dmfuse_jax.conversion import ConversionError, convert_fusion_head, convert_unet, load_torch_state_dict

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file ({PART_NAMES[part]} .pth)")
    try:
        sd = load_torch_state_dict(str(p))
    except ConversionError as e:
        raise UserError(str(e)) from None
    except ImportError as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds on a bad file
        raise UserError(f"{path}: not a readable PyTorch state_dict: {type(e).__name__}: {str(e)[:200]}") from None
    report: list[str] = []
    try:
        tree = convert_fusion_head(sd, template, report=report) if part == "head" else convert_unet(sd, template)
    except ConversionError as e:
        width = f" (UNet width {config.model.unet.inner_channels})" if config is not None else ""
        raise UserError(f"{path}: does not fit the config{width}: {e}") from None
    if report and notes is not None:
        notes.append(f"{path}: skipped {len(report)} keys unused by the forward pass "
                     f"({', '.join(sorted({k.split('.')[0] for k in report}))})")
    return _float32(tree)


def load_torch_pair(unet_path: str, head_path: str, config, notes: list | None = None) -> dict:
    """Converts an SR3 UNet .pth and a DMFuse head .pth to the params of `config`'s model."""
    shapes = param_shapes(config)
    return {part: load_torch_part(path, part, shapes[part], config, notes)
            for part, path in (("unet", unet_path), ("head", head_path))}


def is_workdir(path: str | os.PathLike) -> bool:
    return Path(path, "config.json").is_file() and Path(path, "checkpoints").is_dir()


def load_part(spec: str | os.PathLike, part: str, template, *, key: str, what: str, ema: bool | None = None,
              notes: list | None = None) -> dict:
    """One part ('unet' or 'head') of a model from any weights path dmfuse reads, checked against
    `template` (the model's tree of that part: arrays or ShapeDtypeStructs). The one place that
    decides what such a path is (`resolve` for a whole model, `FusionStage.load_pretrained` for
    `config.init`, `ddfm.priors.load_prior` for an SR3 prior), in this order:
      inference bundle   its params' `part`
      training workdir   its latest params' `part` (`ema`: None = EMA when kept); a pretraining
                         workdir's params are the UNet
      .pth / .pt         a PyTorch state_dict of that part (converted)
      .npz               a flat npz of that part alone or of a whole model (`conversion/npz.py`)
    `key` is the option that named the path, `what` the template ("this config's UNet"), both for
    errors ("PATH: does not fit WHAT: ..."). -> float32 numpy tree."""
    from dmfuse_jax.conversion.npz import check_flat, flatten_shapes, load_like

    if part not in PART_NAMES:
        raise ValueError(f"part must be one of {sorted(PART_NAMES)}, got {part!r}")
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder ({key})")
    if bundle_lib.is_bundle(path):
        _, params, _ = bundle_lib.load_bundle(path)
        tree = params.get(part)
    elif is_workdir(path):
        from dmfuse_jax import workdir

        params = workdir.load_params(path, ema=ema)
        tree = params.get(part) if isinstance(params, dict) and set(params) >= {"unet", "head"} else \
            (params if part == "unet" else None)
    elif path.suffix in (".pth", ".pt"):
        return load_torch_part(path, part, template, notes=notes)
    elif path.suffix == ".npz":
        return _float32(load_like(path, part, template, what))
    else:
        raise UserError(f"{path}: not weights dmfuse reads ({key}): expected an inference bundle, a training "
                        "workdir, a PyTorch .pth or a flat .npz")
    if tree is None:
        raise UserError(f"{path}: holds no {PART_NAMES[part]} ({key})")
    check_flat(flatten_shapes(tree), {k: tuple(v.shape) for k, v in flatten_shapes(template).items()}, str(path), what)
    return _float32(tree)


STEPS_HELP = ("workdir: which checkpoint: 'latest' (the newest valid one), 'best' (the best by "
              "config.checkpoint.best, kept in WORKDIR/best/) or a step number (default: latest)")


def parse_step(step) -> int | str | None:
    """--step: None / 'latest' -> None (the newest valid checkpoint), 'best', or a step number."""
    if step is None or step == "latest":
        return None
    if step == "best" or isinstance(step, int):
        return step
    try:
        return int(step)
    except ValueError:
        raise UserError(f"--step {step!r}: expected 'best', 'latest' or a step number") from None


def _workdir_params(path: Path, ema: bool, step):
    from dmfuse_jax import workdir as ck

    if step == "best":
        from dmfuse_jax.workdir import load_best_params
        params, _ = load_best_params(path, ema=ema)
        return params
    return ck.load_params(path, ema=ema, step=step)


def _load_workdir(path: Path, ema: bool | None, notes: list, step=None):
    from dmfuse_jax import workdir as ck

    config = ck.load_workdir_config(path)
    if step == "best":
        from dmfuse_jax.workdir import best_info
        info = best_info(path) or {}
        notes.append(f"{path}: best checkpoint, step {info.get('step')} ({info.get('metric')} = {info.get('value')})")
    elif step is not None:
        notes.append(f"{path}: checkpoint of step {step}")
    if ema is None:  # EMA params when the run kept them, else the raw ones
        try:
            params = _workdir_params(path, True, step)
            notes.append(f"{path}: EMA params")
        except (KeyError, LookupError, FileNotFoundError, ValueError, UserError):
            params = _workdir_params(path, False, step)
            notes.append(f"{path}: raw params (no EMA params in the checkpoint)")
    else:
        try:
            params = _workdir_params(path, ema, step)
        except KeyError as e:
            raise UserError(f"{path}: the checkpoint has no {'EMA' if ema else 'raw'} params ({e})") from None
    if not (isinstance(params, dict) and "unet" in params and "head" in params):
        stage = config.get("stage", "?")
        raise UserError(f"{path}: a '{stage}'-stage workdir holds a diffusion UNet but no fusion head, so it "
                        "cannot fuse; train the fusion stage on top of it (dmfuse train --config "
                        "configs/quickstart_fusion.py ...) and pass that workdir, or give "
                        "--checkpoint UNET.pth,HEAD.pth --config CFG")
    return config, params


def default_head(mode: str, template) -> tuple[dict, Path] | None:
    """The shipped head of fuse `mode` (float32 numpy tree, checked against `template`, the model's
    head params) and its file, or None when the mode uses the default bundle's own head."""
    from dmfuse_jax.conversion.npz import load_like

    path = MODE_HEADS.get(mode)
    if path is None:
        return None
    if not path.is_file():
        raise UserError(f"--mode {mode}: its fusion head {path} is missing from the package (reinstall dmfuse-jax, "
                        "or pass --checkpoint to use another model)")
    return load_like(path, "head", template, f"the default model's head (mode {mode})"), path


def resolve(spec: str | os.PathLike | None, *, config=None, ema: bool | None = None,
            mode: str = "auto", step=None) -> Checkpoint:
    """A checkpoint spec -> Checkpoint(config, float32 numpy params, kind, source, notes). `mode` (a
    fuse mode) matters only for spec None: the default model with that mode's head (`MODE_HEADS`).
    `step` (workdirs only): None / 'latest', 'best' or a step number (see `parse_step`)."""
    config = _as_config(config)
    step = parse_step(step)
    notes: list[str] = []
    if spec is None:
        if step is not None:
            raise UserError(f"--step {step} selects a checkpoint of a training workdir; pass --checkpoint WORKDIR")
        if not bundle_lib.is_bundle(DEFAULT_BUNDLE):
            raise UserError(f"no --checkpoint given and no default model is bundled ({DEFAULT_BUNDLE} is missing): "
                            "pass --checkpoint WORKDIR|BUNDLE|UNET.pth,HEAD.pth, or use --method average "
                            "for a model-free baseline")
        ck = resolve(DEFAULT_BUNDLE, config=config, ema=ema)
        head = default_head(mode, ck.params["head"])
        if head is not None:
            ck.params = {**ck.params, "head": head[0]}
            ck.source = f"{DEFAULT_BUNDLE} with head {head[1]}"
            ck.notes.append(f"--mode {mode}: fusion head {head[1].name} (on the default model's UNet)")
        return ck
    spec = str(spec)
    if step is not None and not (Path(spec, "config.json").is_file() and Path(spec, "checkpoints").is_dir()):
        raise UserError(f"{spec}: --step {step} selects a checkpoint of a training workdir; this is not one")
    if is_torch_pair(spec):
        parts = [s for s in spec.split(",") if s]
        if len(parts) != 2:
            raise UserError(f"{spec}: a PyTorch checkpoint is given as UNET.pth,HEAD.pth (two files)")
        if config is None:
            raise UserError(f"{spec}: PyTorch weights carry no config: pass --config (e.g. configs/dmfuse_quarter.py)")
        params = load_torch_pair(parts[0], parts[1], config, notes)
        return Checkpoint(config, params, "torch", spec, notes)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint (file or folder)")
    if bundle_lib.is_bundle(path):
        own, params, meta = bundle_lib.load_bundle(path)
        kind = "bundle"
        notes.append(f"{path}: bundle, params stored as {meta.get('param_dtype')}")
    elif path.is_dir() and (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        own, params = _load_workdir(path, ema, notes, step)
        params = _float32(params)
        kind = "workdir"
    else:
        raise UserError(f"{path}: not a checkpoint: expected an inference bundle (folder with "
                        f"{bundle_lib.MARKER}), a training workdir (folder with config.json and checkpoints/) "
                        "or UNET.pth,HEAD.pth")
    check_params_fit(own, params, str(path), "its own config")
    if config is not None:
        check_params_fit(config, params, str(path), "the given --config")
        own = config
    return Checkpoint(own, params, kind, str(path), notes)
