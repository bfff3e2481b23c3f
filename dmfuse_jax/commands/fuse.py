"""`dmfuse fuse`: fuse infrared/visible (or medical) image pairs from files or folders.

  dmfuse fuse --ir samples/ir --vis samples/vi --out outputs/fused            # bundled default model
  dmfuse fuse --checkpoint runs/fusion --ir a_ir.png --vis a_vis.png --out a.png
  dmfuse fuse --method laplacian_pyramid --ir IR_DIR --vis VIS_DIR --out OUT   # no model
  dmfuse fuse --method ddfm [--prior PATH] [--steps 100] --ir IR_DIR --vis VIS_DIR --out OUT   # DDFM

Folders are paired by file name (stem; the extension may differ). Every input is decoded once and
checked (readable, not truncated, matching sizes) before the model loads; outputs are 8-bit PNGs of
the input size, each written to a temporary name and renamed. Errors name the file and exit with
code 2; pairs fused before an error are written first.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dmfuse_jax.data.images import check_output_path, verify_image
from dmfuse_jax.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dmfuse_jax.inference.buckets import DEFAULT_MAX_BUCKETS, DEFAULT_MULTIPLE
    from dmfuse_jax.inference.colour import MODES

    p.add_argument("--ir", required=True, help="infrared image, or folder of them (medical: the grey MRI/CT)")
    p.add_argument("--vis", required=True, help="visible image, or folder of them (medical: PET/SPECT/CT)")
    p.add_argument("--out", required=True, help="output .png (for one pair) or folder (written as <name>.png)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None,
                     help="training workdir, inference bundle, or UNET.pth,HEAD.pth (default: the bundled "
                          "model in dmfuse_jax/assets/default_bundle; --mode medical: with the medical head "
                          "dmfuse_jax/assets/medical_head.npz)")
    src.add_argument("--method", default=None, choices=method_names(),
                     help="a classical baseline instead of the model: average, max, laplacian_pyramid; "
                          "or ddfm (DDFM sampling, see --prior, --steps)")
    p.add_argument("--config", default=None,
                   help="config file: required with UNET.pth,HEAD.pth; with a workdir/bundle it must fit its params; "
                        "ddfm: the prior's config (a DMFuse config for an SR3 .npz, a DDFM config for a .pt)")
    p.add_argument("--mode", choices=list(MODES), default="auto",
                   help="; ".join(f"{k}: {v[1]}" for k, v in MODES.items()) + " (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs of one shape bucket fused together (default: %(default)s)")
    p.add_argument("--bucket", type=int, default=DEFAULT_MULTIPLE,
                   help="pad H and W up to multiples of this (a multiple of 16); one compile per bucket (default: %(default)s)")
    p.add_argument("--max-buckets", type=int, default=DEFAULT_MAX_BUCKETS,
                   help="merge the folder's buckets down to at most this many shapes, by least added padding "
                        "(0: no merging, one bucket per rounded size) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the diffusion noise (default: 0; ddfm: the DDFM config's seed, 3407)")
    p.add_argument("--prior", default=None,
                   help="ddfm: the diffusion prior: DMFuse bundle/workdir, SR3 UNet .npz (with --config), "
                        "guided-diffusion .pt or converted bundle (default: the bundled model's SR3 UNet)")
    p.add_argument("--steps", type=int, default=None,
                   help="ddfm: respaced DDIM steps (default: the DDFM config's diffusion.timestep_respacing, 100)")
    p.add_argument("--resize", action="store_true",
                   help="resize the infrared image to the visible size when they differ (default: error)")
    p.add_argument("--sixteen-bit", choices=("minmax", "full"), default="minmax",
                   help="16-bit inputs: 'minmax' stretches each image's min..max to 0..1, 'full' divides by 65535")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: the config's)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None, help="workdir: use the EMA params")
    ema.add_argument("--raw", dest="ema", action="store_false", help="workdir: use the raw params")
    from dmfuse_jax.inference.checkpoints import STEPS_HELP
    p.add_argument("--step", default=None, help=STEPS_HELP)  # issue 22
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plan", action="store_true",
                   help="print the memory plan of each shape bucket (batch, UNet passes, bytes needed and free, "
                        "the largest square that fits) and exit without fusing")
    from dmfuse_jax.compilation import add_cache_argument
    add_cache_argument(p)
    p.add_argument("--timings-json", default=None, metavar="FILE",
                   help="write the start-up phases (seconds from the process start) and counts as JSON to FILE")


def collect_pairs(ir: str, vis: str, out: str) -> list[tuple[str, Path, Path, Path]]:
    """-> [(name, ir_path, vis_path, out_path)] from two files or two folders."""
    from dmfuse_jax.data.images import is_image_file, match_pairs

    ir_p, vis_p, out_p = Path(ir), Path(vis), Path(out)
    for p, what in ((ir_p, "--ir"), (vis_p, "--vis")):
        if not p.exists():
            raise UserError(f"{p}: no such file or folder ({what})")
    if ir_p.is_dir() != vis_p.is_dir():
        raise UserError(f"--ir {ir_p} and --vis {vis_p}: give two files or two folders")
    if ir_p.is_dir():
        if out_p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") or out_p.is_file():
            raise UserError(f"{out_p}: --out must be a folder when --ir and --vis are folders")
        if out_p.resolve() in (ir_p.resolve(), vis_p.resolve()):
            raise UserError(f"{out_p}: --out must not be an input folder (it would overwrite the inputs)")
        pairs = match_pairs(ir_p, vis_p)
        return [(stem, a, b, out_p / f"{stem}.png") for stem, a, b in pairs]
    for p in (ir_p, vis_p):
        if not is_image_file(p):
            raise UserError(f"{p}: not an image file name (expected .png, .jpg, .jpeg, .bmp, .tif or .tiff)")
    if out_p.is_dir() or str(out).endswith(os.sep) or not out_p.suffix:
        out_p = out_p / f"{vis_p.stem}.png"
    elif out_p.suffix.lower() != ".png":
        raise UserError(f"{out_p}: the output is an 8-bit PNG: give a .png name or a folder")
    if out_p.resolve() in (ir_p.resolve(), vis_p.resolve()):
        raise UserError(f"{out_p}: --out must not be an input file")
    return [(vis_p.stem, ir_p, vis_p, out_p)]


def check_pairs(pairs, resize: bool) -> list[tuple[int, int]]:
    """Decodes every image (a truncated file fails here, before the model loads); -> the output size
    (H, W) of each pair (the visible image's)."""
    sizes = []
    for _, a, b, _ in pairs:
        ha, wa = verify_image(a)
        hb, wb = verify_image(b)
        if (ha, wa) != (hb, wb) and not resize:
            raise UserError(f"{a}: size {wa}x{ha} differs from {b} ({wb}x{hb}); register the pair or pass "
                            "--resize to resize the infrared image to the visible size")
        sizes.append((hb, wb))
    return sizes


def _ddfm(args):
    """--method ddfm: DDFM sampling with a diffusion prior (dmfuse_jax.ddfm)."""
    from dmfuse_jax.compilation import enable_persistent_cache
    from dmfuse_jax.ddfm.fuser import DDFMFuser, SettingError
    from dmfuse_jax.ddfm.priors import load_prior

    enable_persistent_cache(getattr(args, "compilation_cache", None))  # before the first compile
    prior = load_prior(args.prior, config=args.config, dtype=args.dtype)
    try:
        fuser = DDFMFuser(mode=args.mode, sixteen_bit=args.sixteen_bit, prior=prior, steps=args.steps,
                          seed=args.seed, bucket=args.bucket, max_buckets=args.max_buckets,
                          progress=not args.no_progress)
    except SettingError as e:  # the library names its parameters; here they are flags
        flag = {"steps": "--steps", "bucket": "--bucket", "max_buckets": "--max-buckets"}.get(e.name)
        raise UserError(f"{flag} {e.value}: {e.reason}" if flag else f"{args.config or prior.source}: {e}") from None
    for note in prior.notes:
        print(note)
    return fuser, (f"DDFM ({fuser.sampler.num_steps} steps, seed {fuser.seed_used}) with prior {prior.kind}: "
                   f"{prior.source}")


# --method names that need a model (the rest are classical baselines).
MODEL_METHODS = {"ddfm": _ddfm}

# --method's classical baselines: the names of evaluation.baselines.BASELINES, written out so that
# building the parser does not import scipy (a test checks that they agree).
BASELINE_METHODS = ("average", "max", "laplacian_pyramid")


def method_names() -> list[str]:
    """--method's choices: the classical baselines and MODEL_METHODS."""
    return [*BASELINE_METHODS, *MODEL_METHODS]


def memory_plan(fuser, plan, pairs, sizes, show: bool) -> bool:
    """Plans every bucket's memory before any pair is fused (compiling the executables that will fuse);
    prints the plans when `show` (--plan; True: stop there). A bucket that fits nowhere: UserError."""
    if not hasattr(fuser, "memory_plan"):
        if show:
            raise UserError("--plan: a memory plan is made for the DMFuse model only (not --method)")
        return False
    for b, hb, wb in dict.fromkeys(shape for shape, _ in plan):
        idx = [i for shape, ids in plan if shape == (b, hb, wb) for i in ids]
        names = sorted({f"{sizes[i][1]}x{sizes[i][0]}" for i in idx})
        what = f"{pairs[idx[0]][1]}" + (f" and {len(idx) - 1} more" if len(idx) > 1 else "") + \
            f" ({', '.join(names)}, bucket {wb}x{hb})"
        mp = fuser.memory_plan(b, hb, wb, ceiling=show)
        if not mp.fits:
            raise UserError(mp.line(what))
        if show:
            print(mp.line(what))
    return show


# Start-up phases (`startup.Phases`) that make up the model's compile/load time.
LOAD_PHASES = ("bundle", "executables")


def run(args) -> int:
    from dmfuse_jax.data.images import read_image, write_image_atomic
    from dmfuse_jax.inference import colour
    from dmfuse_jax.startup import Phases

    phases = Phases()
    uses_model = args.method is None or args.method in MODEL_METHODS
    if uses_model:
        import jax  # noqa: F401 - imported here so that its import is a phase of its own

        from dmfuse_jax.inference import fuser as _fuser_module  # noqa: F401
    phases.mark("imports")

    if args.plan and args.method is not None:
        raise UserError("--plan: a memory plan is made for the DMFuse model only (not --method)")
    if args.prior is not None and args.method != "ddfm":
        raise UserError("--prior is a --method ddfm option")
    if args.steps is not None and args.method != "ddfm":
        raise UserError("--steps is a --method ddfm option")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.max_buckets < 0:
        raise UserError(f"--max-buckets must be >= 0 (got {args.max_buckets})")
    pairs = collect_pairs(args.ir, args.vis, args.out)
    for folder in sorted({out.parent for _, _, _, out in pairs}):
        check_output_path(folder, "--out", folder=True)
    sizes = check_pairs(pairs, args.resize)
    phases.mark("inputs")

    if args.method in MODEL_METHODS:
        fuser, what = MODEL_METHODS[args.method](args)
    elif args.method is not None:
        from dmfuse_jax.inference.fuser import MethodFuser
        fuser = MethodFuser(mode=args.mode, sixteen_bit=args.sixteen_bit, method=args.method)
        what = f"method {args.method}"
    else:
        from dmfuse_jax.compilation import enable_persistent_cache
        from dmfuse_jax.inference.checkpoints import resolve
        from dmfuse_jax.inference.fuser import Fuser

        enable_persistent_cache(getattr(args, "compilation_cache", None))  # before the first compile

        ck = resolve(args.checkpoint, config=args.config, ema=args.ema, mode=args.mode, step=args.step)
        try:
            fuser = Fuser(config=ck.config, params=ck.params, seed=args.seed or 0, bucket=args.bucket,
                          max_buckets=args.max_buckets,
                          dtype=args.dtype, mode=args.mode, sixteen_bit=args.sixteen_bit, source=ck.source)
        except ValueError as e:  # e.g. a bucket that is not a multiple of the stride
            raise UserError(f"--bucket {args.bucket}: {e}") from None
        for note in ck.notes:
            print(note)
        what = f"{ck.kind} {ck.source} (UNet width {ck.config.model.unet.inner_channels}, seed {args.seed or 0})"
    phases.mark("bundle")

    plan = fuser.plan(sizes, args.batch_size)
    n_buckets = len({shape for shape, _ in plan})
    t0 = time.perf_counter()  # the plan compiles the executables: counted as compile time below
    planned = memory_plan(fuser, plan, pairs, sizes, args.plan)
    phases.mark("executables")  # and the memory plan, which reads their needs
    if planned:
        return 0

    def load(idx):
        prepared = []
        for i in idx:
            _, a, b, _ = pairs[i]
            first = read_image(a, sixteen_bit=args.sixteen_bit)
            second = read_image(b, sixteen_bit=args.sixteen_bit)
            first = colour.match_sizes(first, second, resize=args.resize, ir_name=str(a), vis_name=str(b))
            prepared.append(colour.prepare_pair(first, second, args.mode))
        return prepared

    def write(idx, prepared, pending):
        for i, pair, fused in zip(idx, prepared, pending.result()):
            write_image_atomic(pairs[i][3], colour.finish(fused, pair))
        bar.update(len(idx))
        if "first batch" not in phases.seconds:
            phases.mark("first batch")

    from tqdm import tqdm

    print(f"fusing {len(pairs)} pair(s) with {what}: {n_buckets} shape bucket(s), batch size {args.batch_size}")
    bar = tqdm(total=len(pairs), unit="pair", disable=args.no_progress or None, file=sys.stderr)
    done = 0
    in_flight = None
    try:
        for (b, hb, wb), idx in plan:
            prepared = load(idx)  # host reads overlap the device work of the batch in flight
            pending = fuser.dispatch([p.ir for p in prepared], [p.vi for p in prepared], batch=b, shape=(hb, wb))
            if in_flight is not None:
                write(*in_flight)
                done += len(in_flight[0])
            in_flight = (idx, prepared, pending)
        if in_flight is not None:
            write(*in_flight)
            done += len(in_flight[0])
            in_flight = None
    except BaseException as e:
        if in_flight is not None:  # the batch fused before the failure: write it, then report
            try:
                write(*in_flight)
                done += len(in_flight[0])
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                pass
        if isinstance(e, UserError):
            raise UserError(f"{e}\n({done} of {len(pairs)} pairs were written before this error)") from None
        raise
    finally:
        bar.close()
    total = time.perf_counter() - t0
    phases.mark("rest")
    out_where = pairs[0][3].parent if len(pairs) > 1 else pairs[0][3]
    if uses_model:
        st = fuser.stats
        load_s = sum(phases.seconds.get(k, 0.0) for k in LOAD_PHASES)
        run_s = max(total - phases.seconds.get("executables", 0.0), 1e-9)
        got = f"{len(st['compiled'])} compilation(s)" + (f", {len(st['loaded'])} loaded from the executable cache"
                                                         if st.get("loaded") else "")
        parts = ", ".join(f"{k} {st[k + '_s']:.2f}" for k in ("trace", "lower", "compile", "load") if st.get(k + "_s"))
        for note in getattr(fuser, "notes", []):
            print(note)
        print(f"fused {len(pairs)} pair(s) in {total:.2f} s; fusing {run_s:.2f} s = {len(pairs) / run_s:.2f} pairs/s "
              f"({1e3 * run_s / len(pairs):.1f} ms/pair) -> {out_where}")
        print(f"start-up {phases.total() - phases.seconds['rest']:.2f} s to the first batch written: model and "
              f"executables {load_s:.2f} s ({got}{'; ' + parts + ' s' if parts else ''}); "
              f"phases: {phases.line()} s")
    else:
        print(f"fused {len(pairs)} pair(s) in {total:.2f} s ({len(pairs) / total:.2f} pairs/s); "
              f"{1e3 * total / len(pairs):.1f} ms/pair -> {out_where}")
    if args.timings_json:
        st = getattr(fuser, "stats", {})
        phases.counts.update(pairs=len(pairs), buckets=n_buckets, compiled=len(st.get("compiled", [])),
                             loaded=len(st.get("loaded", [])),
                             **{f"{k}_s": st.get(f"{k}_s", 0.0) for k in ("trace", "lower", "compile", "load")})
        phases.write_json(args.timings_json, load_phases=list(LOAD_PHASES))
    return 0
