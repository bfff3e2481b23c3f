"""Stage 1 of the shipped default model: DDPM pretraining of the 1/4-width SR3 UNet (inner channels
32, 24.47 M params, 3 channels) on the RoadScene images (the 221 infrared and 221 visible images of
../shared/data/roadscene, found recursively, as RGB), 256x256 random crops, cosine schedule.

  dmfuse train --config configs/roadscene_pretrain.py --workdir workdirs/roadscene_pretrain

This is `configs/coco_pretrain.py` with the overrides of the run that made
../shared/weights/dmfuse_jax_roadscene_unet_ema_fp16.npz folded in (one NVIDIA H100, jax 0.11.2,
bfloat16 compute, about 450 images/s): global batch 32, Adam 2e-4 with 300 warmup steps, gradient
clip 1, EMA 0.999, 3,000 steps (that run was stopped by its time limit after step 2,502 and shipped
the EMA params of its step-2,500 checkpoint). Logged diffusion loss (L2 on epsilon): about 0.03 at
the end (0.0323 at step 2,500). On a CPU use --config.model.dtype=float32 (XLA:CPU has no fast
bfloat16 convolutions) and expect hours, not minutes.

Continue training the default model's UNet instead of starting from scratch (params-only: Adam
starts fresh, EMA starts at the loaded params):

  dmfuse train --config configs/roadscene_pretrain.py --workdir workdirs/roadscene_pretrain_more \
      --config.init.unet_params=../shared/weights/dmfuse_jax_roadscene_unet_ema_fp16.npz

Then stage 2: configs/roadscene_fusion.py. Training data is RoadScene only: TNO and Harvard stay
held out for evaluation.

Evals (docs/evals.md): `tno` (diffusion_loss) is the L2 epsilon loss of 16 TNO images (never trained
on; evenly spaced over ir/ and vi/, grey repeated to RGB, 256x256 centre crops) at the 5 fixed
timesteps 200, 600, 1000, 1400, 1800 with fixed noise, EMA and raw params, every 500 steps;
`samples` (sample_grid) writes 8 EMA samples (50 respaced steps) every 1,000 steps; the best step by
the EMA loss is kept in WORKDIR/best/. Expected values after the 3,000 steps: not measured (the
shipped run predates these evals, and this session had no accelerator to repeat it; its logged
training loss at the end was 0.032, for comparison).
"""
from dmfuse_jax.training import defaults


def get_config():
    config = defaults.pretrain_config(width=32, batch_size=32, total_steps=3000, checkpoint_every_steps=500,
                                      root="../shared/data/roadscene")
    config.name = "roadscene_pretrain"
    config.data.color = "rgb"
    config.data.worker_count = 0
    config.model.dtype = "bfloat16"
    config.optimizer.learning_rate = 2e-4
    config.optimizer.warmup_steps = 300
    config.optimizer.ema_decay = 0.999
    config.preview_every_steps = 0  # samples: evals.samples
    # TNO is never trained on: 16 of its images, as RGB (grey repeated), 256x256 centre crops.
    config.evals.tno = defaults.diffusion_loss_eval(500, "../shared/data/tno", max_images=16)
    config.evals.samples = defaults.sample_grid_eval(1000)
    config.checkpoint.best.metric = "eval/tno/ema/loss"
    config.checkpoint.best.mode = "min"
    return config
