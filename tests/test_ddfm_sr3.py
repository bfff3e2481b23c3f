"""DDFM's default path, the SR3 prior (issue 21): `DDFMFuser` and `dmfuse fuse --method ddfm` against a
direct call of the whole sampler (`Sampler.sample`, one `lax.scan`) on arrays prepared here by hand:
the visible image's BT.601 luma as the EM's I, the infrared as V, reflect-padded at the bottom/right
to the bucket, cropped back from the top-left. Each test also shows that a swapped pair, the red
channel instead of the luma, and a crop/pad offset give clearly different images, so a fuser that
made one of those mistakes would fail it. Tiny random SR3 UNet (configs/tiny.py), 2 respaced steps."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, ROOT

from dmfuse_jax.cli import main

H, W = 37, 50  # padded to 48x64 with bucket 16
BUCKET = (48, 64)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@pytest.fixture(scope="module")
def unet(tiny_config):
    from dmfuse_jax.inference.fuser import random_params
    return random_params(tiny_config, seed=1)["unet"]


@pytest.fixture(scope="module")
def fuser(tiny_config, unet):
    from dmfuse_jax.ddfm.fuser import DDFMFuser
    from dmfuse_jax.ddfm.priors import sr3_prior
    return DDFMFuser(prior=sr3_prior(tiny_config, unet, "tiny sr3"), steps=2, bucket=16, progress=False)


@pytest.fixture(scope="module")
def reference(fuser):
    """reference(I, V, crop=(0, 0), pad='bottom_right') -> the fused luma (H, W) of the whole sampler run
    directly on grey I, V (H, W) in [0, 1] (I: the EM's first image)."""
    import jax
    import jax.numpy as jnp
    from dmfuse_jax.ddfm.sampler import fused_luminance, jitted_sample

    assert fuser.sampler.lamb == 0.5 and fuser.sampler.rho == 0.001 and fuser.seed_used == 3407
    run = jitted_sample(fuser.sampler)
    x_start = jax.random.normal(jax.random.PRNGKey(3407), (1, *BUCKET, 3), jnp.float32)

    def ref(I, V, crop=(0, 0), pad="bottom_right"):
        h, w = I.shape
        ph, pw = BUCKET[0] - h, BUCKET[1] - w
        widths = ((0, ph), (0, pw)) if pad == "bottom_right" else ((ph, 0), (pw, 0))
        I, V = (np.pad(a, widths, mode="reflect")[None] * 2 - 1 for a in (I, V))
        x = np.asarray(run(fuser._params, x_start, I.astype(np.float32), V.astype(np.float32)))
        return fused_luminance(x[0, crop[0]:crop[0] + h, crop[1]:crop[1] + w])
    return ref


def _roadscene():
    """(ir grey (H, W), vis RGB (H, W, 3)) uint8: a crop of the first RoadScene pair (a colour visible image)."""
    name = sorted((DATA / "roadscene" / "vi").iterdir())[0].name
    ir = np.asarray(Image.open(DATA / "roadscene" / "ir" / name).convert("L"))[150:150 + H, 200:200 + W]
    vi = np.asarray(Image.open(DATA / "roadscene" / "vi" / name).convert("RGB"))[150:150 + H, 200:200 + W]
    return ir, vi


def _tno(h, w, at=(100, 60)):
    ir, vi = (np.asarray(Image.open(DATA / "tno" / s / "07.png").convert("L"))[at[0]:at[0] + h, at[1]:at[1] + w]
              for s in ("ir", "vi"))
    return ir, vi


def _assert_differs(a, b, what):
    diff = float(np.abs(a - b).max())
    assert diff > 0.05, f"{what} gives nearly the same image (max diff {diff}): the test could not catch it"


def test_sr3_fuser_is_the_sampler_on_visible_luma_and_infrared(fuser, reference):
    """The Python API on a colour pair: the output's luma is the sampler's result with I = the visible
    luma, V = the infrared, bottom/right reflect padding, top-left crop."""
    ir, vi = _roadscene()
    out = fuser(ir, vi)
    assert out.shape == (H, W, 3) and out.dtype == np.float32
    got = out @ LUMA
    irf, vif = ir / 255.0, vi / 255.0
    y = vif @ LUMA
    want = reference(y, irf)
    ok = (out > 0).all(-1) & (out < 1).all(-1)  # pixels whose RGB was not clipped
    assert ok.mean() > 0.5
    err = float(np.abs(got - want)[ok].max())
    assert err <= 1e-4, f"DDFMFuser's luma differs from the sampler on (vis luma, ir) by {err}"
    # what a wrong fuser would produce instead, each far from `want`
    _assert_differs(reference(irf, y), want, "swapping infrared and visible")
    _assert_differs(reference(vif[..., 0], irf), want, "the red channel instead of the luma")
    _assert_differs(reference(y, irf, crop=(3, 5)), want, "a crop offset of (3, 5)")
    _assert_differs(reference(y, irf, pad="top_left", crop=(BUCKET[0] - H, BUCKET[1] - W)), want,
                    "padding at the top/left")
    # and the fuser is not symmetric in its inputs: swapped images give another image
    yg = np.rint(y * 255).astype(np.uint8)
    _assert_differs(fuser(yg, ir), fuser(ir, yg), "DDFMFuser with its inputs swapped")


def test_fuse_cli_ddfm_sr3_batches_by_bucket_and_matches_the_sampler(tmp_path, capsys, unet, reference):
    """`dmfuse fuse --method ddfm` with an SR3 prior on a folder of 3 grey pairs of two sizes: with
    --bucket 16 --max-buckets 1 --batch-size 2 they share one 48x64 bucket, one compile (a batch of 2,
    the last one filled), and each written image is the sampler's on its own pair."""
    from flax.traverse_util import flatten_dict
    npz = tmp_path / "unet.npz"
    np.savez(npz, **{"/".join(k): np.asarray(v) for k, v in flatten_dict(unet).items()})
    pairs = {"a": _tno(H, W), "b": _tno(H, W, at=(180, 150)), "c": _tno(20, 30, at=(30, 200))}
    for sub in ("ir", "vi"):
        (tmp_path / sub).mkdir()
    for name, (ir, vi) in pairs.items():
        Image.fromarray(ir).save(tmp_path / "ir" / f"{name}.png")
        Image.fromarray(vi).save(tmp_path / "vi" / f"{name}.png")
    rc = main(["fuse", "--method", "ddfm", "--prior", str(npz), "--config", str(ROOT / "configs" / "tiny.py"),
               "--steps", "2", "--bucket", "16", "--max-buckets", "1", "--batch-size", "2",
               "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"), "--out", str(tmp_path / "out"),
               "--no-progress", "--compilation-cache", "off"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "DDFM (2 steps, seed 3407) with prior sr3" in out
    assert "1 shape bucket(s), batch size 2" in out and "1 compilation(s)" in out, out
    for name, (ir, vi) in pairs.items():
        got = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"), np.float64) / 255
        want = reference(vi / 255.0, ir / 255.0)
        assert got.shape == want.shape == ir.shape
        err = float(np.abs(got - want).max())
        assert err <= 0.6 / 255, f"{name}: the written image differs from the sampler's by {err * 255:.2f}/255"
        _assert_differs(reference(ir / 255.0, vi / 255.0), want, f"{name}: swapping infrared and visible")
