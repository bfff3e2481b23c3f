"""Classical baselines: exact rules, Laplacian pyramid round trip and fusion rule, input checks."""
from __future__ import annotations

import numpy as np
import pytest

from dmfuse_jax.evaluation import baselines as B


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(1)
    ir = rng.random((37, 50)).astype(np.float32)
    vis = rng.random((37, 50)).astype(np.float32)
    return ir, vis


def test_registry_names_and_signature(pair):
    assert list(B.BASELINES) == ["average", "max", "laplacian_pyramid"]
    for name, fn in B.BASELINES.items():
        out = fn(*pair)
        assert out.shape == pair[0].shape and out.dtype == np.float32, name
        assert out.min() >= 0.0 and out.max() <= 1.0, name


def test_average_and_max_are_pixelwise(pair):
    ir, vis = pair
    np.testing.assert_array_equal(B.average(ir, vis), ((ir + vis) / 2).astype(np.float32))
    np.testing.assert_array_equal(B.maximum(ir, vis), np.maximum(ir, vis))


@pytest.mark.parametrize("shape", [(64, 64), (37, 50), (129, 33)])
def test_laplacian_pyramid_reconstructs_exactly(shape):
    x = np.random.default_rng(2).random(shape)
    n = B.pyramid_levels(shape)
    pyr = B.laplacian_pyramid_decompose(x, n)
    assert len(pyr) == n + 1
    np.testing.assert_allclose(B.laplacian_pyramid_reconstruct(pyr), x, atol=1e-12)


def test_fusing_an_image_with_itself_returns_it(pair):
    ir = pair[0]
    np.testing.assert_allclose(B.laplacian_pyramid(ir, ir), ir, atol=1e-6)


def test_laplacian_fusion_keeps_the_stronger_detail():
    flat = np.full((64, 64), 0.5, np.float32)
    detail = flat.copy()
    detail[20:44, 30:34] = 0.9  # a bright bar only in the "visible" image
    fused = B.laplacian_pyramid(flat, detail)
    # max-abs detail selection keeps the bar's full contrast; averaging would halve it
    assert fused[32, 31] - fused[32, 10] > 0.3
    avg = B.average(flat, detail)
    assert avg[32, 31] - avg[32, 10] == pytest.approx(0.2, abs=1e-6)


def test_levels_shrink_for_small_images():
    assert B.pyramid_levels((576, 768)) == B.DEFAULT_LEVELS
    assert B.pyramid_levels((20, 300)) == 1  # 20 -> 10 -> (5 < 8)
    assert B.pyramid_levels((10, 10)) == 0


def test_bad_inputs_are_rejected(pair):
    ir, vis = pair
    with pytest.raises(ValueError, match="differ in size"):
        B.average(ir, vis[:-1])
    with pytest.raises(ValueError, match="grey"):
        B.laplacian_pyramid(ir[..., None], vis[..., None])
