"""Every form of M × every noise model × every entry point, against the dense reference.

The dense witness differentiates ``reference.loglik(Y, form.dense(), K, Σ)`` with jax.grad with
respect to the form's own arrays, so the form's cotangent (EighFactor, LowRank, Diagonal) is
checked as the form returns it. A new form of M is one builder in ``FORMS``.

Tolerances: float64 against float64 differ by rounding, κ(U)·eps ≈ 1e-13 on these problems
(eigenvalues of U in [0.1, 50]), so 1e-10 has three digits of margin. float32 against the float64
reference: κ·eps32 ≈ 1e-5 at worst here, so 2e-4. Second derivatives carry U⁻¹ twice, κ(U)²·eps:
≈ 3e-11 in float64 (tolerance 1e-9) and ≈ 3e-2 as a bound in float32, where 2e-3 is kept
(measured ≤ 3e-4: the errors do not compound to the bound).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_rel, spd

import kronlik
from kronlik import reference, statespace

T, D, N = 6, 3, 4


def _dense_m(rng):
    return spd(rng, T, 0.1)


FORMS = {
    "dense": lambda rng: jnp.asarray(_dense_m(rng)),
    "eigh": lambda rng: kronlik.factorize(jnp.asarray(_dense_m(rng))),
    "lowrank r<T": lambda rng: kronlik.LowRank(jnp.asarray(rng.standard_normal((T, 2)))),
    "lowrank r>T": lambda rng: kronlik.LowRank(jnp.asarray(rng.standard_normal((T, T + 2)) / 2)),
    # TSQR over a mesh of this process' one device (tests/test_sharding.py runs 4 devices, 2 processes)
    "sharded lowrank": lambda rng: kronlik.ShardedLowRank(jnp.asarray(rng.standard_normal((T, 2))), kronlik.row_mesh()),
    "diagonal": lambda rng: kronlik.Diagonal(jnp.asarray(rng.uniform(0.1, 2.0, T))),
    # unsorted times; a sum of a Matérn and an underdamped oscillator (J = 4)
    "statespace": lambda rng: kronlik.StateSpace(
        jnp.asarray(rng.uniform(0.0, 3.0, T)),
        statespace.Matern32(jnp.asarray(1.3), jnp.asarray(0.7)) + statespace.SHO(*jnp.asarray([0.5, 3.0, 2.0])),
    ),
    # the same form by the associative-scan recursions (a GPU's default); a product kernel (J = 3)
    "statespace parallel": lambda rng: kronlik.StateSpace(
        jnp.asarray(rng.uniform(0.0, 3.0, T)),
        statespace.Matern52(*jnp.asarray([1.1, 0.9])) * statespace.Matern12(*jnp.asarray([0.8, 2.0])),
        scan="parallel",
    ),
}
# What a form does not do, each asserted below to be refused with a clear error rather than
# skipped: second derivatives only in some arguments (none today), predict not differentiable.
SECOND_ORDER_ARGNUMS: dict[str, tuple[int, ...]] = {}
NO_PREDICT_DERIVATIVE = {"statespace", "statespace parallel"}
ALL_ARGNUMS = (0, 1, 2, 3)
# The fast tier runs value + every gradient for every form; the other entry points of the forms
# listed here run in the second tier (CI's fast tier is at its time budget; test_statespace.py
# has the form's own fast checks; a ShardedLowRank is LowRank but for its basis, and
# tests/test_sharding.py runs it on 4 devices and 2 processes).
SECOND_TIER_FORMS = {"statespace", "statespace parallel", "sharded lowrank"}
FORM_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in SECOND_TIER_FORMS else n for n in FORMS]


def _form_dtype(dtypes):
    """(form, dtype) cases: every form in every dtype of ``dtypes``, but a second-tier form in
    float64 only (its float32 arithmetic is the same code, checked by value + every gradient)."""
    cases = []
    for form in FORMS:
        for d in dtypes:
            dtype, marks = (d.values[0], tuple(d.marks)) if hasattr(d, "values") else (d, ())
            if form in SECOND_TIER_FORMS:
                if dtype != "float64":
                    continue
                marks = (*marks, pytest.mark.slow)
            cases.append(pytest.param(form, dtype, marks=marks, id=f"{form}-{dtype}"))
    return cases


NOISE = {
    "Sigma": lambda rng: jnp.asarray(spd(rng, D, 0.3)),
    "log_var": lambda rng: jnp.asarray(rng.uniform(-1.0, 1.0, D)),
}
TOL = {"float64": 1e-10, "float32": 2e-4}
# float64 everywhere in the fast tier; float32 there for value + every gradient and the helpers,
# in the second tier (pytest -m slow) for the other entry points.
DTYPES = ["float64", "float32"]
DTYPES_FAST64 = ["float64", pytest.param("float32", marks=pytest.mark.slow)]
TOL2 = {"float64": 1e-9, "float32": 2e-3}


def _dense_of(M):
    return M.dense() if hasattr(M, "dense") else M  # a form (NamedTuple or registered class) or an array


def _sigma(noise_name, noise):
    return noise if noise_name == "Sigma" else jnp.diag(jnp.exp(noise))


def _dense_predict(Y, M, K, Sigma, M_cross, m_new, mask=None):
    return reference.predict(Y, _dense_of(M), K, Sigma, M_cross, m_new, mask=mask)


def _random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), tree)


def _problem(form_name, noise_name, seed=0):
    rng = np.random.default_rng(seed)
    Y = jnp.asarray(rng.standard_normal((T, D)))
    return Y, FORMS[form_name](rng), jnp.asarray(spd(rng, D, 0.1)), NOISE[noise_name](rng)


# The references' derivatives are jit-compiled whole: run eagerly, every primitive of a dense
# Hessian compiles as its own program (3-4x the compile time of the one program).
def _reference_loglik(noise_name, mask=None):
    def f(Y, M, K, noise):
        return reference.loglik(Y, _dense_of(M), K, _sigma(noise_name, noise), mask=mask)

    return f


def _jvp_in(fn, args, tangents, argnums):
    """jax.jvp of fn along ``tangents`` in ``args[argnums]`` only, the other arguments held fixed."""

    def moving(*xs):
        full = list(args)
        for i, x in zip(argnums, xs):
            full[i] = x
        return fn(*full)

    return jax.jvp(moving, tuple(args[i] for i in argnums), tuple(tangents[i] for i in argnums))


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def _assert_close(got, want, tol, what):
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), what
    for g, w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape, what
        err = max_rel(g, w)
        assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise_name", list(NOISE))
@pytest.mark.parametrize("form_name", list(FORMS))
def test_value_and_every_gradient(form_name, noise_name, dtype):
    args = _problem(form_name, noise_name)
    fn = kronlik.loglik if noise_name == "Sigma" else kronlik.loglik_diag
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(*_cast(args, dtype))
    ref_value, ref_grads = jax.value_and_grad(_reference_loglik(noise_name), argnums=(0, 1, 2, 3))(*args)
    assert value.dtype == dtype and all(g.dtype == dtype for g in jax.tree_util.tree_leaves(grads))
    assert abs(float(value) - float(ref_value)) < TOL[dtype] * abs(float(ref_value))
    for name, g, r in zip(("Y", "M", "K", noise_name), grads, ref_grads):
        _assert_close(g, r, TOL[dtype], f"{form_name}/{noise_name}/{dtype} ∂L/∂{name}")


@pytest.mark.parametrize("noise_name", list(NOISE))
@pytest.mark.parametrize(("form_name", "dtype"), _form_dtype(DTYPES))
def test_gradient_helpers(form_name, noise_name, dtype):
    args = _problem(form_name, noise_name, seed=1)
    low = _cast(args, dtype)
    ref_noise_grad = jax.grad(_reference_loglik(noise_name), argnums=3)(*args)
    if noise_name == "Sigma":
        _assert_close(kronlik.grad_sigma(*low), ref_noise_grad, TOL[dtype], "grad_sigma")
        # the literal block-diagonal sums of the original answer
        Y, M, K, Sigma = args
        _assert_close(kronlik.grad_sigma(*low), reference.grad_sigma(Y, _dense_of(M), K, Sigma), TOL[dtype], "blocks")
    else:
        _assert_close(kronlik.grad_log_var(*low), ref_noise_grad, TOL[dtype], "grad_log_var")


@pytest.mark.parametrize("noise_name", list(NOISE))
@pytest.mark.parametrize(("form_name", "dtype"), _form_dtype(DTYPES_FAST64))
def test_solve_and_predict(form_name, noise_name, dtype):
    Y, M, K, noise = _problem(form_name, noise_name, seed=2)
    Sigma = _sigma(noise_name, noise)  # solve and predict take Σ as a matrix
    rng = np.random.default_rng(3)
    M_cross = jnp.asarray(rng.standard_normal((N, T)))
    m_new = jnp.asarray(rng.uniform(5.0, 6.0, N))
    w = jnp.linalg.solve(reference.dense_covariance(_dense_of(M), K, Sigma), Y.reshape(-1))
    mean, var = _dense_predict(Y, M, K, Sigma, M_cross, m_new)
    low = _cast((Y, M, K, Sigma, M_cross, m_new), dtype)
    _assert_close(kronlik.solve(*low[:4]), w.reshape(T, D), TOL[dtype], "solve")
    got_mean, got_var = kronlik.predict(*low)
    _assert_close(got_mean, mean, TOL[dtype], "predict mean")
    _assert_close(got_var, var, TOL[dtype], "predict var")
    _, var_y = kronlik.predict(*low, include_noise=True)
    _assert_close(var_y, var + jnp.diagonal(Sigma)[None, :], TOL[dtype], "predict var + noise")


@pytest.mark.parametrize("form_name", FORM_NAMES)
def test_validity_agrees_between_validate_and_likelihood(form_name):
    # The same flags: good input passes validate with a finite likelihood; an indefinite K
    # fails both, for every form.
    Y, M, K, noise = _problem(form_name, "log_var", seed=4)
    kronlik.validate(Y, M, K, log_var=noise)
    assert np.isfinite(kronlik.loglik_diag(Y, M, K, noise))
    bad_k = K - (float(jnp.min(jnp.linalg.eigvalsh(K))) + 0.05) * jnp.eye(D)
    assert np.isnan(kronlik.loglik_diag(Y, M, bad_k, noise))
    with pytest.raises(ValueError, match="K is not positive semi-definite|αK \\+ Σ is not positive definite"):
        kronlik.validate(Y, M, bad_k, log_var=noise)


@pytest.mark.parametrize("form_name", FORM_NAMES)
def test_vmap_over_a_batch_of_everything(form_name):
    problems = [_problem(form_name, "Sigma", seed=s) for s in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *problems)
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(kronlik.loglik, argnums=(0, 1, 2, 3))))(*stacked)
    for b, p in enumerate(problems):
        ref_value, ref_grads = jax.value_and_grad(_reference_loglik("Sigma"), argnums=(0, 1, 2, 3))(*p)
        assert abs(float(values[b]) - float(ref_value)) < 1e-10 * abs(float(ref_value))
        _assert_close(jax.tree_util.tree_map(lambda g, b=b: g[b], grads), ref_grads, 1e-10, "vmap")


@pytest.mark.parametrize("noise_name", list(NOISE))
@pytest.mark.parametrize(("form_name", "dtype"), _form_dtype(DTYPES_FAST64))
def test_fisher_information_in_every_array(form_name, noise_name, dtype):
    # Every array of the form, K and the noise is a parameter: all of dM, dK, dΣ and their
    # cross terms (the complement of span(G) for a thin LowRank) are exercised.
    _, M, K, noise = _problem(form_name, noise_name, seed=5)

    def cov_fn(p):
        return p["M"], p["K"], _sigma(noise_name, p["noise"])

    params = {"M": M, "K": K, "noise": noise}
    got = jax.jit(lambda p: kronlik.fisher_information(cov_fn, p))(_cast(params, dtype))
    want = jax.jit(lambda p: reference.fisher_information(cov_fn, p))(params)
    assert got.dtype == dtype
    _assert_close(got, want, TOL[dtype], f"{form_name}/{noise_name}/{dtype} Fisher")


@pytest.mark.parametrize(("form_name", "dtype"), _form_dtype(DTYPES_FAST64))
def test_log_var_information(form_name, dtype):
    # fisher_log_var and hessian_log_var (closed forms) against the dense Fisher and jax.hessian
    # of the dense reference.
    Y, M, K, s = _problem(form_name, "log_var", seed=6)
    low = _cast((Y, M, K, s), dtype)
    fisher = jax.jit(lambda q: reference.fisher_information(lambda x: (M, K, _sigma("log_var", x)), q))(s)
    _assert_close(jax.jit(kronlik.fisher_log_var)(*low[1:]), fisher, TOL[dtype], "fisher_log_var")
    hessian = jax.jit(jax.hessian(_reference_loglik("log_var"), argnums=3))(Y, M, K, s)
    _assert_close(jax.jit(kronlik.hessian_log_var)(*low), hessian, TOL[dtype], "hessian_log_var")


@pytest.mark.parametrize("noise_name", list(NOISE))
@pytest.mark.parametrize(("form_name", "dtype"), _form_dtype(DTYPES_FAST64))
def test_second_order_in_every_array(form_name, noise_name, dtype):
    # jax.hessian (forward over reverse) in all four arguments, every array of the form
    # included, and reverse over reverse and a jvp, against the dense reference.
    args = _problem(form_name, noise_name, seed=7)
    low = _cast(args, dtype)
    fn = kronlik.loglik if noise_name == "Sigma" else kronlik.loglik_diag
    ref = _reference_loglik(noise_name)
    what = f"{form_name}/{noise_name}/{dtype}"
    argnums = SECOND_ORDER_ARGNUMS.get(form_name, ALL_ARGNUMS)
    hess = jax.jit(jax.hessian(fn, argnums=argnums))(*low)
    assert all(h.dtype == dtype for h in jax.tree_util.tree_leaves(hess))
    _assert_close(hess, jax.jit(jax.hessian(ref, argnums=argnums))(*args), TOL2[dtype], f"{what} hessian")
    for refused in sorted(set(ALL_ARGNUMS) - set(argnums)):
        with pytest.raises(TypeError, match="second derivative"):
            jax.hessian(fn, argnums=refused)(*low)
    tangents = _random_like(args, 8)
    value, tangent = jax.jit(lambda a, t: jax.jvp(fn, a, t))(low, _cast(tangents, dtype))
    ref_value, ref_tangent = jax.jit(lambda a, t: jax.jvp(ref, a, t))(args, tangents)
    _assert_close((value, tangent), (ref_value, ref_tangent), TOL[dtype], f"{what} jvp")


@pytest.mark.slow
@pytest.mark.parametrize("noise_name", list(NOISE))
@pytest.mark.parametrize("form_name", FORM_NAMES)
def test_reverse_over_reverse_in_every_array(form_name, noise_name):
    # the same rules transposed (float64 only: float32 adds nothing); second tier
    args = _problem(form_name, noise_name, seed=7)
    fn = kronlik.loglik if noise_name == "Sigma" else kronlik.loglik_diag
    ref = _reference_loglik(noise_name)
    argnums = SECOND_ORDER_ARGNUMS.get(form_name, ALL_ARGNUMS)
    inner, outer = ((2, 3), (1, 2, 3)) if argnums == ALL_ARGNUMS else ((argnums[-1],), argnums)
    rev_rev = jax.jit(jax.jacrev(jax.grad(fn, argnums=inner), argnums=outer))(*args)
    want = jax.jit(jax.jacrev(jax.grad(ref, argnums=inner), argnums=outer))(*args)
    _assert_close(rev_rev, want, TOL2["float64"], f"{form_name}/{noise_name} reverse over reverse")


@pytest.mark.parametrize("noise_name", list(NOISE))
@pytest.mark.parametrize(("form_name", "dtype"), _form_dtype(DTYPES_FAST64))
def test_derivatives_of_the_helpers(form_name, noise_name, dtype):
    # jvp of grad_sigma / grad_log_var, solve and predict along a direction moving every input
    Y, M, K, noise = _problem(form_name, noise_name, seed=9)
    rng = np.random.default_rng(10)
    extra = (jnp.asarray(rng.standard_normal((N, T))), jnp.asarray(rng.uniform(5.0, 6.0, N)))
    args, tangents = (Y, M, K, noise), _random_like((Y, M, K, noise), 11)
    ref = _reference_loglik(noise_name)
    helper = kronlik.grad_sigma if noise_name == "Sigma" else kronlik.grad_log_var
    argnums = SECOND_ORDER_ARGNUMS.get(form_name, ALL_ARGNUMS)  # the helpers are first derivatives
    got = jax.jit(lambda a, t: _jvp_in(helper, a, t, argnums))(_cast(args, dtype), _cast(tangents, dtype))
    want = _jvp_in(jax.grad(ref, argnums=3), args, tangents, argnums)
    _assert_close(got, want, TOL2[dtype], f"{form_name}/{noise_name}/{dtype} {helper.__name__}")

    def dense_sigma(x):
        return _sigma(noise_name, x)

    def solve(Y, M, K, x):
        return kronlik.solve(Y, M, K, dense_sigma(x))

    def dense_solve(Y, M, K, x):
        U = reference.dense_covariance(_dense_of(M), K, dense_sigma(x))
        return jnp.linalg.solve(U, Y.reshape(-1)).reshape(Y.shape)

    got = jax.jit(lambda a, t: jax.jvp(solve, a, t))(_cast(args, dtype), _cast(tangents, dtype))
    _assert_close(got, jax.jvp(dense_solve, args, tangents), TOL2[dtype], f"{form_name}/{noise_name}/{dtype} solve")
    args, tangents = args + extra, tangents + _random_like(extra, 12)

    def predict(Y, M, K, x, M_cross, m_new):
        return kronlik.predict(Y, M, K, dense_sigma(x), M_cross, m_new, include_noise=True)

    def dense_predict(Y, M, K, x, M_cross, m_new):
        mean, var = _dense_predict(Y, M, K, dense_sigma(x), M_cross, m_new)
        return mean, var + jnp.diagonal(dense_sigma(x))[None, :]

    if form_name in NO_PREDICT_DERIVATIVE:
        with pytest.raises(TypeError, match="predict .* not differentiable"):
            jax.jvp(predict, args, tangents)
        return
    got = jax.jit(lambda a, t: jax.jvp(predict, a, t))(_cast(args, dtype), _cast(tangents, dtype))
    _assert_close(got, jax.jvp(dense_predict, args, tangents), TOL2[dtype], f"{form_name}/{noise_name}/{dtype} predict")


# Missing entries: a fully missing row, a fully missing column but for one entry, and scattered
# ones (7 of 18); Y holds NaN where it is missing.
MASK = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1]], bool)


@pytest.mark.parametrize("noise_name", list(NOISE))
@pytest.mark.parametrize(("form_name", "dtype"), _form_dtype(DTYPES_FAST64))
def test_missing_entries_in_every_entry_point(form_name, noise_name, dtype):
    # The exact likelihood of the observed entries (a Schur complement over the missing ones)
    # against the dense Cholesky of U_oo: value, every gradient, the helpers, solve, predict.
    Y, M, K, noise = _problem(form_name, noise_name, seed=13)
    low = _cast((jnp.where(MASK, Y, jnp.nan), M, K, noise), dtype)
    fn = kronlik.loglik if noise_name == "Sigma" else kronlik.loglik_diag
    what = f"{form_name}/{noise_name}/{dtype} masked"
    value, grads = jax.jit(jax.value_and_grad(lambda *a: fn(*a, mask=MASK), argnums=(0, 1, 2, 3)))(*low)
    ref_value, ref_grads = jax.value_and_grad(_reference_loglik(noise_name, MASK), argnums=(0, 1, 2, 3))(Y, M, K, noise)
    assert value.dtype == dtype and all(g.dtype == dtype for g in jax.tree_util.tree_leaves(grads))
    assert abs(float(value) - float(ref_value)) < TOL[dtype] * abs(float(ref_value)), what
    assert np.all(np.asarray(grads[0])[~MASK] == 0.0), what  # missing entries do not enter L
    for name, g, r in zip(("Y", "M", "K", noise_name), grads, ref_grads):
        _assert_close(g, r, TOL[dtype], f"{what} ∂L/∂{name}")
    helper = kronlik.grad_sigma if noise_name == "Sigma" else kronlik.grad_log_var
    _assert_close(helper(*low, mask=MASK), ref_grads[3], TOL[dtype], f"{what} {helper.__name__}")

    Sigma = _sigma(noise_name, noise)
    obs = reference.observed(MASK)
    u_oo = reference.dense_covariance(_dense_of(M), K, Sigma)[obs][:, obs]
    w = np.zeros(T * D)
    w[obs] = np.linalg.solve(u_oo, np.asarray(Y).reshape(-1)[obs])
    low_sigma = low[:3] + (low[3] if noise_name == "Sigma" else _sigma(noise_name, low[3]),)
    _assert_close(kronlik.solve(*low_sigma, mask=MASK), w.reshape(T, D), TOL[dtype], f"{what} solve")
    rng = np.random.default_rng(14)
    extra = (jnp.asarray(rng.standard_normal((N, T))), jnp.asarray(rng.uniform(5.0, 6.0, N)))
    got = kronlik.predict(*low_sigma, *_cast(extra, dtype), mask=MASK)
    _assert_close(got, _dense_predict(Y, M, K, Sigma, *extra, mask=MASK), TOL[dtype], f"{what} predict")


# Mixed models (kronlik.mixed): every form × every method, full Σ (the environmental covariance
# of statistical genetics is full), covariates with a trait design A ≠ I of fewer columns than D.
# float32 once (REML, which has every term); the three methods in float64.
METHOD_DTYPES = [
    ("ml", "float64"),
    ("reml", "float64"),
    pytest.param("reml-lamotte", "float64", marks=pytest.mark.slow),
    pytest.param("reml", "float32", marks=pytest.mark.slow),
]


def _covariates(seed):
    rng = np.random.default_rng(seed)
    F = jnp.asarray(np.column_stack([np.ones(T), rng.standard_normal(T)]))
    return F, jnp.asarray(rng.standard_normal((D, 2)))


@pytest.mark.parametrize(
    ("form_name", "method", "dtype"),
    # a second-tier form once (ML, float64): the mixed models take a StateSpace M densified
    [
        pytest.param(f, *m.values, marks=m.marks) if hasattr(m, "values") else (f, *m)
        for f in FORMS
        for m in METHOD_DTYPES
        if f not in SECOND_TIER_FORMS
    ]
    + [pytest.param(f, "ml", "float64", marks=pytest.mark.slow) for f in FORMS if f in SECOND_TIER_FORMS],
)
def test_mixed_model_in_every_form(form_name, method, dtype):
    Y, M, K, Sigma = _problem(form_name, "Sigma", seed=5)
    F, A = _covariates(6)
    terms = ((F, A),)

    def dense(Y, M, K, Sigma):
        return reference.loglik_mixed(Y, _dense_of(M), K, Sigma, terms, method)

    def structured(Y, M, K, Sigma, F, A):
        return kronlik.loglik_mixed(Y, M, K, Sigma, F, A, method=method)

    low = _cast((Y, M, K, Sigma, F, A), dtype)
    value, grads = jax.jit(jax.value_and_grad(structured, argnums=(0, 1, 2, 3)))(*low)
    ref_value, ref_grads = jax.value_and_grad(dense, argnums=(0, 1, 2, 3))(Y, M, K, Sigma)
    assert value.dtype == dtype
    assert abs(float(value) - float(ref_value)) < TOL[dtype] * abs(float(ref_value))
    for name, g, r in zip(("Y", "M", "K", "Sigma"), grads, ref_grads):
        _assert_close(g, r, TOL[dtype], f"{form_name}/{method}/{dtype} ∂L/∂{name}")
    info = kronlik.information_mixed(*low[1:], method=method)
    _assert_close(info, reference.information_mixed(_dense_of(M), K, Sigma, terms, method), TOL[dtype], "information")
    b, cov = reference.gls(Y, _dense_of(M), K, Sigma, terms)
    got = kronlik.gls(*low)
    _assert_close(got.B.reshape(-1), b, TOL[dtype], "B")
    _assert_close(got.cov, cov, TOL[dtype], "Cov B")
