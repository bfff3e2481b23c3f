"""XLA compile options for dmfuse's jitted functions, and `jit`, which applies them.

Why: on XLA:CPU (jaxlib 0.10) convolutions are handed to YNNPACK by default, and for this model's
convolutions that path is 4 to 5x slower than XLA's own (Eigen) convolution: one 3x3 128->64 conv
on 16x66x66 took 211 ms against 39 ms; the whole fused forward at 64x64, batch 16, 86 against
36 ms per pair, and a fusion-stage training step 897 against 473 ms (2-core AMD EPYC; a pretraining
step, whose UNet convolutions are narrow, 254 against 264 ms: no change). YNNPACK's matmuls are
good, though (a bf16 65536x1152x64 matmul: 21 ms, against 158 ms without), so on CPU every dmfuse
jit limits YNNPACK to individual dots (`xla_cpu_experimental_ynn_fusion_type`). The option is
passed per jit (`jax.jit(..., compiler_options=...)`), so other JAX code in the process keeps XLA's
defaults, and it only applies where the backend is CPU; GPUs and TPUs get no options.

Set `DMFUSE_XLA_CPU_DEFAULTS=1` to compile with XLA's defaults instead (for comparison). A jaxlib that
does not know the option gets none (checked once by compiling a scalar function), never an error.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

log = logging.getLogger(__name__)

# option name -> value, per backend (values as XLA's DebugOptions flags take them).
BACKEND_OPTIONS: dict[str, dict[str, str]] = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}
OPT_OUT_ENV = "DMFUSE_XLA_CPU_DEFAULTS"


@functools.lru_cache(maxsize=None)
def _supported(backend: str) -> dict[str, str] | None:
    import jax
    import jax.numpy as jnp

    options = BACKEND_OPTIONS.get(backend)
    if not options:
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.float32(0)).compile()
    except Exception as e:  # an older/newer jaxlib without the option: fall back to XLA's defaults
        log.info("XLA compile options %s not supported by this jaxlib (%s); using XLA's defaults", options, e)
        return None
    return dict(options)


def compiler_options() -> dict[str, str] | None:
    """The compile options dmfuse uses on JAX's default backend, or None (XLA's defaults)."""
    if os.environ.get(OPT_OUT_ENV, "").strip() not in ("", "0"):
        return None
    import jax

    return _supported(jax.default_backend())


def jit(fun: Callable, **kwargs: Any) -> Callable:
    """`jax.jit(fun, **kwargs)` with `compiler_options()` for the default backend."""
    import jax

    options = compiler_options()
    if options:
        kwargs["compiler_options"] = {**options, **kwargs.get("compiler_options", {})}
    return jax.jit(fun, **kwargs)
