"""What is differentiable, and what refuses with a clear error instead of a silent NaN.

First and second derivatives of loglik / loglik_diag and first derivatives of solve, grad_sigma,
grad_log_var and predict are hand-derived in every argument (test_second_order.py,
test_conformance.py). Everything that would need the derivative of an eigendecomposition (a
derivative of factorize, a second derivative of the helpers or a third of L in M, K or the
noise) raises a TypeError saying so: jax.grad through eigh is NaN exactly at M = I, K = cI, Σ = cI.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_rel

import kronlik
from kronlik import reference

T, D = 4, 3
REFUSAL = "kronlik does not differentiate its eigendecompositions"


def _degenerate():
    Y = jnp.asarray(np.random.default_rng(0).standard_normal((T, D)))
    return Y, jnp.eye(T), 2.0 * jnp.eye(D), 0.5 * jnp.eye(D)


REFUSING = {
    "solve, second": lambda Y, M, K, S: jnp.sum(jax.jacfwd(kronlik.solve, argnums=2)(Y, M, K, S)),
    "grad_sigma, second": lambda Y, M, K, S: jnp.sum(jax.jacfwd(kronlik.grad_sigma, argnums=3)(Y, M, K, S)),
    "grad_log_var, second": lambda Y, M, K, S: jnp.sum(
        jax.jacfwd(kronlik.grad_log_var, argnums=1)(Y, M, K, jnp.log(jnp.diagonal(S)))
    ),
    "predict, second": lambda Y, M, K, S: jnp.sum(
        jax.jacfwd(lambda k: kronlik.predict(Y, M, k, S, M[:2], jnp.diagonal(M)[:2])[1])(K)
    ),
    "loglik, third": lambda Y, M, K, S: jnp.sum(jax.hessian(kronlik.loglik, argnums=2)(Y, M, K, S)),
    "factorize": lambda Y, M, K, S: kronlik.loglik(Y, kronlik.factorize(M), K, S),
}
# factorize only sees M; the others see M (1), K (2) and Σ (3)
CASES = [(n, a) for n in REFUSING for a in ((1,) if n == "factorize" else (1, 2, 3))]


@pytest.mark.parametrize("name,argnum", CASES)
def test_derivatives_through_eigh_raise_instead_of_nan(name, argnum):
    args, fn = _degenerate(), REFUSING[name]
    with pytest.raises(TypeError, match=REFUSAL):
        jax.grad(fn, argnums=argnum)(*args)
    with pytest.raises(TypeError, match=REFUSAL):
        jax.jit(jax.grad(fn, argnums=argnum))(*args)


def test_first_derivatives_of_the_helpers_are_exact_at_repeated_eigenvalues():
    Y, M, K, S = _degenerate()
    got = jax.jacfwd(kronlik.grad_sigma, argnums=(1, 2, 3))(Y, M, K, S)
    want = jax.jacfwd(jax.grad(reference.loglik, argnums=3), argnums=(1, 2, 3))(Y, M, K, S)
    for g, w in zip(got, want):
        assert np.all(np.isfinite(g)) and max_rel(g, w) < 1e-12
    dense_solve = lambda k: jnp.linalg.solve(reference.dense_covariance(M, k, S), Y.reshape(-1)).reshape(T, D)  # noqa: E731
    got = jax.jacrev(lambda k: kronlik.solve(Y, M, k, S))(K)
    assert np.all(np.isfinite(got)) and max_rel(got, jax.jacrev(dense_solve)(K)) < 1e-12


def test_derivatives_in_y_and_m_cross_are_exact_at_repeated_eigenvalues():
    # solve is linear in Y, predict linear in M_cross: those derivatives need no eigh derivative.
    Y, M, K, S = _degenerate()
    U = reference.dense_covariance(M, K, S)
    cot = jnp.arange(T * D, dtype=jnp.float64).reshape(T, D)
    g = jax.grad(lambda y: jnp.sum(cot * kronlik.solve(y, M, K, S)))(Y)
    assert max_rel(g, jnp.linalg.solve(U, cot.reshape(-1)).reshape(T, D)) < 1e-12
    Mc = jnp.asarray(np.random.default_rng(1).standard_normal((2, T)))
    gm = jax.grad(lambda mc: jnp.sum(kronlik.predict(Y, M, K, S, mc, jnp.ones(2))[0]))(Mc)
    w = jnp.linalg.solve(U, Y.reshape(-1)).reshape(T, D)
    assert max_rel(gm, jnp.tile(jnp.sum(w @ K, axis=1), (2, 1))) < 1e-12
    assert np.all(np.isfinite(jax.jacfwd(lambda y: kronlik.solve(y, M, K, S))(Y)))


def test_first_derivatives_at_repeated_eigenvalues_are_exact_where_eigh_autodiff_is_not():
    Y, M, K, S = _degenerate()
    grads = jax.grad(kronlik.loglik, argnums=(0, 1, 2, 3))(Y, M, K, S)
    ref = jax.grad(reference.loglik, argnums=(0, 1, 2, 3))(Y, M, K, S)
    for g, r in zip(grads, ref):
        assert np.all(np.isfinite(g)) and max_rel(g, r) < 1e-12
