"""`dmfuse export`: a checkpoint -> an inference bundle (config + params only, orbax) with a
`jax.export` artefact of the fuse function inside (`BUNDLE/export/`).

  dmfuse export --checkpoint runs/fusion --out exports/fusion                # EMA params if kept
  dmfuse export --checkpoint runs/fusion --out exports/fusion_bf16 --dtype bfloat16
  dmfuse fuse --checkpoint exports/fusion --ir ... --vis ... --out ...        # the bundle serves fuse
"""
from __future__ import annotations

import argparse

from dmfuse_jax.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dmfuse_jax.inference.buckets import DEFAULT_MULTIPLE

    p.add_argument("--checkpoint", required=True, help="training workdir, inference bundle, or UNET.pth,HEAD.pth")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--config", default=None, help="config file (required with UNET.pth,HEAD.pth)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the bundle and the artefact; also the param storage dtype "
                        "unless --store-dtype (default: %(default)s)")
    p.add_argument("--store-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype the bundle stores params in (default: --dtype); params load as float32")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="workdir: export the EMA params (default: EMA when the run kept them)")
    ema.add_argument("--raw", dest="ema", action="store_false", help="workdir: export the raw params")
    from dmfuse_jax.inference.checkpoints import STEPS_HELP
    p.add_argument("--step", default=None, help=STEPS_HELP)  # issue 22
    p.add_argument("--bucket", type=int, default=DEFAULT_MULTIPLE,
                   help="bucket multiple the artefact's loader pads to (default: %(default)s, as dmfuse fuse)")
    p.add_argument("--seed", type=int, default=0, help="default noise seed recorded for the loader")
    p.add_argument("--no-artefact", action="store_true", help="write the bundle only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args) -> int:
    from dmfuse_jax.inference import bundle as bundle_lib
    from dmfuse_jax.inference.checkpoints import resolve

    bundle_lib.check_bundle_out(args.out, args.overwrite)
    ck = resolve(args.checkpoint, config=args.config, ema=args.ema, step=args.step)
    for note in ck.notes:
        print(note)
    config = ck.config.copy_and_resolve_references()
    with config.unlocked():
        config.model.dtype = args.dtype
    store = args.store_dtype or args.dtype

    def extra(tmp):
        if args.no_artefact:
            return
        from dmfuse_jax.inference.export import write_export
        try:
            write_export(tmp, config, ck.params, dtype=args.dtype, bucket=args.bucket, seed=args.seed)
        except ValueError as e:
            raise UserError(f"--bucket {args.bucket}: {e}") from None

    out = bundle_lib.save_bundle(args.out, config, ck.params, store_dtype=store,
                                 source=f"{ck.kind} {ck.source}", overwrite=args.overwrite, extra=extra)
    size = bundle_lib.folder_bytes(out)
    print(f"wrote inference bundle {out} ({size / 2**20:.2f} MiB; params stored as {store}, compute {args.dtype})"
          + ("" if args.no_artefact else f"; jax.export artefact in {out / 'export'}"))
    return 0
