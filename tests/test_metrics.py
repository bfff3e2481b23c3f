"""Fusion metrics: analytic cases, symmetry, scikit-image cross-checks, a literal port of fmi.m."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import fft as sfft

from dmfuse_jax.evaluation import metrics as M
from dmfuse_jax.evaluation.metrics.gradient import _FMI_FEATURES
from dmfuse_jax.evaluation.metrics.phase_congruency import _pc_bank
from dmfuse_jax.evaluation.metrics.vifb import _mi_vifb

from conftest import DATA
from metrics_reference import fmi_reference

EXPECTED_NAMES = ["EN", "SD", "PC", "FMI_pixel", "Qe", "Qabf", "MS_SSIM", "VIF", "SSIM", "MI", "SF", "AG",
                  "PSNR", "RMSE", "CE", "EI", "SCD", "CC", "Qcb", "Qcv", "MS_SSIM_MEF"]
SYMMETRIC = ["EN", "SD", "PC", "FMI_pixel", "Qe", "Qabf", "MS_SSIM", "SSIM", "MI", "SF", "AG", "PSNR",
             "RMSE", "CE", "EI", "SCD", "CC", "Qcb", "Qcv", "MS_SSIM_MEF"]  # VIF picks a source on ties of its gain


def _tno(stem: str, crop=(slice(150, 342), slice(200, 392))) -> tuple[np.ndarray, np.ndarray]:
    from dmfuse_jax.data.images import read_image

    ir = M.to_8bit_grey(read_image(DATA / "tno" / "ir" / f"{stem}.png"))[crop]
    vis = M.to_8bit_grey(read_image(DATA / "tno" / "vi" / f"{stem}.png"))[crop]
    return ir, vis


@pytest.fixture(scope="module")
def triple():
    """A real 192x192 TNO crop pair and a plausible fused image (mean with a little noise)."""
    ir, vis = _tno("01")
    rng = np.random.default_rng(0)
    fused = np.clip(np.floor((ir + vis) / 2 + rng.normal(0, 3, ir.shape) + 0.5), 0, 255)
    return ir, vis, fused


@pytest.fixture(scope="module")
def scores(triple):
    return {n: fn(*triple) for n, fn in M.METRICS.items()}


def test_registry_names_order_and_references():
    assert list(M.METRICS) == EXPECTED_NAMES
    assert M.LOWER_IS_BETTER <= set(M.METRICS)
    for conv in M.CONVENTIONS.values():
        assert list(conv.metrics) == EXPECTED_NAMES
        for name, fn in conv.metrics.items():
            assert fn.__doc__ and "Ref" in fn.__doc__, f"{name} ({fn.__name__}) has no reference in its docstring"


def test_all_metrics_finite_on_real_images(scores):
    bad = {n: v for n, v in scores.items() if not np.isfinite(v)}
    assert not bad, f"non-finite scores: {bad}"


def test_constant_fused_image_has_zero_entropy_sd_and_gradients(triple):
    ir, vis, _ = triple
    const = np.full_like(ir, 117.0)
    for name in ("EN", "SD", "SF", "AG", "EI"):
        assert M.METRICS[name](ir, vis, const) == pytest.approx(0.0, abs=1e-12), name


@pytest.mark.parametrize("name", SYMMETRIC)
def test_swapping_the_sources_does_not_change_symmetric_metrics(triple, scores, name):
    ir, vis, fused = triple
    assert M.METRICS[name](vis, ir, fused) == pytest.approx(scores[name], rel=1e-9, abs=1e-12)


def test_fused_equal_to_both_sources_scores_perfectly(triple):
    ir = triple[0]
    # (PC is not 1 here: metricZhao.m masks the sources' feature maps, not the fused one.)
    perfect = {"SSIM": 2.0, "MS_SSIM": 1.0, "FMI_pixel": 1.0, "Qe": 1.0, "VIF": 1.0, "CC": 1.0,
               "Qcb": 1.0, "Qcv": 0.0, "RMSE": 0.0, "CE": 0.0}
    for name, want in perfect.items():
        got = M.METRICS[name](ir, ir, ir)
        assert got == pytest.approx(want, abs=1e-6), f"{name}: {got} != {want}"
    assert M.psnr(ir, ir, ir) == float("inf")


def test_ssim_of_a_copied_source_is_one_plus_the_cross_ssim(triple):
    ir, vis, _ = triple
    assert M.structural_similarity(ir, vis, ir) == pytest.approx(1.0 + M.ssim_single(vis, ir), abs=1e-12)


def test_mi_of_a_copied_source_is_its_entropy_plus_the_cross_mi(triple):
    ir, vis, _ = triple
    ir = ir.copy()
    ir[0, 0], ir[0, 1] = 0.0, 255.0  # full range: VIFB's min-max stretch leaves the image unchanged
    h_nats = M.entropy(None, None, ir) * np.log(2.0)
    assert M.mutual_information(ir, vis, ir) == pytest.approx(h_nats + _mi_vifb(vis, ir), abs=1e-10)


def test_entropy_matches_skimage(triple):
    from skimage.measure import shannon_entropy

    fused = triple[2]
    assert M.entropy(None, None, fused) == pytest.approx(shannon_entropy(fused.astype(np.uint8), base=2), abs=1e-10)


def test_sd_is_the_population_standard_deviation(triple):
    fused = triple[2]
    assert M.standard_deviation(None, None, fused) == pytest.approx(np.std(fused, ddof=0), rel=1e-12)


def test_psnr_and_rmse_match_skimage_when_both_sources_are_equal(triple):
    from skimage.metrics import mean_squared_error, peak_signal_noise_ratio

    ir, _, fused = triple
    assert M.psnr(ir, ir, fused) == pytest.approx(peak_signal_noise_ratio(ir, fused, data_range=255), rel=1e-12)
    assert M.rmse(ir, ir, fused) == pytest.approx(np.sqrt(mean_squared_error(ir, fused)), rel=1e-12)


def test_ssim_matches_skimage_gaussian_ssim(triple):
    from skimage.metrics import structural_similarity

    ir, _, fused = triple
    want = structural_similarity(ir, fused, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=255)
    assert M.ssim_single(ir, fused) == pytest.approx(want, abs=1e-9)


def test_ms_ssim_rejects_images_too_small_for_five_scales():
    x = np.zeros((100, 300))
    with pytest.raises(ValueError, match="176"):
        M.ms_ssim(x, x, x)
    with pytest.raises(ValueError, match="44"):
        M.ms_ssim_mef(x[:40], x[:40], x[:40])


# --- FMI: literal, loop-for-loop port of Haghighat's fmi.m (w = 3) as the reference (metrics_reference.py)


@pytest.mark.parametrize("feature", ["none", "edge"])
def test_vectorised_fmi_equals_a_literal_port_of_fmi_m(triple, feature):
    ir, vis, fused = (x[40:58, 60:80] for x in triple)
    fa, fb, ff = (_FMI_FEATURES[feature](x / 255.0) for x in (vis, ir, fused))
    want = fmi_reference(fa, fb, ff)
    assert M.fmi(ir, vis, fused, feature=feature) == pytest.approx(want, abs=1e-12)


def test_matlab_edge_finds_a_thin_vertical_step():
    x = np.zeros((9, 12))
    x[:, 6:] = 1.0
    e = M.matlab_edge_sobel(x)
    cols = sorted(set(np.nonzero(e)[1]))
    assert len(cols) == 1 and cols[0] in (5, 6), f"edge columns {cols}"
    assert e[0].sum() == 0 and e[-1].sum() == 0  # borders are never edges


@pytest.mark.parametrize("shape", [(48, 64), (47, 63)])
def test_phase_congruency_noise_sums_equal_the_direct_ifft(shape):
    filters, noise = _pc_bank(*shape)
    for o in range(len(noise)):
        ifft = np.real(sfft.ifft2(filters[o].astype(np.float64), axes=(-2, -1))) * np.sqrt(shape[0] * shape[1])
        an2 = np.sum(ifft ** 2)
        aiaj = sum(np.sum(ifft[i] * ifft[j]) for i in range(4) for j in range(i + 1, 4))
        np.testing.assert_allclose([an2, aiaj], noise[o][1:3], rtol=1e-5)


def test_phase_congruency_is_high_on_a_step_edge_and_zero_on_flat_ground():
    x = np.zeros((64, 64))
    x[:, 32:] = 200.0
    pc, big, small = M.phase_congruency(x)
    assert pc[32, 31:33].max() > 0.5
    assert pc[32, 5] < 0.05 and pc[32, 58] < 0.05
    assert np.all(big >= small - 1e-9)


# --- colour handling


def test_grey_fused_image_is_scored_the_same_in_both_colour_modes(triple):
    ir, vis, fused = (x / 255.0 for x in triple)
    names = ["EN", "SSIM", "Qabf"]
    a = M.evaluate_images(ir, vis, fused, names, color="luminance")
    b = M.evaluate_images(ir, vis, fused, names, color="per-channel")
    assert a == b


def test_per_channel_mode_averages_the_channels_with_the_grey_source_reused(triple):
    ir, vis, fused = (x / 255.0 for x in triple)
    vis_rgb = np.stack([vis, np.flipud(vis), vis], -1)
    fused_rgb = np.stack([fused, fused[::-1], fused], -1)
    names = ["SSIM", "MI", "EN"]
    got = M.evaluate_images(ir[..., None], vis_rgb, fused_rgb, names, color="per-channel")
    ch0 = M.evaluate_images(ir, vis, fused, names)
    ch1 = M.evaluate_images(ir, np.flipud(vis), fused[::-1], names)
    for n in names:
        assert got[n] == pytest.approx((2 * ch0[n] + ch1[n]) / 3, rel=1e-12), n


def test_luminance_mode_scores_the_bt601_luma_of_a_colour_image(triple):
    from dmfuse_jax.data.images import rgb_to_ycbcr

    ir, vis, fused = (x / 255.0 for x in triple)
    rgb = np.stack([fused, 0.5 * fused, 1.0 - fused], -1)
    y = rgb_to_ycbcr(rgb)[..., 0]
    got = M.evaluate_images(ir, vis, rgb, ["EN", "SD"], color="luminance", convention="standard")
    assert got == M.evaluate_images(ir, vis, y, ["EN", "SD"], convention="standard")


def test_unknown_metric_or_colour_mode_is_rejected(triple):
    ir, vis, fused = triple
    with pytest.raises(ValueError, match="NOPE"):
        M.evaluate_images(ir / 255, vis / 255, fused / 255, ["EN", "NOPE"])
    with pytest.raises(ValueError, match="colour mode"):
        M.evaluate_images(ir / 255, vis / 255, fused / 255, ["EN"], color="hsv")
