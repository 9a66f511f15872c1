"""Mixed models at scale (issue 19): missing phenotypes, exactly, and many traits.

Missing cells enter as covariates of their own (``kronlik._gls.profile``); the oracle is the
dense likelihood of the observed cells, U_oo and X_o (``reference.loglik_mixed(..., mask=)``),
and 60-digit mpmath where the dense float64 oracle itself loses digits (graded noise).
With A = I_D the GLS splits over the pencil's columns; its oracle is the same dense likelihood
and the joint path (a traced A, which cannot be recognised as I_D, takes the joint QR).

Tolerances as in test_mixed.py: 1e-10 relative against the dense float64 oracle (κ(U)·eps ≈
1e-13 on these problems), 1e-10 of the largest entry against mpmath, 1e-6 relative for central
differences with step 1e-6 (truncation h² plus cancellation eps·|L|/h).
"""

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from helpers import eqns, max_rel, spd
from test_mixed import assert_matches_exact

import kronlik
from kronlik import mixed as mixed_module
from kronlik import reference
from kronlik.datasets import simulate_traits
from kronlik.mixed import _unvech, vech_of

METHODS = ("ml", "reml", "reml-lamotte")
T, D = 12, 3  # one shape for the fast tests: compiled once per entry point


def _mask(rng):
    """~25 % missing, trait 2 observed on 30 % of individuals, individual 0 with one trait."""
    mask = rng.random((T, D)) > 0.25
    mask[:, 2] = False
    mask[rng.choice(T, size=4, replace=False), 2] = True  # 4 of 12 ≈ 30 %
    mask[0] = [True, False, False]
    return mask


def _problem(seed=50, lowrank=False):
    rng = np.random.default_rng(seed)
    Y = rng.standard_normal((T, D))
    F = np.column_stack([np.ones(T), rng.standard_normal(T)])
    if lowrank:
        G = rng.standard_normal((T, 5)) / np.sqrt(5)
        M, form = G @ G.T, kronlik.LowRank(jnp.asarray(G))
    else:
        M = spd(rng, T, 0.1)
        form = jnp.asarray(M)
    args = tuple(jnp.asarray(a) for a in (Y, M, spd(rng, D, 0.1), spd(rng, D, 0.3), F))
    return args, form, _mask(rng), jnp.asarray(rng.standard_normal((D, 2)))


# ---------------------------------------------------------------------------------------------
# Missing phenotypes: every entry point against the dense oracle on U_oo
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lowrank", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["dense M", "LowRank M"])
@pytest.mark.parametrize("design", ["I", "A"])
def test_masked_entry_points_match_the_dense_oracle(lowrank, design):
    (Y, M, K, S, F), form, mask, A_rand = _problem(lowrank=lowrank)
    A = None if design == "I" else A_rand
    terms = ((F, jnp.eye(D) if A is None else A),)
    Y_nan = jnp.where(jnp.asarray(mask), Y, jnp.nan)  # the missing cells' content is never read
    Y_zero = jnp.where(jnp.asarray(mask), Y, 0.0)
    for method in METHODS:

        def ours(y, m, k, s, method=method):
            return kronlik.loglik_mixed(y, m, k, s, F, A, method=method, mask=mask)

        def dense(y, m, k, s, method=method):
            return reference.loglik_mixed(y, m, k, s, terms, method, mask=mask)

        value, grads = jax.value_and_grad(ours, argnums=(0, 1, 2, 3))(Y_nan, M, K, S)
        want, ref = jax.value_and_grad(dense, argnums=(0, 1, 2, 3))(Y_zero, M, K, S)
        assert abs(float(value - want)) <= 1e-10 * abs(float(want)), method
        for which, (g, r) in enumerate(zip(grads, ref)):
            assert bool(jnp.all(jnp.isfinite(g))) and max_rel(g, r) < 1e-10, (method, which)
        assert float(jnp.max(jnp.abs(jnp.where(jnp.asarray(mask), 0.0, grads[0])))) == 0.0
        if lowrank:
            got = kronlik.loglik_mixed(Y_nan, form, K, S, F, A, method=method, mask=mask)
            assert abs(float(got - want)) <= 1e-10 * abs(float(want)), method
    got = kronlik.gls(Y_nan, form, K, S, F, A, mask=mask)
    b, cov = reference.gls(Y_zero, M, K, S, terms, mask=mask)
    assert max_rel(got.B.reshape(-1), b) < 1e-10 and max_rel(got.cov, cov) < 1e-10
    for method in ("ml", "reml"):
        info = kronlik.information_mixed(form, K, S, F, A, method=method, mask=mask)
        assert max_rel(info, reference.information_mixed(M, K, S, terms, method, mask=mask)) < 1e-10, method


def test_masked_gradient_three_witnesses_and_degenerate_spectra():
    (Y, M, K, S, F), _, mask, _ = _problem(seed=51)
    Y_zero = jnp.where(jnp.asarray(mask), Y, 0.0)
    rng = np.random.default_rng(52)
    h = 1e-6
    hand = jax.grad(lambda *a: kronlik.loglik_mixed(*a, F, mask=mask), argnums=(0, 1, 2, 3))(Y_zero, M, K, S)
    for which, g in enumerate(hand):
        d = rng.standard_normal(g.shape)
        d = d * mask if which == 0 else d + d.T
        up, down = [Y_zero, M, K, S], [Y_zero, M, K, S]
        up[which], down[which] = up[which] + h * d, down[which] - h * d
        ref = lambda args: reference.loglik_mixed(*args, ((F, jnp.eye(D)),), "reml", mask=mask)  # noqa: E731
        fd = (ref(up) - ref(down)) / (2 * h)
        assert abs(float(jnp.sum(g * d)) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd))), which
    x = np.linspace(0, 1, T)
    smooth = np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / 4.0) + 1e-9 * np.eye(T)
    for Md, Kd, Sd in [
        (np.eye(T), np.eye(D), np.eye(D)),  # every eigenvalue tied, equal noise variances
        (np.eye(T), np.zeros((D, D)), np.eye(D)),
        (smooth, spd(rng, D, 0.1), np.eye(D)),  # near-repeated eigenvalues of M
    ]:
        args = tuple(jnp.asarray(a) for a in (Md, Kd, Sd))
        got = jax.grad(lambda *a: kronlik.loglik_mixed(a[0], *a[1:], F, mask=mask), argnums=(0, 1, 2, 3))(Y_zero, *args)
        want = jax.grad(
            lambda *a: reference.loglik_mixed(a[0], *a[1:], ((F, jnp.eye(D)),), "reml", mask=mask), argnums=(0, 1, 2, 3)
        )(Y_zero, *args)
        for g, r in zip(got, want):
            assert bool(jnp.all(jnp.isfinite(g)))
            assert float(jnp.max(jnp.abs(g - r))) <= 1e-8 * max(1.0, float(jnp.max(jnp.abs(r))))


def _mp_masked(Y, M, K, S, F, mask, method, digits=60):
    """The observed cells' ML/REML value in mpmath, inputs taken exactly (the dense oracle's twin)."""
    with mpmath.workdps(digits):
        exact = lambda x: x if isinstance(x, mpmath.mpf) else mpmath.mpf(float(x))  # noqa: E731
        sym = lambda a: [[(exact(a[i][j]) + exact(a[j][i])) / 2 for j in range(len(a))] for i in range(len(a))]  # noqa: E731
        Mm, Km, Sm = (sym(np.asarray(a, dtype=object)) for a in (M, K, S))
        Yo = np.asarray(Y, dtype=object)
        obs = [(t, d) for t in range(len(Yo)) for d in range(len(Km)) if mask[t, d]]
        n = len(obs)
        U = mpmath.matrix(n, n)
        for a, (t, i) in enumerate(obs):
            for b, (s, j) in enumerate(obs):
                U[a, b] = Mm[t][s] * Km[i][j] + (Sm[i][j] if t == s else 0)
        Fx = np.asarray(F)
        zero = mpmath.mpf(0)
        cols = [(c, e) for c in range(Fx.shape[1]) for e in range(len(Km))]  # X = F ⊗ I_D, observed rows
        X = mpmath.matrix([[exact(Fx[t, c]) if d == e else zero for c, e in cols] for t, d in obs])
        y = mpmath.matrix([[exact(Yo[t, d])] for t, d in obs])
        ui = mpmath.inverse(U)
        info = X.T * ui * X
        r = y - X * (mpmath.inverse(info) * (X.T * ui * y))
        value = -(n * mpmath.log(2 * mpmath.pi) + mpmath.log(mpmath.det(U)) + (r.T * ui * r)[0]) / 2
        if method != "ml":
            value += (X.cols * mpmath.log(2 * mpmath.pi) - mpmath.log(mpmath.det(info))) / 2
        return value


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("ties", marks=pytest.mark.slow),
        "graded noise, its cell missing",
        pytest.param("graded noise, observed", marks=pytest.mark.slow),
    ],
)
def test_masked_value_and_gradients_match_exact_arithmetic(case):
    rng = np.random.default_rng(53)
    Tm, Dm = 4, 2
    Y = rng.standard_normal((Tm, Dm))
    F = np.column_stack([np.ones(Tm), [0.3, -1.1, 0.5, 0.9]])
    mask = np.array([[True, True], [True, False], [False, True], [True, True]])  # 6 cells, q = 4
    M, K = spd(rng, Tm, 0.2), spd(rng, Dm, 0.2)
    S = {
        "ties": 0.5 * np.eye(Dm),
        "graded noise, its cell missing": np.diag([1.0, 1e-12]),
        "graded noise, observed": np.diag([1e-12, 1.0]),
    }[case]
    if case == "ties":
        M, K = np.eye(Tm), 2 * np.eye(Dm)
    for method in ("ml", "reml"):

        def ours(y, m, k, s, method=method):
            return kronlik.loglik_mixed(y, m, k, s, jnp.asarray(F), method=method, mask=mask)

        value, grads = jax.value_and_grad(ours, argnums=(0, 1, 2, 3))(*(jnp.asarray(a) for a in (Y, M, K, S)))
        exact = lambda *a, method=method: _mp_masked(*a, F, mask, method)  # noqa: E731
        assert_matches_exact(value, grads, exact, (Y, M, K, S), (case, method))


def test_masked_input_errors_are_clear():
    (Y, M, K, S, F), _, mask, _ = _problem()
    with pytest.raises(TypeError, match="boolean"):
        kronlik.loglik_mixed(Y, M, K, S, F, mask=mask.astype(int))
    with pytest.raises(ValueError, match="shape of Y"):
        kronlik.loglik_mixed(Y, M, K, S, F, mask=mask[:-1])
    empty = mask.copy()
    empty[:, 1] = False
    with pytest.raises(ValueError, match=r"trait\(s\) \[1\] have no observed value"):
        kronlik.gls(Y, M, K, S, F, mask=empty)
    with pytest.raises(ValueError, match="concrete mask"):
        jax.jit(lambda m: kronlik.loglik_mixed(Y, M, K, S, F, mask=m))(jnp.asarray(mask))
    with pytest.raises(ValueError, match="mask=~jnp.isnan"):
        kronlik.fit_mixed(jnp.where(jnp.asarray(mask), Y, jnp.nan), M, F)
    with pytest.raises(ValueError, match="marks observed"):
        kronlik.fit_mixed(Y.at[1, 0].set(jnp.nan), M, F, mask=np.ones((T, D), bool))
    few = np.zeros((T, D), bool)
    few[0] = True  # 3 observed cells for q = 6 coefficients
    with pytest.raises(ValueError, match="observed cells"):
        kronlik.loglik_mixed(Y, M, K, S, F, mask=few)
    # the mask closes over jit as a constant: that works, and agrees
    value = jax.jit(lambda y: kronlik.loglik_mixed(y, M, K, S, F, mask=mask))(Y)
    assert float(value) == pytest.approx(float(kronlik.loglik_mixed(Y, M, K, S, F, mask=mask)), rel=1e-14)


# ---------------------------------------------------------------------------------------------
# Many traits: the per-column GLS (A = I_D) against the joint QR and the dense oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_split_gls_three_witnesses_and_the_joint_path():
    (Y, M, K, S, F), form, _, _ = _problem(seed=54, lowrank=False)
    G = jnp.asarray(np.random.default_rng(55).standard_normal((T, 4)) / 2.0)
    terms = ((F, jnp.eye(D)),)
    rng = np.random.default_rng(56)
    for M_arg, M_dense in ((M, M), (kronlik.LowRank(G), G @ G.T)):
        for method in METHODS:

            def ours(y, m, k, s, a=None, method=method):
                return kronlik.loglik_mixed(y, m, k, s, F, a, method=method)

            def oracle(y, m, k, s, method=method):
                return reference.loglik_mixed(y, m, k, s, terms, method)

            hand = jax.value_and_grad(ours, argnums=(0, 1, 2, 3))(Y, M_dense, K, S)
            # a traced A cannot be recognised as I_D: the joint QR of the whitened design
            joint = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2, 3)))(Y, M_dense, K, S, jnp.eye(D))
            dense = jax.value_and_grad(oracle, argnums=(0, 1, 2, 3))(Y, M_dense, K, S)
            for got in (hand, joint):
                assert abs(float(got[0] - dense[0])) <= 1e-10 * abs(float(dense[0])), method
                for g, r in zip(got[1], dense[1]):
                    assert max_rel(g, r) < 1e-10, method
            args = [Y, M_dense, K, S]
            for which, g in enumerate(hand[1]):
                d = rng.standard_normal(g.shape)
                d = d if which == 0 else d + d.T
                up, down = list(args), list(args)
                up[which], down[which] = args[which] + 1e-6 * d, args[which] - 1e-6 * d
                fd = (reference.loglik_mixed(*up, terms, method) - reference.loglik_mixed(*down, terms, method)) / 2e-6
                assert abs(float(jnp.sum(g * d)) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd))), (method, which)
            if M_arg is not M:
                low = kronlik.loglik_mixed(Y, M_arg, K, S, F, method=method)
                assert abs(float(low - dense[0])) <= 1e-10 * abs(float(dense[0]))
        got = kronlik.gls(Y, M_arg, K, S, F)
        b, cov = reference.gls(Y, M_dense, K, S, terms)
        assert max_rel(got.B.reshape(-1), b) < 1e-10 and max_rel(got.cov, cov) < 1e-10
        for method in ("ml", "reml"):
            info = kronlik.information_mixed(M_arg, K, S, F, method=method)
            assert max_rel(info, reference.information_mixed(M_dense, K, S, terms, method)) < 1e-10


def test_split_path_has_no_joint_qr():
    """With A = I_D every QR is (D batches of) T × c, never the T·D × c·D whitened design."""
    (Y, M, K, S, F), _, _, A = _problem(seed=57)

    def qr_shapes(fn, *args):
        jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
        return [tuple(e.invars[0].aval.shape) for e in eqns(jaxpr) if e.primitive.name == "qr"]

    c = F.shape[1]
    split = qr_shapes(jax.grad(lambda k: kronlik.loglik_mixed(Y, M, k, S, F)), K)
    assert split and all(s[-1] == c and s[-2] == T for s in split), split
    joint = qr_shapes(jax.grad(lambda k: kronlik.loglik_mixed(Y, M, k, S, F, A)), K)
    assert any(s == (T * D, c * A.shape[1]) for s in joint), joint  # the walk sees a joint QR


# ---------------------------------------------------------------------------------------------
# Fits (slow tier): the dense optimum with missing cells, and scoring at many traits
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_masked_fit_reaches_the_dense_optimum():
    """T = 300, D = 3, 20 % missing per trait; the optimum is interior (h² = 0.5, seed 1)."""
    sim = simulate_traits(T=300, D=3, n_snps=500, n_scan=1, h2=0.5, seed=1)
    rng = np.random.default_rng(58)
    mask = rng.random((300, 3)) >= 0.2
    Y, M, F = (jnp.asarray(a) for a in (sim.Y, sim.kinship, sim.covariates))
    fit = kronlik.fit_mixed(jnp.where(jnp.asarray(mask), Y, jnp.nan), sim.kinship, sim.covariates, mask=mask)
    assert bool(fit.converged)
    Y0 = jnp.where(jnp.asarray(mask), Y, 0.0)
    terms = ((F, jnp.eye(3)),)

    def dense(theta):
        return reference.loglik_mixed(Y0, M, *_unvech(theta, 3), terms, "reml", mask=mask)

    theta = vech_of(fit.K, fit.Sigma)
    assert min(np.linalg.eigvalsh(np.asarray(fit.Sigma)).min(), np.linalg.eigvalsh(np.asarray(fit.K)).min()) > 1e-3
    value = dense(theta)
    assert abs(float(value - fit.loglik)) < 1e-10 * abs(float(value))
    g, H = jax.grad(dense)(theta), jax.hessian(dense)(theta)
    gap = 0.5 * float(g @ jnp.linalg.solve(-H, g))
    assert 0 <= gap < 1e-6
    info = reference.information_mixed(M, fit.K, fit.Sigma, terms, "reml", mask=mask)
    assert max_rel(fit.information, info) < 1e-10
    b, b_cov = reference.gls(Y0, M, fit.K, fit.Sigma, terms, mask=mask)
    assert max_rel(fit.B.reshape(-1), b) < 1e-10 and max_rel(fit.B_cov, b_cov) < 1e-10
    h2, se = kronlik.heritability(fit)
    assert bool(jnp.all(jnp.isfinite(se) & (se > 0)))


@pytest.mark.slow
@pytest.mark.parametrize("design", ["any", "common"])
def test_masked_scan_matches_dense_per_variant_gls(design):
    sim = simulate_traits(T=40, D=3, n_snps=60, n_scan=5, seed=3)
    M = sim.kinship + 0.1 * np.eye(40)
    mask = np.random.default_rng(59).random((40, 3)) >= 0.2
    Y = np.where(mask, sim.Y, np.nan)
    fit = kronlik.fit_mixed(Y, M, sim.covariates, mask=mask)
    A_g = jnp.eye(3) if design == "any" else jnp.ones((3, 1))
    terms = ((jnp.asarray(sim.covariates), jnp.eye(3)),)
    want = reference.scan_mixed(np.where(mask, sim.Y, 0.0), M, fit.K, fit.Sigma, terms, sim.genotypes, A_g, mask=mask)
    got = kronlik.scan(fit, sim.genotypes, design=design, batch_size=2)
    assert max_rel(got.chi2, want[0]) < 1e-8 and max_rel(got.effect, want[1]) < 1e-8
    assert max_rel(got.se, want[2]) < 1e-8
    if design == "common":  # a fit on a bound (an LRT's ML refits start from it) restarts from finite parameters
        assert bool(jnp.all(jnp.isfinite(mixed_module._cholesky_params(jnp.ones((3, 3))))))


@pytest.mark.slow
def test_scoring_fit_at_many_traits_matches_lbfgs():
    """D = 12, T = 800: Fisher scoring in the pencil's coordinates ends where L-BFGS alone ends
    (at a point at least as high), in fewer steps than L-BFGS alone takes."""
    from kronlik import mixed

    sim = simulate_traits(T=800, D=12, n_snps=1600, n_scan=1, seed=2)
    fit = kronlik.fit_mixed(sim.Y, sim.kinship, sim.covariates)
    assert bool(fit.converged) and int(fit.num_steps) < 40
    prob = fit.problem
    K0, S0 = mixed._start(prob, method="reml", split=True)
    start = {"k": mixed._cholesky_params(K0), "s": mixed._cholesky_params(S0)}
    alone = mixed._maximise(prob, start, {}, 1e-8, method="reml", build=mixed._build_free, num_steps=500)
    assert bool(alone.converged) and int(alone.num_steps) > int(fit.num_steps)
    assert float(fit.loglik) >= float(alone.loglik) - 1e-7


@pytest.mark.parametrize("conditioning", ["well", "ill"])
def test_cells_first_qr_both_routes(conditioning):
    """CholeskyQR2 where the cells' columns allow it, Householder otherwise: the same QR either way."""
    from kronlik._gls import _qr_cells_first

    rng = np.random.default_rng(60)
    x_c = rng.standard_normal((80, 12)) * np.logspace(0, 6, 12)  # graded columns: scaling takes care of them
    if conditioning == "ill":
        x_c[:, 1] = x_c[:, 0] * (1e6 / 1.0) + 1e-9 * rng.standard_normal(80)  # nearly dependent: cond ~1e9
    x_x = rng.standard_normal((80, 3))
    q, r_diag, r_x = jax.jit(_qr_cells_first)(jnp.asarray(x_c), jnp.asarray(x_x))
    want_q, want_r = np.linalg.qr(np.column_stack([x_c, x_x]))
    assert np.allclose(np.abs(r_diag), np.abs(np.diagonal(want_r)), rtol=1e-8 if conditioning == "ill" else 1e-12)
    assert max_rel(np.abs(r_x), np.abs(want_r[12:, 12:])) < 1e-12
    assert max_rel(q @ q.T, want_q @ want_q.T) < 1e-12  # the same projector
    assert float(jnp.max(jnp.abs(q.T @ q - jnp.eye(15)))) < 1e-13
    gram = (x_c / np.linalg.norm(x_c, axis=0)).T @ (x_c / np.linalg.norm(x_c, axis=0))
    assert (np.linalg.cond(gram) < 1e6) == (conditioning == "well")  # which route each case exercises


def test_never_observed_individuals_are_dropped_and_a_singular_complete_u_gives_nan():
    """An individual with no observed trait only marginalises out: dropped, exactly, so a duplicate
    of another in M with Σ = 0 (the complete U singular, U_oo not) is fine. Where U_oo is
    regular but the complete U is singular for another reason (singular M and Σ, with the noise-free
    trait partly missing), the value is NaN: never a finite wrong number (the documented limit)."""
    rng = np.random.default_rng(61)
    Tn, Dn = 6, 2
    F = jnp.ones((Tn, 1))
    Y = jnp.asarray(rng.standard_normal((Tn, Dn)))
    G = rng.standard_normal((Tn, Tn))
    G[1] = G[0]
    M, K, S = jnp.asarray(G @ G.T / Tn), jnp.eye(Dn), jnp.zeros((Dn, Dn))
    mask = np.ones((Tn, Dn), bool)
    mask[1] = False
    terms = ((F, jnp.eye(Dn)),)
    for method in ("ml", "reml"):
        got, grads = jax.value_and_grad(
            lambda y, m, method=method: kronlik.loglik_mixed(y, m, K, S, F, method=method, mask=mask), argnums=(0, 1)
        )(Y, M)
        want, ref = jax.value_and_grad(
            lambda y, m, method=method: reference.loglik_mixed(y, m, K, S, terms, method, mask=mask), argnums=(0, 1)
        )(jnp.where(jnp.asarray(mask), Y, 0.0), M)
        assert abs(float(got - want)) <= 1e-10 * abs(float(want))
        assert max_rel(grads[0], ref[0]) < 1e-10 and max_rel(grads[1], ref[1]) < 1e-10
        assert float(jnp.max(jnp.abs(grads[1][1]))) == 0.0  # the dropped individual's row of ∂L/∂M
    b, cov = reference.gls(jnp.where(jnp.asarray(mask), Y, 0.0), M, K, S, terms, mask=mask)
    got = kronlik.gls(Y, M, K, S, F, mask=mask)
    assert max_rel(got.B.reshape(-1), b) < 1e-10 and max_rel(got.cov, cov) < 1e-10
    info = kronlik.information_mixed(M, K, S, F, mask=mask)
    assert max_rel(info, reference.information_mixed(M, K, S, terms, "reml", mask=mask)) < 1e-10
    # singular M (rank 3) and Σ = diag(1, 0), trait 1 seen on 3 of 8: U_oo regular, U singular
    G = rng.standard_normal((8, 3))
    Y8 = jnp.asarray(rng.standard_normal((8, Dn)))
    mask = np.ones((8, Dn), bool)
    mask[3:, 1] = False
    value = kronlik.loglik_mixed(
        Y8, jnp.asarray(G @ G.T), K, jnp.diag(jnp.array([1.0, 0.0])), jnp.ones((8, 1)), mask=mask
    )
    assert bool(jnp.isnan(value))
