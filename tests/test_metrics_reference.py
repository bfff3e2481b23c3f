"""Every metric under --convention vifb against an independent formulation (tests/metrics_reference.py:
loop-for-loop transcriptions of VIFB's metrics*.m and of the MATLAB the field uses for the others), on
small hand-made images, grey and colour. Plus the conventions' differences, worked by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dmfuse_jax.evaluation import metrics as M

import metrics_reference as R

# PC runs its image FFTs in float32 (speed); everything else is float64 and agrees to rounding.
TOLERANCE = {"PC": 1e-6}


@pytest.fixture(scope="module")
def worst():
    return R.largest_relative_differences()


@pytest.mark.parametrize("name", list(M.METRICS))
def test_metric_matches_its_independent_formulation(worst, name):
    tol = TOLERANCE.get(name, 1e-12)
    assert worst[name] <= tol, f"{name}: relative difference {worst[name]:.3e} from the reference > {tol}"


def test_the_references_catch_the_old_qabf_orientation_and_colour_sf():
    vis, ir, fused = R.hand_made_triple(20, 24, 0)
    # Sobel responses with gx not negated (the old reading of conv2): atan(gy / gx) = -atan(gy / -gx)
    # where gx != 0, pi/2 where gx == 0 (the hand-made fused image has a saturated, flat corner)
    from dmfuse_jax.evaluation.metrics import gradient as G

    old = G._qabf_grad
    try:
        G._qabf_grad = lambda x: (lambda g, a: (g, np.where(a == np.pi / 2, a, -a)))(*old(x))
        flipped = G.qabf(ir, vis, fused)
    finally:
        G._qabf_grad = old
    want = R.qabf(vis, ir, fused)
    assert abs(M.qabf(ir, vis, fused) - want) <= 1e-12 * want
    assert abs(flipped - want) > 1e-4 * want, "the reference cannot tell the Qabf orientations apart"
    # SF of a colour image: VIFB's H x 3W array differs from the per-channel mean by the two seams
    fused_c = np.stack([fused, np.fliplr(fused), 255 - fused], -1)
    per_channel = np.mean([M.spatial_frequency(None, None, fused_c[..., k]) for k in range(3)])
    assert abs(R.spatial_frequency(None, None, fused_c) - per_channel) > 1e-3 * per_channel


def test_psnr_rmse_ssim_and_mi_worked_by_hand_under_both_conventions():
    # 2x2 images: fused F = [[0, 0], [0, 0]], vis = [[2, 0], [0, 0]], ir = [[0, 0], [0, 4]].
    f = np.zeros((2, 2))
    vis = np.array([[2.0, 0], [0, 0]])
    ir = np.array([[0.0, 0], [0, 4]])
    # VIFB's helper: sqrt(sum d^2) / (m n) = 2/4 (vis) and 4/4 (ir); RMSE = (0.5 + 1) / 2 = 0.75;
    # PSNR = 20 log10(255 / sqrt(0.75)).
    assert M.rmse_vifb(ir, vis, f) == pytest.approx(0.75, rel=1e-15)
    assert M.psnr_vifb(ir, vis, f) == pytest.approx(20 * math.log10(255 / math.sqrt(0.75)), rel=1e-15)
    # textbook: MSE(vis) = 4/4 = 1, MSE(ir) = 16/4 = 4; RMSE = (1 + 2) / 2 = 1.5; PSNR = 10 log10(255^2 / 2.5)
    assert M.rmse(ir, vis, f) == pytest.approx(1.5, rel=1e-15)
    assert M.psnr(ir, vis, f) == pytest.approx(10 * math.log10(255 ** 2 / 2.5), rel=1e-15)
    # MI of a two-level image with itself: H = 1 bit = ln 2 nats; sources = fused = checkerboard of 0/255
    cb = np.indices((12, 12)).sum(0) % 2 * 255.0
    assert M.mutual_information(cb, cb, cb) == pytest.approx(2 * math.log(2), rel=1e-12)       # vifb, nats
    assert M.mutual_information_bits(cb, cb, cb) == pytest.approx(2.0, rel=1e-12)               # standard, bits
    # a 0/1 checkerboard: VIFB stretches it to 0/255 (still 1 bit each), the textbook MI sees the same 2 levels
    cb1 = cb / 255.0
    assert M.mutual_information(cb1, cb1, cb1) == pytest.approx(2 * math.log(2), rel=1e-12)
    assert M.mutual_information_bits(cb1, cb1, cb1) == pytest.approx(2.0, rel=1e-12)
    # SSIM of identical images is 1 each: vifb sums (2), standard averages (1)
    assert M.structural_similarity(cb, cb, cb) == pytest.approx(2.0, abs=1e-12)
    assert M.structural_similarity_mean(cb, cb, cb) == pytest.approx(1.0, abs=1e-12)


def test_colour_sf_is_the_side_by_side_planes_worked_by_hand():
    # planes 1x2: R = [0, 3], G = [3, 3], B = [3, 7] -> H x 3W row [0 3 3 3 3 7]: horizontal
    # differences 3, 0, 0, 0, 4 -> RF = (9 + 16) / 6, no vertical neighbours; SF = sqrt(25 / 6).
    planes = [np.array([[0.0, 3]]), np.array([[3.0, 3]]), np.array([[3.0, 7]])]
    assert M.spatial_frequency_side_by_side(planes) == pytest.approx(math.sqrt(25 / 6), rel=1e-15)


def test_grey_fused_with_colour_sources_uses_matlab_rgb2gray_under_vifb():
    # rgb2gray on uint8: round(0.298936 * 10 + 0.587043 * 20 + 0.114021 * 200) = round(37.53) = 38 and
    # round(0.298936 * 250 + 0.587043 * 10 + 0.114021 * 40) = round(85.17) = 85
    rgb = np.zeros((16, 16, 3))
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 200
    rgb[4:9, 3:12] = (250, 10, 40)
    grey = M.to_8bit_grey_channels(rgb / 255) @ np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
    want = np.floor(grey + 0.5)
    assert set(np.unique(want)) == {38.0, 85.0}
    f = want / 255
    got = M.evaluate_images(f, rgb / 255, f, ["RMSE"], convention="vifb")  # rgb2gray(vis) = ir = fused
    assert got["RMSE"] == pytest.approx(0.0, abs=1e-15)
    assert M.CONVENTIONS["vifb"].grey(rgb / 255)[5, 5] == 85.0
