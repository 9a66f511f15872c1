"""A fixed M factorised once (kronlik.factorize) gives the same values and correct gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_rel, random_problem

import kronlik
from kronlik import reference

ALL = (0, 1, 2, 3)


def _m_from_factor(f):
    return (f.vectors * f.values[None, :]) @ f.vectors.T


@pytest.mark.parametrize("diag", [False, True])
def test_factor_gives_same_value_and_gradients(rng, diag):
    Y, M, K, Sigma = random_problem(rng, 7, 3)
    noise = jnp.asarray(rng.uniform(-1, 1, 3)) if diag else Sigma
    fn = kronlik.loglik_diag if diag else kronlik.loglik
    fm = kronlik.factorize(M)
    assert isinstance(fm, kronlik.EighFactor)
    v1, g1 = jax.value_and_grad(fn, argnums=ALL)(Y, M, K, noise)
    v2, g2 = jax.value_and_grad(fn, argnums=ALL)(Y, fm, K, noise)
    assert max_rel(v2, v1) < 1e-12
    for i in (0, 2, 3):
        assert max_rel(g2[i], g1[i]) < 1e-10

    # the cotangent of the factor: M = V diag(λ) Vᵀ differentiated by the dense reference
    def dense(vectors, values):
        s = jnp.diag(jnp.exp(noise)) if diag else noise
        return reference.loglik(Y, _m_from_factor(kronlik.EighFactor(vectors, values)), K, s)

    ref_v, ref_l = jax.grad(dense, argnums=(0, 1))(fm.vectors, fm.values)
    assert isinstance(g2[1], kronlik.EighFactor)
    assert max_rel(g2[1].vectors, ref_v) < 1e-10
    assert max_rel(g2[1].values, ref_l) < 1e-10
    if not diag:
        assert max_rel(kronlik.grad_sigma(Y, fm, K, Sigma), kronlik.grad_sigma(Y, M, K, Sigma)) < 1e-12
        assert max_rel(kronlik.solve(Y, fm, K, Sigma), kronlik.solve(Y, M, K, Sigma)) < 1e-12
    else:
        assert max_rel(kronlik.grad_log_var(Y, fm, K, noise), g1[3]) < 1e-12


def test_factor_of_indefinite_m_gives_nan(rng):
    Y, M, K, Sigma = random_problem(rng, 5, 2)
    fm = kronlik.factorize(M - 10.0 * jnp.eye(5))
    assert np.all(np.isnan(fm.values))
    assert np.isnan(kronlik.loglik(Y, fm, K, Sigma))


def test_factor_shape_and_dtype_errors(rng):
    Y, M, K, Sigma = random_problem(rng, 5, 2)
    with pytest.raises(ValueError, match=r"an EighFactor for M must have vectors \(4, 4\)"):
        kronlik.loglik(Y[:4], kronlik.factorize(M), K, Sigma)
    with pytest.raises(ValueError, match="square"):
        kronlik.factorize(M[:3])
    with pytest.raises(TypeError, match="M.values float32"):
        fm = kronlik.factorize(M)
        kronlik.loglik(Y, kronlik.EighFactor(fm.vectors, fm.values.astype(jnp.float32)), K, Sigma)


def test_vmap_over_y_with_a_factor(rng):
    _, M, K, Sigma = random_problem(rng, 6, 3)
    Ys = jnp.asarray(rng.standard_normal((4, 6, 3)))
    fm = kronlik.factorize(M)
    batched = jax.jit(jax.vmap(kronlik.loglik, in_axes=(0, None, None, None)))(Ys, fm, K, Sigma)
    assert max_rel(batched, jnp.stack([reference.loglik(y, M, K, Sigma) for y in Ys])) < 1e-10
