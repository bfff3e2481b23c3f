"""Diffusion maths: cosine schedule, continuous noise levels, q_sample, DDPM loss, sampling."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmfuse_jax.diffusion import ddpm_loss, make_schedule, p_sample_loop, q_sample, sample_noise_level


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("cosine", 2000)


def test_cosine_schedule(schedule):
    s = schedule.sqrt_alphas_cumprod_prev
    assert s.shape == (2001,) and s[0] == 1.0
    assert np.all(np.diff(s) < 0), "sqrt_alphas_cumprod_prev must decrease"
    assert schedule.betas.max() <= 0.999
    # Nichol & Dhariwal: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)
    f = lambda t: np.cos(((t / 2000 + 0.008) / 1.008) * np.pi / 2) ** 2
    np.testing.assert_allclose(schedule.alphas_cumprod[99], f(100) / f(0), rtol=1e-10)


def test_noise_level_lies_in_its_step_interval(schedule):
    t = jnp.array([1, 5, 50, 100, 2000] * 20)
    g = np.asarray(sample_noise_level(jax.random.PRNGKey(0), schedule, t))
    s = schedule.sqrt_alphas_cumprod_prev
    t = np.asarray(t)
    assert np.all(g >= s[t] - 1e-6) and np.all(g <= s[t - 1] + 1e-6)


def test_q_sample_endpoints():
    x0 = jnp.ones((2, 4, 4, 3))
    eps = -jnp.ones((2, 4, 4, 3))
    np.testing.assert_allclose(q_sample(x0, jnp.array([1.0, 0.0]), eps)[:, 0, 0, 0], [1.0, -1.0])
    g = jnp.array([0.6, 0.6])
    np.testing.assert_allclose(q_sample(x0, g, eps)[0, 0, 0, 0], 0.6 - 0.8, atol=1e-6)


def test_ddpm_loss_of_a_zero_predictor_is_the_noise_variance(schedule):
    x0 = jnp.zeros((8, 16, 16, 3))
    loss, aux = ddpm_loss(lambda x, g: jnp.zeros_like(x), x0, jax.random.PRNGKey(0), schedule, "l2")
    assert abs(float(loss) - 1.0) < 0.05
    l1, _ = ddpm_loss(lambda x, g: jnp.zeros_like(x), x0, jax.random.PRNGKey(0), schedule, "l1")
    assert abs(float(l1) - np.sqrt(2 / np.pi)) < 0.05
    assert 0.0 < float(aux["noise_level_mean"]) < 1.0


def test_ddpm_loss_of_an_oracle_is_zero(schedule):
    """A denoiser that inverts q_sample exactly (x0 known) has zero loss."""
    x0 = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 1), minval=-1, maxval=1)

    def oracle(x_t, g):
        g = g[:, None, None, None]
        return (x_t - g * x0) / jnp.sqrt(1 - g * g)

    loss, _ = ddpm_loss(oracle, x0, jax.random.PRNGKey(2), schedule, "l2")
    assert float(loss) < 1e-6


def test_p_sample_loop_shapes_range_and_determinism(schedule):
    fn = jax.jit(lambda k: p_sample_loop(lambda x, g: 0.1 * x, k, (2, 8, 8, 1), schedule, num_steps=10))
    a, b = fn(jax.random.PRNGKey(0)), fn(jax.random.PRNGKey(0))
    assert a.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a).max()) <= 1.0


def test_unknown_schedule_rejected():
    with pytest.raises(ValueError, match="beta schedule"):
        make_schedule("quadratic", 10)
