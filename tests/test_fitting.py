"""Fitting: the cached log-variance loop, the joint-fit idiom, and the posterior predictive."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import eqns, max_rel, random_problem

import kronlik
from kronlik import kernels, reference

ALL = (0, 1, 2, 3)


def _rbf(t, log_ell):
    return kernels.rbf(t, t, jnp.exp(log_ell))


def _simulate(rng, T, K, log_var, ell=0.1):
    t = np.linspace(0, 1, T)
    M = np.asarray(_rbf(jnp.asarray(t), jnp.log(ell))) + 1e-8 * np.eye(T)
    chol = np.linalg.cholesky(np.kron(M, K) + np.kron(np.eye(T), np.diag(np.exp(log_var))))
    return (chol @ rng.standard_normal(T * K.shape[0])).reshape(T, -1), M


def test_rotated_loglik_matches_and_differentiates(rng):
    Y, M, K, _ = random_problem(rng, 7, 3)
    s = jnp.asarray(rng.uniform(-1, 1, 3))
    fm = kronlik.factorize(M)
    y_rot = fm.vectors.T @ Y
    value, grads = jax.value_and_grad(kronlik.loglik_diag_rotated, argnums=ALL)(y_rot, fm.values, K, s)
    assert max_rel(value, kronlik.loglik_diag(Y, M, K, s)) < 1e-12

    def dense(y_rot, lam, K, s):
        return reference.loglik(y_rot, jnp.diag(lam), K, jnp.diag(jnp.exp(s)))

    ref_grads = jax.grad(dense, argnums=ALL)(y_rot, fm.values, K, s)
    for g, r in zip(grads, ref_grads):
        assert max_rel(g, r) < 1e-10


def test_fit_step_costs_no_t_by_t_work(rng):
    # The per-step function sees only Y_rot (T, D), λ (T,), K (D, D), s (D,). Walk every nested
    # jaxpr of the step (value and hand-derived gradient) for a T×T array or a T×T eigh.
    T, D = 40, 3
    step = jax.value_and_grad(kronlik.loglik_diag_rotated, argnums=3)
    jaxpr = jax.make_jaxpr(step)(jnp.zeros((T, D)), jnp.ones(T), jnp.eye(D), jnp.zeros(D))
    all_eqns = list(eqns(jaxpr.jaxpr))
    shapes = {v.aval.shape for e in all_eqns for v in e.outvars if hasattr(v.aval, "shape")}
    assert (T, T) not in shapes
    eighs = [e for e in all_eqns if e.primitive.name == "eigh"]
    assert eighs and all(e.outvars[0].aval.shape == (D, D) for e in eighs)
    # and the walker does see T×T work where there is some
    full = jax.make_jaxpr(jax.value_and_grad(kronlik.loglik_diag, argnums=3))(
        jnp.zeros((T, D)), jnp.eye(T), jnp.eye(D), jnp.zeros(D)
    )
    assert any(e.primitive.name == "eigh" and e.outvars[0].aval.shape == (T, T) for e in eqns(full.jaxpr))


@pytest.mark.slow
def test_fit_log_var_recovers_the_truth(rng):
    T, D = 300, 3
    A = rng.standard_normal((D, D))
    K = A @ A.T / D + 0.2 * np.eye(D)
    truth = np.log([0.2, 0.5, 1.5])
    Y, M = _simulate(rng, T, K, truth)
    result = kronlik.fit_log_var(jnp.asarray(Y), jnp.asarray(M), jnp.asarray(K), jnp.zeros(D))
    assert bool(result.converged) and int(result.num_steps) < 100
    # sampling error of a log-variance from T=300 rows is ≈ sqrt(2/T) ≈ 0.08; allow 4 SE
    np.testing.assert_allclose(result.params, truth, atol=0.35)
    n = int(result.num_steps)
    history = np.asarray(result.value_history)
    assert np.all(np.isnan(history[n:])) and np.all(np.isfinite(history[:n]))
    assert np.all(np.diff(history[:n]) > -1e-9 * abs(history[0]))  # the line search only ascends
    assert float(result.grad_norm_history[n - 1]) <= np.sqrt(np.finfo(np.float64).eps) * T
    np.testing.assert_allclose(result.value, kronlik.loglik_diag(Y, M, K, result.params), rtol=1e-13)


@pytest.mark.slow
def test_fit_log_var_agrees_with_a_dense_autodiff_fit(rng):
    Y, M, K, _ = random_problem(rng, 10, 3)
    ours = kronlik.fit_log_var(Y, kronlik.factorize(M), K, jnp.zeros(3), tol=1e-10)

    def dense_loss(s):
        return -reference.loglik(Y, M, K, jnp.diag(jnp.exp(s)))

    theirs = kronlik.fit(dense_loss, jnp.zeros(3), tol=1e-9)  # jax.grad of the dense reference
    # tolerances at rounding level: either the gradient test held or the value stopped changing
    # (FitResult.stalled); the comparisons below are the test
    assert bool(ours.converged | ours.stalled) and bool(theirs.converged | theirs.stalled)
    np.testing.assert_allclose(ours.params, theirs.params, atol=1e-6)
    np.testing.assert_allclose(ours.value, -theirs.value, rtol=1e-12)
    # any optax optimizer: adam reaches the same optimum, more slowly
    adam = kronlik.fit_log_var(Y, M, K, jnp.zeros(3), optax.adam(0.05), num_steps=3000, tol=1e-7)
    np.testing.assert_allclose(adam.params, ours.params, atol=1e-4)


@pytest.mark.slow
def test_fit_log_var_progress_and_bad_input(rng, capsys):
    Y, M, K, _ = random_problem(rng, 6, 2)
    kronlik.fit_log_var(Y, M, K, jnp.zeros(2), progress=True, chunk_size=2)
    err = capsys.readouterr().err
    assert "step" in err and "max|grad|" in err
    kronlik.fit_log_var(Y, M, K, jnp.zeros(2))
    assert capsys.readouterr().err == ""  # quiet by default
    bad = kronlik.fit_log_var(Y, M - 10 * jnp.eye(6), K, jnp.zeros(2))
    assert not bool(bad.converged) and np.isnan(bad.value) and int(bad.num_steps) == 1
    with pytest.raises(ValueError, match="log_var must have shape"):
        kronlik.fit_log_var(Y, M, K, jnp.zeros(3))


@pytest.mark.slow
def test_float32_fit(rng):
    T, D = 200, 2
    K = np.array([[1.0, 0.3], [0.3, 0.5]])
    truth = np.log([0.3, 0.8])
    Y, M = _simulate(rng, T, K, truth)
    args = (jnp.asarray(a, jnp.float32) for a in (Y, M, K))
    r32 = kronlik.fit_log_var(*args, jnp.zeros(D, jnp.float32))
    r64 = kronlik.fit_log_var(jnp.asarray(Y), jnp.asarray(M), jnp.asarray(K), jnp.zeros(D))
    assert r32.params.dtype == jnp.float32 and bool(r32.converged)
    np.testing.assert_allclose(r32.params, r64.params, atol=1e-3)


@pytest.mark.slow
def test_joint_fit_through_the_hand_derived_backward(rng):
    # M(θ) an RBF kernel, K = LLᵀ + diag, Σ = diag(eˢ), all fitted together by jax.grad
    # through kronlik.loglik_diag: no eigh derivative anywhere.
    T, D = 40, 2
    K_true = np.array([[1.0, 0.6], [0.6, 0.8]])
    Y, _ = _simulate(rng, T, K_true, np.log([0.1, 0.2]), ell=0.15)
    t, Y = jnp.linspace(0.0, 1.0, T), jnp.asarray(Y)

    def k_of(p):
        return p["L"] @ p["L"].T + jnp.diag(jnp.exp(p["log_kappa"]))

    def loss(p):
        return -kronlik.loglik_diag(Y, _rbf(t, p["log_ell"]) + 1e-6 * jnp.eye(T), k_of(p), p["log_var"])

    def dense_loss(p):
        M = _rbf(t, p["log_ell"]) + 1e-6 * jnp.eye(T)
        return -reference.loglik(Y, M, k_of(p), jnp.diag(jnp.exp(p["log_var"])))

    # start where K = cI and equal noise: K̃ has a repeated eigenvalue
    p0 = {"log_ell": jnp.array(-1.0), "L": jnp.eye(D), "log_kappa": jnp.zeros(D), "log_var": jnp.zeros(D)}
    g, g_ref = jax.grad(loss)(p0), jax.grad(dense_loss)(p0)
    for k in p0:
        assert np.all(np.isfinite(g[k])) and max_rel(g[k], g_ref[k]) < 1e-9
    result = kronlik.fit(loss, p0, num_steps=300, tol=1e-5)
    assert bool(result.converged)
    np.testing.assert_allclose(result.value, dense_loss(result.params), rtol=1e-10)
    assert float(result.value) < float(loss(p0)) - 10.0


def test_predict_matches_dense(rng):
    T, D, N = 8, 3, 5
    Y, _, K, Sigma = random_problem(rng, T, D)
    x = jnp.asarray(np.sort(rng.uniform(0, 1, T + N)))
    full = _rbf(x, jnp.log(0.3)) + 1e-6 * jnp.eye(T + N)
    train, new = jnp.arange(T), jnp.arange(T, T + N)
    M, M_cross = full[train][:, train], full[new][:, train]
    m_new = jnp.diagonal(full)[new]
    mean, var = kronlik.predict(Y, M, K, Sigma, M_cross, m_new)
    U = reference.dense_covariance(M, K, Sigma)
    C = jnp.kron(M_cross, K)  # Cov(vec F_new, vec Y)
    dense_mean = (C @ jnp.linalg.solve(U, Y.reshape(-1))).reshape(N, D)
    dense_var = jnp.diagonal(jnp.kron(full[new][:, new], K) - C @ jnp.linalg.solve(U, C.T)).reshape(N, D)
    assert max_rel(mean, dense_mean) < 1e-10
    assert max_rel(var, dense_var) < 1e-10
    _, var_y = kronlik.predict(Y, kronlik.factorize(M), K, Sigma, M_cross, m_new, include_noise=True)
    assert max_rel(var_y, dense_var + jnp.diagonal(Sigma)[None, :]) < 1e-10
    with pytest.raises(ValueError, match="M_cross must be"):
        kronlik.predict(Y, M, K, Sigma, M_cross[:, :4], m_new)


def _noise_free_problem():
    # Output 1 is a draw of the latent GP without noise: its noise variance's MLE is tiny
    # (e^-16.75 here), and beyond it L is flat to 1e-8, a plateau where the gradient vanishes.
    rng = np.random.default_rng(3)
    T = 100
    t = np.linspace(0, 1, T)
    M = np.asarray(kernels.rbf(jnp.asarray(t), jnp.asarray(t), 0.2)) + 1e-6 * np.eye(T)
    K = np.array([[1.0, 0.5], [0.5, 1.0]])
    Y = np.linalg.cholesky(M) @ rng.standard_normal((T, 2)) @ np.linalg.cholesky(K).T
    Y[:, 0] += 0.1 * rng.standard_normal(T)
    return jnp.asarray(Y), jnp.asarray(M), jnp.asarray(K)


@pytest.mark.slow
def test_fit_log_var_with_a_noise_free_output_lands_at_the_dense_mle():
    Y, M, K = _noise_free_problem()
    ours = kronlik.fit_log_var(Y, M, K, jnp.zeros(2))
    dense_at_ours = float(reference.loglik(Y, M, K, jnp.diag(jnp.exp(ours.params))))
    assert abs(float(ours.value) - dense_at_ours) < 1e-8 * abs(dense_at_ours)  # the reported L is right

    def dense_loss(s):
        return -reference.loglik(Y, M, K, jnp.diag(jnp.exp(s)))

    # the dense MLE, by jax.grad of the dense reference, with the same plateau escape
    dense = kronlik.fit(lambda p: dense_loss(p["s"]), {"s": jnp.zeros(2)}, tol=1e-8, log_scale_keys=("s",))
    assert abs(float(ours.value) + float(dense.value)) < 1e-6
    # and no coordinate is left on the plateau: a scan over the noise-free output finds nothing better
    grid = jnp.linspace(-40.0, 0.0, 81)
    scan = jax.vmap(lambda s1: -dense_loss(jnp.stack([ours.params[0], s1])))(grid)
    assert float(jnp.nanmax(scan)) < float(ours.value) + 1e-6
    assert -25.0 < float(ours.params[1]) < -10.0


@pytest.mark.slow
def test_plateau_escape_is_what_finds_it():
    # Without the escape (a loss the fit does not know to be log-scale) the same L-BFGS run stops
    # on the plateau, 0.06 below the maximum: the escape is doing the work.
    Y, M, K = _noise_free_problem()
    stuck = kronlik.fit(lambda s: -kronlik.loglik_diag(Y, M, K, s), jnp.zeros(2))
    best = kronlik.fit_log_var(Y, M, K, jnp.zeros(2))
    assert float(-stuck.value) < float(best.value) - 0.01


@pytest.mark.slow
def test_fit_log_var_standard_errors_observed_and_expected(rng):
    K = np.eye(3) + 0.3
    truth = np.log([0.2, 0.5, 1.0])
    Y, M = _simulate(rng, 40, K, truth)
    Y, M, K = jnp.asarray(Y), jnp.asarray(M), jnp.asarray(K)
    observed = kronlik.fit_log_var(Y, M, K, jnp.zeros(3))
    s = observed.params
    dense_hessian = jax.hessian(lambda q: reference.loglik(Y, M, K, jnp.diag(jnp.exp(q))))(s)
    assert max_rel(observed.information, -dense_hessian) < 1e-8  # at the fitted point
    np.testing.assert_allclose(observed.std_errors, np.sqrt(np.diag(np.linalg.inv(-dense_hessian))), rtol=1e-8)
    expected = kronlik.fit_log_var(Y, M, K, jnp.zeros(3), information="expected")
    U_inv = jnp.linalg.inv(reference.dense_covariance(M, K, jnp.diag(jnp.exp(s))))
    blocks = [jnp.kron(jnp.eye(40), jnp.diag(jnp.exp(s) * e)) for e in jnp.eye(3)]
    fisher = jnp.array([[0.5 * jnp.trace(U_inv @ a @ U_inv @ b) for b in blocks] for a in blocks])
    assert max_rel(expected.information, fisher) < 1e-8
    np.testing.assert_allclose(expected.std_errors, np.sqrt(np.diag(np.linalg.inv(fisher))), rtol=1e-8)
    with pytest.raises(ValueError, match="information must be"):
        kronlik.fit_log_var(Y, M, K, jnp.zeros(3), information="fisher")


@pytest.mark.slow
def test_fit_with_cov_fn_gives_fisher_standard_errors(rng):
    K = np.eye(2) + 0.5
    Y, _ = _simulate(rng, 30, K, np.log([0.3, 0.6]), ell=0.2)
    t = jnp.linspace(0.0, 1.0, 30)

    def cov_fn(p):
        return _rbf(t, p["log_ell"]) + 1e-6 * jnp.eye(30), jnp.asarray(K), jnp.diag(jnp.exp(p["log_var"]))

    def loss(p):
        return -kronlik.loglik(jnp.asarray(Y), *cov_fn(p))

    params = {"log_ell": jnp.asarray(jnp.log(0.3)), "log_var": jnp.zeros(2)}
    result = kronlik.fit(loss, params, cov_fn=cov_fn)
    fisher = reference.fisher_information(cov_fn, result.params)
    assert max_rel(result.information, fisher) < 1e-8
    se = np.sqrt(np.diag(np.linalg.inv(fisher)))
    np.testing.assert_allclose(result.std_errors["log_ell"], se[0], rtol=1e-8)
    np.testing.assert_allclose(result.std_errors["log_var"], se[1:], rtol=1e-8)


@pytest.mark.slow
def test_newton_and_fisher_scoring_reach_the_lbfgs_optimum(rng):
    K = np.eye(3) + 0.3
    Y, M = _simulate(rng, 40, K, np.log([0.2, 0.5, 1.0]))
    Y, M, K = jnp.asarray(Y), jnp.asarray(M), jnp.asarray(K)
    lbfgs = kronlik.fit_log_var(Y, M, K, jnp.zeros(3))
    newton = kronlik.fit_log_var(Y, M, K, jnp.zeros(3), method="newton")
    assert newton.converged and int(newton.num_steps) <= int(lbfgs.num_steps)
    assert abs(float(newton.value - lbfgs.value)) < 1e-9 * abs(float(lbfgs.value))
    assert float(jnp.max(jnp.abs(kronlik.grad_log_var(Y, M, K, newton.params)))) < 1e-8
    with pytest.raises(ValueError, match="method must be"):
        kronlik.fit_log_var(Y, M, K, jnp.zeros(3), method="bfgs")
    with pytest.raises(ValueError, match="chooses its own optimizer"):
        kronlik.fit_log_var(Y, M, K, jnp.zeros(3), optax.adam(0.1), method="newton")
    # Fisher scoring through kronlik.fit: the same optimum from the expected information
    cov_fn = lambda p: (M, K, jnp.diag(jnp.exp(p["s"])))  # noqa: E731
    scoring = optax.chain(
        kronlik.fitting.information_step(lambda p: kronlik.fisher_information(cov_fn, p)),
        optax.scale_by_backtracking_linesearch(max_backtracking_steps=40),
    )
    result = kronlik.fit(lambda p: -kronlik.loglik(Y, *cov_fn(p)), {"s": jnp.zeros(3)}, scoring, tol=1e-9)
    assert bool(result.converged | result.stalled)  # tol 1e-9 is at rounding level here
    assert abs(float(-result.value - lbfgs.value)) < 1e-9 * abs(float(lbfgs.value))
