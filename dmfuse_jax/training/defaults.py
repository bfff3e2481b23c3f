"""Building blocks of the training configs in `configs/` (the model blocks are in `config_lib`).

Every training config has `seed`, `stage`, `batch_size` (global, over all devices and processes),
`total_steps`, `checkpoint_every_steps`; all are overridable: `--config.total_steps=1000`.
"""
from __future__ import annotations

import ml_collections

from dmfuse_jax import config_lib


def optimizer_config(learning_rate: float, *, warmup_steps: int = 0, schedule: str = "constant",
                     grad_clip: float = 1.0, ema_decay: float = 0.0) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="adam", learning_rate=learning_rate, warmup_steps=warmup_steps, schedule=schedule,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=grad_clip, ema_decay=ema_decay))


def sharding_config(mesh_shape=(-1, 1), fsdp_min_size: int = 2 ** 18) -> ml_collections.ConfigDict:
    """mesh_shape = (data, fsdp); -1 takes the remaining devices. fsdp > 1 splits params and optimizer
    state with at least `fsdp_min_size` elements across that axis (for large widths)."""
    return ml_collections.ConfigDict(dict(mesh_shape=tuple(mesh_shape), fsdp_min_size=fsdp_min_size))


def common(config: ml_collections.ConfigDict, *, stage: str, batch_size: int, total_steps: int,
           checkpoint_every_steps: int, log_every_steps: int, preview_every_steps: int):
    config.stage = stage
    config.batch_size = batch_size
    config.total_steps = total_steps
    config.checkpoint_every_steps = checkpoint_every_steps
    config.keep_checkpoints = 3
    config.log_every_steps = log_every_steps
    config.preview_every_steps = preview_every_steps
    # Steps with a non-finite loss or gradient norm whose update may be skipped before the run stops
    # (exit 3); 0: stop at the first. No non-finite state is ever applied or saved.
    config.max_nonfinite_steps = 0
    config.sharding = sharding_config()
    # Evaluation while training (dmfuse_jax/training/evals.py): name -> dict(type=..., every_steps=...,
    # options); the best checkpoint by one of their values (dmfuse_jax/training/best.py; metric '' = off).
    config.evals = ml_collections.ConfigDict()
    config.checkpoint = ml_collections.ConfigDict(dict(best=dict(metric="", mode="max")))
    return config


def fusion_metrics_eval(every_steps: int, *, pairs: str = "holdout", ir_dir: str = "", vi_dir: str = "",
                        max_pairs: int = 0, metrics=("Qabf", "VIF", "SSIM", "MS_SSIM_MEF"),
                        preview_pairs: int = 2, preview_size: int = 256) -> ml_collections.ConfigDict:
    """Stage 2: held-out pairs fused as `dmfuse fuse` does (EMA and raw), scored (vifb convention)."""
    return ml_collections.ConfigDict(dict(
        type="fusion_metrics", every_steps=every_steps, pairs=pairs, ir_dir=ir_dir, vi_dir=vi_dir,
        max_pairs=max_pairs, metrics=tuple(metrics), convention="vifb", params=("ema", "raw"), batch_size=4,
        seed=0, preview_pairs=preview_pairs, preview_size=preview_size))


def diffusion_loss_eval(every_steps: int, root: str, *, max_images: int = 16, timesteps=()) -> ml_collections.ConfigDict:
    """Stage 1: the DDPM loss of held-out images at fixed timesteps and noise (EMA and raw)."""
    return ml_collections.ConfigDict(dict(
        type="diffusion_loss", every_steps=every_steps, root=root, max_images=max_images,
        timesteps=tuple(timesteps), params=("ema", "raw"), seed=0))


def sample_grid_eval(every_steps: int, *, num_samples: int = 8, sample_steps: int = 50,
                     seed: int = 7) -> ml_collections.ConfigDict:
    """Stage 1: reverse-diffusion samples of the EMA UNet from a fixed key -> samples/step_*.png."""
    return ml_collections.ConfigDict(dict(
        type="sample_grid", every_steps=every_steps, num_samples=num_samples, sample_steps=sample_steps,
        params="ema", seed=seed, cols=8))


def pretrain_config(width: int = 32, *, batch_size: int = 64, total_steps: int = 500_000,
                    checkpoint_every_steps: int = 5000, root: str = "", **unet_kwargs) -> ml_collections.ConfigDict:
    """Stage 1: DDPM pretraining of the UNet on an image folder tree (or tfds)."""
    config = config_lib.base_config(width, **unet_kwargs)
    common(config, stage="pretrain", batch_size=batch_size, total_steps=total_steps,
           checkpoint_every_steps=checkpoint_every_steps, log_every_steps=100, preview_every_steps=10_000)
    config.optimizer = optimizer_config(1e-4, warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999)
    config.data = ml_collections.ConfigDict(dict(
        source="folder",  # 'folder' (recursive image folder) | 'tfds'
        root=root, tfds_name="coco/2017", tfds_split="train", tfds_data_dir="",
        color="rgb",  # 'grey' | 'rgb'
        crop="random_crop",  # 'random_crop' | 'resize'
        flip=True, num_threads=8, prefetch=16, worker_count=0))
    config.preview = ml_collections.ConfigDict(dict(num_samples=8, sample_steps=50))
    # unet_params: a flat npz (dmfuse_jax/conversion/npz.py) to start from; Adam starts fresh.
    config.init = ml_collections.ConfigDict(dict(unet_params=""))
    return config


def fusion_config(width: int = 32, *, batch_size: int = 4, num_epochs: float = 16,
                  checkpoint_every_steps: int = 2000, ir_dir: str = "", vi_dir: str = "",
                  **unet_kwargs) -> ml_collections.ConfigDict:
    """Stage 2: fusion head on the frozen UNet, paired patches (paper: 256, step 12, batch 4, 16 epochs)."""
    config = config_lib.base_config(width, **unet_kwargs)
    # total_steps 0: num_epochs epochs of the patch index (its size is printed at start).
    common(config, stage="fusion", batch_size=batch_size, total_steps=0,
           checkpoint_every_steps=checkpoint_every_steps, log_every_steps=50, preview_every_steps=2000)
    config.num_epochs = float(num_epochs)
    config.optimizer = optimizer_config(1e-5, grad_clip=0.0, ema_decay=0.0)
    config.data = ml_collections.ConfigDict(dict(
        ir_dir=ir_dir, vi_dir=vi_dir, patch_size=256, patch_step=12, num_holdout=2, max_pairs=0,
        num_threads=2, prefetch=8, worker_count=0))
    # The frozen UNet: one of unet_workdir (stage-1 workdir), unet_torch (.pth), unet_params (flat npz);
    # the head may start from head_torch (.pth) or head_params (flat npz); Adam starts fresh.
    config.init = ml_collections.ConfigDict(dict(unet_workdir="", unet_ema=True, unet_torch="", unet_params="",
                                                 head_torch="", head_params=""))
    config.preview = ml_collections.ConfigDict(dict(size=256))
    return config
