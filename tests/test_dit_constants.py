"""SPEC section 12 sanity constants (computed from upstream's formulas)."""

import jax.numpy as jnp
import numpy as np

from dit_jax.layers import rope_angles, sincos_pos_embed_2d, timestep_frequencies


def test_sincos_pos_embed_values():
    pe = sincos_pos_embed_2d(1152, 16)  # XL/1: 16x16 tokens
    assert pe.shape == (256, 1152) and pe.dtype == np.float32
    # token 18 = row 1, col 2; column index in the first half, sin before cos
    np.testing.assert_allclose(
        pe[18, [0, 1, 288, 576, 577, 864]],
        [0.9092974, 0.9336751, -0.41614684, 0.84147096, 0.8240513, 0.5403023],
        rtol=1e-6,
    )


def test_timestep_frequency_features():
    emb = timestep_frequencies(jnp.array([0.5]), 256)  # raw t, not t * 1000; cos first
    np.testing.assert_allclose(emb[0, [0, 1, 127, 128, 129]],
                               [0.87758255, 0.89369327, 1.0, 0.47942555, 0.44867843], rtol=1e-6)


def test_rope_frequencies_and_angles():
    angles = rope_angles(72, 16)  # XL head_dim 72 -> r = 36, 18 frequencies per axis
    assert angles.shape == (256, 72)
    base = angles[16 * 1 + 1, 0::2][:18]  # row 1: the first half holds 1 * f_j, interleaved
    np.testing.assert_allclose(base[[0, 1, 2, 17]], [1.0, 0.5994842, 0.35938138, 0.0001668101],
                               rtol=1e-6)
    np.testing.assert_allclose(angles[18, [0, 1, 2, 3, 36, 37, 38]],
                               [1, 1, 0.5994842, 0.5994842, 2, 2, 1.1989684], rtol=1e-6)
