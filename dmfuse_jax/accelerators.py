"""Accelerator chips as `dmfuse compile` needs them: HBM capacity, peak bf16 FLOP/s and HBM bandwidth
per chip (the vendors' published figures, sources in `CHIPS` and docs/fit.md), and TPU topologies by
name, built without TPU hardware through libtpu's compile-only client.

Figures are as published: Google gives v5e and v6e HBM in "GB", v4 in "GiB", v5p in "GB"; NVIDIA
gives H100/H200 memory in GB. Except v5e: its "16 GB" is 16 GiB. XLA:TPU allows 15.75 GiB of it and
compiled a step with 15.69 GiB of arguments + temporaries (configs/coco_pretrain.py, 48 per chip;
docs/fit.md), more than 16e9 bytes could hold. Peak FLOP/s is dense bf16 (NVIDIA's 1,979 TFLOP/s is with 2:4
sparsity: dense is half). They are upper bounds for a roofline, not expectations.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from dmfuse_jax.errors import UserError

GB, GIB = 1e9, 2.0 ** 30


@dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float  # per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes_per_s: float
    kind: str  # 'tpu' | 'cuda'
    source: str  # where the figures are published

    def row(self) -> dict:
        return dict(name=self.name, hbm_bytes=self.hbm_bytes, peak_bf16_flops=self.peak_flops,
                    hbm_bytes_per_s=self.hbm_bytes_per_s, source=self.source)


# name -> chip. Registry: a new chip is a new row (and, for a TPU, its libtpu prefix below).
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1200 * GB, "tpu", "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819 * GB, "tpu", "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95 * GB, 459e12, 2765 * GB, "tpu", "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32 * GB, 918e12, 1638 * GB, "tpu", "https://cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("NVIDIA H100 SXM", 80 * GB, 989e12, 3350 * GB, "cuda",
                 "NVIDIA H100 datasheet (BF16 Tensor Core 1,979 TFLOP/s with sparsity; 3.35 TB/s)"),
    "h200": Chip("NVIDIA H200 SXM", 141 * GB, 989e12, 4800 * GB, "cuda",
                 "NVIDIA H200 datasheet (141 GB HBM3e, 4.8 TB/s; Hopper compute as H100)"),
}
# `--topology cuda` means the H100 (the GPU this project last ran on).
CUDA_ALIASES = {"cuda": "h100", "gpu": "h100", "h100": "h100", "h200": "h200"}

# libtpu's chip generation names (topology "v5e:2x4"); v4 and v5p are megacore chips (one JAX device
# per chip, as on their TPU VMs).
TPU_MEGACORE = ("v4", "v5p")
# accelerator type libtpu expects in TPU_ACCELERATOR_TYPE (quiets its start-up probe)
_ACCEL_TYPE = {"v4": "v4-8", "v5e": "v5litepod-4", "v5p": "v5p-8", "v6e": "v6e-4"}
TOPOLOGY_RE = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


@dataclass(frozen=True)
class GpuTarget:
    """What XLA:GPU needs to know of a GPU to compile for it without one (a GpuTargetConfigProto in
    text form, `target_config()`): the figures a CUDA device reports of itself. Hopper (compute
    capability 9.0) limits are from NVIDIA's CUDA C++ Programming Guide (compute capabilities table);
    memory size and bandwidth as XLA's own GPU target specs list them
    (openxla/xla xla/backends/gpu/target_config/specs/h100_sxm.txtpb, h200.txtpb)."""
    name: str  # the device kind a real one reports
    memory_bytes: int
    memory_bandwidth: int  # bytes/s
    cc_major: int = 9
    cc_minor: int = 0
    core_count: int = 132  # SMs
    fpus_per_core: int = 128
    clock_rate_ghz: float = 1.98
    l2_cache_size: int = 50 * 2 ** 20
    shared_memory_per_block: int = 48 * 1024
    shared_memory_per_block_optin: int = 227 * 1024
    shared_memory_per_core: int = 228 * 1024
    threads_per_core_limit: int = 2048
    registers_per_core_limit: int = 65536
    cudnn: tuple[int, int, int] = (9, 10, 0)  # the cuDNN the executable is compiled for

    def target_config(self, memory_bytes: int | None = None) -> str:
        """The GpuTargetConfigProto text the CUDA plugin's deviceless topology is built from;
        `memory_bytes` replaces the device memory size XLA is told (see `cuda_devices`)."""
        info = dict(threads_per_block_limit=1024, threads_per_warp=32,
                    shared_memory_per_block=self.shared_memory_per_block,
                    shared_memory_per_core=self.shared_memory_per_core,
                    threads_per_core_limit=self.threads_per_core_limit, core_count=self.core_count,
                    fpus_per_core=self.fpus_per_core, block_dim_limit_x=2 ** 31 - 1, block_dim_limit_y=65535,
                    block_dim_limit_z=65535, memory_bandwidth=self.memory_bandwidth,
                    l2_cache_size=self.l2_cache_size, clock_rate_ghz=self.clock_rate_ghz,
                    device_memory_size=int(memory_bytes or self.memory_bytes),
                    shared_memory_per_block_optin=self.shared_memory_per_block_optin,
                    registers_per_core_limit=self.registers_per_core_limit,
                    registers_per_block_limit=self.registers_per_core_limit)
        fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
        major, minor, patch = self.cudnn
        return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: {self.cc_major} "
                f"minor: {self.cc_minor} }}\n}}\nplatform_name: \"CUDA\"\n"
                f"dnn_version_info {{ major: {major} minor: {minor} patch: {patch} }}\n"
                f"device_description_str: \"{self.name}\"\n")


# chip key (CHIPS) -> its deviceless compile target
GPU_TARGETS: dict[str, GpuTarget] = {
    "h100": GpuTarget("NVIDIA H100 80GB HBM3", memory_bytes=84_942_979_072, memory_bandwidth=3_352_320_000_000),
    "h200": GpuTarget("NVIDIA H200 141GB HBM3e", memory_bytes=151_397_597_184, memory_bandwidth=4_800_000_000_000),
}


def chip_for(topology: str) -> Chip:
    """'v5e:2x4' -> v5e; 'cuda' / 'h100' / 'h200' -> the GPU."""
    name = topology.lower()
    if name in CUDA_ALIASES:
        return CHIPS[CUDA_ALIASES[name]]
    m = TOPOLOGY_RE.match(name)
    if not m:
        raise UserError(f"--topology {topology}: expected a TPU slice GEN:SHAPE (GEN one of "
                        f"{', '.join(_ACCEL_TYPE)}; e.g. v5e:2x4, v4:2x2x1) or one of {', '.join(CUDA_ALIASES)}")
    return CHIPS[m.group(1)]


def is_cuda(topology: str) -> bool:
    return topology.lower() in CUDA_ALIASES


def prepare_libtpu_env(topology: str) -> None:
    """Environment for libtpu on a machine without TPUs, set before JAX starts its backends: the host
    platform stays CPU (the TPU is only a compile target), libtpu's probe of the machine is told
    what to expect, and its one-process lockfile is not taken (several compiles may run at once)."""
    gen = topology.split(":", 1)[0].lower()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _ACCEL_TYPE.get(gen, "v5litepod-4"))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def libtpu_version() -> str | None:
    """The installed libtpu's version, or None when the `tpu` extra is not installed."""
    from importlib import metadata

    for dist in ("libtpu", "libtpu-nightly"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def tpu_devices(topology: str, num_slices: int = 1) -> list:
    """The devices of `num_slices` TPU slices of shape `topology` (e.g. 'v5e:2x4'): compile-only
    devices from libtpu (no TPU needed). UserError when libtpu is missing or does not know the shape."""
    chip_for(topology)
    if libtpu_version() is None:
        raise UserError(f"--topology {topology} needs libtpu: pip install 'dmfuse-jax[tpu]'")
    from jax.experimental import topologies

    gen, shape = topology.lower().split(":", 1)
    kwargs = {"chip_config_name": "megacore"} if gen in TPU_MEGACORE else {}
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    try:
        desc = topologies.get_topology_desc(topology_name=f"{gen}:{shape}", platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001 - libtpu's errors for unknown shapes vary
        raise UserError(f"--topology {topology}: libtpu does not know this slice "
                        f"({str(e).splitlines()[0][:200]})") from None
    return list(desc.devices)


def cuda_plugin_version() -> str | None:
    """The installed JAX CUDA plugin's version, or None without the `cuda-compile` extra."""
    from importlib import metadata

    try:
        metadata.version("jax-cuda12-pjrt")
        return metadata.version("jax-cuda12-plugin")
    except metadata.PackageNotFoundError:
        return None


# XLA:GPU schedules and rematerialises under this share of the device memory when the compile is not
# given a limit (GetSchedulerMemoryLimit); jax on a GPU gives it its allocator's limit instead.
XLA_GPU_UNSET_LIMIT_SHARE = 0.8


def cuda_devices(chip: str, count: int = 1) -> list:
    """`count` compile-only devices of the GPU `chip` (a GPU_TARGETS key), from the JAX CUDA plugin's
    deviceless topology (target config in, no GPU or driver needed). Raises what the plugin raises.

    On a GPU, jax compiles with the allocator's limit (JAX's pool, `gpu_pool_fraction`) as XLA's
    memory limit; a deviceless compile has no allocator and XLA takes 80% of the device memory. The
    target is therefore told a device memory of pool / 0.8, so XLA plans under the same limit."""
    if cuda_plugin_version() is None:
        raise UserError("compiling for CUDA needs the JAX CUDA plugin: pip install 'dmfuse-jax[cuda-compile]'")
    from jax.experimental import topologies

    target = GPU_TARGETS[chip]
    told = target.memory_bytes * gpu_pool_fraction() / XLA_GPU_UNSET_LIMIT_SHARE
    desc = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                        target_config=target.target_config(memory_bytes=int(told)))
    return list(desc.devices)


def cuda_compile_devices(topology: str) -> tuple[list | None, str]:
    """(the devices XLA:GPU can compile for without a GPU, "") for `--topology cuda|h100|h200`, or
    (None, why not): the plugin is not installed, or it would not build the topology."""
    if cuda_plugin_version() is None:
        return None, "the JAX CUDA plugin is not installed (pip install 'dmfuse-jax[cuda-compile]')"
    gpu_pool_fraction()  # a bad XLA_PYTHON_CLIENT_MEM_FRACTION is the user's error, not the plugin's
    try:
        return cuda_devices(CUDA_ALIASES[topology.lower()]), ""
    except NotImplementedError as e:  # jax has no 'cuda' topology factory: the plugin did not register
        return None, (f"{e} (the CUDA plugin did not register; without a GPU it only does so with "
                      f"JAX_PLATFORMS=cpu, JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r} here)")
    except Exception as e:  # noqa: BLE001 - the plugin's errors (e.g. it failed to initialise) are the reason
        text = f"{type(e).__name__}: {e}"
        return None, next((l for l in text.splitlines() if l.strip()), text)[:300]


def gpu_pool_fraction() -> float:
    """The share of GPU memory JAX's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)."""
    text = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={text!r}: expected a number in (0, 1], such as 0.9")
    return fraction
