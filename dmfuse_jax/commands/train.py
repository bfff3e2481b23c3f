"""`dmfuse train --config configs/<file>.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]`

Trains the stage the config names (`config.stage`: 'pretrain' = DDPM pretraining of the UNet,
'fusion' = the fusion head on a frozen UNet), resuming from the workdir's latest checkpoint.
Also runs as `python -m dmfuse_jax.train ...`. The library side is `training/train.py`.
`--config` and its overrides are ml_collections config flags: each `--config.KEY=VALUE` is parsed as
the type of that key (tuples as `--config.model.timesteps="(5, 50)"`, booleans also as
`--config.KEY` / `--noconfig.KEY`); an unknown key or a value of the wrong type exits with code 2.

Several processes (hosts): set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
JAX_PROCESS_ID on each, or pass --distributed on a cluster JAX detects itself (SLURM, Cloud TPU
VMs, Open MPI); see launch/.

Before anything is written: the config's values are checked (`config_lib.validate_config`, and the
mesh against the devices), then the workdir is locked (`lock.py`: one writer per workdir; process 0
holds it). Exit codes: 0 done, 1 a system failure while saving (one line), 2 bad input or a locked
workdir, 3 diverged (non-finite loss), 75 preempted (checkpoint saved; run again), 130 Ctrl-C
(`dmfuse_jax.errors`).
"""
from __future__ import annotations

import argparse
import logging
import sys

from dmfuse_jax.training import train as train_lib

# The `dmfuse` CLI hands the arguments argparse does not know (--config.KEY=VALUE) to `run` as
# args.config_flags, for ml_collections.config_flags.
CONFIG_FLAGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="training config file (configs/*.py, or FILE.py:ARG for get_config(ARG)); "
                             "override any key with --config.KEY=VALUE, e.g. --config.total_steps=1000")
    parser.add_argument("--workdir", required=True, help="run folder: config.json, checkpoints/, tensorboard/, samples")
    parser.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                        help="multi-process init: 'auto' (when JAX_COORDINATOR_ADDRESS is set), 'on' "
                             "(also detect SLURM / Cloud TPU / MPI), 'off' (default: %(default)s)")
    from dmfuse_jax.compilation import add_cache_argument
    add_cache_argument(parser)


def _one_line_warnings(message, category, filename, lineno, line=None) -> str:
    """The CLI's warnings: one line each (the category and the message, no source line)."""
    return f"{category.__name__}: {message}\n"


def run(args) -> int:
    from dmfuse_jax.config_lib import config_from_flags
    from dmfuse_jax.data.images import check_output_path

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from dmfuse_jax.compilation import enable_persistent_cache

    config = config_from_flags(args.config, getattr(args, "config_flags", ()))
    check_output_path(args.workdir, "--workdir", folder=True)  # before waiting for other processes
    cache = enable_persistent_cache(getattr(args, "compilation_cache", None))
    logging.getLogger(__name__).info("compilation cache: %s", cache or "off")
    train_lib.initialize_distributed(args.distributed)
    import warnings

    from dmfuse_jax.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, CommandFailed

    warnings.formatwarning = _one_line_warnings
    try:
        summary = train_lib.train(config, args.workdir)
    except CommandFailed as e:
        print(f"dmfuse train: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    if summary["preempted"] == "SIGINT":
        return EXIT_INTERRUPTED
    return EXIT_PREEMPTED if summary["preempted"] else 0


def main(argv=None) -> int:
    """`python -m dmfuse_jax.train ...`: the same as `dmfuse train ...`."""
    from dmfuse_jax.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
