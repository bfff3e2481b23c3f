"""DMFuse inference, ours (JAX) against the same model in PyTorch, in one process on one device.

  python benchmarks/compare_torch.py --json compare_torch.json            # GPU: paper sizes, width 32
  python benchmarks/compare_torch.py --small --json compare_torch_cpu.json  # CPU: a few minutes

Variants (--variants picks a subset):
  torch_eager_fp32   the PyTorch reference (`tests/torch_references/dmfuse.py`) in eager mode,
                     float32, the SR3 einsum self-attention as the authors ship it
  torch_compile_bf16 the same weights, `torch.compile` + `torch.autocast(bfloat16)`,
                     F.scaled_dot_product_attention (the strongest PyTorch setting we know)
  ours_fp32          `build_dmfuse(config)` jitted with `dmfuse_jax.compilation.jit`, float32
  ours_bf16          the same params with config.model.dtype = 'bfloat16'
  ours_fp32_xla_defaults  ours_fp32 compiled by plain `jax.jit` (XLA's default options); in the
                     default list only where dmfuse sets compile options (CPU), to show what they buy
Cases (--cases HxWxB,...): default 576x768x1 (a TNO pair), 256x256x1 and 256x256x16.

Weights: the PyTorch model is initialised (seed 0) and converted to our params with the project's
converter; at width 32 the released fusion head is loaded (--head-weights). Before timing, every
case is checked: ours float32 vs PyTorch eager float32 on the same noise with TF32 off on both
sides (max |diff| must be below --tol, else exit 1). Timing: --warmup calls (the first one compiles;
its time is reported as first_call_s), then the median of --iters calls, each synchronised
(`block_until_ready` / `torch.cuda.synchronize`). Every timed call includes the noise sampling and
the whole forward pass, per pair of images. Prints a markdown table; --json writes all figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# Two frameworks share one GPU: JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# PyTorch's OpenMP threads spin-wait by default; on a CPU shared with other processes that turns a
# 0.1 s forward into seconds (measured on the 2-core CI machine). Passive waiting only helps PyTorch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dmfuse_jax import compilation  # noqa: E402
from dmfuse_jax.data.images import write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HEAD = ROOT.parent / "shared" / "weights" / "dmfuse_fusion_head.pth"
VARIANTS = ("torch_eager_fp32", "torch_compile_bf16", "ours_fp32", "ours_bf16", "ours_fp32_xla_defaults")
# ours_fp32_xla_defaults only differs from ours_fp32 where dmfuse sets XLA compile options (CPU)
DEFAULT_VARIANTS = VARIANTS if compilation.compiler_options() else VARIANTS[:4]
FULL_CASES = "576x768x1,256x256x1,256x256x16"
SMALL_CASES = "144x192x1,64x64x1,64x64x16"


def parse_cases(text: str) -> list[tuple[int, int, int]]:
    cases = []
    for item in text.split(","):
        try:
            h, w, b = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise SystemExit(f"--cases: {item!r} is not HxWxB (e.g. 576x768x1)") from None
        cases.append((h, w, b))
    return cases


def device_description() -> dict:
    d = jax.devices()[0]
    info = dict(backend=jax.default_backend(), device_kind=d.device_kind, n_jax_devices=len(jax.devices()))
    if info["backend"] == "cpu":
        try:
            names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
            info["cpu"] = f"{names[0]} ({os.cpu_count()} logical cores)" if names else platform.processor()
        except OSError:
            info["cpu"] = platform.processor()
    return info


def versions() -> dict:
    import flax
    import jaxlib
    import torch
    return dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                flax=flax.__version__, torch=torch.__version__,
                cuda_torch=torch.version.cuda if torch.cuda.is_available() else None)


def timed(fn, warmup: int, iters: int) -> dict:
    """fn() runs one synchronised call. Returns first-call time and the median of `iters` calls."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return dict(first_call_s=first, median_s=float(np.median(times)), min_s=float(np.min(times)),
                iters=iters)


# ----------------------------------------------------------------------------------------------
# Runners: make(ir, vi) -> a zero-argument function that runs one synchronised fused forward.

class TorchRunner:
    def __init__(self, model, device, *, bf16: bool, compile_mode: str | None):
        import torch
        self.torch, self.device, self.bf16 = torch, device, bf16
        self.model = model
        self.fn = torch.compile(model, mode=compile_mode, dynamic=False) if compile_mode else model
        self.gen = torch.Generator(device=device).manual_seed(0)

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def make(self, ir: np.ndarray, vi: np.ndarray):
        torch = self.torch
        a = torch.as_tensor(ir).permute(0, 3, 1, 2).contiguous().to(self.device)
        b = torch.as_tensor(vi).permute(0, 3, 1, 2).contiguous().to(self.device)

        def run():
            with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                out = self.fn(a, b, generator=self.gen)
            self.sync()
            return out
        return run

    def reset_peak(self):
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self):
        return int(self.torch.cuda.max_memory_allocated()) if self.device.type == "cuda" else None


class JaxRunner:
    def __init__(self, config, params, dtype: str, *, xla_defaults: bool = False):
        from dmfuse_jax.models import build_dmfuse
        model = build_dmfuse(config, dtype)
        self.params = jax.device_put(params)
        fuse = lambda p, a, b, key: model.apply(p, a, b, rngs={"noise": key})  # noqa: E731
        # xla_defaults: plain jax.jit, without dmfuse's compile options (to measure what they buy)
        self.fuse = jax.jit(fuse) if xla_defaults else compilation.jit(fuse)
        self.key = jax.random.PRNGKey(0)

    def make(self, ir: np.ndarray, vi: np.ndarray):
        a, b = jax.device_put(ir), jax.device_put(vi)
        return lambda: jax.block_until_ready(self.fuse(self.params, a, b, self.key))

    def reset_peak(self):
        pass  # JAX keeps a process-wide peak only

    def peak_bytes(self):
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")


# ----------------------------------------------------------------------------------------------


def check_equal(config, params, torch_model, device, ir, vi) -> float:
    """Max |ours fp32 - PyTorch eager fp32| on the same noise, full-precision matmuls/convs both sides."""
    import torch

    from dmfuse_jax.models import build_dmfuse

    jm = build_dmfuse(config, "float32")
    key = jax.random.PRNGKey(1)

    def fuse_and_noise(p, a, b):
        fused = jm.apply(p, a, b, rngs={"noise": key})
        noisy = jm.apply(p, a, b, rngs={"noise": key}, method=jm.diffusion_inputs)  # the same noise
        return fused, noisy

    with jax.default_matmul_precision("highest"):
        fused, (x_t, g) = compilation.jit(fuse_and_noise)(params, ir, vi)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        nchw = lambda x: torch.as_tensor(np.array(x)).permute(0, 3, 1, 2).contiguous().to(device)
        with torch.inference_mode():
            out = torch_model(nchw(ir), nchw(vi), noisy=(nchw(x_t), torch.as_tensor(np.array(g)).to(device)))
        out = out.permute(0, 2, 3, 1).float().cpu().numpy()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return float(np.max(np.abs(out - np.asarray(fused))))


def build_models(args):
    import torch

    from dmfuse_jax import config_lib
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from torch_references import dmfuse as tr

    config = config_lib.base_config(width=args.width, norm_groups=min(32, args.width))
    config.model.head.caim_impl = args.caim_impl
    config.model.unet.attention_impl = args.attention_impl
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    eager = tr.build_torch_dmfuse(config, attention="einsum")
    head_source = "random (torch default init), CAIM gamma = 1"
    if args.head_weights and args.width == 32 and Path(args.head_weights).is_file():
        sd = torch.load(args.head_weights, map_location="cpu", weights_only=True)
        eager.head.load_state_dict(sd, strict=True)
        head_source = f"released ({Path(args.head_weights).name})"
    else:
        with torch.no_grad():
            eager.head.crossatten.gamma.fill_(1.0)
    params = tr.to_flax_params(eager, config)
    sdpa = tr.build_torch_dmfuse(config, attention="sdpa")
    sdpa.load_state_dict(eager.state_dict(), strict=True)
    return config, params, eager.to(device).eval(), sdpa.to(device).eval(), device, head_source


def markdown_table(results: list[dict], variants: list[str]) -> str:
    head = "| case (HxW, batch) | " + " | ".join(f"{v} ms/pair" for v in variants)
    ratio_cols = [("torch_eager_fp32", "ours_bf16"), ("torch_compile_bf16", "ours_bf16"),
                  ("torch_eager_fp32", "ours_fp32"), ("torch_compile_bf16", "ours_fp32"),
                  ("ours_fp32_xla_defaults", "ours_fp32")]
    ratio_cols = [(a, b) for a, b in ratio_cols if a in variants and b in variants]
    head += "".join(f" | {b} speed-up vs {a}" for a, b in ratio_cols) + " | max abs diff (fp32) |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        cells = [f"{r['height']}x{r['width']}, {r['batch']}"]
        cells += [f"{r['variants'][v]['ms_per_pair']:.2f}" if v in r["variants"] else "-" for v in variants]
        cells += [f"{r['ratios'][f'{b}_vs_{a}']:.2f}x" for a, b in ratio_cols]
        cells.append(f"{r['check_max_abs_diff']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true",
                    help=f"CPU preset: width 8 and cases {SMALL_CASES} (unless given explicitly)")
    ap.add_argument("--width", type=int, help="UNet inner channels (default 32, the paper's 1/4 model; --small: 8)")
    ap.add_argument("--cases", help=f"HxWxB list (default {FULL_CASES}; --small: {SMALL_CASES})")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="comma list of " + ", ".join(VARIANTS) + " (default: %(default)s)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-4, help="max |ours - PyTorch| (fp32) before timing")
    ap.add_argument("--head-weights", default=str(DEFAULT_HEAD), help="released head (used at width 32)")
    ap.add_argument("--caim-impl", default="auto", choices=("auto", "reference", "pallas"))
    ap.add_argument("--attention-impl", default="xla", choices=("xla", "chunked", "cudnn"))
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    ap.add_argument("--json", help="write all figures to this JSON file")
    args = ap.parse_args(argv)
    args.width = args.width or (8 if args.small else 32)
    cases = parse_cases(args.cases or (SMALL_CASES if args.small else FULL_CASES))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown} (expected some of {list(VARIANTS)})")

    import torch
    torch.backends.cudnn.benchmark = True

    config, params, eager, sdpa, device, head_source = build_models(args)
    makers = {
        "torch_eager_fp32": lambda: TorchRunner(eager, device, bf16=False, compile_mode=None),
        "torch_compile_bf16": lambda: TorchRunner(sdpa, device, bf16=True, compile_mode=args.compile_mode),
        "ours_fp32": lambda: JaxRunner(config, params, "float32"),
        "ours_bf16": lambda: JaxRunner(config, params, "bfloat16"),
        "ours_fp32_xla_defaults": lambda: JaxRunner(config, params, "float32", xla_defaults=True),
    }
    runners = {v: makers[v]() for v in variants}
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **device_description(),
                versions=versions(), torch_device=str(device), torch_threads=torch.get_num_threads(),
                width=args.width, head=head_source, caim_impl=args.caim_impl,
                attention_impl=args.attention_impl, compile_mode=args.compile_mode,
                iters=args.iters, warmup=args.warmup, cudnn_benchmark=True,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                xla_compiler_options=compilation.compiler_options(), xla_flags=os.environ.get("XLA_FLAGS"),
                load_avg_1min_start=os.getloadavg()[0])
    print(f"# DMFuse ours vs PyTorch: width {args.width}, {meta['device_kind']} ({meta['backend']}), "
          f"{meta.get('cpu', '')} {meta['date']}; XLA compile options {meta['xla_compiler_options']}", flush=True)

    results = []
    rng = np.random.default_rng(0)
    for h, w, b in cases:
        ir = rng.uniform(-1, 1, (b, h, w, 1)).astype(np.float32)
        vi = rng.uniform(-1, 1, (b, h, w, 1)).astype(np.float32)
        nb = min(b, 2)
        diff = check_equal(config, params, eager, device, ir[:nb], vi[:nb])
        print(f"{h}x{w} batch {b}: ours fp32 vs PyTorch eager fp32 max |diff| = {diff:.2e}", flush=True)
        if not diff <= args.tol:
            print(f"error: outputs differ by {diff:.2e} > --tol {args.tol:.1e}; not timing", file=sys.stderr)
            return 1
        row = dict(height=h, width=w, batch=b, check_max_abs_diff=diff, variants={}, ratios={})
        for name, runner in runners.items():
            runner.reset_peak()
            t = timed(runner.make(ir, vi), args.warmup, args.iters)
            t.update(ms_per_pair=1e3 * t["median_s"] / b, pairs_per_s=b / t["median_s"],
                     peak_bytes=runner.peak_bytes())
            row["variants"][name] = t
            print(f"  {name:20s} {t['ms_per_pair']:10.2f} ms/pair {t['pairs_per_s']:9.2f} pairs/s "
                  f"(first call {t['first_call_s']:.1f} s)", flush=True)
        for a in ("torch_eager_fp32", "torch_compile_bf16", "ours_fp32_xla_defaults"):
            for o in ("ours_fp32", "ours_bf16"):
                if a in row["variants"] and o in row["variants"]:
                    row["ratios"][f"{o}_vs_{a}"] = row["variants"][a]["median_s"] / row["variants"][o]["median_s"]
        results.append(row)

    meta["load_avg_1min_end"] = os.getloadavg()[0]
    print(f"\nload average (1 min) at start {meta['load_avg_1min_start']:.2f}, at end {meta['load_avg_1min_end']:.2f} "
          f"(on a shared CPU, other processes' load distorts the figures)")
    print(markdown_table(results, variants))
    if args.json:
        write_text_atomic(args.json, json.dumps(dict(meta=meta, cases=results), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
