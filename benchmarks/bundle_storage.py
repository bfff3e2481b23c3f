"""How much does a bundle's param storage dtype change the fused images? float16 vs bfloat16 storage
of the npz weights, each against the float32 Fuser built straight from the npz files (same config,
same seed), on TNO pairs: PSNR (dB, images in [0, 1]) and max |difference|, plus the bundle sizes.

  python benchmarks/bundle_storage.py [--pairs 07,19] [--unet U.npz --head H.npz --config CFG]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights"


def main(argv=None) -> int:
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.conversion.npz import load_model
    from dmfuse_jax.data.images import read_image
    from dmfuse_jax.inference import bundle as bundle_lib
    from dmfuse_jax.inference.fuser import Fuser, load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet", default=str(WEIGHTS / "dmfuse_jax_roadscene_unet_ema_fp16.npz"))
    p.add_argument("--head", default=str(WEIGHTS / "dmfuse_jax_roadscene_head_ema.npz"))
    p.add_argument("--config", default=str(ROOT / "configs" / "dmfuse_quarter.py"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tno"))
    p.add_argument("--pairs", default="07,19")
    args = p.parse_args(argv)

    config = load_config(args.config)
    params = load_model(config, unet=args.unet, head=args.head)
    ref = Fuser(config=config, params=params, source="npz float32")
    pairs = [(read_image(Path(args.data) / "ir" / f"{n}.png"), read_image(Path(args.data) / "vi" / f"{n}.png"))
             for n in args.pairs.split(",")]
    want = [ref(a, b) for a, b in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float16", "bfloat16"):
            out = bundle_lib.save_bundle(Path(tmp) / dtype, config, params, store_dtype=dtype)
            fz = load(str(out))
            for name, (a, b), w in zip(args.pairs.split(","), pairs, want):
                got = fz(a, b)
                mse = float(np.mean((got - w) ** 2))
                psnr = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
                print(f"store {dtype:8s} pair {name}: PSNR {psnr:.1f} dB vs float32 npz, "
                      f"max |diff| {np.abs(got - w).max():.2e}, 8-bit pixels changed "
                      f"{np.mean(np.rint(got * 255) != np.rint(w * 255)) * 100:.2f}%")
            print(f"store {dtype:8s} bundle size {bundle_lib.folder_bytes(out) / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
