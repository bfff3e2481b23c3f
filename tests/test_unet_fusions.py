"""The UNet's one-pass GroupNorm is exact: flax's nn.GroupNorm with the same params, values and
gradients."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmfuse_jax.models.unet import GroupNorm


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

