"""Stage 2 for medical fusion (issue 23): the default model's fusion head fine-tuned on the train split
of the Harvard sets (MRI-CT, MRI-PET, MRI-SPECT: 91 of the 136 pairs), the UNet frozen, so that
black background stays black. The 45 held-out pairs (`data.sets.*.heldout`, the seeded split of
dmfuse_jax/data/harvard_split.py) are never trained on; the first of each set is the preview.

  dmfuse train --config configs/harvard_fusion.py --workdir workdirs/harvard_fusion

It starts from the default model's UNet and head (the flat npz files of ../shared/weights, the ones
dmfuse_jax/assets/default_bundle was built from) with a fresh Adam, and uses the paper's fusion loss
(weights 1, 4, 20) unchanged. MRI takes the infrared role, CT / PET / SPECT the visible role (their
BT.601 luma: PET and SPECT are colour), as `dmfuse fuse --mode medical` does. 128x128 patches with a
sliding step of 32 (25 per 256x256 pair), batch 2, Adam 1e-4 (constant), float32, 400 steps (800
patches, about a third of the 2,275): sized for about an hour on a 2-core CPU. Measured: 400 steps in
57 min wall (1,152 s CPU, peak 3.1 GiB resident) on a 2-core machine shared with three other jobs
(1-minute load average 6 to 24, median 13; about 2.8 s of CPU per step, so less wall time on an
idle machine, not measured). The run was started with total_steps 720 and stopped by SIGTERM after
its step-400 checkpoint (constant learning rate: the same as a 400-step run). The shipped head is a
second run of this config from that head (`--config.init.head_params=<the step-400 head as npz>`,
400 more steps: 14.5 min wall, 1,067 s CPU, peak 3.4 GiB, load 3 to 4, 2026-12-02), its step-400
raw params stored as float16:

  python -c "import dmfuse_jax; from dmfuse_jax.conversion.npz import save_npz; \
    save_npz('dmfuse_jax/assets/medical_head.npz', \
             dmfuse_jax.load_params('workdirs/harvard_fusion_800', ema=False, step=400)['head'], dtype='float16')"

docs/evaluation.md, "Medical head", has the loss curve, both runs and the held-out scores.
"""
from dmfuse_jax.data import harvard_split
from dmfuse_jax.training import defaults

import ml_collections


def get_config():
    config = defaults.fusion_config(width=32, batch_size=2, num_epochs=1, checkpoint_every_steps=100)
    config.name = "harvard_fusion"
    config.total_steps = 400  # overrides num_epochs
    config.log_every_steps = 10
    config.preview_every_steps = 300
    config.data.patch_size = 128
    config.data.patch_step = 32
    # the split replaces the single folder pair and its last-names hold-out
    for key in ("ir_dir", "vi_dir", "num_holdout", "max_pairs"):
        del config.data[key]
    config.data.sets = ml_collections.ConfigDict({
        name: dict(ir_dir=f"../shared/data/{a}", vi_dir=f"../shared/data/{b}",
                   train=harvard_split.TRAIN[name], heldout=harvard_split.HELDOUT[name])
        for name, (a, b) in harvard_split.FOLDERS.items()})
    config.optimizer.learning_rate = 1e-4
    config.init.unet_params = "../shared/weights/dmfuse_jax_roadscene_unet_ema_fp16.npz"
    config.init.head_params = "../shared/weights/dmfuse_jax_roadscene_head_ema.npz"
    return config
