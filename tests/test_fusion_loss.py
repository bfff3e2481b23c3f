"""The fusion loss: SSIM, intensity and Sobel-gradient terms, paper and released-code variants."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from dmfuse_jax.config_lib import fusion_loss_config
from dmfuse_jax.training.fusion_loss import fusion_loss, fusion_loss_from_config, sobel_magnitude, ssim


def _img(seed, shape=(2, 40, 36, 1)):
    return jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1.0, maxval=1.0)


def test_ssim_of_identical_images_is_one():
    x = _img(0)
    np.testing.assert_allclose(ssim(x, x, data_range=2.0), 1.0, atol=1e-6)


def test_ssim_matches_scikit_image():
    a, b = np.asarray(_img(1, (1, 48, 40, 1))), np.asarray(_img(2, (1, 48, 40, 1)))
    b = 0.6 * a + 0.4 * b  # correlated, so SSIM is far from 0
    ref = structural_similarity(a[0, ..., 0], b[0, ..., 0], gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=2.0)
    np.testing.assert_allclose(float(ssim(a, b, 2.0)[0]), ref, atol=1e-4)


def test_sobel_magnitude_of_a_ramp():
    x = jnp.tile(jnp.arange(10, dtype=jnp.float32)[None, None, :, None], (1, 8, 1, 1))
    g = sobel_magnitude(x)
    np.testing.assert_allclose(g[0, 1:-1, 1:-1, 0], 8.0)  # |Sobel_x| of a unit ramp, Sobel_y 0


def test_loss_is_zero_when_all_images_agree():
    x = _img(3)
    total, terms = fusion_loss(x, x, x)
    assert abs(float(total)) < 1e-5
    for name in ("loss_ssim", "loss_intensity", "loss_gradient"):
        assert abs(float(terms[name])) < 1e-5, name


def test_intensity_term_targets():
    ir, vi = _img(4), _img(5)
    _, mean_terms = fusion_loss(0.5 * (ir + vi), ir, vi, intensity_target="mean")
    assert float(mean_terms["loss_intensity"]) < 1e-6
    _, max_terms = fusion_loss(jnp.maximum(ir, vi), ir, vi, intensity_target="max")
    assert float(max_terms["loss_intensity"]) < 1e-6
    _, mixed = fusion_loss(jnp.maximum(ir, vi), ir, vi, intensity_target="mean")
    assert float(mixed["loss_intensity"]) > 0.1


def test_gradient_based_ssim_weights_follow_the_sharper_source():
    ir = _img(6)
    vi = jnp.zeros_like(ir)  # flat: no gradient, so all SSIM weight goes to the infrared image
    _, terms = fusion_loss(ir, ir, vi, w_intensity=0, w_gradient=0, ssim_weighting="gradient")
    assert float(terms["loss_ssim"]) < 1e-5
    _, fixed = fusion_loss(ir, ir, vi, w_intensity=0, w_gradient=0, ssim_weighting="fixed")
    assert float(fixed["loss_ssim"]) > 0.1


def test_loss_weights_and_gradients_are_finite():
    ir, vi, f = _img(7), _img(8), _img(9)
    cfg = fusion_loss_config("paper")
    total, t = fusion_loss_from_config(f, ir, vi, cfg)
    expected = 1.0 * t["loss_ssim"] + 4.0 * t["loss_intensity"] + 20.0 * t["loss_gradient"]
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    grad = jax.grad(lambda z: fusion_loss_from_config(z, ir, vi, fusion_loss_config("released_code"))[0])(f)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0


def test_unknown_options_are_rejected():
    x = _img(10)
    with pytest.raises(ValueError, match="intensity_target"):
        fusion_loss(x, x, x, intensity_target="median")
    with pytest.raises(ValueError, match="ssim_weighting"):
        fusion_loss(x, x, x, ssim_weighting="learned")
    with pytest.raises(ValueError):
        fusion_loss_config("other")
    assert isinstance(fusion_loss_config("released_code"), ml_collections.ConfigDict)


# --- independent numpy formulation of the two variants (authors' loss.py for 'released_code',
# DESIGN.md section 5 for 'paper'), with scipy's 2-D correlation in place of the separable lax convs.

def _np_ssim_map(a, b, c1, c2, mode):
    """Gaussian (11, 1.5) SSIM map of 2-D float64 images; mode 'same' = zero padding (torch conv2d with
    padding 5), 'valid' = positions where the window fits."""
    from scipy import ndimage

    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def filt(x):
        y = ndimage.correlate(x, w, mode="constant", cval=0.0)
        return y if mode == "same" else y[5:-5, 5:-5]

    mu_a, mu_b = filt(a), filt(b)
    saa, sbb, sab = filt(a * a) - mu_a ** 2, filt(b * b) - mu_b ** 2, filt(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))


def _np_sobel(x):
    from scipy import ndimage

    kx = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    ky = np.array([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])  # loss.py's kernely
    return np.abs(ndimage.correlate(x, kx, mode="constant")) + np.abs(ndimage.correlate(x, ky, mode="constant"))


def _np_released_loss(f, ir, vi, per_image_weights=False):
    """loss.py's g_content_loss: 10 (1 - (wA ssim(ir, F) + wB ssim(vi, F))) + 16 L_grad + 14 L_int,
    wA = mean(grad ir) / (mean(grad ir) + mean(grad vi)) over the BATCH (torch.mean of the 4-D tensor),
    ssim = mean of the zero-padded SSIM map over the batch, C1 = 0.01^2, C2 = 0.03^2."""
    f, ir, vi = (np.asarray(t, np.float64)[..., 0] for t in (f, ir, vi))
    s_ir = np.array([_np_ssim_map(a, b, 1e-4, 9e-4, "same").mean() for a, b in zip(ir, f)])
    s_vi = np.array([_np_ssim_map(a, b, 1e-4, 9e-4, "same").mean() for a, b in zip(vi, f)])
    g_ir, g_vi, g_f = (np.stack([_np_sobel(x) for x in t]) for t in (ir, vi, f))
    if per_image_weights:  # the old (wrong) reading, to show the test tells them apart
        m_ir, m_vi = g_ir.mean(axis=(1, 2)), g_vi.mean(axis=(1, 2))
    else:
        m_ir, m_vi = g_ir.mean(), g_vi.mean()
    w_ir, w_vi = m_ir / (m_ir + m_vi), m_vi / (m_ir + m_vi)
    ssim_term = np.mean(1.0 - (w_ir * s_ir + w_vi * s_vi))
    l_int = np.mean(np.abs(f - np.maximum(ir, vi)))
    l_grad = np.mean(np.abs(g_f - np.maximum(g_ir, g_vi)))
    return 10 * ssim_term + 16 * l_grad + 14 * l_int


def _sharp_and_smooth_batch():
    """Two pairs whose sharpness ratios differ, so per-image and batch-mean SSIM weights disagree."""
    ir, vi, f = (np.array(_img(s, (2, 24, 20, 1))) for s in (11, 12, 13))
    vi[1] = 0.1 * vi[1]  # second pair: a nearly flat visible image
    f = 0.5 * f + 0.5 * ir
    return ir, vi, f


def test_released_code_loss_matches_an_independent_formulation_of_loss_py():
    ir, vi, f = _sharp_and_smooth_batch()
    got, _ = fusion_loss_from_config(jnp.asarray(f), jnp.asarray(ir), jnp.asarray(vi),
                                     fusion_loss_config("released_code"))
    want = _np_released_loss(f, ir, vi)
    assert float(got) == pytest.approx(want, rel=2e-5)
    # the test can tell batch-mean weights from per-image ones
    assert abs(_np_released_loss(f, ir, vi, per_image_weights=True) - want) > 1e-3 * want


def test_paper_loss_matches_an_independent_formulation_of_design_section_5():
    ir, vi, f = _sharp_and_smooth_batch()
    got, _ = fusion_loss_from_config(jnp.asarray(f), jnp.asarray(ir), jnp.asarray(vi), fusion_loss_config("paper"))
    f64, ir64, vi64 = (t[..., 0].astype(np.float64) for t in (f, ir, vi))
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # data range 2 for [-1, 1]
    l_ssim = np.mean([0.5 * (1 - _np_ssim_map(x, y, c1, c2, "valid").mean())
                      + 0.5 * (1 - _np_ssim_map(z, y, c1, c2, "valid").mean()) for x, z, y in zip(ir64, vi64, f64)])
    g_ir, g_vi, g_f = (np.stack([_np_sobel(x) for x in t]) for t in (ir64, vi64, f64))
    l_int = np.mean(np.abs(f64 - (ir64 + vi64) / 2))
    want = 1 * l_ssim + 4 * l_int + 20 * np.mean(np.abs(g_f - np.maximum(g_ir, g_vi)))
    assert float(got) == pytest.approx(want, rel=2e-5)


def _pet_like(h=32, w=32):
    """A red disc (PET-like hot spot) on black: (1, H, W, 3) RGB in [0, 1]."""
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 4) ** 2).astype(np.float32)
    return np.stack([disc * 0.9, disc * 0.2, disc * 0.05], -1)[None]


def test_colour_gradient_loss_is_the_luma_gradient_term_for_a_grey_visible_image():
    from dmfuse_jax.training.fusion_loss import colour_gradient_loss

    f, a, b = _img(1), _img(2), _img(3)
    _, aux = fusion_loss(f, a, b)
    got = colour_gradient_loss(f, a, b, jnp.zeros(f.shape[:-1] + (3,)), -1.0, 1.0)
    np.testing.assert_allclose(float(got), float(aux["loss_gradient"]), rtol=1e-6)


def test_colour_gradient_loss_sees_a_channel_the_recolouring_clips():
    """A fused luma darker than PET's on the hot spot clips PET's blue channel to black there: the
    recoloured term rises and its gradient pushes the luma up; the luma-only term cannot tell."""
    from dmfuse_jax.data.images import luma
    from dmfuse_jax.training.fusion_loss import colour_gradient_loss, recolour

    rgb = _pet_like()
    y = luma(rgb)
    chroma = jnp.asarray((rgb - y) * 2)  # model-range offsets of [-1, 1]
    vi, ir = jnp.asarray(y * 2 - 1), jnp.full(y.shape, -1.0)
    np.testing.assert_allclose(np.asarray(recolour(vi, chroma, -1, 1)), rgb * 2 - 1, atol=1e-6)
    exact = colour_gradient_loss(vi, ir, vi, chroma, -1.0, 1.0)
    assert float(exact) < 1e-6, "the visible image itself preserves every channel's edges"
    dim = jnp.where(vi > -1, vi - 0.2, vi)
    assert float(colour_gradient_loss(dim, ir, vi, chroma, -1.0, 1.0)) > 10 * float(exact) + 1e-3
    grad = jax.grad(lambda f: colour_gradient_loss(f, ir, vi, chroma, -1.0, 1.0))(dim)
    assert float(jnp.sum(grad * (vi > -1))) < 0, "descent raises the luma of the spot"


def test_w_colour_needs_the_offsets_and_adds_its_term():
    cfg = fusion_loss_config("paper")
    f, a, b = _img(4), _img(5), _img(6)
    base, _ = fusion_loss_from_config(f, a, b, cfg)
    cfg.w_colour = 2.0
    with pytest.raises(ValueError, match="vi_chroma"):
        fusion_loss_from_config(f, a, b, cfg)
    ch = jnp.zeros(f.shape[:-1] + (3,))
    total, aux = fusion_loss_from_config(f, a, b, cfg, vi_chroma=ch)
    np.testing.assert_allclose(float(total), float(base) + 2.0 * float(aux["loss_colour"]), rtol=1e-6)


def _harvard_pet_pair(shared_dir, name="11.png"):
    """A Harvard MRI-PET pair as 8-bit arrays: MRI (H, W), PET (H, W, 3), PET's BT.601 luma (H, W)."""
    from PIL import Image

    d = shared_dir / "data" / "harvard" / "MRI_PET"
    mri = np.asarray(Image.open(d / "MRI" / name).convert("L"), np.float64)
    pet = np.asarray(Image.open(d / "PET" / name).convert("RGB"), np.float64)
    return mri, pet, pet @ np.array([0.299, 0.587, 0.114])


@pytest.mark.parametrize("rule", ["max", "mean", "mri"])
def test_edge_preservation_loss_is_one_minus_the_qabf_metric_per_channel(shared_dir, rule):
    """The differentiable term against the metric it stands for (VIFB's Qabf, colour scored per
    channel, evaluation/metrics/gradient.py) on a real MRI-PET pair, for three fused lumas."""
    from dmfuse_jax.evaluation.metrics.gradient import qabf
    from dmfuse_jax.training.fusion_loss import edge_preservation_loss

    mri, pet, y_pet = _harvard_pet_pair(shared_dir)
    chroma = pet - y_pet[..., None]
    fy = {"max": np.maximum(mri, y_pet), "mean": 0.5 * (mri + y_pet), "mri": mri}[rule]
    rgb = np.clip(fy[..., None] + chroma, 0, 255)
    metric = np.mean([qabf(mri, pet[..., c], rgb[..., c]) for c in range(3)])

    def m(x):  # 8-bit -> model range, (1, H, W, C)
        return jnp.asarray(x / 127.5 - 1.0, jnp.float32).reshape((1,) + x.shape[:2] + (-1,))

    got = 1.0 - float(edge_preservation_loss(m(fy), m(mri), m(y_pet), jnp.asarray(chroma / 127.5, jnp.float32)[None],
                                             -1.0, 1.0))
    np.testing.assert_allclose(got, metric, atol=5e-3, err_msg=f"{rule}: 1 - loss is not Qabf")


def test_edge_preservation_loss_gradient_is_finite_and_descends(shared_dir):
    """On a 64x64 crop of a real MRI-PET pair (the metric's orientation wraps at gx = 0, so exactly
    symmetric synthetic edges are a poor test): the gradient is finite, also where F equals a
    source (the metric's ratio branches there), and steps against it lower the loss about as the
    first-order term predicts."""
    from dmfuse_jax.training.fusion_loss import edge_preservation_loss

    mri, pet, y_pet = _harvard_pet_pair(shared_dir)
    crop = (slice(96, 160), slice(96, 160))

    def m(x):
        return jnp.asarray(x[crop] / 127.5 - 1.0, jnp.float32).reshape((1, 64, 64, -1))

    chroma = jnp.asarray((pet - y_pet[..., None])[crop] / 127.5, jnp.float32)[None]
    ir, vi = m(mri), m(y_pet)

    def loss(x):
        return edge_preservation_loss(x, ir, vi, chroma, -1.0, 1.0)

    f = 0.5 * (ir + vi)
    g = jax.grad(loss)(f)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    for size in (1e-3, 1e-2):
        step = size / float(jnp.abs(g).max())
        drop, predicted = float(loss(f)) - float(loss(f - step * g)), step * float(jnp.sum(g * g))
        assert 0.5 * predicted < drop < 1.5 * predicted, (size, drop, predicted)
    for source in (ir, vi):
        assert bool(jnp.all(jnp.isfinite(jax.grad(loss)(source))))
    assert float(loss(vi)) > float(loss(f)) > float(loss(ir)) > 0, "this crop's edges are mostly the MRI's"


def test_w_edge_needs_the_offsets_and_adds_its_term():
    cfg = fusion_loss_config("paper")
    f, a, b = _img(4), _img(5), _img(6)
    base, aux0 = fusion_loss_from_config(f, a, b, cfg)
    assert "loss_edge" not in aux0
    cfg.w_edge = 3.0
    with pytest.raises(ValueError, match="w_edge"):
        fusion_loss_from_config(f, a, b, cfg)
    ch = jnp.zeros(f.shape[:-1] + (3,))
    total, aux = fusion_loss_from_config(f, a, b, cfg, vi_chroma=ch)
    assert 0.0 < float(aux["loss_edge"]) < 1.0
    np.testing.assert_allclose(float(total), float(base) + 3.0 * float(aux["loss_edge"]), rtol=1e-6)
