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

Start-up time: `enable_persistent_cache()` turns on JAX's persistent compilation cache (compiled
executables are written to disk and reused by the next process that compiles the same program with
the same options, on CPU too), used by `dmfuse train` and `dmfuse fuse`. The folder is
$XDG_CACHE_HOME/dmfuse_jax/xla (~/.cache/dmfuse_jax/xla); `DMFUSE_COMPILATION_CACHE=off` (or 0)
turns it off, `DMFUSE_COMPILATION_CACHE=/some/dir` moves it, and so does the commands'
`--compilation-cache off|DIR`. A cache configured for JAX itself (JAX_COMPILATION_CACHE_DIR) is left alone.
The same folder's `executables/` holds dmfuse's own executable cache (`executable_cache.py`), which
a warm `dmfuse fuse` loads from without tracing.
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


CACHE_ENV = "DMFUSE_COMPILATION_CACHE"
CACHE_OFF = ("0", "off", "false", "no", "none")
# Programs that compile faster than this are not written (every eager op is a tiny jit of its own).
CACHE_MIN_COMPILE_SECS = 0.2


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/dmfuse_jax/xla, or ~/.cache/dmfuse_jax/xla."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dmfuse_jax", "xla")


def enable_persistent_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache for this process; returns its folder, or None
    when it is off. Call it before the first compile.

    `path` (the commands' --compilation-cache): 'off' (or '0') disables the cache, a folder puts it
    there. None: a cache JAX was configured with (JAX_COMPILATION_CACHE_DIR,
    JAX_ENABLE_COMPILATION_CACHE=false) is left as it is; otherwise $DMFUSE_COMPILATION_CACHE ('off'
    or a folder), else `default_cache_dir()`. Executables that took at least CACHE_MIN_COMPILE_SECS to
    compile are stored, unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise.
    """
    import jax

    if path is None:
        if jax.config.jax_compilation_cache_dir:  # JAX's own configuration: left alone
            return jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
        if not jax.config.jax_enable_compilation_cache:  # JAX_ENABLE_COMPILATION_CACHE=false
            return None
        path = os.environ.get(CACHE_ENV, "").strip() or default_cache_dir()
    choice = os.fspath(path).strip()
    if choice.lower() in CACHE_OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    folder = os.path.abspath(os.path.expanduser(choice))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a read-only home, say: run without the cache rather than fail
        log.warning("compilation cache %s not usable (%s); compiling without it", folder, e)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
    return folder


def add_cache_argument(parser) -> None:
    """`--compilation-cache off|DIR` for a command that compiles (train, fuse)."""
    parser.add_argument("--compilation-cache", default=None, metavar="off|DIR",
                        help="JAX's persistent compilation cache: 'off', or its folder (default: "
                             f"${CACHE_ENV}, else {default_cache_dir()})")
