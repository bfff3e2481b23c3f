"""Diffusion maths: the noise schedule, q_sample, the DDPM loss and ancestral sampling (`gaussian.py`);
respaced schedules for DDIM sampling (`respace.py`)."""
from dmfuse_jax.diffusion.gaussian import (  # noqa: F401
    Schedule,
    ddpm_loss,
    make_schedule,
    p_sample_loop,
    q_sample,
    sample_noise_level,
)
