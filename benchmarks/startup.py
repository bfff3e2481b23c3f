"""Start-up of `dmfuse fuse` (and of a resumed `dmfuse train`), cold and warm, split into phases.

  python benchmarks/startup.py [--tno-only] [--no-train] [--json OUT.json]

Folders, each fused by fresh `dmfuse fuse` processes with the bundled default model:
- `samples`: the README's 3 sample pairs (256x256 and 360x270: 2 buckets);
- `tno6`: TNO pairs 07, 19, 24, 06, 05, 08 (six sizes, merged into 3 buckets).

Per folder, in one empty cache folder (`--compilation-cache DIR`), three runs:
1. `cold`: nothing cached: trace, lower and XLA compile every bucket;
2. `warm, JAX cache only`: `DMFUSE_EXECUTABLE_CACHE=off`, so JAX's persistent cache serves the
   compile but every bucket is still traced and lowered and the model's init traced (the start-up
   before issue 24);
3. `warm`: dmfuse's executable cache loads the executables without tracing.
The phases are the command's own (`--timings-json`): imports, inputs (decode and check every image),
bundle (read, verify and place the params), executables (all buckets' executables and their memory
plan), first batch (until the first batch's PNGs are written). "model+exe" = bundle + executables: the
compile/load phase. The fused PNGs of all runs are compared byte for byte.

Then the bundle alone: bytes read, read + sha256, the flat (version 3) load, and the same params
through orbax (a version 2 bundle written here). With training: `dmfuse train` resuming a quickstart
workdir for one more step, cold and warm (the trainer's own start-up line).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TNO6 = ("07", "19", "24", "06", "05", "08")
PHASES = ("imports", "inputs", "bundle", "executables", "first batch")


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # quiets libtpu's probe where it is installed
    env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    env.update(extra)
    return env


def fuse_run(ir: Path, vi: Path, out: Path, cache: Path, **env) -> dict:
    timings = out.parent / f"{out.name}.json"
    cmd = [sys.executable, "-m", "dmfuse_jax", "fuse", "--ir", str(ir), "--vis", str(vi), "--out", str(out),
           "--no-progress", "--compilation-cache", str(cache), "--timings-json", str(timings)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=_env(**env), cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"dmfuse fuse failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    row = json.loads(timings.read_text())
    row["wall"] = wall
    row["digest"] = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.glob("*.png")))).hexdigest()
    row["load"] = os.getloadavg()[0]
    return row


def folder_table(name: str, ir: Path, vi: Path, work: Path) -> list[dict]:
    cache = work / f"cache-{name}"
    rows = []
    for label, env in (("cold", {}), ("warm, JAX cache only", {"DMFUSE_EXECUTABLE_CACHE": "off"}), ("warm", {})):
        row = fuse_run(ir, vi, work / f"{name}-{len(rows)}", cache, **env)
        row["run"], row["folder"] = label, name
        rows.append(row)
    print(f"\n{name}: {rows[0]['counts']['pairs']} pairs, {rows[0]['counts']['buckets']} buckets")
    print("| run | " + " | ".join(PHASES) + " | model+exe | compiled | loaded | to first batch | wall | load avg |")
    print("|---" * (len(PHASES) + 7) + "|")
    for r in rows:
        s = r["seconds"]
        model_exe = s.get("bundle", 0) + s.get("executables", 0)
        first = sum(s.get(k, 0) for k in PHASES)
        print(f"| {r['run']} | " + " | ".join(f"{s.get(k, 0):.2f}" for k in PHASES) +
              f" | **{model_exe:.2f}** | {r['counts']['compiled']} | {r['counts']['loaded']} | {first:.2f} | "
              f"{r['wall']:.1f} | {r['load']:.1f} |")
    same = len({r["digest"] for r in rows}) == 1
    print(f"fused PNGs identical in all three runs: {same}")
    if not same:
        raise SystemExit("cold and warm runs differ")
    return rows


def bundle_table(work: Path) -> dict:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from dmfuse_jax.inference import bundle as bundle_lib
    from dmfuse_jax.inference.checkpoints import DEFAULT_BUNDLE

    def best(fn, n=5):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    path = Path(DEFAULT_BUNDLE) / bundle_lib.PARAMS_FILE
    read_s, data = best(lambda: path.read_bytes())
    hash_s, _ = best(lambda: hashlib.sha256(path.read_bytes()).hexdigest())
    flat_s, (config, params, meta) = best(lambda: bundle_lib.load_bundle(DEFAULT_BUNDLE))
    v2 = work / "v2_params"
    tree = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(meta["param_dtype"]), params)
    ocp.PyTreeCheckpointer().save(v2.absolute(), tree)
    orbax_s, _ = best(lambda: bundle_lib.restore_params(v2, meta["arrays"]), n=3)
    print(f"\nbundle ({len(data) / 2**20:.1f} MiB, {len(meta['arrays'])} arrays, {meta['param_dtype']}), best of 5:")
    print("| read bytes | read + sha256 | flat load (v3: read, sha256 per array, float32) | orbax (v2) |")
    print("|---|---|---|---|")
    print(f"| {read_s:.3f} s | {hash_s:.3f} s | **{flat_s:.3f} s** ({flat_s / hash_s:.1f}x read+sha256, "
          f"{flat_s / read_s:.0f}x read) | {orbax_s:.3f} s ({orbax_s / flat_s:.1f}x the flat load) |")
    return dict(read_s=read_s, read_sha256_s=hash_s, flat_s=flat_s, orbax_s=orbax_s)


def train_table(work: Path) -> list[dict]:
    wd = work / "train"
    cache = work / "cache-train"
    base = [sys.executable, "-m", "dmfuse_jax", "train", "--config", str(ROOT / "configs" / "quickstart_pretrain.py"),
            "--workdir", str(wd), "--compilation-cache", str(cache), "--config.checkpoint_every_steps=1"]
    rows = []
    for i, label in enumerate(("first run (2 steps)", "resume, cold cache", "resume, warm cache")):
        if i == 1:
            shutil.rmtree(cache)
        steps = 2 + i
        t0 = time.perf_counter()
        res = subprocess.run(base + [f"--config.total_steps={steps}"], env=_env(), cwd=ROOT, capture_output=True,
                             text=True)
        wall = time.perf_counter() - t0
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("start-up ")]
        if res.returncode or not line:
            raise SystemExit(f"dmfuse train failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        rows.append(dict(run=label, line=line[-1], wall=wall, load=os.getloadavg()[0]))
    print("\ndmfuse train, configs/quickstart_pretrain.py (the trainer's start-up line):")
    for r in rows[1:]:
        print(f"- {r['run']}: {r['line']} (wall {r['wall']:.1f} s, load {r['load']:.1f})")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tno-only", action="store_true", help="skip the sample folder")
    p.add_argument("--no-train", action="store_true", help="skip the dmfuse train rows")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    import platform
    print(f"{platform.node()}: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tno = work / "tno6"
        for sub in ("ir", "vi"):
            (tno / sub).mkdir(parents=True)
            for n in TNO6:
                shutil.copy(DATA / "tno" / sub / f"{n}.png", tno / sub / f"{n}.png")
        if not args.tno_only:
            result["samples"] = folder_table("samples", ROOT / "samples" / "ir", ROOT / "samples" / "vi", work)
        result["tno6"] = folder_table("tno6", tno / "ir", tno / "vi", work)
        result["bundle"] = bundle_table(work)
        if not args.no_train:
            result["train"] = train_table(work)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
