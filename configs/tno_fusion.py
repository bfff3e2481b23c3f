"""Stage 2 at the paper's settings: the fusion head on the frozen 1/4-width UNet, trained on TNO pairs
cut into 256x256 patches with a sliding step of 12, grey values in [-1, 1], batch 4, 16 epochs,
Adam (learning rate 1e-5, the released code's; the paper gives none), the paper's fusion loss
(weights 1, 4, 20). Two pairs (the last names) are held out for previews.

  dmfuse train --config configs/tno_fusion.py --workdir workdirs/tno_fusion \
      --config.init.unet_workdir=workdirs/coco_pretrain

The frozen UNet comes from a stage-1 workdir (EMA weights; --config.init.unet_ema=False for the raw
ones) or from a PyTorch SR3 state_dict: --config.init.unet_torch=path/to/unet.pth. The head can start
from the released weights: --config.init.head_torch=../shared/weights/dmfuse_fusion_head.pth.

Evals (docs/evals.md): `holdout` (fusion_metrics) fuses the 2 held-out TNO pairs (24, 25; full size,
as `dmfuse fuse` does, raw params: no EMA) every 2,000 steps and at the end, and logs their mean Qabf,
VIF, SSIM and MS_SSIM_MEF (vifb convention) as eval/holdout/raw/*, with a preview grid in
WORKDIR/evals/holdout/; the best step by Qabf is kept in WORKDIR/best/. Expected values after the 16
epochs: not measured (this config has not been run to the end: it needs an accelerator and a COCO
UNet, and no session had both). For scale, the shipped RoadScene-trained model, which never saw TNO,
scores Qabf 0.517 and VIF 0.361 over all 25 TNO pairs (README, "Evaluation").
"""
from dmfuse_jax.training import defaults


def get_config():
    config = defaults.fusion_config(width=32, batch_size=4, num_epochs=16, checkpoint_every_steps=2000,
                                    ir_dir="../shared/data/tno/ir", vi_dir="../shared/data/tno/vi")
    config.name = "tno_fusion"
    config.preview_every_steps = 0  # previews: the grid of evals.holdout
    config.evals.holdout = defaults.fusion_metrics_eval(2000)  # the 2 held-out TNO pairs
    config.evals.holdout.batch_size = 1  # a 768x576 pair is large for the 1/4 model (see roadscene_fusion.py)
    config.checkpoint.best.metric = "eval/holdout/raw/Qabf"
    return config
