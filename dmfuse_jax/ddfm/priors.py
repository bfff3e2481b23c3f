"""DDFM priors: where the unconditional diffusion model comes from.

`load_prior(spec, config=None, dtype=None) -> Prior`:
  None                    the bundled default DMFuse model's SR3 UNet (`checkpoints.resolve(None)`, the
                          same path as `dmfuse_jax.load(None)`), over its own cosine schedule ('sr3')
  DMFuse bundle/workdir   its SR3 UNet ('sr3')
  UNET.npz                a flat npz of SR3 UNet params (keys = Flax paths joined with '/', e.g.
                          ../shared/weights/dmfuse_jax_roadscene_unet_ema_fp16.npz); needs `config`
                          (a DMFuse model config such as configs/dmfuse_quarter.py) ('sr3')
  DDFM bundle             written by `dmfuse convert-torch --guided-diffusion` ('guided_diffusion')
  MODEL.pt / .pth         a guided-diffusion state_dict (the authors' 256x256_diffusion_uncond.pt), with
                          `config` a DDFM config (default: configs/ddfm_openai256.py's settings)
  DMFuse bundle/workdir or None, with `config` a DDFM config of prior 'sr3': that SR3 UNet, sampled
                          with that config's settings

`Prior.config` is the DDFM config (em, seed, respacing, clip; `ddfm/config.py`) the prior came with:
a guided-diffusion prior's own (a given DDFM config wins over a bundle's), or `config` when it is a
DDFM config of prior 'sr3'; else None (`DDFMFuser` then uses `ddfm_config(prior='sr3')`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from dmfuse_jax.errors import UserError


@dataclasses.dataclass
class Prior:
    kind: str  # a sampler.PRIORS name
    module: Any
    params: Any
    betas: np.ndarray  # the prior's own (un-respaced) beta schedule, float64
    source: str
    notes: list = dataclasses.field(default_factory=list)
    config: Any = None  # the DDFM config it came with (see the module docstring), or None

    @property
    def stride(self) -> int:
        return self.module.total_stride


def _as_config(config):
    if config is None or not isinstance(config, (str, Path)):
        return config
    from dmfuse_jax.config_lib import load_config
    return load_config(str(config))


def is_ddfm_config(config) -> bool:
    return config is not None and "prior" in config and "em" in config


def _check_kind(ddfm, kind: str, source: str):
    if ddfm is not None and ddfm.prior != kind:
        raise UserError(f"{source}: a {kind} prior, but the DDFM config is for prior {ddfm.prior!r}")
    return ddfm


def sr3_prior(config, unet_params, source: str, dtype: str | None = None, notes=None, ddfm=None) -> Prior:
    """config: the DMFuse model config of `unet_params`; ddfm: a DDFM config (prior 'sr3') or None."""
    from dmfuse_jax.models.builders import build_schedule, build_unet

    module = build_unet(config, dtype)
    _check_fit(module, unet_params, source, (1, 2 * module.total_stride, 2 * module.total_stride,
                                             module.in_channels), "noise level")
    return Prior("sr3", module, unet_params, build_schedule(config).betas, source, list(notes or []),
                 _check_kind(ddfm, "sr3", source))


def guided_prior(config, params, source: str, dtype: str | None = None) -> Prior:
    from dmfuse_jax.ddfm.config import build_guided_unet
    from dmfuse_jax.diffusion.respace import named_beta_schedule

    from dmfuse_jax.ddfm.config import FIXED_SAMPLER

    _check_kind(config, "guided_diffusion", source)
    d = config.diffusion
    # a config written before these keys were dropped (they could only hold the authors' values)
    odd = [f"{k}={d[k]!r}" for k, v in FIXED_SAMPLER.items() if k in d and d[k] != v]
    if odd:
        raise UserError(f"{source}: only the authors' sampler settings are supported (DDIM, epsilon prediction, "
                        f"no dynamic threshold, no timestep rescaling), not {', '.join(odd)}")
    module = build_guided_unet(config.model, dtype or config.get("dtype", "float32"))
    _check_fit(module, params, source, (1, 2 * module.total_stride, 2 * module.total_stride, 3), "timestep")
    return Prior("guided_diffusion", module, params, named_beta_schedule(d.noise_schedule, d.steps), source,
                 config=config)


def _check_fit(module, params, source, shape, _cond):
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    want = flatten_dict(jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(shape),
                                       jnp.zeros((1,)))["params"])
    try:
        have = flatten_dict(params)
    except Exception:  # noqa: BLE001
        raise UserError(f"{source}: params are not a tree of arrays") from None
    missing = sorted("/".join(k) for k in set(want) - set(have))
    unexpected = sorted("/".join(k) for k in set(have) - set(want))
    bad = sorted(f"{'/'.join(k)} {np.shape(have[k])} (needs {tuple(want[k].shape)})"
                 for k in set(want) & set(have) if tuple(np.shape(have[k])) != tuple(want[k].shape))
    if missing or unexpected or bad:
        parts = [f"{w} ({len(x)}): {'; '.join(x[:8])}{' ...' if len(x) > 8 else ''}"
                 for w, x in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)) if x]
        raise UserError(f"{source}: prior params do not fit the config: " + " | ".join(parts))


def load_prior(spec: str | Path | None = None, *, config=None, dtype: str | None = None) -> Prior:
    """See the module docstring. `config`: a config file path or ConfigDict (when the spec needs one)."""
    from dmfuse_jax.inference import bundle as bundle_lib
    from dmfuse_jax.inference.checkpoints import resolve

    config = _as_config(config)
    ddfm = config if is_ddfm_config(config) else None
    if spec is None:
        ck = resolve(None)
        return sr3_prior(ck.config, ck.params["unet"], f"default model {ck.source}", dtype, ck.notes, ddfm)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{path}: no such prior (file or folder)")
    if path.suffix == ".npz":
        if config is None or is_ddfm_config(config):
            raise UserError(f"{path}: a flat npz of SR3 UNet params needs --config (a DMFuse model config, "
                            "e.g. configs/dmfuse_quarter.py)")
        from dmfuse_jax.inference.checkpoints import load_part
        from dmfuse_jax.models.params import param_shapes

        unet = load_part(path, "unet", param_shapes(config)["unet"], key="--prior", what="the --config's UNet")
        return sr3_prior(config, unet, str(path), dtype)
    if path.suffix in (".pt", ".pth"):
        from dmfuse_jax.ddfm.config import OPENAI_256_UNCOND, build_guided_unet, ddfm_config
        from dmfuse_jax.ddfm.convert import convert_params

        cfg = _check_kind(ddfm, "guided_diffusion", str(path)) or ddfm_config(model=OPENAI_256_UNCOND)
        params = convert_params(load_state_dict(path), build_guided_unet(cfg.model), source=str(path))
        return guided_prior(cfg, params, str(path), dtype)
    if bundle_lib.is_bundle(path):
        own, params, meta = bundle_lib.load_bundle(path)
        if is_ddfm_config(own):  # a given DDFM config wins over the bundle's own (its model must fit)
            return guided_prior(ddfm or own, params["unet"], str(path), dtype)
    ck = resolve(str(path), config=None if ddfm is not None else config)
    return sr3_prior(ck.config, ck.params["unet"], f"{ck.kind} {ck.source}", dtype, ck.notes, ddfm)


def load_state_dict(path: str | Path) -> dict:
    """A PyTorch state_dict file -> {key: float32 numpy} (`conversion.load_torch_state_dict`), UserError if bad."""
    from dmfuse_jax.conversion import ConversionError, load_torch_state_dict

    if not Path(path).is_file():
        raise UserError(f"{path}: no such file (guided-diffusion state_dict)")
    try:
        return load_torch_state_dict(str(path))
    except (ConversionError, ImportError) as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds on a bad file
        raise UserError(f"{path}: not a readable PyTorch state_dict: {type(e).__name__}: {str(e)[:200]}") from None
