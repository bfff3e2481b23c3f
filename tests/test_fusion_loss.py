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
