"""`dmfuse convert-torch`: PyTorch weights (SR3 UNet + DMFuse fusion head) -> an inference bundle.

  dmfuse convert-torch --unet sr3_unet.pth --head ../shared/weights/dmfuse_fusion_head.pth \\
      --config configs/dmfuse_quarter.py --out bundles/dmfuse_quarter
  dmfuse convert-torch --guided-diffusion 256x256_diffusion_uncond.pt \\
      --config configs/ddfm_openai256.py --out bundles/ddfm_openai256     # a DDFM prior

The released head fits the 1/4-width config only. Every key that does not fit is reported at once
(missing, unexpected, mis-shaped), naming the file; nothing is written then.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unet", default=None, help="SR3 UNet state_dict (.pth)")
    p.add_argument("--head", default=None, help="DMFuse fusion head state_dict (.pth), e.g. the released one")
    p.add_argument("--guided-diffusion", default=None, metavar="PT",
                   help="instead of --unet/--head: a guided-diffusion UNet state_dict (a DDFM prior, e.g. "
                        "256x256_diffusion_uncond.pt) with a DDFM --config (e.g. configs/ddfm_openai256.py)")
    p.add_argument("--config", required=True, help="model config the weights fit (e.g. configs/dmfuse_quarter.py)")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--store-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the bundle stores params in (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args) -> int:
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.inference import bundle as bundle_lib
    from dmfuse_jax.errors import UserError
    from dmfuse_jax.inference.checkpoints import load_torch_pair

    bundle_lib.check_bundle_out(args.out, args.overwrite)
    config = load_config(args.config)
    if args.guided_diffusion is not None:
        if args.unet or args.head:
            raise UserError("--guided-diffusion converts a DDFM prior alone: drop --unet/--head")
        return _run_guided_diffusion(args, config)
    if not (args.unet and args.head):
        raise UserError("convert-torch needs --unet and --head (or --guided-diffusion)")
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


def _run_guided_diffusion(args, config) -> int:
    from dmfuse_jax.ddfm.config import build_guided_unet
    from dmfuse_jax.ddfm.convert import convert_params
    from dmfuse_jax.ddfm.priors import guided_prior, is_ddfm_config, load_state_dict
    from dmfuse_jax.errors import UserError
    from dmfuse_jax.inference import bundle as bundle_lib

    if not is_ddfm_config(config):
        raise UserError(f"{args.config}: --guided-diffusion needs a DDFM config (e.g. configs/ddfm_openai256.py)")
    params = convert_params(load_state_dict(args.guided_diffusion), build_guided_unet(config.model),
                            source=args.guided_diffusion)
    guided_prior(config, params, args.guided_diffusion)  # the sampler settings are supported
    out = bundle_lib.save_bundle(args.out, config, {"unet": params}, store_dtype=args.store_dtype,
                                 source=f"guided-diffusion {args.guided_diffusion}", overwrite=args.overwrite)
    n = sum(x.size for x in _leaves(params))
    print(f"wrote DDFM prior bundle {out} ({n:,} params, stored as {args.store_dtype}, "
          f"{bundle_lib.folder_bytes(out) / 2**20:.2f} MiB)")
    return 0


def _leaves(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)
