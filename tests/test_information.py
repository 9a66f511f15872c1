"""Information matrices: the three witnesses, degenerate spectra, and the statistics they promise.

Every form × entry point is in test_conformance.py; here: central differences of the
hand-derived gradient, repeated eigenvalues (where jax.hessian through eigh is NaN), graded
noise, the Monte Carlo identity E[score scoreᵀ] = F = -E[H], and jit/vmap.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import exact_log_var_hessian, max_rel, random_problem

import kronlik
from kronlik import kernels, reference

T, D = 5, 3


def _dense_log_var_hessian(Y, M, K, s):
    return jax.hessian(lambda q: reference.loglik(Y, M, K, jnp.diag(jnp.exp(q))))(s)


def test_hessian_log_var_three_witnesses(rng):
    Y, M, K, _ = random_problem(rng, T, D)
    s = jnp.asarray(rng.uniform(-1.0, 1.0, D))
    hess = kronlik.hessian_log_var(Y, M, K, s)
    # central differences of the hand-derived gradient: error h² ‖∂³L‖ ≈ 1e-8, round-off eps/h ≈ 1e-11
    h = 1e-4
    cols = [
        (kronlik.grad_log_var(Y, M, K, s + h * e) - kronlik.grad_log_var(Y, M, K, s - h * e)) / (2 * h)
        for e in jnp.eye(D)
    ]
    assert max_rel(hess, jnp.stack(cols, axis=1)) < 1e-6
    assert max_rel(hess, _dense_log_var_hessian(Y, M, K, s)) < 1e-10
    np.testing.assert_array_equal(hess, hess.T)


DEGENERATE = {
    "M = I, K = cI, Σ = cI": (jnp.eye(T), 2.0 * jnp.eye(D), jnp.zeros(D)),
    "K = 0": (jnp.eye(T), jnp.zeros((D, D)), jnp.log(jnp.arange(1.0, D + 1))),
    "low-rank M, equal noise": (jnp.ones((T, T)), jnp.eye(D), jnp.zeros(D)),
    "near tie 1e-10": (
        jnp.diag(1.0 + 1e-10 * jnp.arange(T, dtype=jnp.float64)),
        jnp.eye(D),
        1e-10 * jnp.arange(D, dtype=jnp.float64),
    ),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_exact_at_repeated_eigenvalues(case):
    M, K, s = DEGENERATE[case]
    Y = jnp.asarray(np.random.default_rng(0).standard_normal((T, D)))
    hess = kronlik.hessian_log_var(Y, M, K, s)
    fisher = kronlik.fisher_log_var(M, K, s)
    assert np.all(np.isfinite(hess)) and np.all(np.isfinite(fisher))
    # the dense reference has no eigendecomposition, so it is exact here
    assert max_rel(hess, _dense_log_var_hessian(Y, M, K, s)) < 1e-10
    cov_fn = lambda p: (M, p["K"], jnp.diag(jnp.exp(p["s"])))  # noqa: E731
    full = kronlik.fisher_information(cov_fn, {"K": K, "s": s})
    assert np.all(np.isfinite(full))
    np.testing.assert_allclose(full[-D:, -D:], fisher, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("s", [[0.0, -20.0, -40.0], [0.0, 0.0, -35.0], [30.0, 0.0, -30.0]])
def test_graded_noise_against_exact_arithmetic(s):
    # One output nearly noise-free: the dense float64 reference is itself in doubt here (it is
    # the case of the stable-engine issue), so the witness is exact arithmetic on a tiny problem.
    pytest.importorskip("mpmath")
    rng = np.random.default_rng(7)
    Y, M, K = rng.standard_normal((3, D)), np.eye(3), np.eye(D) + 0.5
    hess = kronlik.hessian_log_var(*(jnp.asarray(a) for a in (Y, M, K, s)))
    exact, exact_fisher = exact_log_var_hessian(Y, M, K, s)
    # every entry to its own relative accuracy (measured ≤ 5e-15; the entries span 1e-27 to 1):
    # the diagonal is summed without the O(T) cancellation between g_d and the curvature terms
    np.testing.assert_allclose(np.asarray(hess), exact, rtol=1e-13, atol=0)
    fisher = kronlik.fisher_log_var(*(jnp.asarray(a) for a in (M, K, s)))
    np.testing.assert_allclose(np.asarray(fisher), exact_fisher, rtol=1e-13, atol=0)


@pytest.mark.slow
def test_fisher_is_the_expected_outer_product_of_scores_and_minus_the_expected_hessian():
    # Monte Carlo over N draws of Y: the mean of score scoreᵀ and of -H has standard error
    # ≈ sd / sqrt(N); 6 standard errors (computed from the draws themselves) bound both.
    rng = np.random.default_rng(11)
    M = kernels.rbf(jnp.arange(T, dtype=jnp.float64), jnp.arange(T, dtype=jnp.float64), 2.0)
    K = jnp.asarray(np.eye(D) + 0.3)
    s = jnp.asarray(np.log([0.2, 0.5, 1.0]))
    U = np.asarray(reference.dense_covariance(M, K, jnp.diag(jnp.exp(s))))
    N = 4000
    ys = jnp.asarray((rng.standard_normal((N, T * D)) @ np.linalg.cholesky(U).T).reshape(N, T, D))
    scores = jax.vmap(lambda y: kronlik.grad_log_var(y, M, K, s))(ys)
    hessians = jax.vmap(lambda y: kronlik.hessian_log_var(y, M, K, s))(ys)
    fisher = np.asarray(kronlik.fisher_log_var(M, K, s))
    for samples in (np.einsum("nd,ne->nde", scores, scores), -np.asarray(hessians)):
        mean, se = samples.mean(0), samples.std(0) / np.sqrt(N)
        assert np.all(np.abs(mean - fisher) < 6 * se + 1e-12)
    # symmetric positive definite
    np.testing.assert_array_equal(fisher, fisher.T)
    assert np.min(np.linalg.eigvalsh(fisher)) > 0


def test_nan_for_invalid_input_and_shape_errors():
    M, K, s = jnp.eye(T), jnp.eye(D), jnp.zeros(D)
    bad_k = K.at[0, 0].set(-1.0)
    assert np.all(np.isnan(kronlik.fisher_log_var(M, bad_k, s)))
    assert np.all(np.isnan(kronlik.hessian_log_var(jnp.ones((T, D)), M, bad_k, s)))
    with pytest.raises(ValueError, match="K must have shape"):
        kronlik.fisher_log_var(M, jnp.eye(D + 1), s)
    with pytest.raises(ValueError, match=r"\(T, T\)"):
        kronlik.hessian_log_var(jnp.ones((T + 1, D)), M, K, s)
    with pytest.raises(TypeError, match="one floating dtype"):
        kronlik.fisher_log_var(M, K, s.astype(jnp.float32))


@pytest.mark.slow
def test_float32_and_vmap():
    rng = np.random.default_rng(3)
    Y, M, K, _ = random_problem(rng, T, D)
    s = jnp.asarray(rng.uniform(-1.0, 1.0, D))
    want = kronlik.fisher_log_var(M, K, s)
    got = kronlik.fisher_log_var(M.astype(jnp.float32), K.astype(jnp.float32), s.astype(jnp.float32))
    assert got.dtype == jnp.float32 and max_rel(got, want) < 2e-4  # κ(U)·eps32 ≈ 1e-5 here
    batch = jnp.stack([s, s + 0.5])
    vm = jax.vmap(lambda q: kronlik.hessian_log_var(Y, M, K, q))(batch)
    assert max_rel(vm[1], kronlik.hessian_log_var(Y, M, K, s + 0.5)) < 1e-14


def test_only_the_parameters_that_move_m_pay_for_a_rotation():
    # The dataflow of cov_fn decides, leaf by leaf, which directions have a (T, T) tangent.
    from kronlik.information import _inputs_reaching

    def cov_fn(a, b, c):
        return a * jnp.eye(T), b * jnp.eye(D), jnp.exp(c) * jnp.eye(D)

    jaxpr = jax.make_jaxpr(lambda *x: jax.jvp(cov_fn, (1.0, 1.0, 1.0), x)[1])(1.0, 1.0, 1.0)
    assert [_inputs_reaching(jaxpr, i) for i in range(3)] == [{0}, {1}, {2}]
    # and the result is the same whichever leaves move M
    params = {"a": jnp.asarray(2.0), "b": jnp.asarray(0.5), "c": jnp.asarray(0.1)}
    fixed = kronlik.fisher_information(lambda p: cov_fn(p["a"], p["b"], p["c"]), params)
    merged = kronlik.fisher_information(
        lambda p: cov_fn(p["abc"][0], p["abc"][1], p["abc"][2]), {"abc": jnp.stack(list(params.values()))}
    )
    assert max_rel(fixed, merged) < 1e-14


@pytest.mark.slow
def test_inverse_fisher_is_the_spread_of_maximum_likelihood_estimates():
    # N simulated data sets from known s; the MLE of each by Newton steps with the closed-form
    # Hessian (vmapped, from the truth). Its sample covariance estimates F⁻¹ (asymptotically
    # exact; T = 400 rows of D = 2 outputs, half of them mostly noise), each variance to a
    # relative sd of sqrt(2/N) = 7 %.
    N, T_mc = 400, 400
    rng = np.random.default_rng(5)
    lam = jnp.asarray(np.exp(-np.linspace(0.0, 12.0, T_mc)) * 20.0)  # M in its eigenbasis
    K = jnp.asarray([[1.0, 0.4], [0.4, 0.5]])
    s_true = jnp.log(jnp.asarray([0.3, 0.1]))
    M = kronlik.Diagonal(lam)
    chol = [np.linalg.cholesky(l_t * np.asarray(K) + np.diag(np.exp(np.asarray(s_true)))) for l_t in np.asarray(lam)]
    ys = jnp.asarray(np.einsum("tde,nte->ntd", np.stack(chol), rng.standard_normal((N, T_mc, 2))))

    def mle(y):
        def newton(s, _):
            step = jnp.linalg.solve(kronlik.hessian_log_var(y, M, K, s), kronlik.grad_log_var(y, M, K, s))
            return s - step, None

        return jax.lax.scan(newton, s_true, None, length=12)[0]

    estimates = np.asarray(jax.jit(jax.vmap(mle))(ys))
    assert np.max(np.abs(jax.vmap(lambda y, s: kronlik.grad_log_var(y, M, K, s))(ys, jnp.asarray(estimates)))) < 1e-8
    inverse_fisher = np.linalg.inv(np.asarray(kronlik.fisher_log_var(M, K, s_true)))
    spread = np.cov(estimates.T)
    # variances within 4 Monte Carlo sd (28 %); the correlation within 4 sd ((1 - ρ²)/√N ≤ 0.05)
    np.testing.assert_allclose(np.diag(spread), np.diag(inverse_fisher), rtol=0.28)
    corr = lambda c: c[0, 1] / np.sqrt(c[0, 0] * c[1, 1])  # noqa: E731
    assert abs(corr(spread) - corr(inverse_fisher)) < 0.2
