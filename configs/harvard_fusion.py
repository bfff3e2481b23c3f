"""Stage 2 for medical fusion (issue 23): the default model's fusion head fine-tuned on the train split
of the Harvard sets (MRI-CT, MRI-PET, MRI-SPECT: 91 of the 136 pairs), the UNet frozen, so that
black background stays black. The 45 held-out pairs (`data.sets.*.heldout`, the seeded split of
dmfuse_jax/data/harvard_split.py) are never trained on; the first of each set is the preview.

  dmfuse train --config configs/harvard_fusion.py --workdir workdirs/harvard_fusion

It starts from the default model's UNet and head (the flat npz files of ../shared/weights, the ones
dmfuse_jax/assets/default_bundle was built from) with a fresh Adam. The loss is the paper's (weights
1, 4, 20) with two changes, each measured and written down in docs/evaluation.md ("MRI-PET Qabf"):
its gradient term is computed on the recoloured image, per R, G, B channel (`loss.w_gradient = 0`,
`loss.w_colour = 20`; for a grey partner (CT) that is the paper's term exactly; for PET and SPECT it
keeps the fused luma from clipping a colour channel), and an edge-preservation term, 1 - Qabf of
the recoloured image made differentiable (`loss.w_edge = 40`), which asks the fused image to keep
each source's edges, strength and direction, where the gradient terms only ask for the larger
magnitude. MRI takes the infrared role, CT / PET / SPECT the visible role (their BT.601 luma, as
`dmfuse fuse --mode medical` does; the colour terms also get their colour offsets). 128x128 patches
with a sliding step of 32 (25 per 256x256 pair), batch 2, Adam 1e-4 (constant), float32, 400 steps
(800 patches, about a third of the 2,275): sized for about an hour on a 2-core CPU (measured: 27 to
37 min wall, 940 to 1,940 s CPU, 3.0 to 3.5 GiB resident per 400 steps beside other jobs; 57 min
under heavier load).

The shipped head (dmfuse_jax/assets/medical_head.npz, float16) is eight runs, each from the head
before it (`--config.init.head_params=<the previous head as npz>`): five of 400 steps, two with the
paper's loss unchanged (`--config.loss.w_gradient=20 --config.loss.w_colour=0 --config.loss.w_edge=0`,
2026-12-01 and 02), two with the colour term only (`--config.loss.w_edge=0`), one of this config
(2026-12-02); then 400 steps on MRI-PET only (`--config.loss.w_edge=120
--config.optimizer.schedule=cosine --config.data.sets.mri_ct.train='()'
--config.data.sets.mri_spect.train='()'`) and 600 on all three sets with MRI-PET weighted
(`--config.loss.w_edge=120 --config.optimizer.schedule=cosine --config.total_steps=600
--config.data.sets.mri_ct.repeat=2 --config.data.sets.mri_pet.repeat=3`, 2026-12-03), then 150
steps on whole 256x256 pairs (the same flags with `--config.total_steps=150
--config.data.patch_size=256`; 23 min wall on the 2-core CPU, 2026-12-03), stored as

  python -c "import dmfuse_jax; from dmfuse_jax.conversion.npz import save_npz; \
    save_npz('dmfuse_jax/assets/medical_head.npz', \
             dmfuse_jax.load_params('WORKDIR', ema=False, step=150)['head'], dtype='float16')"

docs/evaluation.md, "Medical head", has the loss curves, the runs and the held-out scores.
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
                   train=harvard_split.TRAIN[name], heldout=harvard_split.HELDOUT[name],
                   repeat=1)  # a set weight: its train pairs are listed `repeat` times
        for name, (a, b) in harvard_split.FOLDERS.items()})
    config.optimizer.learning_rate = 1e-4
    config.loss.w_gradient = 0.0  # the gradient term moves to the recoloured image (same for a grey CT)
    config.loss.w_colour = 20.0
    config.loss.w_edge = 40.0  # 1 - Qabf of the recoloured image (fusion_loss.edge_preservation_loss)
    config.init.unet_params = "../shared/weights/dmfuse_jax_roadscene_unet_ema_fp16.npz"
    config.init.head_params = "../shared/weights/dmfuse_jax_roadscene_head_ema.npz"
    return config
