"""PyTorch -> Flax weight conversion (SR3 UNet and the DMFuse fusion head)."""
from dmfuse_jax.conversion.torch_to_flax import (  # noqa: F401
    KNOWN_UNUSED_HEAD_KEYS,
    ConversionError,
    convert_fusion_head,
    convert_unet,
    load_torch_state_dict,
)
