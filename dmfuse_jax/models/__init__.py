"""Models: the SR3 diffusion UNet, the fusion head (reducers, CAIM, decoder) and DMFuse."""
from dmfuse_jax.models.builders import build_dmfuse, build_fusion_head, build_schedule, build_unet  # noqa: F401
from dmfuse_jax.data.images import from_model_range, to_model_range  # noqa: F401 (images <-> model inputs)
from dmfuse_jax.models.dmfuse import DMFuse  # noqa: F401
from dmfuse_jax.models.fusion_head import CAIM, FusionHead  # noqa: F401
from dmfuse_jax.models.unet import UNet  # noqa: F401
