"""What XLA compiles for one fused pair and one training step: HBM traffic ('bytes accessed' of the
compiled program's cost analysis), FLOPs (analytic and XLA's) and instruction counts by kind. Compile
only, nothing runs, so it works for any size on any backend; compare two checkouts by running it
with each on PYTHONPATH.

  python benchmarks/hlo_stats.py --width 8 --dtype bfloat16                 # TNO-sized pair + pretrain step
  PYTHONPATH=/tmp/before python benchmarks/hlo_stats.py --width 8 --json before.json
  python benchmarks/hlo_stats.py --parts blocks --width 8 --dtype bfloat16   # old vs new form, one run

Instruction counts come from the optimised HLO text (`compiled.as_text()`): top-level fusions by
kind, convolutions, standalone concatenates, and everything else per opcode; a fusion is one
kernel, so fewer instructions and fewer bytes accessed mean fewer passes over memory.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hlo_counts(text: str) -> dict:
    """Instruction counts of the ENTRY computation and of non-fused sub-computations (while/call
    bodies), i.e. the kernels that run; fusion bodies are not counted."""
    counts: collections.Counter = collections.Counter()
    fused = False
    for line in text.splitlines():
        if line and not line.startswith(" "):  # a computation header
            fused = line.lstrip("ENTRY ").startswith("%fused") or "fused_computation" in line.split("(")[0]
            continue
        if fused or "=" not in line:
            continue
        m = re.search(r"=\s*\S+\s+(\w[\w-]*)\(", line)
        if not m:
            continue
        op = m.group(1)
        if op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
            continue
        if op == "fusion":
            kind = re.search(r"kind=(\w+)", line)
            op = f"fusion:{kind.group(1) if kind else '?'}"
        counts[op] += 1
    return dict(sorted(counts.items()))


def stats(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    counts = hlo_counts(compiled.as_text())
    return dict(bytes_accessed=float(cost.get("bytes accessed", float("nan"))),
                xla_flops=float(cost.get("flops", float("nan"))),
                temp_bytes=getattr(mem, "temp_size_in_bytes", None),
                instructions=sum(counts.values()), counts=counts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--size", default="576x768", help="HxW of the fused pair (default: TNO)")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--parts", default="fuse,pretrain", help="comma list of fuse, pretrain, fusion, blocks "
                                                              "(same-run A/B of the GroupNorm rewrite)")
    p.add_argument("--json")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from dmfuse_jax import compilation, config_lib
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.models import build_dmfuse

    h, w = (int(s) for s in args.size.lower().split("x"))
    rows = {}
    if "fuse" in args.parts:
        config = config_lib.base_config(width=args.width, norm_groups=min(32, args.width))
        model = build_dmfuse(config, args.dtype)
        img = jax.ShapeDtypeStruct((1, h, w, 1), jnp.float32)
        keys = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(0)}
        params = jax.eval_shape(lambda a: model.init(keys, a, a, method=model.init_all), img)
        fn = compilation.jit(lambda p, a, b: model.apply(p, a, b, rngs={"noise": jax.random.PRNGKey(0)}))
        t = time.perf_counter()
        rows["fuse"] = dict(stats(fn.lower(params, img, img).compile()), compile_s=time.perf_counter() - t,
                            what=f"fuse one {h}x{w} pair, width {args.width}, {args.dtype}")
    for stage in ("pretrain", "fusion"):
        if stage not in args.parts:
            continue
        from dmfuse_jax.training.train import build_stage
        from dmfuse_jax.training.trainer import Trainer

        path = ROOT / "configs" / ("coco_pretrain.py" if stage == "pretrain" else "tno_fusion.py")
        overrides = [f"model.unet.inner_channels={args.width}", f"model.unet.norm_groups={min(32, args.width)}",
                     f"model.dtype={args.dtype}", f"batch_size={args.train_batch}"]
        overrides += ([f"model.unet.image_size={args.train_size}"] if stage == "pretrain"
                      else [f"data.patch_size={args.train_size}", "init.unet_workdir="])
        config = load_config(str(path), overrides)
        import warnings
        warnings.filterwarnings("ignore", message="init.unet_workdir and init.unet_torch are empty")
        st = build_stage(config)
        t = time.perf_counter()
        compiled = Trainer(config, st, total_steps=1000).compile()
        rows[stage] = dict(stats(compiled), compile_s=time.perf_counter() - t,
                           what=f"{stage} step, width {args.width}, batch {args.train_batch}, "
                                f"{args.train_size}x{args.train_size}, {args.dtype}")
    if "blocks" in args.parts:
        # Same-run A/B of the GroupNorm rewrite on one decoder level's tensors (six UNet passes at 1/4
        # of a TNO pair, width-8 channels x 8): flax's nn.GroupNorm vs the one-pass one, compiled and timed.
        import flax.linen as nn
        import numpy as np

        from dmfuse_jax.models.unet import GroupNorm

        dt = jnp.dtype(args.dtype)
        b, hh, ww, c = 6, h // 4, w // 4, 8 * args.width
        key = jax.random.PRNGKey(0)
        x = jax.random.normal(key, (b, hh, ww, c)).astype(dt)
        groups = min(32, args.width)
        flax_gn = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dt)
        ours_gn = GroupNorm(num_groups=groups, dtype=dt)
        gn_params = flax_gn.init(key, x)
        cases = {
            "groupnorm_silu_flax": (lambda p, x: nn.swish(flax_gn.apply(p, x)), (gn_params, x)),
            "groupnorm_silu_one_pass": (lambda p, x: nn.swish(ours_gn.apply(p, x)), (gn_params, x)),
        }
        for name, (fn, fargs) in cases.items():
            t = time.perf_counter()
            compiled = compilation.jit(fn).lower(*fargs).compile()
            row = dict(stats(compiled), compile_s=time.perf_counter() - t,
                       what=f"{name}, ({b}, {hh}, {ww}, {c}) {args.dtype}")
            jax.block_until_ready(compiled(*fargs))
            times, cpu = [], []
            for _ in range(5):
                t, tc = time.perf_counter(), time.process_time()
                jax.block_until_ready(compiled(*fargs))
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - tc)
            row.update(median_ms=1e3 * float(np.median(times)), median_cpu_ms=1e3 * float(np.median(cpu)))
            rows[name] = row
    for name, r in rows.items():
        print(f"{r['what']}: bytes accessed {r['bytes_accessed'] / 2**30:.3f} GiB, XLA flops "
              f"{r['xla_flops'] / 1e9:.1f} G, temp {(r['temp_bytes'] or 0) / 2**30:.3f} GiB, "
              f"{r['instructions']} instructions (compile {r['compile_s']:.1f} s)"
              + (f"; run {r['median_ms']:.1f} ms wall, {r['median_cpu_ms']:.1f} ms process CPU (median of 5)"
                 if "median_ms" in r else ""))
        print("   " + ", ".join(f"{k} {v}" for k, v in r["counts"].items()))
    if args.json:
        meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), backend=jax.default_backend(),
                    jax=jax.__version__, xla_compiler_options=compilation.compiler_options())
        from dmfuse_jax.data.images import write_text_atomic
        write_text_atomic(Path(args.json), json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
