"""DDFM throughput: seconds per TNO-sized pair (576x768) for 100 DDIM+EM steps, per prior, and the
authors' algorithm in PyTorch in the same run.

  python benchmarks/ddfm_throughput.py                                    # all rows, CPU-sized
  python benchmarks/ddfm_throughput.py --rows jax-sr3 --size 576x768 --timed-steps 10   # a GPU run
  python benchmarks/ddfm_throughput.py --rows jax-guided,torch-guided --size 256x256 --timed-steps 1
  python benchmarks/ddfm_throughput.py --rows torch-guided,jax-guided --guided-config configs/ddfm_tiny.py \
      --size 64x64 --timed-steps 10 --iters 3     # implementations compared on the golden tiny prior

Rows (random weights: speed does not depend on the values):
  jax-sr3        DDFM sampling with the DMFuse UNet (configs/dmfuse_quarter.py, 24.5 M) as prior
  jax-guided     DDFM with the authors' prior: OpenAI's 256x256 uncond config (552.8 M), float32
  torch-guided   the same algorithm in PyTorch (tests/torch_references/ddfm.py, which reproduces
                 the authors' golden vectors), float32, on the CPU
Each JAX row compiles `sample_chunk` for `--timed-steps` steps, runs it once to warm up, then times
`--iters` runs; torch runs one step to warm up and times `--timed-steps` steps. A full 100-step
sampling costs 100 x (time per step): the figure printed for 100 steps is that product (steps of
DDIM cost the same whatever t is). When --size is not 576x768 the per-pair figure is scaled by the
pixel ratio too, and marked as an extrapolation (attention grows faster than the pixel count, so
it underestimates the full-size prior's cost).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TNO = (576, 768)


def _jax_row(kind: str, hw, timed_steps: int, iters: int, dtype: str, guided_config: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.ddfm.sampler import Sampler, jitted_chunk
    from dmfuse_jax.diffusion.respace import named_beta_schedule, respaced_tables

    h, w = hw
    if kind == "sr3":
        from dmfuse_jax.models.builders import build_schedule, build_unet
        config = load_config(str(ROOT / "configs" / "dmfuse_quarter.py"))
        module = build_unet(config, dtype)
        betas = build_schedule(config).betas
        cond = jnp.zeros((1,))
        prior = "sr3"
    else:
        from dmfuse_jax.ddfm.config import build_guided_unet
        config = load_config(guided_config)
        module = build_guided_unet(config.model, dtype)
        betas = named_beta_schedule("linear", 1000)
        cond = jnp.zeros((1,))
        prior = "guided_diffusion"
    t0 = time.perf_counter()
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, module.in_channels)), cond)["params"]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    init_s = time.perf_counter() - t0
    sampler = Sampler(module, prior, respaced_tables(betas, "100"))
    I = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, h, w)), jnp.float32)
    V = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, h, w)), jnp.float32)
    carry = sampler.init(jax.random.normal(jax.random.PRNGKey(3407), (1, h, w, module.in_channels)), I)
    t0 = time.perf_counter()
    fn = jitted_chunk(sampler, timed_steps).lower(params, carry, I, V, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(fn(params, carry, I, V, jnp.int32(0)))  # warm-up
    times, cpu = [], []
    for i in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(params, carry, I, V, jnp.int32(timed_steps * (i + 1) % 100)))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    del params, fn
    gc.collect()
    best = min(range(iters), key=lambda i: times[i])
    return dict(params=int(n_params), init_s=init_s, compile_s=compile_s,
                s_per_step=times[best] / timed_steps, cpu_s_per_step=cpu[best] / timed_steps,
                s_per_step_runs=[t / timed_steps for t in times])


def _torch_row(hw, timed_steps: int, threads: int | None, guided_config: str) -> dict:
    import numpy as np
    import torch

    from dmfuse_jax.config_lib import load_config
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from torch_references import ddfm as ref
    from dmfuse_jax.diffusion.respace import named_beta_schedule, respaced_tables

    if threads:
        torch.set_num_threads(threads)
    h, w = hw
    config = load_config(guided_config)
    torch.manual_seed(0)
    model = ref.UNetModel(**dict(config.model)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    tables = respaced_tables(named_beta_schedule("linear", 1000), "100")
    I = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 1, h, w)).astype(np.float32))
    V = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (1, 1, h, w)).astype(np.float32))
    x = torch.randn(1, 3, h, w)
    # the last (timed_steps + 1) steps of the 100-step schedule: one warm-up step, then the timed ones
    k = timed_steps + 1
    with torch.no_grad():
        t0 = time.perf_counter()
        ref.ddim_em_sample(model, x, I, V, tables.timestep_map[:1], tables.alphas_cumprod[:1])
        warm = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        ref.ddim_em_sample(model, x, I, V, tables.timestep_map[1:k], tables.alphas_cumprod[1:k])
        s = (time.perf_counter() - t0) / timed_steps
        c = (time.process_time() - c0) / timed_steps
    del model
    gc.collect()
    return dict(params=int(n_params), warmup_step_s=warm, s_per_step=s, cpu_s_per_step=c,
                torch_threads=torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="jax-sr3,jax-guided,torch-guided")
    p.add_argument("--size", default="576x768", help="HxW sampled (default: %(default)s, TNO)")
    p.add_argument("--guided-size", default=None, help="HxW for the guided rows (default: --size)")
    p.add_argument("--guided-config", default=str(ROOT / "configs" / "ddfm_openai256.py"),
                   help="DDFM config of the guided rows (default: the authors' prior, OpenAI 256x256 uncond)")
    p.add_argument("--timed-steps", type=int, default=2, help="steps per timed run (default: %(default)s)")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="JAX rows' prior dtype")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import jax

    from dmfuse_jax.data.images import write_text_atomic

    def hw(s):
        h, w = (int(v) for v in s.lower().split("x"))
        return h, w

    load = os.getloadavg()
    report = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                  cpu_count=os.cpu_count(), loadavg_start=load, timed_steps=args.timed_steps, rows={})
    print(f"device {report['device']} ({report['backend']}), load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
          flush=True)
    for row in [r for r in args.rows.split(",") if r]:
        size = hw(args.guided_size or args.size) if row.endswith("guided") else hw(args.size)
        if row == "jax-sr3":
            r = _jax_row("sr3", size, args.timed_steps, args.iters, args.dtype, args.guided_config)
        elif row == "jax-guided":
            r = _jax_row("guided", size, args.timed_steps, args.iters, args.dtype, args.guided_config)
        elif row == "torch-guided":
            r = _torch_row(size, args.timed_steps, args.torch_threads, args.guided_config)
        else:
            raise SystemExit(f"unknown row {row!r}")
        scale = TNO[0] * TNO[1] / (size[0] * size[1])
        r.update(size=f"{size[0]}x{size[1]}", s_per_100_steps_at_size=100 * r["s_per_step"],
                 s_per_tno_pair_100_steps=100 * r["s_per_step"] * scale, extrapolated_from_size=scale != 1.0,
                 loadavg_end=os.getloadavg())
        report["rows"][row] = r
        est = " (extrapolated by pixel count)" if scale != 1.0 else ""
        print(f"{row}: {r['params']:,} params, {r['size']}: {r['s_per_step']:.3f} s/step "
              f"({r['cpu_s_per_step']:.3f} CPU s/step) -> "
              f"{r['s_per_tno_pair_100_steps']:.1f} s per TNO pair for 100 steps{est}", flush=True)
    if "jax-guided" in report["rows"] and "torch-guided" in report["rows"]:
        a, b = report["rows"]["jax-guided"], report["rows"]["torch-guided"]
        if a["size"] == b["size"]:
            report["jax_vs_torch_speedup"] = b["s_per_step"] / a["s_per_step"]
            report["jax_vs_torch_cpu_time_ratio"] = b["cpu_s_per_step"] / a["cpu_s_per_step"]
            print(f"JAX vs the PyTorch reference (same prior, size, run): {report['jax_vs_torch_speedup']:.2f}x "
                  f"wall, {report['jax_vs_torch_cpu_time_ratio']:.2f}x CPU time")
    print(json.dumps(report, indent=1))
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
