"""`dmfuse compile --config CFG --topology NAME [--num-slices N] [--what train|fuse] [--size HxW]
[--batch N] [--json FILE] [--config.KEY=VALUE ...]`: will it fit, and how fast can it be, before renting.

Builds the real step ahead of time for an accelerator this machine does not have, and reports per chip
what XLA says about it:
  * TPU slices by name (v4, v5e, v5p, v6e: `v5e:2x4`, `v4:2x2x1`, ...; any shape libtpu knows),
    compiled by XLA:TPU through libtpu's compile-only client (`pip install 'dmfuse-jax[tpu]'`), no TPU
    needed. `--num-slices N` puts N such slices together, the data axis over the data-center network.
  * `--topology cuda` (or h100, h200): lowered for CUDA with every GPU-only branch forced on (the
    criss-cross Pallas kernel's Triton path, bf16 cuDNN attention), then compiled by XLA:GPU for a
    deviceless H100/H200 (a GPU target config, accelerators.GPU_TARGETS) when the JAX CUDA plugin is
    installed (`pip install 'dmfuse-jax[cuda-compile]'`; no GPU or driver needed). Without it (or with
    `--lower-only`) the report has the custom calls, the analytic FLOPs and an HBM estimate, and
    `xla_gpu_compile` says why XLA's figures are missing.

`--what train` (default) is the training step `dmfuse train` runs: the same `Trainer`, stage, mesh
(`config.sharding.mesh_shape` over the slice's chips) and shardings. `--what fuse` is the fuse
function `dmfuse fuse` runs, for `--batch` pairs of `--size` on one chip.

Exit 2 with one line when the step does not fit the chip's HBM (naming the size, the capacity and
the largest buffers, and what to change). JAX's persistent compilation cache cannot serve these
compiles (measured: an entry is written, but reading it back needs a TPU client), so `--json` is the
record to keep: benchmarks/fit_table.py keeps one per cell.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from typing import Any

from dmfuse_jax.errors import UserError

CONFIG_FLAGS = True
WHAT = ("train", "fuse")
# HLO collective opcodes (async ones are counted at their -start).
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE_RE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
GPU_CUDNN_VERSION = 91000  # the cuDNN version asserted while tracing cuDNN attention without one (9.10)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a config file (configs/*.py); override keys "
                                                        "with --config.KEY=VALUE")
    parser.add_argument("--topology", required=True,
                        help="TPU slice GEN:SHAPE (v4:2x2x1, v5e:2x4, v5p:2x2x1, v6e:2x4, ...) or cuda|h100|h200")
    parser.add_argument("--num-slices", type=int, default=1, help="TPU slices joined over DCN (default 1)")
    parser.add_argument("--what", choices=WHAT, default="train",
                        help="train: the training step of the config's stage; fuse: the fuse function")
    parser.add_argument("--size", default="576x768", help="--what fuse: HxW of the pairs (default TNO's 576x768)")
    parser.add_argument("--batch", type=int, default=1, help="--what fuse: pairs per call (default 1)")
    parser.add_argument("--json", help="write the report here (atomically)")
    parser.add_argument("--lower-only", action="store_true",
                        help="cuda|h100|h200: lower only (seconds), even when XLA:GPU could compile (minutes)")


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise UserError(f"--size {text}: expected HxW, e.g. 576x768")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------------
# Reading XLA's results


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO type string ('bf16[8,32]{1,0}', tuples included)."""
    total = 0
    for dtype, dims in _SHAPE_RE.findall(text):
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {'count', 'bytes'}} of the collectives in an optimized HLO module, bytes being each
    one's result size per chip (for an async pair, the -start's; its -done is not counted again)."""
    out: dict[str, dict[str, int]] = {}
    pat = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in hlo_text.splitlines():
        m = pat.search(line)
        if not m:
            continue
        kind, result = m.group(2), m.group(1)
        arrays = [_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
                  for d, dims in _SHAPE_RE.findall(result)]
        if m.group(3) and kind == "all-gather":  # ((operands), (results)): the results half
            nbytes = sum(arrays[len(arrays) // 2:])
        elif m.group(3) and kind == "collective-permute":  # (operand, result, contexts...)
            nbytes = arrays[1] if len(arrays) > 1 else sum(arrays)
        else:  # all-reduce-start has the all-reduce's own result shape
            nbytes = sum(arrays)
        entry = out.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += int(nbytes)
    return dict(sorted(out.items()))


_PLUMBING = ("parameter", "tuple", "get-tuple-element", "bitcast", "constant")
_INSTR_RE = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")


def kernel_io_bytes(hlo_text: str) -> int:
    """Operand + result bytes of every top-level instruction (kernel) of the ENTRY computation of an
    optimized HLO module, parameters and tuple plumbing left out: the HBM traffic if every kernel read
    its inputs from HBM and wrote its result back, counting nothing inside a fusion (which stays on
    chip). XLA:TPU's 'bytes accessed' adds up the instructions inside fusions too (docs/fit.md)."""
    shapes: dict[str, int] = {}
    total, in_entry = 0, False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY"):
            in_entry = True
            continue
        m = _INSTR_RE.match(line)
        if not m:
            if in_entry and line.startswith("}"):
                break
            continue
        name, result, op, rest = m.groups()
        shapes[name] = shape_bytes(result)
        if in_entry and op not in _PLUMBING:
            total += shapes[name] + sum(shapes.get(o, 0) for o in re.findall(r"%([\w.\-]+)", _operand_list(rest)))
    return total


def _operand_list(rest: str) -> str:
    """The text of an instruction's operand list: `rest` (after 'op(') up to its closing parenthesis."""
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                return rest[:i]
            depth -= 1
    return rest


def memory(compiled) -> dict[str, int]:
    """Per-chip bytes from XLA's buffer assignment; peak = arguments + outputs - aliased (donated
    state written in place) + temporaries + generated code."""
    m = compiled.memory_analysis()
    get = lambda k: int(getattr(m, k, 0) or 0)  # noqa: E731
    mem = dict(argument_bytes=get("argument_size_in_bytes"), output_bytes=get("output_size_in_bytes"),
               alias_bytes=get("alias_size_in_bytes"), temp_bytes=get("temp_size_in_bytes"),
               code_bytes=get("generated_code_size_in_bytes"))
    mem["peak_bytes"] = (mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
                         + mem["code_bytes"])
    return mem


def cost(compiled) -> dict[str, float | None]:
    """XLA's FLOPs and bytes accessed; None where XLA gives none (XLA:GPU's compile-only executables
    have no cost analysis)."""
    c = compiled.cost_analysis()
    c = (c[0] if isinstance(c, (list, tuple)) else c) or {}
    get = lambda k: float(c[k]) if k in c else None  # noqa: E731
    return dict(xla_flops=get("flops"), bytes_accessed=get("bytes accessed"))


def compiled_custom_calls(hlo_text: str) -> dict[str, int]:
    """Custom-call targets of an optimized HLO module (what XLA kept as library calls or kernels),
    with counts; XLA's own Triton fusions are counted as 'fusion:__triton'."""
    found: dict[str, int] = {}
    for name in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
        found[name] = found.get(name, 0) + 1
    n = len(re.findall(r'"kind":"__triton[^"]*"', hlo_text))
    if n:
        found["fusion:__triton"] = n
    return dict(sorted(found.items()))


def unsized_workspaces(hlo_text: str) -> int:
    """Library calls (cuDNN convolutions and attention) whose scratch buffer is u8[0]: sized by
    autotuning on a GPU, which a deviceless compile skips."""
    return len(re.findall(r"u8\[0\]\{0\}\)\s+custom-call\(", hlo_text))


_OOM_PATTERNS = (
    # buffer assignment: "Used 20.50G of 15.75G hbm. Exceeded hbm capacity by ..."
    re.compile(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm"),
    # the early estimate: "the total memory required for HLO temporaries (55.14G) exceeds available HBM (15.75G)"
    re.compile(r"required for HLO temporaries \(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)"),
)
_TENSOR_RE = re.compile(r"tensor<((?:\d+x)+)(bf16|f16|f32|f64|i32|i8|ui8|i1)>")
_MLIR_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4, "i8": 1, "ui8": 1, "i1": 1}


def oom_summary(message: str) -> dict | None:
    """XLA:TPU's out-of-memory compile error -> {'used', 'capacity', 'largest': [(size, shape)]}
    (XLA's sizes, e.g. '55.14G'), or None when the error is something else."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    used = cap = "?"
    for pat in _OOM_PATTERNS:
        m = pat.search(message)
        if m:
            used, cap = m.group(1), m.group(2)
            break
    largest = []
    tail = message.split("Largest program allocations", 1)
    if len(tail) == 2:
        for block in re.split(r"\n\s*\d+\. ", tail[1])[1:4]:
            size = re.search(r"Size: ([\d.]+[KMGT]?)", block)
            shape = re.search(r"Shape: (\S+)", block)
            if size:
                largest.append((size.group(1), shape.group(1) if shape else "?"))
    return dict(used=used, capacity=cap, largest=largest)


def largest_arrays(lowered_text: str, n: int = 3) -> list[tuple[str, str]]:
    """The n largest distinct array types of a lowered (StableHLO) module: [(size, 'bf16[...]')],
    global shapes (before partitioning over the mesh)."""
    seen = {}
    for dims, dtype in _TENSOR_RE.findall(lowered_text):
        shape = tuple(int(d) for d in dims.rstrip("x").split("x"))
        seen[(dtype, shape)] = _MLIR_BYTES[dtype] * math.prod(shape)
    top = sorted(seen.items(), key=lambda kv: -kv[1])[:n]
    return [(_gib(b), f"{dt}[{','.join(map(str, sh))}]") for (dt, sh), b in top]


def custom_calls(text: str) -> dict[str, int]:
    """Custom-call targets of a lowered (StableHLO) module, with counts."""
    found: dict[str, int] = {}
    for name in re.findall(r'call_target_name\s*=\s*"([^"]+)"', text):
        found[name] = found.get(name, 0) + 1
    for name in re.findall(r"stablehlo\.custom_call\s+@([\w$.]+)", text):
        found[name] = found.get(name, 0) + 1
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------------------------
# What is compiled: the real train step (Trainer) and the real fuse function (inference.fuser)


def _gpu_config(config):
    """The config with every GPU-only branch on: bf16, the criss-cross kernel, cuDNN attention."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.dtype = "bfloat16"
        config.model.head.caim_impl = "pallas"
        config.model.unet.attention_impl = "cudnn"
    return config


class _CudnnAsserted:
    """Tracing cuDNN attention asks the installed cuDNN for its version; without a GPU stack there is
    none (or, with the CUDA plugin but no cuDNN wheel, none loadable), so while lowering for CUDA the
    version is asserted (GPU_CUDNN_VERSION)."""

    def __enter__(self):
        from jax._src.cudnn import fused_attention_stablehlo as fa
        self._fa, self._orig = fa, fa.check_cudnn_version
        try:
            self._orig()
        except Exception:  # noqa: BLE001 - no cuDNN here ("cuDNN is not detected." / "cuDNN not found.")
            fa.check_cudnn_version = lambda: GPU_CUDNN_VERSION
        return self

    def __exit__(self, *exc):
        self._fa.check_cudnn_version = self._orig


def train_target(config, mesh, platforms=None):
    """(trainer, lowered train step): the step `dmfuse train` runs, through its Trainer."""
    from dmfuse_jax.training.train import REQUIRED_KEYS, build_stage
    from dmfuse_jax.training.trainer import Trainer

    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise UserError(f"--what train needs a training config; this one lacks {missing}")
    total = int(config.total_steps) if int(config.total_steps) > 0 else 1000
    trainer = Trainer(config, build_stage(config), mesh=mesh, total_steps=total)
    return trainer, trainer.lower(platforms)


def fuse_target(config, size, batch, device, platforms=None):
    """The fuse function `dmfuse fuse` runs (inference.fuser.fuse_function of the config's model) for
    `batch` pairs padded to the UNet stride, lowered for one device (or for `platforms`)."""
    import jax
    import jax.numpy as jnp

    from dmfuse_jax import compilation
    from dmfuse_jax.inference.fuser import fuse_function
    from dmfuse_jax.models.params import cached_model, config_key, param_shapes

    model, cfg = cached_model(config_key(config))
    stride = model.unet.total_stride
    h, w = (-(-s // stride) * stride for s in size)
    sharding = jax.sharding.SingleDeviceSharding(device)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=sharding),
                          param_shapes(config))
    img = jax.ShapeDtypeStruct((batch, h, w, 1), jnp.float32, sharding=sharding)
    seed = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)
    fn = compilation.jit(fuse_function(model, cfg.model.input_range))
    traced = fn.trace(params, img, img, seed)
    return (h, w), traced.lower(lowering_platforms=tuple(platforms)) if platforms else traced.lower()


def analytic_flops(config, what: str, size=None, batch: int = 1) -> float:
    from dmfuse_jax import flops

    if what == "train":
        return flops.train_step(config).total
    return flops.fuse_pairs(config, size[0], size[1], batch=batch).total


def hbm_estimate_train(trainer) -> dict[str, int]:
    """Without a compiler: the state (params, optimizer, EMA), one gradient of the trained params,
    the batch, and the activations the forward saves for the backward (the residuals of `jax.vjp`,
    as traced, before XLA's rematerialisation or fusion)."""
    import jax

    nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))  # noqa: E731
    stage, state = trainer.stage, trainer.abstract_state
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in stage.example_batch(int(trainer.config.batch_size)).items()}

    def residuals(params, frozen, batch):
        return jax.vjp(lambda p: stage.loss(p, frozen, batch, jax.random.PRNGKey(0))[0], params)[1]

    with jax.set_mesh(trainer.mesh):
        res = jax.eval_shape(residuals, state.params, state.frozen, batch)
    est = dict(state_bytes=nbytes(state), gradient_bytes=nbytes(state.params), batch_bytes=nbytes(batch),
               residual_bytes=nbytes(res))
    est["estimate_bytes"] = sum(est.values())
    return est


# ---------------------------------------------------------------------------------------------
# The report


def roofline(flops_per_chip: float, bytes_per_chip: float, chip, images_per_step: float, chips: int) -> dict:
    """Lower bounds on one step from the chip's peaks: compute = analytic FLOPs / peak bf16 FLOP/s,
    memory = the kernels' input + output bytes (`kernel_io_bytes`) / HBM bandwidth; the bound is the
    larger. images/s and MFU are what that bound would give (MFU = compute time / bound)."""
    t_c = flops_per_chip / chip.peak_flops
    t_m = bytes_per_chip / chip.hbm_bytes_per_s if bytes_per_chip == bytes_per_chip else 0.0
    t = max(t_c, t_m)
    return dict(compute_s=t_c, memory_s=t_m, step_s=t, bound="compute" if t_c >= t_m else "memory",
                images_per_s=images_per_step / t if t > 0 else float("nan"),
                best_mfu=t_c / t if t > 0 else float("nan"), chips=chips)


def _gib(n) -> str:
    """Bytes in GiB, or MiB below 1 GiB."""
    return f"{n / 2 ** 30:.2f} GiB" if abs(n) >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def _ms(s) -> str:
    if s != s:
        return "n/a"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 10 else f"{s:.1f} s"


def format_report(r: dict) -> list[str]:
    """The report as lines for the terminal."""
    chip = r["chip"]
    head = (f"{r['what']} step of {r['config_name']} on {r['topology']}" +
            (f" x {r['num_slices']} slices" if r.get("num_slices", 1) > 1 else "") +
            f" ({r['chips']} chip{'s' if r['chips'] > 1 else ''} {chip['name']}")
    if r["what"] == "train":
        head += f", mesh {r['mesh']}, global batch {r['global_batch']}, {r['per_chip_batch']:g} per chip"
    else:
        head += f", {r['batch']} pair(s) of {r['size'][0]}x{r['size'][1]}"
    lines = [head + f", {r['dtype']})"]
    if "memory" in r:
        m = r["memory"]
        pool = (f"; JAX's GPU pool {_gib(r['gpu_pool_bytes'])} ({100 * r['gpu_pool_fraction']:.0f}% of "
                f"{_gib(r['gpu_memory_bytes'])})" if "gpu_pool_bytes" in r else "")
        lines.append(f"  memory per chip: arguments {_gib(m['argument_bytes'])}, outputs {_gib(m['output_bytes'])} "
                     f"({_gib(m['alias_bytes'])} aliased), temps {_gib(m['temp_bytes'])}, code {_gib(m['code_bytes'])}; "
                     f"peak {_gib(m['peak_bytes'])} of {_gib(chip['hbm_bytes'])} HBM ({100 * m['peak_bytes'] / chip['hbm_bytes']:.0f}%)"
                     + pool)
    if "xla_gpu_compile" in r:
        note = r["xla_gpu_compile"]
        if note == "compiled":
            note = (f"compiled without a GPU from the {r['gpu_target']} target config; no autotuning, so "
                    f"{r['unsized_workspaces']} cuDNN workspaces are unsized (u8[0]) and not in the temps")
        lines.append(f"  XLA:GPU: {note}")
    if "hbm_estimate" in r:
        e = r["hbm_estimate"]
        parts = ", ".join(f"{k.removesuffix('_bytes')} {_gib(v)}" for k, v in e.items() if k != "estimate_bytes")
        how = "traced, before XLA's fusion; XLA's figure is above" if "memory" in r else "no GPU compiler here"
        lines.append(f"  HBM estimate ({how}): {_gib(e['estimate_bytes'])} of {_gib(chip['hbm_bytes'])} ({parts})")
    f = r["flops"]
    xla = f" (XLA's count: {f['xla_per_chip'] / 1e9:,.1f} GFLOP)" if f.get("xla_per_chip") == f.get("xla_per_chip") and f.get("xla_per_chip") is not None else ""
    lines.append(f"  FLOPs per chip per step: {f['analytic_per_chip'] / 1e9:,.1f} GFLOP analytic{xla}")
    if r.get("bytes_accessed") is not None:
        lines.append(f"  bytes accessed per chip: {r['bytes_accessed'] / 1e9:,.2f} GB (XLA's count, fused instructions "
                     f"included); kernel inputs + outputs {r['kernel_io_bytes'] / 1e9:,.2f} GB (the roofline's)")
    elif r.get("kernel_io_bytes") is not None:
        lines.append(f"  bytes per chip: kernel inputs + outputs {r['kernel_io_bytes'] / 1e9:,.2f} GB (the roofline's; "
                     f"XLA gives no bytes accessed here)")
    if "collectives" in r:
        c = r["collectives"]
        lines.append("  collectives per chip: " + (", ".join(f"{k} x{v['count']} ({v['bytes'] / 2 ** 20:,.1f} MiB)"
                                                          for k, v in c.items()) or "none"))
    if "custom_calls" in r:
        lines.append("  custom calls: " + (", ".join(f"{k} x{v}" for k, v in r["custom_calls"].items()) or "none"))
    if "compiled_custom_calls" in r:
        lines.append("  after XLA:GPU: " + (", ".join(f"{k} x{v}" for k, v in r["compiled_custom_calls"].items())
                                           or "none"))
    if "roofline" in r:
        rf = r["roofline"]
        if rf.get("note"):
            lines.append(f"  roofline bound: {_ms(rf['step_s'])} per step from compute alone ({rf['note']}) -> at most "
                         f"{rf['images_per_s']:,.0f} images/s")
        else:
            lines.append(f"  roofline bound: {_ms(rf['step_s'])} per step ({rf['bound']}-bound; compute "
                         f"{_ms(rf['compute_s'])}, memory {_ms(rf['memory_s'])}) -> at most {rf['images_per_s']:,.0f} "
                         f"images/s, best-case MFU {100 * rf['best_mfu']:.0f}%")
    t = r["compile"]
    lines.append(f"  {t['stage']} in {t['wall_s']:.1f} s wall ({t['cpu_s']:.1f} s CPU)")
    return lines


def _does_not_fit(r: dict, used: str, capacity: str, largest) -> UserError:
    what = (f"batch {r['global_batch']} ({r['per_chip_batch']:g} per chip) of {r['image_size']}x{r['image_size']}"
            if r["what"] == "train" else f"{r['batch']} pair(s) of {r['size'][0]}x{r['size'][1]}")
    big = "; ".join(f"{s} {shape}" for s, shape in largest[:3]) or "see XLA's message"
    hint = ("set --config.sharding.mesh_shape='(-1, N)' (fsdp) or a smaller --config.batch_size"
            if r["what"] == "train" else "use a smaller --size or --batch")
    return UserError(f"{r['config_name']} does not fit {r['topology']}: {what} needs {used} per chip (XLA), "
                     f"{r['chip']['name']} has {capacity} HBM; largest buffers: {big}; {hint}")


def build_report(config, args) -> dict:
    """Compiles (or lowers, for CUDA) and returns the report dict; raises UserError when it does not fit."""
    import jax
    import numpy as np

    from dmfuse_jax import accelerators as acc
    from dmfuse_jax import sharding as shd

    chip = acc.chip_for(args.topology)
    cuda = acc.is_cuda(args.topology)
    if cuda and args.num_slices != 1:
        raise UserError("--num-slices is for TPU slices")
    if args.num_slices < 1:
        raise UserError(f"--num-slices {args.num_slices}: must be >= 1")
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: must be >= 1")
    if cuda:
        config = _gpu_config(config)
    dtype = str(config.model.get("dtype", "float32"))
    r: dict[str, Any] = dict(config_name=str(config.get("name", os.path.basename(args.config))), config=args.config,
                             what=args.what, topology=args.topology, num_slices=args.num_slices, chip=chip.row(),
                             dtype=dtype, jax_version=jax.__version__, libtpu_version=acc.libtpu_version())
    platforms = None
    if cuda:  # XLA:GPU's deviceless devices when the CUDA plugin can build them, else lowering only
        devices, why = (None, "--lower-only") if getattr(args, "lower_only", False) else acc.cuda_compile_devices(args.topology)
        r["xla_gpu_compile"] = "compiled" if devices else f"unavailable: {why}"
        r["cuda_plugin_version"] = acc.cuda_plugin_version()
        if devices is None:
            devices, platforms = jax.devices("cpu")[:1], ("cuda",)
    else:
        devices = acc.tpu_devices(args.topology, args.num_slices)
    r["chips"] = 1 if (cuda or args.what == "fuse") else len(devices)

    from contextlib import ExitStack
    from dmfuse_jax.models.criss_cross import lowering_for_gpu

    t0, c0 = time.perf_counter(), time.process_time()
    with ExitStack() as stack:
        if cuda:
            stack.enter_context(lowering_for_gpu())
            stack.enter_context(_CudnnAsserted())
        if args.what == "train":
            mesh = shd.make_mesh(tuple(config.sharding.mesh_shape), devices=devices)
            trainer, lowered = train_target(config, mesh, platforms)
            n = int(np.prod(list(mesh.shape.values())))
            first = next(iter(trainer.stage.example_batch(1).values()))  # (1, H, W, C)
            r.update(mesh=dict(mesh.shape), global_batch=int(config.batch_size),
                     per_chip_batch=int(config.batch_size) / n, stage=str(config.stage),
                     image_size=int(first.shape[1]))
            images = int(config.batch_size)
        else:
            size = parse_size(args.size)
            (h, w), lowered = fuse_target(config, size, args.batch, devices[0], platforms)
            r.update(size=[h, w], requested_size=list(size), batch=args.batch)
            images = args.batch
        t_lower = time.perf_counter() - t0
        if cuda and args.what == "train":
            r["hbm_estimate"] = hbm_estimate_train(trainer)  # traces the GPU branches again

    # traced with the portable kernels (models.builders.portable_config): the same matmuls as the GPU's or TPU's
    analytic = analytic_flops(config, args.what, r.get("size"), args.batch)
    if cuda:
        r["custom_calls"] = custom_calls(lowered.as_text())
        if platforms is None:  # lowered for XLA:GPU's deviceless device: compile it
            t1 = time.perf_counter()
            try:
                compiled = lowered.compile()
            except Exception as e:  # noqa: BLE001 - e.g. no libdevice/ptxas: the lowering report stands
                text = f"{type(e).__name__}: {e}"
                r["xla_gpu_compile"] = "unavailable: XLA:GPU failed: " + next(
                    (l for l in text.splitlines() if l.strip()), text)[:300]
            else:
                return _gpu_compiled(r, compiled, lowered, chip, analytic, images, t0, c0, t_lower, t1)
        r["flops"] = dict(analytic_per_chip=analytic, xla_per_chip=None)
        r["compile"] = dict(stage="lowered for CUDA (not compiled: see xla_gpu_compile)", wall_s=t_lower,
                            cpu_s=time.process_time() - c0, lower_s=t_lower)
        r["roofline"] = roofline(analytic, float("nan"), chip, images, 1)
        r["roofline"]["note"] = "compute bound only (no bytes accessed without XLA:GPU)"
        return r

    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA's out-of-memory is a JaxRuntimeError
        oom = oom_summary(str(e))
        if oom is None:
            raise
        largest = oom["largest"] or [(size, f"{shape} (global)") for size, shape in largest_arrays(lowered.as_text())]
        raise _does_not_fit(r, oom["used"], oom["capacity"], largest) from None
    r["compile"] = dict(stage="compiled by XLA:TPU", wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
                        lower_s=t_lower, xla_s=time.perf_counter() - t1)
    r["memory"] = memory(compiled)
    r.update(cost(compiled))
    text = compiled.as_text()
    r["collectives"] = collectives(text)
    r["kernel_io_bytes"] = kernel_io_bytes(text)
    per_chip = analytic / r["chips"]
    r["flops"] = dict(analytic_per_step=analytic, analytic_per_chip=per_chip, xla_per_chip=r.pop("xla_flops"))
    r["roofline"] = roofline(per_chip, r["kernel_io_bytes"], chip, images, r["chips"])
    # Whether it fits is XLA:TPU's verdict (it refuses to compile what does not fit the HBM it can use),
    # except that its compile-only client has been seen to compile past the chip (docs/fit.md)
    check_tpu_capacity(r, lambda: largest_arrays(lowered.as_text()))
    return r


def check_tpu_capacity(r: dict, largest) -> None:
    """Raises the does-not-fit error when a program XLA:TPU compiled needs more than the chip's HBM:
    arguments + outputs - aliased + temps (generated code left out, as XLA's own limit leaves it). A
    compile-only client compiled one 1088x1088 fuse with 17.55 GiB of temps for a 16 GiB v5e; such a
    program cannot load on the chip. largest: () -> [(size, shape)] of the lowered program."""
    m, hbm = r["memory"], r["chip"]["hbm_bytes"]
    buffers = m["peak_bytes"] - m["code_bytes"]
    if buffers > hbm:
        big = [(size, f"{shape} (global)") for size, shape in largest()]
        raise _does_not_fit(r, f"{_gib(buffers)} (XLA:TPU compiled it, but its buffers exceed the chip)",
                            _gib(hbm), big)


def _gpu_compiled(r, compiled, lowered, chip, analytic, images, t0, c0, t_lower, t1) -> dict:
    """The report of a deviceless XLA:GPU compile: XLA's buffer assignment against the GPU's memory and
    JAX's allocator pool (exit 2 above the pool), what XLA kept as library calls, the roofline."""
    from dmfuse_jax import accelerators as acc

    key = acc.CUDA_ALIASES[r["topology"].lower()]
    target = acc.GPU_TARGETS[key]
    r["compile"] = dict(stage="compiled by XLA:GPU", wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
                        lower_s=t_lower, xla_s=time.perf_counter() - t1)
    r["memory"] = memory(compiled)
    r.update(cost(compiled))
    text = compiled.as_text()
    r.update(gpu_target=target.name, gpu_memory_bytes=target.memory_bytes, gpu_pool_fraction=acc.gpu_pool_fraction(),
             compiled_custom_calls=compiled_custom_calls(text), unsized_workspaces=unsized_workspaces(text),
             kernel_io_bytes=kernel_io_bytes(text))
    r["gpu_pool_bytes"] = int(target.memory_bytes * r["gpu_pool_fraction"])
    r["flops"] = dict(analytic_per_step=analytic, analytic_per_chip=analytic, xla_per_chip=r.pop("xla_flops"))
    r["roofline"] = roofline(analytic, r["kernel_io_bytes"], chip, images, 1)
    # XLA:GPU compiles what does not fit (the allocator fails at run time): the pool is the verdict
    if r["memory"]["peak_bytes"] > r["gpu_pool_bytes"]:
        largest = [(size, f"{shape} (global)") for size, shape in largest_arrays(lowered.as_text())]
        raise _does_not_fit(r, _gib(r["memory"]["peak_bytes"]),
                            f"{_gib(r['gpu_pool_bytes'])} of JAX's pool (XLA_PYTHON_CLIENT_MEM_FRACTION="
                            f"{r['gpu_pool_fraction']:g}) of {_gib(target.memory_bytes)}", largest)
    return r


def write_json(path: str, report: dict) -> None:
    from pathlib import Path

    from dmfuse_jax.data.images import write_bytes_atomic

    Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())


def run(args) -> int:
    from dmfuse_jax import accelerators as acc

    acc.chip_for(args.topology)  # a bad name fails before JAX starts
    if not acc.is_cuda(args.topology):
        acc.prepare_libtpu_env(args.topology)
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.json:
        from dmfuse_jax.data.images import check_output_path
        check_output_path(args.json, "--json")
    from dmfuse_jax.config_lib import config_from_flags

    config = config_from_flags(args.config, getattr(args, "config_flags", ()))
    report = build_report(config, args)
    print("\n".join(format_report(report)), flush=True)
    if args.json:
        write_json(args.json, report)
        print(f"  report written to {args.json}")
    return 0


def main(argv=None) -> int:
    from dmfuse_jax.cli import main as cli_main

    return cli_main(["compile", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
