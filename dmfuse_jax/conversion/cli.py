"""`dmfuse convert-torch`: PyTorch weights (SR3 UNet + DMFuse fusion head) -> an inference bundle.

  dmfuse convert-torch --unet sr3_unet.pth --head ../shared/weights/dmfuse_fusion_head.pth \\
      --config configs/dmfuse_quarter.py --out bundles/dmfuse_quarter

The released head fits the 1/4-width config only. Every key that does not fit is reported at once
(missing, unexpected, mis-shaped), naming the file; nothing is written then.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unet", required=True, help="SR3 UNet state_dict (.pth)")
    p.add_argument("--head", required=True, help="DMFuse fusion head state_dict (.pth), e.g. the released one")
    p.add_argument("--config", required=True, help="model config the weights fit (e.g. configs/dmfuse_quarter.py)")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--store-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the bundle stores params in (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args) -> int:
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.inference import bundle as bundle_lib
    from dmfuse_jax.inference.checkpoints import load_torch_pair

    bundle_lib.check_bundle_out(args.out, args.overwrite)
    config = load_config(args.config)
    notes: list[str] = []
    params = load_torch_pair(args.unet, args.head, config, notes)
    for note in notes:
        print(note)
    out = bundle_lib.save_bundle(args.out, config, params, store_dtype=args.store_dtype,
                                 source=f"torch {args.unet},{args.head}", overwrite=args.overwrite)
    n = sum(x.size for part in params.values() for x in _leaves(part))
    print(f"wrote inference bundle {out} ({n:,} params, stored as {args.store_dtype}, "
          f"{bundle_lib.folder_bytes(out) / 2**20:.2f} MiB)")
    return 0


def _leaves(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)
