"""Stage 1 at the paper's size: DDPM pretraining of the 1/4-width SR3 UNet (inner channels 32,
24.47 M params, 3 channels) on MS-COCO train2017, 256x256 random crops, cosine schedule (2000 steps).

Data: COCO's `train2017/` folder (JPEGs, found recursively; the file list is cached in the workdir),
by default at ../shared/data/coco/train2017 (or pass --config.data.root=/path/to/train2017), or
--config.data.source=tfds for `tfds.data_source('coco/2017')` (pip install 'dmfuse-jax[tfds]').

  dmfuse train --config configs/coco_pretrain.py --workdir workdirs/coco_pretrain

Optimiser settings (Adam 1e-4, 5k warmup, clip 1, EMA 0.9999, global batch 64, 500k steps) are the
SR3 code base's, not the DMFuse paper's (which does not state them). On several hosts see launch/.

Evals (docs/evals.md): `val` (diffusion_loss) is the L2 epsilon loss of 64 images of COCO val2017
(beside train2017, never trained on; 256x256 centre crops) at the 5 fixed timesteps 200, 600, 1000,
1400, 1800 with fixed noise, EMA and raw params, every 5,000 steps; `samples` (sample_grid) writes 8
EMA samples (50 respaced steps) every 10,000 steps; the best step by the EMA loss is kept in
WORKDIR/best/. Expected values after 500k steps: not measured (COCO is not in ../shared and no session
had an accelerator for this run).
"""
from dmfuse_jax.training import defaults


def get_config():
    config = defaults.pretrain_config(width=32, batch_size=64, total_steps=500_000,
                                      checkpoint_every_steps=5000,
                                      root="../shared/data/coco/train2017")
    config.name = "coco_pretrain"
    config.data.color = "rgb"
    config.data.worker_count = 8
    config.preview_every_steps = 0  # samples: evals.samples
    # COCO val2017 beside train2017 (never trained on): its first 64 images, 256x256 centre crops.
    config.evals.val = defaults.diffusion_loss_eval(5000, "../shared/data/coco/val2017", max_images=64)
    config.evals.samples = defaults.sample_grid_eval(10_000)
    config.checkpoint.best.metric = "eval/val/ema/loss"
    config.checkpoint.best.mode = "min"
    return config
