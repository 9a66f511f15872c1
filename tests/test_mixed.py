"""Multi-trait mixed models: exactness, three gradient witnesses, the fit at the dense optimum,
standard errors against the dense Fisher delta method, scans against dense per-variant GLS.

Tolerances. float64 against the dense float64 oracle: rounding, κ(U)·eps ≈ 1e-13 on these
problems, so 1e-10. Against 60-digit mpmath (ties and graded scales, where the dense float64
oracle itself loses digits): 1e-10 of each gradient's largest entry. Central differences in
float64 with step 1e-6: truncation O(h²)·L''' ≈ 1e-10 plus cancellation eps·|L|/h ≈ 1e-8 of
|L| ≈ 50: 1e-6 relative. The fit's gap to the dense optimum: ½ gᵀ(-H)⁻¹g from the dense gradient
and Hessian at the fitted point (a Newton step, exact to third order here).
"""

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from helpers import eqns, max_rel, spd

import kronlik
from kronlik import reference
from kronlik.datasets import simulate_traits
from kronlik.mixed import _unvech, make_problem, ml_unbounded, vech_of

METHODS = ("ml", "reml", "reml-lamotte")


# ---------------------------------------------------------------------------------------------
# Exact arithmetic: value and every gradient at ties, singular M, K = 0 and graded scales
# ---------------------------------------------------------------------------------------------


def _mp_loglik_mixed(Y, M, K, S, F, A, method, digits=60):
    """The mixed log-likelihood in mpmath from the float64 inputs taken exactly (symmetrised)."""
    with mpmath.workdps(digits):
        exact = lambda x: x if isinstance(x, mpmath.mpf) else mpmath.mpf(float(x))  # noqa: E731
        mp = lambda a: mpmath.matrix([[exact(x) for x in row] for row in np.atleast_2d(a)])  # noqa: E731
        sym = lambda a: (mp(a) + mp(a).T) / 2  # noqa: E731
        T, D = np.shape(Y)
        Mm, Km, Sm = sym(M), sym(K), sym(S)
        n = T * D
        U = mpmath.matrix(n, n)
        for t in range(T):
            for s in range(T):
                for i in range(D):
                    for j in range(D):
                        U[t * D + i, s * D + j] = Mm[t, s] * Km[i, j] + (Sm[i, j] if t == s else 0)
        X = mp(np.kron(F, A))
        y = mp(np.reshape(Y, (-1, 1)))
        ui = mpmath.inverse(U)
        info = X.T * ui * X
        b = mpmath.inverse(info) * (X.T * ui * y)
        r = y - X * b
        quad = (r.T * ui * r)[0]
        value = -(n * mpmath.log(2 * mpmath.pi) + mpmath.log(mpmath.det(U)) + quad) / 2
        if method != "ml":
            value += (X.cols * mpmath.log(2 * mpmath.pi) - mpmath.log(mpmath.det(info))) / 2
        if method == "reml-lamotte":
            value += mpmath.log(mpmath.det(X.T * X)) / 2
        return value


def _mp_gradient(fn, args, which, digits=60, h=1e-25):
    """∂ fn / ∂ args[which] entrywise by central differences in ``digits``-digit arithmetic."""
    base = np.asarray(args[which], dtype=object)
    grad = np.zeros(base.shape)
    with mpmath.workdps(digits):
        for idx in np.ndindex(base.shape):
            vals = []
            for sign in (1, -1):
                moved = [np.asarray(a, dtype=object).copy() if k == which else a for k, a in enumerate(args)]
                moved[which][idx] = mpmath.mpf(float(base[idx])) + sign * mpmath.mpf(h)
                vals.append(fn(*moved))
            grad[idx] = float((vals[0] - vals[1]) / (2 * mpmath.mpf(h)))
    return grad


def _exact_cases():
    rng = np.random.default_rng(40)
    T, D = 3, 2
    F = np.column_stack([np.ones(T), [0.3, -1.1, 0.5]])
    A = np.eye(D)
    Y = rng.standard_normal((T, D))
    k = spd(rng, D, 0.2)
    m = spd(rng, T, 0.2)
    rank_one = np.outer([1.0, 2.0, -1.0], [1.0, 2.0, -1.0]) / 3
    return {
        "ties: M = I, K = 2I, Σ = I/2": (Y, np.eye(T), 2 * np.eye(D), 0.5 * np.eye(D), F, A),
        "K = 0": (Y, m, np.zeros((D, D)), spd(rng, D, 0.3), F, A),
        "singular M, Σ PD": (Y, rank_one, k, spd(rng, D, 0.3), F, A),
        "graded noise 1e-12": (Y, m, k, np.diag([1.0, 1e-12]), F, A),
        "M × 1e8, K × 1e-8": (Y, 1e8 * m, 1e-8 * k, np.diag([0.5, 2.0]), F, np.array([[1.0], [1.0]])),
    }


@pytest.mark.parametrize("case", list(_exact_cases()))
def test_value_and_gradients_match_exact_arithmetic(case):
    Y, M, K, S, F, A = _exact_cases()[case]
    for method in METHODS:

        def exact(Y, M, K, S, method=method):
            return _mp_loglik_mixed(Y, M, K, S, F, A, method)

        value, grads = jax.value_and_grad(kronlik.loglik_mixed, argnums=(0, 1, 2, 3))(
            *(jnp.asarray(a) for a in (Y, M, K, S, F, A)), method=method
        )
        assert_matches_exact(value, grads, exact, (Y, M, K, S), (case, method))


def assert_matches_exact(value, grads, exact, args, tag):
    """The value to 1e-10 relative and each gradient to 1e-10 of its largest entry, against ``exact``
    (an mpmath function of ``args``) and its 60-digit central differences."""
    want = float(exact(*args))
    assert abs(float(value) - want) <= 1e-10 * abs(want), tag
    for which, g in enumerate(grads):
        ref = _mp_gradient(exact, args, which)
        # kronlik symmetrises M, K, Σ: its gradient is the symmetric part of the entrywise one
        ref = ref if which == 0 else 0.5 * (ref + ref.T)
        assert max_rel(g, ref) < 1e-10, (*tag, which, max_rel(g, ref))


# ---------------------------------------------------------------------------------------------
# Three witnesses on a generic problem, and finite gradients on degenerate spectra
# ---------------------------------------------------------------------------------------------


def _generic(seed=41, T=7, D=3):
    rng = np.random.default_rng(seed)
    Y = rng.standard_normal((T, D))
    F = np.column_stack([np.ones(T), rng.standard_normal(T)])
    A = rng.standard_normal((D, 2))
    return tuple(jnp.asarray(a) for a in (Y, spd(rng, T, 0.1), spd(rng, D, 0.1), spd(rng, D, 0.3), F, A))


@pytest.mark.parametrize("method", METHODS)
def test_three_gradient_witnesses(method):
    Y, M, K, S, F, A = _generic()
    hand = jax.grad(kronlik.loglik_mixed, argnums=(0, 1, 2, 3))(Y, M, K, S, F, A, method=method)
    autodiff = jax.grad(reference.loglik_mixed, argnums=(0, 1, 2, 3))(Y, M, K, S, ((F, A),), method)
    rng = np.random.default_rng(42)
    h = 1e-6
    for which, (g, r) in enumerate(zip(hand, autodiff)):
        assert max_rel(g, r) < 1e-10, (method, which)
        for _ in range(3):  # central differences along random symmetric directions
            d = rng.standard_normal(g.shape)
            d = d if which == 0 else d + d.T
            args = [Y, M, K, S]
            up, down = list(args), list(args)
            up[which], down[which] = args[which] + h * d, args[which] - h * d
            fd = (reference.loglik_mixed(*up, ((F, A),), method) - reference.loglik_mixed(*down, ((F, A),), method)) / (
                2 * h
            )
            assert abs(float(jnp.sum(g * d)) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd))), (method, which)


def test_gradients_finite_and_exact_on_degenerate_spectra():
    T, D = 6, 3
    rng = np.random.default_rng(43)
    Y = jnp.asarray(rng.standard_normal((T, D)))
    F = jnp.asarray(np.column_stack([np.ones(T), rng.standard_normal(T)]))
    x = np.linspace(0, 1, T)
    smooth = np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / 4.0) + 1e-9 * np.eye(T)  # near-repeated eigenvalues
    for M, K, S in [
        (np.eye(T), np.zeros((D, D)), np.eye(D)),
        (np.eye(T), np.eye(D), np.eye(D)),
        (np.ones((T, T)), np.ones((D, D)), 0.5 * np.eye(D)),
        (smooth, spd(rng, D, 0.1), np.eye(D)),
    ]:
        args = tuple(jnp.asarray(a) for a in (M, K, S))
        grads = jax.grad(kronlik.loglik_mixed, argnums=(0, 1, 2, 3))(Y, *args, F)
        ref = jax.grad(reference.loglik_mixed, argnums=(0, 1, 2, 3))(Y, *args, ((F, jnp.eye(D)),))
        for g, r in zip(grads, ref):
            assert bool(jnp.all(jnp.isfinite(g)))
            # the dense oracle's own error on the smooth kernel: κ(U)·eps ≈ 1e-9 (some gradients are 0)
            assert float(jnp.max(jnp.abs(g - r))) <= 1e-8 * max(1.0, float(jnp.max(jnp.abs(r))))


# ---------------------------------------------------------------------------------------------
# Fitting on the published simulation: the dense optimum, and standard errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated():
    return simulate_traits(T=300, D=3, n_snps=500, n_scan=20, seed=0)


@pytest.mark.slow
def test_fit_reaches_the_dense_optimum_and_ses_match_dense_fisher(simulated):
    sim = simulated
    fit = kronlik.fit_mixed(sim.Y, sim.kinship, sim.covariates)
    assert bool(fit.converged)
    Y, M, F = (jnp.asarray(a) for a in (sim.Y, sim.kinship, sim.covariates))
    terms = ((F, jnp.eye(3)),)
    D = 3

    def dense(theta):
        K, S = _unvech(theta, D)
        return reference.loglik_mixed(Y, M, K, S, terms, "reml")

    theta = vech_of(fit.K, fit.Sigma)
    value = dense(theta)
    assert abs(float(value) - float(fit.loglik)) < 1e-10 * abs(float(value))
    g = jax.grad(dense)(theta)
    H = jax.hessian(dense)(theta)
    gap = 0.5 * float(g @ jnp.linalg.solve(-H, g))  # L(optimum) - L(fit), to third order
    assert 0 <= gap < 1e-6
    # the expected information and the delta-method SEs, against the dense ½ tr(P dU P dU)
    info = reference.information_mixed(M, fit.K, fit.Sigma, terms, "reml")
    assert max_rel(fit.information, info) < 1e-10
    cov = jnp.linalg.inv(info)
    m_bar = jnp.mean(jnp.diagonal(M))

    def h2(t):
        K, S = _unvech(t, D)
        return m_bar * jnp.diagonal(K) / (m_bar * jnp.diagonal(K) + jnp.diagonal(S))

    rows, cols = jnp.array([1, 2, 2]), jnp.array([0, 0, 1])

    def rg(t):
        K, _ = _unvech(t, D)
        return K[rows, cols] / jnp.sqrt(K[rows, rows] * K[cols, cols])

    for fn, got in ((h2, kronlik.heritability(fit)), (rg, kronlik.genetic_correlation(fit))):
        J = jax.jacfwd(fn)(theta)
        se = jnp.sqrt(jnp.diagonal(J @ cov @ J.T))
        est, got_se = got
        if est.ndim == 2:
            est, got_se = est[rows, cols], got_se[rows, cols]
        assert max_rel(est, fn(theta)) < 1e-12
        assert float(jnp.max(jnp.abs(got_se / se - 1))) < 1e-6  # the issue asks 2 %
    # the logit-scale interval of h²
    h, h_se = kronlik.heritability(fit)
    lo, hi = kronlik.heritability_interval(fit, level=0.9)
    logit = np.log(np.asarray(h) / (1 - np.asarray(h)))
    half = 1.6448536269514722 * np.asarray(h_se) / (np.asarray(h) * (1 - np.asarray(h)))
    assert (
        max_rel(lo, 1 / (1 + np.exp(-(logit - half)))) < 1e-12
        and max_rel(hi, 1 / (1 + np.exp(-(logit + half)))) < 1e-12
    )
    assert bool(jnp.all((lo < h) & (h < hi)))
    # GLS at the fit, against the dense oracle
    b, b_cov = reference.gls(Y, M, fit.K, fit.Sigma, terms)
    assert max_rel(fit.B.reshape(-1), b) < 1e-10 and max_rel(fit.B_cov, b_cov) < 1e-10


@pytest.mark.slow
def test_ml_and_lamotte_fits_are_stationary_and_consistent(simulated):
    sim = simulated
    fm = kronlik.factorize(jnp.asarray(sim.kinship))
    with pytest.warns(UserWarning, match="unbounded"):  # a centred kinship: the interior local maximum
        ml = kronlik.fit_mixed(sim.Y, fm, sim.covariates, method="ml")
    reml = kronlik.fit_mixed(sim.Y, fm, sim.covariates, method="reml")
    lamotte = kronlik.fit_mixed(sim.Y, fm, sim.covariates, method="reml-lamotte")
    assert bool(ml.converged | ml.stalled) and bool(lamotte.converged | lamotte.stalled)
    # LaMotte differs from Harville by the constant ½ log det XᵀX: the same optimum
    X = np.kron(sim.covariates, np.eye(3))
    const = 0.5 * np.linalg.slogdet(X.T @ X)[1]
    assert abs(float(lamotte.loglik - reml.loglik) - const) < 1e-7
    assert max_rel(lamotte.K, reml.K) < 1e-4
    # ML: the dense gradient at the fit vanishes (relative to the gradient's scale at the start)
    grads = jax.grad(reference.loglik_mixed, argnums=(2, 3))(
        jnp.asarray(sim.Y), fm.dense(), ml.K, ml.Sigma, ((jnp.asarray(sim.covariates), jnp.eye(3)),), "ml"
    )
    assert max(float(jnp.max(jnp.abs(g))) for g in grads) < 1e-3
    # ML shrinks the variances relative to REML (it ignores the q degrees of freedom of B)
    assert float(jnp.trace(ml.Sigma)) < float(jnp.trace(reml.Sigma))


@pytest.mark.slow
def test_genetic_correlation_test(simulated):
    fit = kronlik.fit_mixed(simulated.Y, kronlik.factorize(jnp.asarray(simulated.kinship)), simulated.covariates)
    rg, _ = kronlik.genetic_correlation(fit)
    at_estimate = kronlik.genetic_correlation_test(fit, 0, 1, float(rg[0, 1]))
    assert float(at_estimate.statistic) < 1e-6 and float(at_estimate.p_value) > 0.99
    zero = kronlik.genetic_correlation_test(fit, 0, 1, 0.0)
    swapped = kronlik.genetic_correlation_test(fit, 1, 0, 0.0)
    assert bool(zero.converged) and float(zero.loglik_null) <= float(fit.loglik) + 1e-9
    assert abs(float(zero.statistic) - float(swapped.statistic)) < 1e-6
    assert float(zero.statistic) > 1.0  # r̂_g(0, 1) ≈ 0.32 ± 0.13 here: 0 is far from the estimate
    assert abs(float(zero.p_value) - float(jax.scipy.special.gammaincc(0.5, zero.statistic / 2))) < 1e-12
    with pytest.raises(ValueError, match="two different traits"):
        kronlik.genetic_correlation_test(fit, 1, 1)
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        kronlik.genetic_correlation_test(fit, 0, 1, 1.5)


# ---------------------------------------------------------------------------------------------
# Association scans
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    # A kinship from centred genotypes has M·1 = 0, which makes the ML likelihood with an intercept
    # unbounded (test_ml_unbounded_is_said); + 0.1 I keeps the LRT's ML fits well posed.
    sim = simulate_traits(T=40, D=3, n_snps=60, n_scan=7, seed=3)
    sim = sim._replace(kinship=sim.kinship + 0.1 * np.eye(40))
    return sim, kronlik.fit_mixed(sim.Y, sim.kinship, sim.covariates)


@pytest.mark.slow
@pytest.mark.parametrize("design", ["any", "common", "user"])
def test_scan_matches_dense_per_variant_gls(small, design):
    sim, fit = small
    A_g = {"any": jnp.eye(3), "common": jnp.ones((3, 1)), "user": jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])}
    arg = A_g[design] if design == "user" else design
    terms = ((jnp.asarray(sim.covariates), jnp.eye(3)),)
    chi2, effect, se = reference.scan_mixed(sim.Y, sim.kinship, fit.K, fit.Sigma, terms, sim.genotypes, A_g[design])
    for test in ("score", "wald"):
        got = kronlik.scan(fit, sim.genotypes, design=arg, test=test, batch_size=3)  # 3 batches, the last padded
        assert got.df == A_g[design].shape[1]
        assert max_rel(got.chi2, chi2) < 1e-8 and max_rel(got.effect, effect) < 1e-8 and max_rel(got.se, se) < 1e-8
        sf = jax.scipy.special.gammaincc(got.df / 2, chi2 / 2)
        assert max_rel(got.p_value, sf) < 1e-8


@pytest.mark.slow
def test_ml_unbounded_is_said(small):
    sim, _ = small
    centred = simulate_traits(T=40, D=3, n_snps=60, n_scan=1, seed=3).kinship  # M·1 = 0
    with pytest.warns(UserWarning, match="unbounded"):  # the shapes of the LRT test's fits: no new compile
        kronlik.fit_mixed(sim.Y, centred, sim.covariates, method="ml", num_steps=5)
    # every form: the null space of a LowRank M includes the complement of span(G)
    Z = np.linalg.svd(centred)[0][:, :30]  # an orthonormal basis of part of 1's complement
    assert ml_unbounded(make_problem(sim.Y, kronlik.LowRank(jnp.asarray(Z)), sim.covariates, None))
    assert not ml_unbounded(make_problem(sim.Y, kronlik.LowRank(jnp.asarray(Z)), sim.covariates[:, 1:], None))
    assert not ml_unbounded(make_problem(sim.Y, sim.kinship, sim.covariates, None))  # + 0.1 I


@pytest.mark.slow
def test_lrt_scan_equals_ml_refits(small):
    sim, fit = small
    got = kronlik.scan(fit, sim.genotypes[:, :2], test="lrt")
    null = kronlik.fit_mixed(sim.Y, sim.kinship, sim.covariates, method="ml")
    for k in range(2):
        alt = kronlik.fit_mixed(sim.Y, sim.kinship, np.column_stack([sim.covariates, sim.genotypes[:, k]]), method="ml")
        assert abs(float(got.chi2[k]) - 2 * float(alt.loglik - null.loglik)) < 1e-6
        assert max_rel(got.effect[k], alt.B[-1]) < 1e-4


@pytest.mark.slow
def test_scan_is_accurate_for_a_variant_close_to_a_covariate(small):
    # P annihilates the intercept, so g = 1 + n/10⁶ and g = n/10⁶ are the same test; forming
    # V = X̃ᵀX̃ - (QᵀX̃)ᵀ(QᵀX̃) lost (10⁶)²·eps ≈ 1e-4 of it (NaN at 10⁸), the projection does not.
    sim, fit = small
    n = np.random.default_rng(2).standard_normal(40)
    for off in (1e6, 1e8):
        near = kronlik.scan(fit, (1 + n / off)[:, None]).chi2
        apart = kronlik.scan(fit, (n / off)[:, None]).chi2
        assert bool(jnp.all(jnp.isfinite(near))) and max_rel(near, apart) < 1e-5


@pytest.mark.slow
def test_genetic_correlation_test_with_two_traits(small):
    sim, _ = small
    fit = kronlik.fit_mixed(sim.Y[:, :2], sim.kinship, sim.covariates)
    res = kronlik.genetic_correlation_test(fit, 0, 1, 0.0)
    assert bool(res.converged) and 0.0 <= float(res.statistic) and 0.0 < float(res.p_value) <= 1.0
    assert float(res.loglik_null) <= float(fit.loglik) + 1e-9


@pytest.mark.slow
def test_scan_rejects_bad_input(small):
    sim, fit = small
    with pytest.raises(ValueError, match="shape"):
        kronlik.scan(fit, sim.genotypes[:10])
    with pytest.raises(ValueError, match="non-finite"):
        kronlik.scan(fit, np.where(np.eye(40, 7) > 0, np.nan, sim.genotypes))
    with pytest.raises(ValueError, match="design"):
        kronlik.scan(fit, sim.genotypes, design="some")
    with pytest.raises(ValueError, match="full column rank"):
        kronlik.scan(fit, sim.genotypes, design=np.ones((3, 2)))
    with pytest.raises(ValueError, match="test must be"):
        kronlik.scan(fit, sim.genotypes, test="f")


# ---------------------------------------------------------------------------------------------
# The JAX contract: errors, jit/vmap, float32, no TD×TD array
# ---------------------------------------------------------------------------------------------


def test_bad_input_raises_clearly():
    Y, M, K, S, F, A = _generic()
    with pytest.raises(ValueError, match="covariates F must have shape"):
        kronlik.loglik_mixed(Y, M, K, S, F[:3])
    with pytest.raises(ValueError, match="trait design A must have shape"):
        kronlik.loglik_mixed(Y, M, K, S, F, A[:2])
    with pytest.raises(ValueError, match="q < T·D"):
        kronlik.loglik_mixed(Y, M, K, S, jnp.ones((7, 7)), jnp.eye(3))
    with pytest.raises(ValueError, match="method must be"):
        kronlik.loglik_mixed(Y, M, K, S, F, method="REML")
    with pytest.raises(TypeError, match="floating"):
        kronlik.loglik_mixed(Y, M, K, S, jnp.ones((7, 1), int))
    with pytest.raises(TypeError, match="float64"):
        kronlik.loglik_mixed(Y, M, K, S, F.astype(jnp.float32))
    with pytest.raises(TypeError, match="covariates F or the trait design"):
        jax.grad(kronlik.loglik_mixed, argnums=4)(Y, M, K, S, F)
    with pytest.raises(TypeError, match="second"):
        jax.hessian(kronlik.loglik_mixed, argnums=2)(Y, M, K, S, F)
    # rank-deficient covariates: NaN, never a finite number (and fit_mixed says so up front)
    dup = jnp.column_stack([F, F[:, 0]])
    assert bool(jnp.isnan(kronlik.loglik_mixed(Y, M, K, S, dup)))
    for method in METHODS:
        assert bool(jnp.all(jnp.isnan(kronlik.information_mixed(M, K, S, dup, method=method))))
    with pytest.raises(ValueError, match="not of full column rank"):
        kronlik.fit_mixed(Y, M, dup)
    with pytest.raises(ValueError, match="mask=~jnp.isnan"):
        kronlik.fit_mixed(Y.at[0, 0].set(jnp.nan), M, F)
    with pytest.raises(ValueError, match="covariates F are required"):
        kronlik.loglik_mixed(Y, M, K, S, None)
    with pytest.raises(ValueError, match="K must be a square"):
        kronlik.information_mixed(M, K[:2], S, F)
    assert bool(jnp.isnan(kronlik.loglik_mixed(Y, M, K, -S, F)))


@pytest.mark.slow
def test_jit_and_vmap():
    Y, M, K, S, F, A = _generic()
    batch = jnp.stack([Y, 2 * Y, Y[::-1]])
    fn = jax.jit(jax.vmap(lambda y: kronlik.loglik_mixed(y, M, K, S, F, A)))
    want = jnp.stack([reference.loglik_mixed(y, M, K, S, ((F, A),), "reml") for y in batch])
    assert max_rel(fn(batch), want) < 1e-10
    gk = jax.vmap(jax.grad(lambda k, y: kronlik.loglik_mixed(y, M, k, S, F, A)), in_axes=(None, 0))(K, batch)
    want_gk = jnp.stack([jax.grad(reference.loglik_mixed, argnums=2)(y, M, K, S, ((F, A),), "reml") for y in batch])
    assert max_rel(gk, want_gk) < 1e-10


@pytest.mark.slow
def test_float32_fit_agrees_with_float64(small):
    sim, fit64 = small
    fit32 = kronlik.fit_mixed(*(np.asarray(a, np.float32) for a in (sim.Y, sim.kinship, sim.covariates)))
    assert fit32.K.dtype == jnp.float32
    # float32 L is accurate to ≈ κ·eps32·|L| ≈ 1e-4 relative; the optimum is flat to second order
    assert abs(float(fit32.loglik) - float(fit64.loglik)) < 1e-3 * abs(float(fit64.loglik))
    h32, _ = kronlik.heritability(fit32)
    h64, _ = kronlik.heritability(fit64)
    assert h32.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(h32, np.float64) - np.asarray(h64))) < 0.02


def test_no_td_by_td_array_anywhere():
    # T = 40, D = 5, q = 10: the largest intermediates are the backward kernel's T × (q + 1)D
    # side-by-side solves, the whitened design (TD × q) and the REML information's q×q×D×D
    # moments, all far below (TD)² = 4·10⁴.
    rng = np.random.default_rng(44)
    T, D = 40, 5
    Y, M, K, S = rng.standard_normal((T, D)), spd(rng, T, 0.1), spd(rng, D, 0.1), spd(rng, D, 0.3)
    F = np.column_stack([np.ones(T), rng.standard_normal(T)])
    fns = [
        jax.value_and_grad(lambda *a: kronlik.loglik_mixed(*a, F), argnums=(0, 1, 2, 3)),
        lambda y, m, k, s: kronlik.information_mixed(m, k, s, F),
    ]
    for fn in fns:
        jaxpr = jax.make_jaxpr(fn)(Y, M, K, S)
        sizes = [int(np.prod(v.aval.shape)) for e in eqns(jaxpr.jaxpr) for v in e.outvars if hasattr(v.aval, "shape")]
        q = 2 * D
        assert max(sizes) <= max(T * D * (q + D), q * q * D * D) < (T * D) ** 2 // 10
