"""DDFM (Zhao et al., ICCV 2023): zero-shot fusion by DDIM sampling of an unconditional diffusion
model with an EM correction of the x0 estimate. See docs/ddfm.md.

  convert_guided_diffusion(state_dict, create_model_kwargs) -> (GuidedUNet, params)
"""
from dmfuse_jax.ddfm.convert import convert_guided_diffusion  # noqa: F401

__all__ = ["convert_guided_diffusion"]
