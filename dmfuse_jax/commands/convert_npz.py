"""`dmfuse convert-npz`: flat npz parameter files (Flax paths joined by "/") -> an inference bundle.

  dmfuse convert-npz --unet ../shared/weights/dmfuse_jax_roadscene_unet_ema_fp16.npz \\
      --head ../shared/weights/dmfuse_jax_roadscene_head_ema.npz \\
      --config configs/dmfuse_quarter.py --out bundles/roadscene --store-dtype float16
  dmfuse convert-npz --params model.npz --config CFG --out DIR     # one file with unet/ and head/ keys
  dmfuse convert-npz --checkpoint WORKDIR --step best --out DIR    # a training run's best (or any) step

The file layout is described in `dmfuse_jax/conversion/npz.py`. Every key is checked against the
config's model before anything is written: a missing, unexpected or mis-shaped key exits with code 2
and one line naming the file and the key.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dmfuse_jax.inference.bundle import STORE_DTYPES

    p.add_argument("--unet", default=None, help="UNet params npz (keys like downs_0/res_block/block1/conv/kernel)")
    p.add_argument("--head", default=None, help="fusion head params npz (keys like conv_in1/conv2d/kernel)")
    p.add_argument("--params", default=None, help="instead of --unet/--head: one npz with unet/... and head/... keys")
    p.add_argument("--checkpoint", default=None,
                   help="instead of npz files: a training workdir (its config; see --step, --ema/--raw)")
    from dmfuse_jax.inference.checkpoints import STEPS_HELP
    p.add_argument("--step", default=None, help=STEPS_HELP)
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None, help="--checkpoint: the EMA params")
    ema.add_argument("--raw", dest="ema", action="store_false", help="--checkpoint: the raw params")
    p.add_argument("--config", default=None, help="model config the params fit (e.g. configs/dmfuse_quarter.py); "
                                                  "required with npz files")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--store-dtype", choices=STORE_DTYPES, default="float32",
                   help="dtype the bundle stores params in (default: %(default)s; loaded back as float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args) -> int:
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.conversion.npz import load_model
    from dmfuse_jax.inference import bundle as bundle_lib

    from dmfuse_jax.errors import UserError

    if args.checkpoint:  # issue 22: a workdir's best / latest / step-N params
        if args.unet or args.head or args.params:
            raise UserError("--checkpoint replaces --unet/--head/--params: give one source")
        from dmfuse_jax.inference.checkpoints import resolve
        ck = resolve(args.checkpoint, config=args.config, ema=args.ema, step=args.step)
        for note in ck.notes:
            print(note)
        config, params, source = ck.config, ck.params, f"{ck.kind} {ck.source} (step {args.step or 'latest'})"
    else:
        if args.config is None:
            raise UserError("--config is required with --unet/--head/--params")
        if args.step is not None or args.ema is not None:
            raise UserError("--step, --ema and --raw select the params of a --checkpoint WORKDIR")
        config = load_config(args.config)
        params = load_model(config, unet=args.unet, head=args.head, params=args.params)
        source = f"npz {args.params}" if args.params else f"npz {args.unet},{args.head}"
    out = bundle_lib.save_bundle(args.out, config, params, store_dtype=args.store_dtype, source=source,
                                 overwrite=args.overwrite)
    n = sum(x.size for part in params.values() for x in _leaves(part))
    print(f"wrote inference bundle {out} ({n:,} params, stored as {args.store_dtype}, "
          f"{bundle_lib.folder_bytes(out) / 2**20:.2f} MiB)")
    return 0


def _leaves(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)
