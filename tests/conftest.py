"""Test configuration: float64 available, and implicit promotion made an error.

As in lineax/equinox, strict dtype promotion and rank promotion "raise" turn silent
float32/float64 mixing and accidental broadcasting in the library into test failures.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def random_problem(rng: np.random.Generator, T: int, D: int, dtype=jnp.float64, diag_noise=False):
    """A well-conditioned random (Y, M, K, Sigma): PSD M, K and SPD Sigma with eigenvalues ≳ 0.1."""

    def spd(n, floor):
        x = rng.standard_normal((n, n))
        return x @ x.T / n + floor * np.eye(n)

    Y = rng.standard_normal((T, D))
    M, K = spd(T, 0.1), spd(D, 0.1)
    Sigma = np.diag(rng.uniform(0.3, 2.0, D)) if diag_noise else spd(D, 0.3)
    return tuple(jnp.asarray(a, dtype) for a in (Y, M, K, Sigma))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def max_rel(a, b) -> float:
    """max |a - b| / max |b| in float64 (the error measure used throughout the tests)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0))
