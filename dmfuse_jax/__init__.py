"""dmfuse-jax: DMFuse (diffusion-model-guided cross-attention image fusion) in JAX/Flax.

Public API (imported lazily, so `import dmfuse_jax` stays cheap):
  dmfuse_jax.load(checkpoint) -> Fuser          fuse numpy image pairs: fuser(ir, vis) -> fused
  dmfuse_jax.load_params(workdir, ema=None)     params of a training workdir's latest checkpoint (EMA if kept)
"""
__version__ = "0.1.0"

_LAZY = {
    "load": ("dmfuse_jax.inference.fuser", "load"),
    "Fuser": ("dmfuse_jax.inference.fuser", "Fuser"),
    "load_params": ("dmfuse_jax.workdir", "load_params"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'dmfuse_jax' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
