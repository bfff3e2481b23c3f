"""The values a config's `config.evals` give for the params its `init.*` keys load, without training:
what a run of that config would log at step 0, or, with the params a finished run produced, after it.

  # the shipped default model's head and UNet through configs/roadscene_fusion.py's evals (holdout, tno):
  python benchmarks/evals_of_params.py configs/roadscene_fusion.py --config.model.dtype=float32 \\
      --config.init.unet_workdir= --config.init.head_torch= \\
      --config.init.unet_params=../shared/weights/dmfuse_jax_roadscene_unet_ema_fp16.npz \\
      --config.init.head_params=../shared/weights/dmfuse_jax_roadscene_head_ema.npz

Prints one line per value (`eval/NAME/VARIANT/METRIC value`) and each evaluator's time (compile
included), with the load average.
"""
from __future__ import annotations

import os
import sys
import time
import warnings


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    from dmfuse_jax.config_lib import config_from_flags
    from dmfuse_jax.training.evals import EvalRunner
    from dmfuse_jax.training.train import build_stage
    from dmfuse_jax.training.trainer import Trainer

    config = config_from_flags(argv[0], argv[1:])
    stage = build_stage(config)
    trainer = Trainer(config, stage, total_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = trainer.init_state()
    runner = EvalRunner(config, stage, trainer, total_steps=1, workdir=None)
    print(f"{argv[0]}: {len(runner.evaluators)} evaluator(s); load average {os.getloadavg()[0]:.2f}", flush=True)
    for ev, _ in runner.evaluators:
        t = time.perf_counter()
        got = ev.run(state, 0)
        dt = time.perf_counter() - t
        for k, v in got.items():
            print(f"eval/{ev.name}/{k} {v:.4f}")
        print(f"  ({ev.kind} {ev.name}: {dt:.1f} s, {getattr(ev, 'compile_s', 0.0):.1f} s of it compiling; "
              f"load average {os.getloadavg()[0]:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
