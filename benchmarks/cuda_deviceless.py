"""Can XLA:GPU compile our programs on a machine without a GPU? Builds a deviceless CUDA topology from a
GPU target config (accelerators.GPU_TARGETS) through the JAX CUDA plugin, compiles each case for its
one device and prints what XLA says: memory_analysis() (arguments, outputs, aliased, temps, code),
cost_analysis() FLOPs, compile seconds, the custom calls in the lowered module and which survive in
the compiled HLO. A case that fails prints the first line of its error; the script goes on. The
target is told a device memory of JAX's pool / 0.8 (accelerators.cuda_devices), so XLA plans under
the memory limit it would have on the GPU.

  pip install 'dmfuse-jax[cuda-compile]'     # jax-cuda12-plugin + jax-cuda12-pjrt, pinned to jax
  python benchmarks/cuda_deviceless.py                       # toy, fuse (tiny 256x256), train (cut-down)
  python benchmarks/cuda_deviceless.py --cases fuse --attention xla,cudnn --caim pallas,reference
  python benchmarks/cuda_deviceless.py --cases train --config configs/coco_pretrain.py --batch 64 --full

Cases:
  toy    jnp.tanh(x @ x.T).sum(0) on a 256x256 float32 (the plugin and the topology work at all)
  fuse   dmfuse_jax.inference.fuser.fuse_function of --config (default configs/tiny.py) at --size, the
         function `dmfuse compile --what fuse` compiles
  train  the stage-1 Trainer step of --config (default the tests' cut-down quickstart UNet: 2 levels,
         1 res block, 16x16 crops, batch 2), the step `dmfuse compile --what train` compiles
Every GPU branch is as `dmfuse compile --topology cuda` sets it (bf16, Pallas criss-cross kernel's Triton
path), the UNet's attention as --attention says (xla: the jnp softmax attention, cudnn: cuDNN's fused
attention), the fusion head's criss-cross attention as --caim says.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host backend; the GPU is only a compile target
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRETRAIN = "configs/quickstart_pretrain.py"
# the tests' cut-down stage-1 UNet (tests/test_compile_cli.py SMALL), batch 2
SMALL = ["batch_size=2", "model.unet.channel_mults=(1,2)", "model.unet.res_blocks=1", "model.unet.attn_res=(8,)",
         "model.unet.image_size=16"]


def first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return next((l for l in text.splitlines() if l.strip()), text)[:400]


def report(name: str, lowered, t_lower: float) -> dict:
    from dmfuse_jax.commands.compile import _gib, compiled_custom_calls, cost, custom_calls, memory, unsized_workspaces

    row = dict(case=name, lower_s=t_lower, lowered_calls=custom_calls(lowered.as_text()))
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - what fails is the finding
        row.update(ok=False, error=first_line(e), compile_s=time.perf_counter() - t0)
        print(f"[{name}] compile FAILED after {row['compile_s']:.1f} s: {row['error']}", flush=True)
        return row
    row.update(ok=True, compile_s=time.perf_counter() - t0, compile_cpu_s=time.process_time() - c0)
    row["memory"] = memory(compiled)
    try:
        row.update(cost(compiled))
    except Exception as e:  # noqa: BLE001
        row.update(xla_flops=None, cost_error=first_line(e))
    text = compiled.as_text()
    row["compiled_calls"], row["unsized_workspaces"] = compiled_custom_calls(text), unsized_workspaces(text)
    m = row["memory"]
    flops = row.get("xla_flops")
    print(f"[{name}] compiled in {row['compile_s']:.1f} s wall ({row['compile_cpu_s']:.1f} s CPU), lowered in "
          f"{t_lower:.1f} s\n  memory: arguments {_gib(m['argument_bytes'])}, outputs {_gib(m['output_bytes'])} "
          f"({_gib(m['alias_bytes'])} aliased), temps {_gib(m['temp_bytes'])}, code {_gib(m['code_bytes'])}; "
          f"peak {_gib(m['peak_bytes'])}\n  XLA FLOPs: {'none (no cost analysis)' if flops is None else f'{flops / 1e9:,.2f} GFLOP'}"
          f"{'' if 'cost_error' not in row else ' (' + row['cost_error'] + ')'}\n"
          f"  custom calls lowered: {row['lowered_calls'] or 'none'}\n  survived in compiled HLO: "
          f"{row['compiled_calls'] or 'none'}; {row['unsized_workspaces']} library calls with an unsized (u8[0]) "
          f"workspace", flush=True)
    return row


def lower_case(case: str, args, device, attention: str, caim: str):
    """(name, lowered, lower seconds) of one case for the deviceless device."""
    import jax
    import jax.numpy as jnp

    from dmfuse_jax import sharding as shd
    from dmfuse_jax.commands.compile import _CudnnAsserted, _gpu_config, fuse_target, train_target
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.models.criss_cross import lowering_for_gpu

    t0 = time.perf_counter()
    if case == "toy":
        x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
        return "toy", jax.jit(lambda a: jnp.tanh(a @ a.T).sum(0)).lower(x), time.perf_counter() - t0
    path = args.config or ("configs/tiny.py" if case == "fuse" else PRETRAIN)
    over = list(args.override) + (SMALL if case == "train" and not args.full else [])
    if case == "train" and args.batch:
        over.append(f"batch_size={args.batch}")
    config = _gpu_config(load_config(str(ROOT / path), over))
    with config.unlocked():
        config.model.unet.attention_impl = attention
        config.model.head.caim_impl = caim
    name = f"{case} {Path(path).stem} attention={attention} caim={caim}"
    with lowering_for_gpu(), _CudnnAsserted():
        if case == "fuse":
            size = tuple(int(s) for s in args.size.split("x"))
            (h, w), lowered = fuse_target(config, size, 1, device)
            name += f" {h}x{w}"
        else:
            mesh = shd.make_mesh((1, 1), devices=[device])
            _, lowered = train_target(config, mesh)
            name += f" batch {int(config.batch_size)}"
    return name, lowered, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chip", default="h100", help="accelerators.GPU_TARGETS key (h100, h200)")
    p.add_argument("--cases", default="toy,fuse,train")
    p.add_argument("--attention", default="xla,cudnn", help="model.unet.attention_impl values to try")
    p.add_argument("--caim", default="pallas", help="model.head.caim_impl values to try (fuse)")
    p.add_argument("--config", help="config file (default: tiny for fuse, quickstart_pretrain cut down for train)")
    p.add_argument("--size", default="256x256", help="fuse: HxW")
    p.add_argument("--batch", type=int, default=0, help="train: global batch (default: the config's / 2 cut down)")
    p.add_argument("--full", action="store_true", help="train: the config's own UNet, not the cut-down one")
    p.add_argument("--override", action="append", default=[], help="config KEY=VALUE (repeatable)")
    args = p.parse_args(argv)

    import jax

    from dmfuse_jax import accelerators as acc

    print(f"jax {jax.__version__}; CUDA plugin {acc.cuda_plugin_version()}; chip {args.chip}; "
          f"load average {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    try:
        device = acc.cuda_devices(args.chip)[0]
    except Exception as e:  # noqa: BLE001
        print(f"deviceless CUDA topology FAILED: {first_line(e)}")
        return 1
    print(f"topology: {device} ({device.platform}) in {time.perf_counter() - t0:.2f} s", flush=True)
    rows = []
    for case in args.cases.split(","):
        variants = [("xla", "pallas")] if case == "toy" else [
            (a, c) for a in args.attention.split(",") for c in (args.caim.split(",") if case == "fuse" else ["pallas"])]
        for attention, caim in variants:
            try:
                name, lowered, t_lower = lower_case(case, args, device, attention, caim)
            except Exception as e:  # noqa: BLE001
                print(f"[{case} attention={attention} caim={caim}] lowering FAILED: {first_line(e)}", flush=True)
                if os.environ.get("DMFUSE_TRACEBACK"):
                    traceback.print_exc()
                continue
            rows.append(report(name, lowered, t_lower))
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} compiled; load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
