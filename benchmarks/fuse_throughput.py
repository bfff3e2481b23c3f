"""Fusion throughput of DMFuse: pairs/s and ms per TNO-sized pair (576x768) for a width, dtype and batch.

  python benchmarks/fuse_throughput.py                                   # 1/4 model, float32, batch 1
  python benchmarks/fuse_throughput.py --config configs/tiny.py --iters 3
  python benchmarks/fuse_throughput.py --width 64 --dtype bfloat16 --batch 4   # the 1/2 model

Runs the same compiled function as `dmfuse fuse` (random params of the config's shapes: speed does
not depend on the values) on the default device and prints: time per batch and per pair, pairs/s,
FLOPs per pair by the analytic count (`dmfuse_jax.flops`: convolutions and matmuls of the padded
bucket the device really computes, the same on every backend; XLA's own count is kept in the JSON
for comparison, but on GPU it misses cuDNN convolutions), achieved TFLOP/s, the fraction
of the device's peak (table below by device kind, or --peak-tflops) and the peak device memory
(`device.memory_stats()`, where the backend reports it). Host I/O (PNG decode/encode) is excluded.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Dense peak TFLOP/s by device kind (vendor data sheets, SXM parts, no sparsity). float32 convs and
# matmuls on these GPUs run on TF32 tensor cores under XLA's default precision, hence the TF32 peak.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.4, "float32": 494.7},
    "H100": {"bfloat16": 989.4, "float32": 494.7},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "L4": {"bfloat16": 121.0, "float32": 60.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
}


def peak_for(kind: str, dtype: str) -> float | None:
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in kind.lower():
            return peaks[dtype]
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "dmfuse_quarter.py"))
    p.add_argument("--width", type=int, default=None, help="UNet inner channels (default: the config's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", default="576x768", help="HxW of one pair (default: %(default)s, TNO)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the fraction (default: table)")
    p.add_argument("--caim-impl", choices=("auto", "reference", "blockwise", "pallas"), default=None,
                   help="force CAIM's criss-cross implementation (default: the config's, 'auto')")
    p.add_argument("--attention-impl", choices=("xla", "chunked", "cudnn"), default=None,
                   help="UNet self-attention backend (default: the config's)")
    p.add_argument("--json", help="also write the figures to this JSON file (atomically)")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from dmfuse_jax import compilation, flops as flop_count
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.data.images import write_text_atomic
    from dmfuse_jax.inference import buckets
    from dmfuse_jax.inference.fuser import Fuser, random_params

    config = load_config(args.config)
    if args.width:
        with config.unlocked():
            config.model.unet.inner_channels = args.width
            config.model.unet.norm_groups = min(config.model.unet.norm_groups, args.width)
    with config.unlocked():
        if args.caim_impl:
            config.model.head.caim_impl = args.caim_impl
        if args.attention_impl:
            config.model.unet.attention_impl = args.attention_impl
    h, w = (int(s) for s in args.size.lower().split("x"))
    dev = jax.devices()[0]
    print(f"devices: {', '.join(str(d) for d in jax.devices())}; running on {dev} ({dev.device_kind})")
    print(f"config {args.config}: UNet width {config.model.unet.inner_channels}, dtype {args.dtype}, "
          f"batch {args.batch}, pair {h}x{w}; XLA compile options {compilation.compiler_options()}")
    fuser = Fuser(config=config, params=random_params(config), dtype=args.dtype)
    hb, wb = buckets.bucket_shape(h, w, fuser.bucket)
    rng = np.random.default_rng(0)
    ir = rng.random((args.batch, h, w, 1), np.float32)
    vi = rng.random((args.batch, h, w, 1), np.float32)
    irs, vis = list(ir), list(vi)

    t = time.perf_counter()
    fuser.dispatch(irs, vis).result()
    first = time.perf_counter() - t
    xla_flops = flop_count.xla_flops(fuser._executable(args.batch, hb, wb))
    flops = flop_count.fuse_pairs(config, hb, wb, args.batch, args.dtype).total
    for _ in range(max(0, args.warmup - 1)):
        fuser.dispatch(irs, vis).result()
    times, cpu_times = [], []
    for _ in range(args.iters):
        t, c = time.perf_counter(), time.process_time()
        fuser.dispatch(irs, vis).result()  # includes host padding + transfer, as in `dmfuse fuse`
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)  # this process's CPU seconds: steadier on a shared CPU
    med = statistics.median(times)
    per_pair = med / args.batch
    tflops = flops / med / 1e12
    peak = args.peak_tflops or peak_for(dev.device_kind, args.dtype)
    print(f"compile + first batch: {first:.2f} s (compile {fuser.stats['executables_s']:.2f} s); "
          f"bucket {hb}x{wb}; {args.iters} timed batches, median {med * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
    print(f"per pair: {per_pair * 1e3:.1f} ms; throughput {args.batch / med:.3f} pairs/s; "
          f"process CPU time per batch (median) {statistics.median(cpu_times):.2f} s")
    print(f"FLOPs per pair (analytic, {hb}x{wb} bucket): {flops / args.batch / 1e9:.1f} GFLOP "
          f"(XLA cost analysis: {xla_flops / args.batch / 1e9:.1f}); "
          f"achieved {tflops:.3f} TFLOP/s" + (f" = {100 * tflops / peak:.1f}% of {peak:g} TFLOP/s peak"
                                             if peak else " (no peak known for this device: --peak-tflops)"))
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    peak_mem = stats.get("peak_bytes_in_use") if stats else None
    print("peak device memory: " + (f"{peak_mem / 2**30:.2f} GiB" if peak_mem is not None
                                    else "not reported by this backend"))
    row = dict(device=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), config=args.config,
               width=int(config.model.unet.inner_channels), dtype=args.dtype, batch=args.batch, size=f"{h}x{w}",
               caim_impl=config.model.head.caim_impl, attention_impl=config.model.unet.attention_impl,
               bucket=f"{hb}x{wb}", compile_s=fuser.stats["executables_s"], first_batch_s=first, ms_per_batch=med * 1e3,
               ms_per_pair=per_pair * 1e3, pairs_per_s=args.batch / med, gflop_per_pair=flops / args.batch / 1e9,
               flop_count="analytic (dmfuse_jax.flops)", xla_gflop_per_pair=xla_flops / args.batch / 1e9,
               cpu_s_per_batch=statistics.median(cpu_times), tflops=tflops, peak_tflops=peak, fraction_of_peak=tflops / peak if peak else None,
               peak_device_bytes=peak_mem, xla_compiler_options=compilation.compiler_options())
    print("\n| device | width | dtype | batch | pair | ms/pair | pairs/s | GFLOP/pair | TFLOP/s | % of peak "
          "| peak memory |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {row['device']} | {row['width']} | {args.dtype} | {args.batch} | {h}x{w} | {per_pair * 1e3:.1f} | "
          f"{row['pairs_per_s']:.3f} | {row['gflop_per_pair']:.1f} | {tflops:.3f} | "
          + (f"{100 * tflops / peak:.1f}%" if peak else "n/a") + " | "
          + (f"{peak_mem / 2**30:.2f} GiB" if peak_mem is not None else "n/a") + " |")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(row, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
