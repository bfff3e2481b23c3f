"""The `dmfuse` command line: one entry point, subcommands from a registry.

Each subcommand lives in its own module that defines `add_arguments(parser)` and `run(args) -> int`.
A module with `CONFIG_FLAGS = True` takes ml_collections config flags (`--config.KEY=VALUE`): the
arguments its parser does not know reach `run` as `args.config_flags`, for `config_lib.config_from_flags`.
Modules are imported lazily so `dmfuse info` does not pay for the training stack.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import os
import sys

from dmfuse_jax.errors import UserError

# name -> (module, one-line help). Registry, not an if-chain: add a command by adding a row.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dmfuse_jax.commands.info", "versions, devices, parameter and FLOP counts of a config's model"),
    "train": ("dmfuse_jax.commands.train", "train a stage (diffusion pretraining or fusion) from a config"),
    "fuse": ("dmfuse_jax.commands.fuse", "fuse infrared/visible (or medical) image pairs"),
    "export": ("dmfuse_jax.commands.export", "export an inference bundle and a serialized artefact"),
    "convert-torch": ("dmfuse_jax.commands.convert_torch", "build an inference bundle from PyTorch weights"),
    "convert-npz": ("dmfuse_jax.commands.convert_npz", "build an inference bundle from flat npz parameter files"),
    "evaluate": ("dmfuse_jax.commands.evaluate", "score fused images with the field's metrics"),
    "report": ("dmfuse_jax.commands.report", "a training run's curves, evals, best step and previews as PNG + markdown"),
    "compile": ("dmfuse_jax.commands.compile", "compile a training step or the fuse function for a TPU slice or GPU "
                "ahead of time: memory, FLOPs, collectives, roofline"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmfuse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Arguments are added lazily (only for the chosen command) to keep startup fast.
    return parser


GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "jax_rocm6_plugin")


def skip_absent_tpu() -> bool:
    """With the `tpu` extra (libtpu) installed on a machine without a TPU, jax probes for one at
    every start and prints a screen of warnings; then, and only then (no TPU device file, no GPU
    plugin, JAX_PLATFORMS unset), run on the CPU. Returns True when it set JAX_PLATFORMS=cpu."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return False
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*"):
        return False
    if any(importlib.util.find_spec(m) is not None for m in GPU_PLUGINS):
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from dmfuse_jax import startup

    startup.enter()
    skip_absent_tpu()
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_help(sys.stderr)
            print(f"\ndmfuse: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"dmfuse {name}", description=help_text)
    module.add_arguments(sub)
    if getattr(module, "CONFIG_FLAGS", False):
        args, config_flags = sub.parse_known_args(argv[1:])
        args.config_flags = config_flags
    else:
        args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"dmfuse {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dmfuse {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
