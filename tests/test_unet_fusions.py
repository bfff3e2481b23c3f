"""The UNet's memory-traffic rewrites are exact: one-pass GroupNorm = flax's nn.GroupNorm, and the
split 1x1 residual convolution = nn.Conv on the concatenation (same params, same values)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmfuse_jax.models.unet import GroupNorm, SplitConv1x1


def test_one_pass_group_norm_equals_flax_group_norm():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 24))
    ours, ref = GroupNorm(num_groups=4), nn.GroupNorm(num_groups=4, epsilon=1e-5)
    params = ref.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, params)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=2e-5, rtol=1e-5)
    g_ours = jax.grad(lambda p, x: jnp.sum(jnp.sin(ours.apply(p, x))), argnums=(0, 1))(params, x)
    g_ref = jax.grad(lambda p, x: jnp.sum(jnp.sin(ref.apply(p, x))), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    bf16 = GroupNorm(num_groups=4, dtype=jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16


def test_split_residual_conv_equals_conv_of_the_concatenation():
    a = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 12))
    b = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 5, 20))
    ref = nn.Conv(8, (1, 1))
    params = ref.init(jax.random.PRNGKey(2), jnp.concatenate([a, b], -1))
    split = SplitConv1x1(8)
    assert jax.tree.map(jnp.shape, split.init(jax.random.PRNGKey(2), (a, b))) == jax.tree.map(jnp.shape, params)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
    np.testing.assert_allclose(split.apply(params, (a, b)), ref.apply(params, jnp.concatenate([a, b], -1)),
                               atol=1e-5, rtol=1e-5)
