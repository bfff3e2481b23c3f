"""Training throughput: images/s and model FLOP utilisation (MFU) of one train step, per stage.

  python benchmarks/train_throughput.py --stage both --width 32 --batch 16 --dtype bfloat16
  python benchmarks/train_throughput.py --stage pretrain --width 8 --batch 8 --size 64   # CPU

The step is the real one (`Trainer.train_step`: forward, backward, Adam, EMA) on a synthetic batch
that is already on the devices, so the figure is the model's, not the input pipeline's. FLOPs come
from the analytic count of the step (`dmfuse_jax.flops.train_step`: convolutions and matmuls of
forward and backward as traced, 2 per multiply-add; the same on every backend, where XLA's cost
analysis misses cuDNN convolutions on GPU; XLA's figure is kept in the JSON); MFU = FLOPs / step
time / peak. The peak comes from
a small table by device kind (dense bf16 for bfloat16, fp32 otherwise; per device, times the device
count) or from --peak-tflops. Unknown devices (CPUs) print MFU only with --peak-tflops.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense peak TFLOP/s per device: (bf16, fp32). Vendor datasheet figures (SXM parts, no sparsity).
PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L4": (121.0, 30.3),
    "TPU v4": (275.0, 275.0 / 2),
    "TPU v5 lite": (197.0, 197.0 / 2),
    "TPU v5e": (197.0, 197.0 / 2),
    "TPU v5p": (459.0, 459.0 / 2),
    "TPU v6 lite": (918.0, 918.0 / 2),
}

CONFIGS = {"pretrain": "configs/coco_pretrain.py", "fusion": "configs/tno_fusion.py"}


def peak_for(device_kind: str, dtype: str) -> float | None:
    for name, (bf16, fp32) in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def measure(stage_name: str, args) -> dict:
    import jax
    import numpy as np

    from dmfuse_jax import compilation, flops as flop_count
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.training.train import build_stage
    from dmfuse_jax.training.trainer import Trainer

    overrides = [f"model.unet.inner_channels={args.width}", f"model.dtype={args.dtype}",
                 f"batch_size={args.batch}", "init.unet_workdir=" if stage_name == "fusion" else "seed=0"]
    if args.groups:
        overrides.append(f"model.unet.norm_groups={args.groups}")
    if stage_name == "pretrain":
        overrides.append(f"model.unet.image_size={args.size}")
    else:
        overrides.append(f"data.patch_size={args.size}")
    config = load_config(os.path.join(ROOT, CONFIGS[stage_name]), overrides)
    import warnings
    warnings.filterwarnings("ignore", message="init.unet_workdir and init.unet_torch are empty")
    stage = build_stage(config)
    trainer = Trainer(config, stage, total_steps=1000)
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    batch = {k: np.clip(rng.normal(0, 0.5, v.shape), -1, 1).astype(np.float32) if v.dtype == np.float32
             else np.zeros(v.shape, v.dtype) for k, v in stage.example_batch(args.batch).items()}
    batch = trainer.place(batch)
    t0 = time.perf_counter()
    step = trainer.compile()
    compile_s = time.perf_counter() - t0
    xla_flops = flop_count.xla_flops(step)
    flops = flop_count.train_step(config).total
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    dt = (time.perf_counter() - t0) / args.steps
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or peak_for(kind, args.dtype)
    n_dev = jax.device_count()
    achieved = flops / dt / 1e12
    return dict(stage=stage_name, device=f"{n_dev}x {kind}", width=args.width, batch=args.batch, size=args.size,
                dtype=args.dtype, compile_s=compile_s, step_ms=dt * 1e3, images_per_s=args.batch / dt,
                gflop_per_step=flops / 1e9, flop_count="analytic (dmfuse_jax.flops)",
                xla_gflop_per_step=xla_flops / 1e9, tflops=achieved,
                mfu=(achieved / (peak * n_dev)) if peak else None, peak=peak, jax=jax.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                xla_compiler_options=compilation.compiler_options())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("pretrain", "fusion", "both"), default="both")
    p.add_argument("--width", type=int, default=32, help="UNet inner channels (paper's 1/4 model: 32)")
    p.add_argument("--groups", type=int, default=0, help="GroupNorm groups (default: the config's, 32; "
                                                           "use <= width for tiny widths)")
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--size", type=int, default=256, help="image / patch size")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device for MFU")
    p.add_argument("--json", help="also write the figures to this JSON file (atomically)")
    args = p.parse_args(argv)
    stages = ["pretrain", "fusion"] if args.stage == "both" else [args.stage]
    rows = []
    for s in stages:
        r = measure(s, args)
        rows.append(r)
        mfu = f"{100 * r['mfu']:.1f}% of {r['peak']:g} TFLOP/s/device" if r["mfu"] is not None else \
            "n/a (unknown peak: pass --peak-tflops)"
        print(f"{r['stage']:8s} {r['device']}  width {r['width']}  batch {r['batch']}  {r['size']}x{r['size']}  "
              f"{r['dtype']}: {r['step_ms']:.1f} ms/step, {r['images_per_s']:.1f} images/s, "
              f"{r['gflop_per_step']:.1f} GFLOP/step, {r['tflops']:.3f} TFLOP/s, MFU {mfu} "
              f"(compile {r['compile_s']:.1f} s; XLA compile options {r['xla_compiler_options']})", flush=True)
    if args.json:
        from dmfuse_jax.data.images import write_text_atomic
        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
