"""Criss-cross attention (CAIM's core): the Pallas kernel against the jnp reference, time and memory.

  python benchmarks/caim_kernel.py --json caim_kernel.json                          # GPU: 128..2048
  python benchmarks/caim_kernel.py --sizes 64,128,256 --kernel-sizes 32 --json caim_cpu.json   # CPU

One call is what CAIM runs per level for one image pair: batch 2 (both directions), Cq = 4, Cv = 32,
square feature maps of the given sizes. For each size and impl: forward ('fwd') and forward +
backward ('train': value and gradients of <out, ct>). Memory: XLA's compiled memory analysis
(temporaries + arguments + outputs of the jitted call, available on every backend, also for calls too
large to run) and on GPU the device's peak_bytes_in_use after the run (process-wide, so monotone).
A call whose analysed memory exceeds the device's limit is not run and reported as 'OOM (estimated)'.
Off-GPU the kernel runs in Pallas interpret mode, which is slow and says nothing about GPU speed: keep
--kernel-sizes tiny there (it checks that the path runs end to end).

--model-sizes HxW,... also compiles (never runs) the whole fuse (DMFuse forward, one pair, width
--model-width) with each CAIM impl and dtype and reports XLA's analysed memory: the basis of the
'largest image per path' figures (on GPU: the GPU's own buffer assignment).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone

import jax
import jax.numpy as jnp
import numpy as np

from dmfuse_jax import compilation
from dmfuse_jax.data.images import write_text_atomic
from dmfuse_jax.models.criss_cross import criss_cross_reference
from dmfuse_jax.models.criss_cross_pallas import criss_cross_pallas

IMPLS = {"reference": criss_cross_reference, "pallas": criss_cross_pallas}


def make_call(impl: str, mode: str):
    fn = IMPLS[impl]
    if mode == "fwd":
        return compilation.jit(lambda q, k, v, ct: fn(q, k, v))

    def loss_and_grads(q, k, v, ct):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct),
                                  argnums=(0, 1, 2))(q, k, v)
    return compilation.jit(loss_and_grads)


def analysed_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # backend without memory analysis
        return None
    if m is None:
        return None
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
               - m.alias_size_in_bytes)


def device_limit_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def run_case(impl, mode, size, dtype, iters, warmup):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    shape = (2, size, size)
    q = (0.5 * jax.random.normal(ks[0], shape + (4,))).astype(dtype)
    k = (0.5 * jax.random.normal(ks[1], shape + (4,))).astype(dtype)
    v = jax.random.normal(ks[2], shape + (32,)).astype(dtype)
    ct = jax.random.normal(ks[3], shape + (32,))
    row = dict(impl=impl, mode=mode, size=size, dtype=jnp.dtype(dtype).name)
    t0 = time.perf_counter()
    try:
        compiled = make_call(impl, mode).lower(q, k, v, ct).compile()
    except Exception as e:  # noqa: BLE001 - report, keep going with the other sizes
        row.update(status=f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return row
    row["compile_s"] = time.perf_counter() - t0
    row["analysed_bytes"] = analysed_bytes(compiled)
    limit = device_limit_bytes()
    if limit and row["analysed_bytes"] and row["analysed_bytes"] > limit:
        row.update(status="OOM (estimated)")
        return row
    try:
        for _ in range(warmup):
            jax.block_until_ready(compiled(q, k, v, ct))
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v, ct))
            times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - e.g. RESOURCE_EXHAUSTED
        row.update(status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return row
    stats = jax.devices()[0].memory_stats() or {}
    row.update(status="ok", median_ms=1e3 * float(np.median(times)), device_peak_bytes=stats.get("peak_bytes_in_use"))
    return row


def model_memory(hw, width: int, impl: str, dtype: str) -> dict:
    """Analysed memory of the jitted whole-model fuse of one (H, W) pair; compiled, not run."""
    from dmfuse_jax import config_lib
    from dmfuse_jax.models import build_dmfuse

    config = config_lib.base_config(width=width, norm_groups=min(32, width))
    config.model.head.caim_impl = impl
    model = build_dmfuse(config, dtype)
    x = jax.ShapeDtypeStruct((1,) + hw + (1,), jnp.float32)
    keys = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(0)}
    params = jax.eval_shape(lambda a, b: model.init(keys, a, b), x, x)
    fuse = compilation.jit(lambda p, a, b: model.apply(p, a, b, rngs={"noise": jax.random.PRNGKey(0)}))
    row = dict(height=hw[0], width=hw[1], model_width=width, impl=impl, dtype=dtype)
    t0 = time.perf_counter()
    try:
        compiled = fuse.lower(params, x, x).compile()
    except Exception as e:  # noqa: BLE001
        row.update(status=f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return row
    row.update(status="ok", compile_s=time.perf_counter() - t0, analysed_bytes=analysed_bytes(compiled))
    return row


def fmt_bytes(n):
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_gpu = jax.default_backend() == "gpu"
    ap.add_argument("--sizes", default="128,256,512,1024,2048", help="square feature-map sizes (reference)")
    ap.add_argument("--kernel-sizes", default=None,
                    help="sizes for the Pallas kernel (default: --sizes on GPU, 32 elsewhere: interpret mode)")
    ap.add_argument("--modes", default="fwd,train")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--model-sizes", default="", help="HxW list: whole-model analysed memory (compile only)")
    ap.add_argument("--model-width", type=int, default=32)
    ap.add_argument("--model-impls", default="reference,pallas")
    ap.add_argument("--model-dtypes", default="float32,bfloat16")
    ap.add_argument("--skip-kernel-table", action="store_true", help="only the --model-sizes analysis")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    ksizes = [int(s) for s in (args.kernel_sizes or (args.sizes if on_gpu else "32")).split(",")]
    dtype = jnp.dtype(args.dtype)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), backend=jax.default_backend(),
                device=jax.devices()[0].device_kind, jax=jax.__version__, python=platform.python_version(),
                kernel_interpret=not on_gpu, dtype=args.dtype, batch=2, cq=4, cv=32,
                device_bytes_limit=device_limit_bytes(), xla_compiler_options=compilation.compiler_options())
    print(f"# criss-cross attention, {meta['device']} ({meta['backend']}), {args.dtype}, batch 2, "
          f"Cq 4, Cv 32, {meta['date']}" + ("  [kernel in INTERPRET mode]" if not on_gpu else ""), flush=True)
    rows, model_rows = [], []
    for mode in ([] if args.skip_kernel_table else args.modes.split(",")):
        for impl, impl_sizes in (("reference", sizes), ("pallas", ksizes)):
            for s in impl_sizes:
                r = run_case(impl, mode, s, dtype, args.iters, args.warmup)
                rows.append(r)
                print(f"  {mode:5s} {impl:9s} {s:5d}x{s:<5d} "
                      + (f"{r['median_ms']:10.3f} ms" if r.get("status") == "ok" else f"{r['status']:>13s}")
                      + f"  analysed {fmt_bytes(r.get('analysed_bytes')):>10s}"
                      + f"  device peak {fmt_bytes(r.get('device_peak_bytes'))}", flush=True)
    print("\n| mode | impl | size | ms | analysed memory | device peak (process) |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ms = f"{r['median_ms']:.3f}" if r.get("status") == "ok" else r["status"]
        print(f"| {r['mode']} | {r['impl']} | {r['size']}x{r['size']} | {ms} | {fmt_bytes(r.get('analysed_bytes'))} "
              f"| {fmt_bytes(r.get('device_peak_bytes'))} |")
    for item in filter(None, args.model_sizes.split(",")):
        hw = tuple(int(v) for v in item.lower().split("x"))
        for impl in args.model_impls.split(","):
            for dt in args.model_dtypes.split(","):
                r = model_memory(hw, args.model_width, impl, dt)
                model_rows.append(r)
                print(f"  whole fuse {hw[0]}x{hw[1]} width {args.model_width} {impl:9s} {dt:8s} "
                      f"analysed {fmt_bytes(r.get('analysed_bytes')) if r['status'] == 'ok' else r['status']}",
                      flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps(dict(meta=meta, rows=rows, model_rows=model_rows), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
