"""The state-space form of M (kronlik.StateSpace): O(T) Kalman recursions on the pencil's D problems.

Witnesses for every gradient: the dense reference (``reference.loglik`` of ``M.dense()``, the
kernel's closed form), ``jax.grad`` through a plain joint-state Kalman filter written here (state
X_i of shape (J, D) with Cov(vec X) = P∞ ⊗ K, observed through hᵀ X_i with noise Σ: no pencil,
no eigendecomposition, no hand-derived rule), and central differences. The conformance test
(tests/test_conformance.py) runs the form through every entry point.

Tolerances: float64 against the dense reference 1e-10 relative on problems where κ(U) ≲ 1e3
(the dense Cholesky's own error is ~κ(U)·eps ≈ 1e-13); central differences with step 1e-5
carry a truncation error ~h²·|f'''| ≈ 1e-10 and a rounding error ~eps·|L|/h ≈ 1e-10 here, so 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import exact_matern32_loglik, max_rel, plain_joint_filter_loglik, spd

import kronlik
from kronlik import reference
from kronlik.statespace import SHO, Matern12, Matern32, Matern52, StateSpace

T, D = 24, 3


def _s(*values):
    return [jnp.asarray(v, jnp.float64) for v in values]


def _kernel():
    return Matern32(*_s(1.3, 0.7)) + SHO(*_s(0.5, 3.0, 2.0))


def _problem(seed=0, times=None, kernel=None):
    rng = np.random.default_rng(seed)
    t = jnp.asarray(rng.uniform(0.0, 4.0, T)) if times is None else jnp.asarray(times)
    M = StateSpace(t, _kernel() if kernel is None else kernel)
    Y = jnp.asarray(rng.standard_normal((T, D)))
    return Y, M, jnp.asarray(spd(rng, D, 0.1)), jnp.asarray(rng.uniform(-1.0, 1.0, D))


def _dense_loglik(Y, M, K, log_var):
    return reference.loglik(Y, M.dense(), K, jnp.diag(jnp.exp(log_var)))


def _plain_filter_loglik(Y, M, K, log_var):
    """log N(vec Y; 0, U) by a plain Kalman filter on the joint state (helpers), autodiff-friendly."""
    return plain_joint_filter_loglik(Y, M, K, jnp.diag(jnp.exp(log_var)))


_value_and_grads = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3)))
# the witnesses, compiled once per shape and shared by the tests
_dense_value_and_grads = jax.jit(jax.value_and_grad(_dense_loglik, argnums=(0, 1, 2, 3)))
_plain_value_and_grads = jax.jit(jax.value_and_grad(_plain_filter_loglik, argnums=(0, 1, 2, 3)))


def _assert_tree_close(got, want, tol, what):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        err = max_rel(g, w)
        assert err < tol, f"{what}: relative error {err:.2e}"


def test_three_witnesses_for_every_gradient():
    args = _problem()
    value, grads = _value_and_grads(*args)
    dense_value, dense_grads = _dense_value_and_grads(*args)
    plain_value, plain_grads = _plain_value_and_grads(*args)
    assert abs(float(value - dense_value)) < 1e-10 * abs(float(dense_value))
    assert abs(float(value - plain_value)) < 1e-10 * abs(float(dense_value))
    for name, g, dg, pg in zip(("Y", "M", "K", "log_var"), grads, dense_grads, plain_grads):
        _assert_tree_close(g, dg, 1e-10, f"∂L/∂{name} vs dense")
        _assert_tree_close(g, pg, 1e-10, f"∂L/∂{name} vs jax.grad of the plain filter")
    # every kernel parameter and the times get a non-trivial gradient (a dropped one would be 0)
    assert all(float(jnp.max(jnp.abs(x))) > 1e-6 for x in jax.tree_util.tree_leaves(grads[1]))

    # central differences along one random direction in all four arguments at once
    rng = np.random.default_rng(1)
    direction = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), args)
    h = 1e-5

    def moved(sign):
        return jax.tree_util.tree_map(lambda a, d: a + sign * h * d, args, direction)

    fd = (float(_value_and_grads(*moved(1))[0]) - float(_value_and_grads(*moved(-1))[0])) / (2 * h)
    analytic = sum(
        float(jnp.vdot(g, d)) for g, d in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction))
    )
    assert abs(fd - analytic) < 1e-6 * max(1.0, abs(analytic))


@pytest.mark.slow
def test_unsorted_repeated_times_in_the_users_order():
    # Permuting the rows of Y together with the times changes nothing, and the gradients come back
    # in the given order; repeated times (a tie in the sort) are exact.
    rng = np.random.default_rng(2)
    times = np.round(rng.uniform(0.0, 4.0, T), 1)
    times[5] = times[6] = times[17]
    args = _problem(seed=3, times=times)
    perm = rng.permutation(T)
    Y, M, K, s = args
    permuted = (Y[perm], StateSpace(M.times[perm], M.kernel), K, s)
    v1, g1 = _value_and_grads(*args)
    v2, g2 = _value_and_grads(*permuted)
    dense_value, dense_grads = _dense_value_and_grads(*args)
    assert abs(float(v1 - dense_value)) < 1e-10 * abs(float(dense_value))
    assert abs(float(v2 - v1)) < 1e-12 * abs(float(v1))
    _assert_tree_close(g1, dense_grads, 1e-10, "duplicates vs dense")
    _assert_tree_close(g2[0], g1[0][perm], 1e-12, "∂L/∂Y permuted")
    _assert_tree_close(g2[1].times, g1[1].times[perm], 1e-12, "∂L/∂times permuted")
    w = kronlik.solve(Y, M, K, jnp.diag(jnp.exp(s)))
    dense_w = jnp.linalg.solve(reference.dense_covariance(M.dense(), K, jnp.diag(jnp.exp(s))), Y.reshape(-1))
    assert max_rel(w, dense_w.reshape(T, D)) < 1e-10


def test_not_positive_definite_is_nan_never_finite():
    Y, M, K, s = _problem(seed=4)
    kern = M.kernel
    bad_kernels = {
        "lengthscale 0": Matern32(kern.terms[0].amplitude, jnp.zeros(())) + kern.terms[1],
        "lengthscale < 0": Matern32(kern.terms[0].amplitude, -kern.terms[0].lengthscale) + kern.terms[1],
        "quality < 0": kern.terms[0] + SHO(kern.terms[1].amplitude, kern.terms[1].frequency, -jnp.ones(())),
        "amplitude < 0": Matern32(-kern.terms[0].amplitude, kern.terms[0].lengthscale) + kern.terms[1],
    }
    cases = {n: (Y, StateSpace(M.times, k), K, s) for n, k in bad_kernels.items()}
    cases["K indefinite"] = (Y, M, K - 2.0 * jnp.eye(D), s)
    cases["Y not finite"] = (Y.at[3, 1].set(jnp.inf), M, K, s)
    # duplicate times with no noise on an output whose K-direction is rank one: U singular
    times = M.times.at[7].set(M.times[8])
    k_rank1 = jnp.outer(jnp.arange(1.0, D + 1), jnp.arange(1.0, D + 1))
    cases["duplicate times, Σ singular"] = (Y, StateSpace(times, kern), k_rank1, s.at[0].set(-1e4))  # e^{-1e4} = 0
    for name, a in cases.items():
        value, grads = _value_and_grads(*a)
        assert np.isnan(float(value)), name
        assert all(bool(jnp.all(jnp.isnan(g))) for g in jax.tree_util.tree_leaves(grads)), name


def test_refused_with_a_clear_error():
    Y, M, K, s = _problem()
    with pytest.raises(ValueError, match="mask must have the shape of Y"):
        kronlik.loglik_diag(Y, M, K, s, mask=np.ones((T, D + 1), bool))
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        kronlik.loglik_diag(Y, M, K, s, mask=np.ones((T, D)))
    with pytest.raises(TypeError, match="first derivatives of loglik"):
        jax.hessian(kronlik.loglik_diag, argnums=3)(Y, M, K, s, mask=np.eye(T, D, dtype=bool))
    with pytest.raises(TypeError, match="third derivative in K or the noise"):
        jax.jacfwd(jax.hessian(kronlik.loglik_diag, argnums=3), argnums=3)(Y, M, K, s)
    with pytest.raises(ValueError, match=r"times of shape \(T,\)"):
        kronlik.loglik_diag(Y, StateSpace(M.times[:-1], M.kernel), K, s)
    with pytest.raises(TypeError, match="state-space kernel"):
        kronlik.loglik_diag(Y, StateSpace(M.times, (1.0, 2.0)), K, s)


KERNELS = {
    "matern12": Matern12(*_s(1.3, 0.7)),
    "matern32": Matern32(*_s(1.3, 0.7)),
    "matern52": Matern52(*_s(0.8, 1.7)),
    "sho underdamped": SHO(*_s(1.1, 2.0, 3.0)),
    "sho overdamped": SHO(*_s(1.1, 2.0, 0.2)),
    "sho critical": SHO(*_s(1.1, 2.0, 0.5)),
    "sho near critical": SHO(*_s(1.1, 2.0, 0.5 + 1e-9)),
    "product": Matern32(*_s(1.3, 0.7)) * SHO(*_s(0.5, 3.0, 2.0)),
    "sum of three": Matern12(*_s(0.3, 5.0)) + Matern52(*_s(0.8, 0.4)) + SHO(*_s(0.5, 6.0, 10.0)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KERNELS))
def test_every_kernel_against_the_dense_reference(name):
    args = _problem(seed=5, kernel=KERNELS[name])
    value, grads = _value_and_grads(*args)
    dense_value, dense_grads = _dense_value_and_grads(*args)
    assert abs(float(value - dense_value)) < 1e-10 * abs(float(dense_value)), name
    _assert_tree_close(grads, dense_grads, 1e-10, name)
    Y, M, _, _ = args
    assert max_rel(M.matmul(Y), M.dense() @ Y) < 1e-12, f"{name}: M X by recursion vs closed form"


# Issue item 3's cases (T = 300 here, the benchmark script runs T = 2,000): a dense float64
# Cholesky of U is accurate on all of them (κ(U) ≤ ~1e6), so 1e-10 relative holds against it.
def _hard_case(name):
    rng = np.random.default_rng(7)
    n = 300
    t = np.sort(rng.uniform(0.0, 10.0, n))
    ell, log_var = 1.0, rng.uniform(-1.0, 1.0, D)
    K = spd(rng, D, 0.1)
    if name == "near-duplicate times":
        t[1::7] = t[0:-1:7] + 1e-12
    elif name == "exact duplicate times":
        t[1::5] = t[0:-1:5]
    elif name == "lengthscale 1e-3 span":
        ell = 1e-3 * 10.0
    elif name == "lengthscale 1e4 span":
        ell = 1e4 * 10.0
    elif name == "log-variance -40":
        log_var[1] = -40.0
    elif name == "K singular":
        v = rng.standard_normal((D, 1))
        K = v @ v.T
    elif name == "Sigma = cI":
        log_var = np.full(D, -0.5)
    M = StateSpace(jnp.asarray(rng.permutation(t)), Matern32(*_s(1.0, ell)))
    return jnp.asarray(rng.standard_normal((n, D))), M, jnp.asarray(K), jnp.asarray(log_var)


HARD = [
    "near-duplicate times",
    "exact duplicate times",
    "lengthscale 1e-3 span",
    "lengthscale 1e4 span",
    "K singular",
    "Sigma = cI",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", HARD)
def test_hard_cases_against_the_dense_reference(name):
    args = _hard_case(name)
    value, grads = _value_and_grads(*args)
    dense_value, dense_grads = _dense_value_and_grads(*args)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads)), name
    assert abs(float(value - dense_value)) < 1e-10 * abs(float(dense_value)), name
    for what, g, r in zip(("Y", "M", "K", "log_var"), grads, dense_grads):
        _assert_tree_close(g, r, 1e-10, f"{name}: ∂L/∂{what}")


def _hvp_of(fn):
    grad = jax.grad(fn, argnums=(0, 1, 2, 3))
    return jax.jit(lambda args, v: jax.jvp(lambda a: grad(*a), (args,), (v,))[1])


# Forward over reverse through the hand-derived rules (kronlik), and the witnesses: jax's
# forward over reverse through the dense reference and through the plain joint-state filter.
_hvp, _dense_hvp, _plain_hvp = (_hvp_of(f) for f in (kronlik.loglik_diag, _dense_loglik, _plain_filter_loglik))
_grads = jax.jit(jax.grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3)))


def _direction(args, seed):
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten(args)
    moved = [jnp.asarray(0.3 * rng.standard_normal(np.shape(x))) for x in leaves]
    return jax.tree_util.tree_unflatten(tree, moved)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["random", "exact duplicate times", "lengthscale 1e-3 span", "K singular", "Sigma = cI"]
)
def test_hessian_vector_products_in_every_argument(name):
    # A direction moving Y, the times, the kernel's parameters, K and the log-variances at once:
    # the K and noise parts go through the pencil basis held fixed plus the pair traces Ω_p
    # (kronlik._statespace_core.gradient_tangents). Degenerate spectra (ties in Σ, K of rank
    # one, M ≈ I, repeated times) must give the same finite numbers as the dense reference.
    args = _problem(seed=6) if name == "random" else _hard_case(name)
    v = _direction(args, 61)
    got = _hvp(args, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(got)), name
    _assert_tree_close(got, _dense_hvp(args, v), 1e-9, f"{name}: H·v vs the dense reference")
    if name != "random":
        return
    _assert_tree_close(got, _plain_hvp(args, v), 1e-9, "H·v vs the plain joint-state filter")
    # central differences of the (separately tested) hand-derived gradient: error ~h²|g'''| + eps|g|/h
    h = 1e-5
    plus, minus = (_grads(*jax.tree_util.tree_map(lambda a, d, c=c: a + c * h * d, args, v)) for c in (1.0, -1.0))
    fd = jax.tree_util.tree_map(lambda p, m: (p - m) / (2 * h), plus, minus)
    _assert_tree_close(got, fd, 1e-6, "H·v vs central differences of the gradient")


@pytest.mark.slow
def test_log_variance_minus_40_against_exact_arithmetic():
    # One output nearly noise-free: κ(U) ~ 1e17 and the dense float64 Cholesky is itself off by
    # ~1e-6 relative. Against exact arithmetic (mpmath, a joint-state filter), kronlik's value and
    # gradients must be within 10x the dense Cholesky's own error (or 1e-10). Gradients exact by
    # central differences in mpmath (step 1e-15 at 50 digits: error ~1e-30).
    import mpmath

    rng = np.random.default_rng(8)
    n = 100
    t = rng.uniform(0.0, 10.0, n)
    log_var = rng.uniform(-1.0, 1.0, D)
    log_var[1] = -40.0
    K = spd(rng, D, 0.1)
    Y = rng.standard_normal((n, D))
    amp, ell = 1.0, 1.0
    M = StateSpace(jnp.asarray(t), Matern32(*_s(amp, ell)))
    args = (jnp.asarray(Y), M, jnp.asarray(K), jnp.asarray(log_var))
    value, grads = _value_and_grads(*args)
    dense_value, dense_grads = _dense_value_and_grads(*args)

    def exact(amp=amp, ell=ell, K=K, log_var=log_var):
        return exact_matern32_loglik(Y, t, amp, ell, K, log_var)

    def exact_derivative(bump):
        with mpmath.workdps(50):
            h = mpmath.mpf("1e-15")
            return float((bump(h) - bump(-h)) / (2 * h))

    def bumped_log_var(d):
        return lambda h: exact(log_var=[mpmath.mpf(float(x)) + (h if i == d else 0) for i, x in enumerate(log_var)])

    def bumped_k(a, b):
        def f(h):
            k = [[mpmath.mpf(float(x)) for x in row] for row in K]
            k[a][b] += h / 2
            k[b][a] += h / 2
            return exact(K=np.array(k, dtype=object))

        return f

    exact_value = float(exact())
    checks = [("value", float(value), float(dense_value), exact_value)]
    for d in range(D):
        checks.append((f"∂L/∂s_{d}", float(grads[3][d]), float(dense_grads[3][d]), exact_derivative(bumped_log_var(d))))
    for a, b in ((0, 0), (1, 1), (0, 1)):
        want = exact_derivative(bumped_k(a, b))
        got, dense = (float(g[a, b] + g[b, a]) / (2 if a == b else 1) for g in (grads[2], dense_grads[2]))
        checks.append((f"∂L/∂K_{a}{b}", got, dense, want))
    checks.append(
        (
            "∂L/∂ℓ",
            float(grads[1].kernel.lengthscale),
            float(dense_grads[1].kernel.lengthscale),
            exact_derivative(lambda h: exact(ell=mpmath.mpf(ell) + h)),
        )
    )
    scale = max(abs(c[3]) for c in checks[1:])
    for what, got, dense, want in checks:
        ref = abs(want) if what == "value" else scale
        err, dense_err = abs(got - want) / ref, abs(dense - want) / ref
        assert err <= max(1e-10, 10 * dense_err), f"{what}: kronlik {err:.2e}, dense Cholesky {dense_err:.2e}"


@pytest.mark.slow
def test_validate_in_float32_bounds_the_error_and_names_bad_input():
    # validate runs in O(T) for this form; its estimate bounds the float32 error of L and of
    # every gradient against float64 (including the times rounded to float32).
    Y, M, K, s = _problem(seed=9)
    for case in ("plain", "smooth", "graded"):
        smooth = Matern32(*_s(1.0, 1e3)) + SHO(*_s(0.5, 0.01, 2.0))  # same structure: compiled once
        m = M if case != "smooth" else StateSpace(M.times, smooth)
        lv = s if case != "graded" else jnp.linspace(-10.0, 1.0, D)
        v64, g64 = _value_and_grads(Y, m, K, lv)
        low = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), (Y, m, K, lv))
        v32, g32 = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3)))(*low)
        report = kronlik.validate(*low[:3], log_var=low[3], warn=False)
        assert report.dtype == "float32"
        assert abs(float(v32) - float(v64)) <= report.error_bound * abs(float(v64)), case
        for a, b in zip(jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g64)):
            assert max_rel(a, b) <= report.gradient_error_bound, case
    with pytest.raises(ValueError, match="kernel's parameters are not valid"):
        kronlik.validate(Y, StateSpace(M.times, Matern32(*_s(1.0, -1.0))), K, log_var=s)
    with pytest.raises(ValueError, match="K is not positive semi-definite"):
        kronlik.validate(Y, M, K - 3.0 * jnp.eye(D), log_var=s)
    times = M.times.at[7].set(M.times[8])
    with pytest.raises(ValueError, match="numerically singular"):
        kronlik.validate(Y, StateSpace(times, M.kernel), jnp.ones((D, D)), log_var=s.at[0].set(-1e4))


@pytest.mark.slow
def test_validate_bounds_the_gradients_where_w_is_large_where_m_vanishes():
    # Exact duplicate times and one output with a tiny noise variance: W is ~1/ν in the directions
    # M annihilates (y_t - y_t' at a duplicate), so the data term RᵀMR of ∂L/∂K cancels terms of
    # order λ_max‖W‖² and ∂L/∂K loses every digit (the dense Cholesky too), while L, ∂L/∂Y and
    # ∂L/∂s stay accurate. validate once said 1e-2 where the error was 8e3; its bound must hold
    # against exact arithmetic for both recursions, and be inf ("no reliable digit") there.
    T2, D2 = 12, 2
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0.0, 5.0, T2))
    t[1::4] = t[0:-1:4]
    K2 = np.array([[1.0, 0.4], [0.4, 0.7]])
    y_noise = rng.standard_normal((T2, D2))  # not drawn from the model: W large in M's null space
    kernel = Matern32(*_s(1.0, 1.0))
    forms = {scan: StateSpace(jnp.asarray(t), kernel, scan=scan) for scan in ("sequential", "parallel")}
    M2 = np.asarray(forms["sequential"].dense())
    grads = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 2, 3)))
    for lv1, drawn in ((-10.0, False), (-20.0, True), (-20.0, False), (-25.0, False)):
        lv = np.array([-1.0, lv1])
        U = np.kron(M2, K2) + np.kron(np.eye(T2), np.diag(np.exp(lv)))
        Y2 = (np.linalg.cholesky(U) @ rng.standard_normal(T2 * D2)).reshape(T2, D2) if drawn else y_noise
        ex = reference.exact(Y2, M2, K2, log_var=lv, digits=40)
        for scan, form in forms.items():
            value, g = grads(jnp.asarray(Y2), form, jnp.asarray(K2), jnp.asarray(lv))
            report = kronlik.validate(Y2, form, K2, log_var=lv, warn=False)
            case = (lv1, drawn, scan, str(report))
            assert abs(float(value) - ex.value) <= report.error_bound * abs(ex.value), case
            for got, want in zip(g, (ex.y, ex.k, ex.noise)):
                assert max_rel(got, want) <= report.gradient_error_bound, case
            if lv1 == -25.0:
                assert max_rel(g[1], ex.k) > 1.0 and report.gradient_error_bound == np.inf, case
                assert "no reliable digit" in str(report)
