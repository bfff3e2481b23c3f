"""Input pipeline throughput: images/s of a stage's grain pipeline alone (no model, no devices), for
several `data.worker_count` values, in one run.

  python benchmarks/input_pipeline.py --config configs/coco_pretrain.py --workers 0,2,4 \
      --config.data.root=../shared/data/roadscene --config.batch_size=16
  python benchmarks/input_pipeline.py --config configs/quickstart_fusion.py --workers 0,2,4

The pipeline is the one `dmfuse train` builds (the stage's source and transform, shuffling,
batching, `train_iterator` with the config's num_threads and prefetch); each setting first takes
`--warmup` batches (worker start-up, first decodes), then times `--batches` batches.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(config, workers: int, batches: int, warmup: int, workdir: str) -> dict:
    from dmfuse_jax.data.pipeline import train_dataset, train_iterator
    from dmfuse_jax.training.train import build_stage

    stage = build_stage(config)
    source, transform = stage.train_source(workdir)
    ds = train_dataset(source, transform, seed=int(config.seed), global_batch=int(config.batch_size))
    d = config.data
    it = train_iterator(ds, num_threads=int(d.get("num_threads", 2)), prefetch=int(d.get("prefetch", 8)),
                        worker_count=workers)
    t0 = time.perf_counter()
    for _ in range(warmup):
        batch = next(it)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    dt = time.perf_counter() - t0
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    images = batches * int(config.batch_size)
    if hasattr(it, "close"):
        it.close()
    return {"stage": config.stage, "workers": workers, "images_per_s": images / dt, "batches": batches,
            "batch_size": int(config.batch_size), "first_batches_s": startup, "shapes": str(shapes),
            "source": repr(source), "num_threads": int(d.get("num_threads", 2))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="training config (configs/*.py)")
    p.add_argument("--workers", default="0,2,4", help="comma-separated data.worker_count values")
    p.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    p.add_argument("--warmup", type=int, default=4, help="untimed batches first (worker start-up)")
    p.add_argument("--json", help="also write the figures to this JSON file (atomically)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    import tempfile

    from dmfuse_jax.config_lib import load_config

    config = load_config(args.config, rest)
    import warnings
    warnings.filterwarnings("ignore", message="init.unet_workdir and init.unet_torch are empty")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for w in [int(x) for x in args.workers.split(",")]:
            r = measure(config, w, args.batches, args.warmup, workdir)
            rows.append(r)
            print(f"{r['stage']:8s} workers {w}: {r['images_per_s']:8.1f} images/s  (batch {r['batch_size']}, "
                  f"{r['batches']} batches, first {args.warmup} in {r['first_batches_s']:.1f} s, "
                  f"num_threads {r['num_threads']}; {r['shapes']}; {r['source']})", flush=True)
    if args.json:
        from dmfuse_jax.data.images import write_text_atomic
        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
