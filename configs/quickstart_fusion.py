"""Quickstart, step 2 of 2: train the fusion head on the frozen tiny UNet of step 1, on 64x64 patches
of a few RoadScene pairs (8 for training, 2 held out for the previews), on CPU.

  dmfuse train --config configs/quickstart_fusion.py --workdir workdirs/quickstart_fusion \
      --config.init.unet_workdir=workdirs/quickstart_pretrain

Evals (docs/evals.md): `holdout` (fusion_metrics) fuses the 2 held-out RoadScene pairs (full size,
as `dmfuse fuse` does) every 50 steps and at the end, and logs their mean Qabf, VIF, SSIM and
MS_SSIM_MEF (vifb convention; raw params, this run keeps no EMA) as eval/holdout/raw/* with a preview
grid in workdirs/quickstart_fusion/evals/holdout/; the best step by Qabf is kept in
workdirs/quickstart_fusion/best/. Measured after the 150 steps (this machine's CPU, jax 0.10.2, on the
stage-1 run of configs/quickstart_pretrain.py as shipped): Qabf 0.156, VIF 0.030, SSIM 0.271,
MS_SSIM_MEF 0.205. Over the run Qabf and VIF rise (0.115 and 0.015 at step 50, 0.141 and 0.023 at
100) while SSIM and MS_SSIM_MEF fall (0.540 and 0.269 at step 50): the head trades the sources'
structure for edges, so the best step by Qabf (150) is the worst by SSIM. `dmfuse report` draws it.

Self-attention sits at the deepest level (resolution 4 of the 32-pixel config size, 1/8 of any
input), so fusing full-size images stays cheap; at 1/2 it would need tens of GB at TNO sizes.
"""
from dmfuse_jax.training import defaults


def get_config():
    config = defaults.fusion_config(width=8, batch_size=4, num_epochs=1, checkpoint_every_steps=100,
                                    ir_dir="../shared/data/roadscene/ir", vi_dir="../shared/data/roadscene/vi",
                                    norm_groups=8, image_size=32, attn_res=(4,), in_channels=1, out_channels=1,
                                    channel_mults=(1, 2, 4, 4), dropout=0.0)
    config.name = "quickstart_fusion"
    config.diffusion.num_timesteps = 1000
    config.total_steps = 150
    config.data.patch_size = 64
    config.data.patch_step = 48
    config.data.max_pairs = 8
    config.data.num_holdout = 2
    config.init.unet_workdir = "workdirs/quickstart_pretrain"
    config.optimizer.learning_rate = 3e-5  # larger steps saturate the tanh output of the tiny head
    config.log_every_steps = 25
    config.preview_every_steps = 0  # previews: the grid of evals.holdout (evals/holdout/step_*.png)
    config.preview.size = 128
    # The 2 held-out RoadScene pairs, full size, fused as `dmfuse fuse` does (raw params: no EMA here).
    config.evals.holdout = defaults.fusion_metrics_eval(50, preview_size=128)
    config.checkpoint.best.metric = "eval/holdout/raw/Qabf"
    return config
