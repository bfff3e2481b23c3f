"""dmfuse_jax.compilation: the per-jit XLA options (YNNPACK convolutions off on CPU)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmfuse_jax import compilation


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _args():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.normal(size=(2, 12, 12, 16)), jnp.float32),
            jnp.asarray(rng.normal(size=(3, 3, 16, 8)), jnp.float32))


@pytest.fixture
def fresh_probe(monkeypatch):
    compilation._supported.cache_clear()
    yield monkeypatch
    compilation._supported.cache_clear()


def test_cpu_gets_the_option_and_convolutions_stay_with_xla():
    assert jax.default_backend() == "cpu"
    options = compilation.compiler_options()
    if options is None:
        import jaxlib
        pytest.skip(f"jaxlib {jaxlib.__version__} has no xla_cpu_experimental_ynn_fusion_type")
    assert options == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    hlo = compilation.jit(_conv).lower(*_args()).compile().as_text()
    # the convolution is XLA's own op, not a YNNPACK custom fusion
    assert "convolution(" in hlo and "__ynn_fusion" not in hlo


def test_results_match_plain_jit():
    x, w = _args()
    np.testing.assert_allclose(np.asarray(compilation.jit(_conv)(x, w)), np.asarray(jax.jit(_conv)(x, w)),
                               atol=1e-4, rtol=1e-5)


def test_opt_out_environment_variable(fresh_probe):
    fresh_probe.setenv(compilation.OPT_OUT_ENV, "1")
    assert compilation.compiler_options() is None
    fresh_probe.setenv(compilation.OPT_OUT_ENV, "0")
    assert compilation.compiler_options() == compilation._supported("cpu")


def test_unknown_option_falls_back_to_xla_defaults(fresh_probe):
    fresh_probe.setitem(compilation.BACKEND_OPTIONS, "cpu", {"xla_cpu_no_such_option_for_dmfuse": "1"})
    assert compilation.compiler_options() is None
    x, w = _args()
    assert compilation.jit(_conv)(x, w).shape == (2, 12, 12, 8)  # still compiles, with no options


def test_caller_options_are_kept(monkeypatch):
    seen = {}
    real_jit = jax.jit

    def spy(fun, **kwargs):
        seen.update(kwargs.get("compiler_options") or {})
        return real_jit(fun, **kwargs)

    monkeypatch.setattr(jax, "jit", spy)
    f = compilation.jit(_conv, compiler_options={"xla_cpu_enable_fast_math": False})
    assert f(*_args()).shape == (2, 12, 12, 8)
    assert seen == {**(compilation.compiler_options() or {}), "xla_cpu_enable_fast_math": False}


def test_no_options_for_other_backends():
    assert compilation._supported("gpu") is None and compilation._supported("tpu") is None


@pytest.fixture
def cache_config(monkeypatch, tmp_path):
    """Restores JAX's cache settings (nothing is compiled while they point at tmp_path)."""
    names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
             "jax_persistent_cache_min_compile_time_secs")
    saved = {n: getattr(jax.config, n) for n in names}
    for var in (compilation.CACHE_ENV, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_enable_compilation_cache", True)  # an earlier in-process run may have turned it off
    yield monkeypatch
    for n, v in saved.items():
        jax.config.update(n, v)


def test_persistent_cache_is_on_by_default_in_the_user_cache_folder(cache_config, tmp_path):
    folder = compilation.enable_persistent_cache()
    assert folder == str(tmp_path / "xdg" / "dmfuse_jax" / "xla") and (tmp_path / "xdg" / "dmfuse_jax" / "xla").is_dir()
    assert jax.config.jax_compilation_cache_dir == folder and jax.config.jax_enable_compilation_cache
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compilation.CACHE_MIN_COMPILE_SECS


def test_persistent_cache_switches(cache_config, tmp_path):
    cache_config.setenv(compilation.CACHE_ENV, str(tmp_path / "env"))
    assert compilation.enable_persistent_cache() == str(tmp_path / "env")  # DMFUSE_COMPILATION_CACHE=DIR
    assert compilation.enable_persistent_cache(tmp_path / "mine") == str(tmp_path / "mine")  # --compilation-cache DIR
    assert compilation.enable_persistent_cache() == str(tmp_path / "mine")  # a folder JAX already has: kept
    cache_config.setenv(compilation.CACHE_ENV, "off")
    jax.config.update("jax_compilation_cache_dir", None)
    assert compilation.enable_persistent_cache() is None and not jax.config.jax_enable_compilation_cache
    cache_config.delenv(compilation.CACHE_ENV)
    assert compilation.enable_persistent_cache() is None  # JAX's own switch is off (JAX_ENABLE_COMPILATION_CACHE)
    assert compilation.enable_persistent_cache(tmp_path / "mine") == str(tmp_path / "mine")  # the flag turns it on
    assert jax.config.jax_enable_compilation_cache
    assert compilation.enable_persistent_cache("off") is None and not jax.config.jax_enable_compilation_cache


def test_cli_runs_on_cpu_without_probing_for_an_absent_tpu(monkeypatch):
    """libtpu installed (the tpu extra), no TPU device file, no GPU plugin: the CLI picks the CPU
    itself (no libtpu warnings); a TPU device file, a GPU plugin or JAX_PLATFORMS leave jax alone."""
    import importlib.util

    from dmfuse_jax import cli

    real = importlib.util.find_spec
    specs = {"libtpu": object()}
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: specs.get(name) if name in
                        ("libtpu", *cli.GPU_PLUGINS) else real(name))
    monkeypatch.setattr(cli.glob, "glob", lambda pattern: [])
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert cli.skip_absent_tpu() and os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(cli.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    assert not cli.skip_absent_tpu() and "JAX_PLATFORMS" not in os.environ
    monkeypatch.setattr(cli.glob, "glob", lambda pattern: [])
    specs["jax_cuda12_plugin"] = object()
    assert not cli.skip_absent_tpu() and "JAX_PLATFORMS" not in os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not cli.skip_absent_tpu() and os.environ["JAX_PLATFORMS"] == "cuda"
