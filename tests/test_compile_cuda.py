"""`dmfuse compile --topology h100|cuda`: XLA:GPU compiles the real steps without a GPU through the JAX
CUDA plugin's deviceless topology (a GPU target config in, accelerators.GPU_TARGETS), and the report
carries XLA's memory figures; without the plugin the report stays lowering-only and says why.

The compiling cases need the plugin (`pip install 'dmfuse-jax[cuda-compile]'`, which CI does not
install) and skip without it. They compile the tests' cut-down stage-1 UNet (tests/test_compile_cli.py
SMALL, batch 2) and the tiny fuse function at 64x64.
"""
from __future__ import annotations

import argparse

import pytest

from dmfuse_jax import accelerators
from dmfuse_jax.errors import UserError
from tests.helpers import REPO_ROOT
from tests.test_compile_cli import PRETRAIN, SMALL

needs_plugin = pytest.mark.skipif(accelerators.cuda_plugin_version() is None,
                                  reason="JAX CUDA plugin not installed (pip install 'dmfuse-jax[cuda-compile]')")


def _report(case: str, topology: str = "h100", **extra):
    from dmfuse_jax.commands.compile import build_report
    from dmfuse_jax.config_lib import load_config

    path = "configs/tiny.py" if case == "fuse" else PRETRAIN
    over = [] if case == "fuse" else ["batch_size=2"] + [s.removeprefix("--config.") for s in SMALL[1:]]
    args = argparse.Namespace(config=path, topology=topology, num_slices=1, what=case, size="64x64", batch=1,
                              json=None, **extra)
    return build_report(load_config(str(REPO_ROOT / path), over), args)


@pytest.fixture(scope="module")
def train_report():
    return _report("train")


@needs_plugin
def test_cut_down_step_compiled_by_xla_gpu(train_report):
    r = train_report
    assert r["xla_gpu_compile"] == "compiled", r["xla_gpu_compile"]
    assert r["compile"]["stage"] == "compiled by XLA:GPU" and r["gpu_target"] == "NVIDIA H100 80GB HBM3"
    m, e = r["memory"], r["hbm_estimate"]
    # the arguments are the state (params, Adam, EMA: float32) and the batch; the state is donated
    assert e["state_bytes"] <= m["argument_bytes"] <= e["state_bytes"] + e["batch_bytes"] + 4096, (m, e)
    assert m["alias_bytes"] > 0.9 * m["output_bytes"] and m["temp_bytes"] > 0
    assert m["peak_bytes"] == m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"] + m["code_bytes"]
    assert 0 < m["peak_bytes"] < 2 ** 30
    assert r["gpu_pool_bytes"] == int(r["gpu_memory_bytes"] * r["gpu_pool_fraction"])
    # lowered: cuDNN attention; compiled: it survives, with XLA's convolutions as cuDNN calls whose
    # workspaces a deviceless compile leaves unsized
    assert any(k.startswith("__cudnn$fmha") for k in r["custom_calls"]), r["custom_calls"]
    calls = r["compiled_custom_calls"]
    assert any(k.startswith("__cudnn$fmha") for k in calls) and calls.get("__cudnn$convForward", 0) >= 1, calls
    assert r["unsized_workspaces"] >= calls["__cudnn$convForward"]
    rf = r["roofline"]
    assert m["argument_bytes"] < r["kernel_io_bytes"] and rf["memory_s"] == pytest.approx(r["kernel_io_bytes"] / 3350e9)
    assert rf["compute_s"] == pytest.approx(r["flops"]["analytic_per_chip"] / 989e12)
    assert r["flops"]["xla_per_chip"] is None  # XLA:GPU's compile-only executables have no cost analysis
    from dmfuse_jax.commands.compile import format_report
    text = "\n".join(format_report(r))
    for needle in ("JAX's GPU pool", "XLA:GPU: compiled without a GPU", "after XLA:GPU:", "compiled by XLA:GPU in"):
        assert needle in text, text


@needs_plugin
def test_peak_above_the_gpu_pool_does_not_fit(monkeypatch):
    """XLA:GPU compiles what cannot fit; the command refuses it against JAX's allocator pool."""
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.00001")  # 0.85 MB of the H100's 79 GiB
    with pytest.raises(UserError) as e:
        _report("fuse")
    line = str(e.value)
    assert "does not fit h100" in line and "1 pair(s) of 64x64" in line and "JAX's pool" in line, line
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=1e-05" in line and "largest buffers" in line, line


def test_without_the_plugin_the_report_says_why(monkeypatch):
    """No plugin (as in CI): lowering only, with the reason in `xla_gpu_compile`."""
    monkeypatch.setattr(accelerators, "cuda_plugin_version", lambda: None)
    r = _report("fuse", topology="cuda")
    assert r["xla_gpu_compile"].startswith("unavailable: the JAX CUDA plugin is not installed"), r["xla_gpu_compile"]
    assert "memory" not in r and r["compile"]["stage"].startswith("lowered for CUDA")
    assert r["custom_calls"].get("__gpu$xla.gpu.triton", 0) >= 1


def test_gpu_target_config_text():
    """The target config handed to the plugin: the figures a CUDA device reports of itself."""
    for key, name in (("h100", "NVIDIA H100 80GB HBM3"), ("h200", "NVIDIA H200 141GB HBM3e")):
        target = accelerators.GPU_TARGETS[key]
        text = target.target_config()
        assert 'platform_name: "CUDA"' in text and "cuda_compute_capability { major: 9 minor: 0 }" in text
        assert f"device_memory_size: {target.memory_bytes}\n" in text and f'device_description_str: "{name}"' in text
        assert text.count("{") == text.count("}") and "dnn_version_info { major: 9 minor: 10" in text


def test_compiled_hlo_readings():
    """What XLA:GPU kept as library calls and kernels, and the scratch buffers it could not size."""
    from dmfuse_jax.commands.compile import compiled_custom_calls, cost, unsized_workspaces

    hlo = """
  %c = (bf16[2,8]{1,0}, u8[0]{0}) custom-call(%x, %w), custom_call_target="__cudnn$convForward"
  %m = (f32[4]{0}, u8[1024]{0}) custom-call(%y, %z), custom_call_target="__cublas$lt$matmul"
  %f = f32[4]{0} fusion(%y), kind=kCustom, calls=%g, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
"""
    assert compiled_custom_calls(hlo) == {"__cublas$lt$matmul": 1, "__cudnn$convForward": 1, "fusion:__triton": 1}
    assert unsized_workspaces(hlo) == 1  # the convolution's u8[0]; the matmul's 1 KiB is sized

    class NoCost:  # XLA:GPU's compile-only executable
        def cost_analysis(self):
            return None
    assert cost(NoCost()) == {"xla_flops": None, "bytes_accessed": None}


def test_deviceless_target_is_told_the_pool_as_xla_limit(monkeypatch):
    """XLA:GPU plans under 80% of the device memory it is told when no client gives it a limit; on a
    GPU jax gives it the allocator's pool. The target is told pool / 0.8 so the two agree."""
    from jax.experimental import topologies

    seen = {}

    def fake_desc(**kwargs):
        seen.update(kwargs)
        return type("Desc", (), {"devices": ["gpu0"]})()

    monkeypatch.setattr(accelerators, "cuda_plugin_version", lambda: "0.10.2")
    monkeypatch.setattr(topologies, "get_topology_desc", fake_desc)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    assert accelerators.cuda_devices("h100") == ["gpu0"]
    assert seen["platform"] == "cuda" and seen["topology"] == "1x1x1"
    told = int(accelerators.GPU_TARGETS["h100"].memory_bytes * 0.6 / accelerators.XLA_GPU_UNSET_LIMIT_SHARE)
    assert f"device_memory_size: {told}\n" in seen["target_config"]
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.5")
    with pytest.raises(UserError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
        accelerators.cuda_compile_devices("h100")
