"""Bad input: a clear exception, or NaN under jit, never a silently wrong finite number."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_problem

import kronlik
from kronlik import reference

ALL = (0, 1, 2, 3)
ENTRY_POINTS = [kronlik.loglik, kronlik.grad_sigma, kronlik.solve, reference.loglik, reference.grad_sigma]


@pytest.fixture
def good(rng):
    return random_problem(rng, 5, 3)


@pytest.mark.parametrize("fn", ENTRY_POINTS + [jax.jit(kronlik.loglik), jax.grad(kronlik.loglik)])
@pytest.mark.parametrize(
    "which,shape,message",
    [
        (0, (15,), r"Y must be a 2-D array of shape \(T, D\); got shape \(15,\)"),
        (1, (4, 4), r"M must have shape \(T, T\) = \(5, 5\) to match Y of shape \(5, 3\); got \(4, 4\)"),
        (1, (5, 4), r"M must have shape \(T, T\) = \(5, 5\)"),
        (2, (3,), r"K must have shape \(D, D\) = \(3, 3\) to match Y of shape \(5, 3\); got \(3,\)"),
        (3, (3,), r"Sigma must have shape \(3, 3\) to match Y of shape \(5, 3\); got \(3,\)"),
        (3, (5, 5), r"Sigma must have shape \(3, 3\)"),
    ],
)
def test_shape_errors_name_the_shapes(good, fn, which, shape, message):
    args = list(good)
    args[which] = jnp.ones(shape)
    with pytest.raises(ValueError, match=message):
        fn(*args)


def test_diag_shape_errors(good):
    Y, M, K, _ = good
    for fn in (kronlik.loglik_diag, kronlik.grad_log_var, jax.jit(kronlik.loglik_diag)):
        with pytest.raises(ValueError, match=r"log_var must have shape \(3,\) to match Y of shape \(5, 3\)"):
            fn(Y, M, K, jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"T >= 1 rows"):
        kronlik.loglik_diag(jnp.zeros((0, 3)), jnp.zeros((0, 0)), K, jnp.zeros(3))


def test_shape_errors_inside_vmap(good):
    Y, M, K, Sigma = good
    with pytest.raises(ValueError, match="M must have shape"):
        jax.vmap(kronlik.loglik, in_axes=(0, None, None, None))(jnp.stack([Y, Y]), M[:4, :4], K, Sigma)


def test_dtype_policy_is_raise_not_promote(good):
    Y, M, K, Sigma = good
    with pytest.raises(TypeError, match=r"one floating dtype; got Y float32, M float64"):
        kronlik.loglik(Y.astype(jnp.float32), M, K, Sigma)
    with pytest.raises(TypeError, match=r"real floating-point inputs; got Y int32"):
        kronlik.loglik(jnp.ones((5, 3), jnp.int32), M, K, Sigma)
    with pytest.raises(TypeError, match=r"complex128"):
        kronlik.loglik(Y.astype(jnp.complex128), M, K, Sigma)
    with pytest.raises(TypeError, match=r"log_var float32"):
        kronlik.loglik_diag(Y, M, K, jnp.zeros(3, jnp.float32))
    # NumPy float64 arrays are fine: they are JAX float64 arrays with x64 on
    value = kronlik.loglik(*(np.asarray(a) for a in good))
    assert value.dtype == jnp.float64


def _assert_nan_everywhere(args, fn=kronlik.loglik):
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=ALL))(*args)
    assert np.isnan(value)
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isnan(g))


def test_indefinite_sigma_gives_nan(good):
    Y, M, K, _ = good
    Sigma = jnp.diag(jnp.array([1.0, -0.1, 1.0]))
    _assert_nan_everywhere((Y, M, K, Sigma))
    assert np.all(np.isnan(kronlik.grad_sigma(Y, M, K, Sigma)))
    with pytest.raises(ValueError, match=r"Sigma is not positive semi-definite: smallest eigenvalue -0.1"):
        kronlik.validate(Y, M, K, Sigma)


def test_singular_sigma_is_fine_where_u_is_positive_definite(good):
    # A noise-free output: Σ singular, but M ⊗ K covers it, so U is positive definite.
    Y, M, K, _ = good
    Sigma = jnp.diag(jnp.array([1.0, 0.0, 0.5]))
    value, grads = jax.value_and_grad(kronlik.loglik, argnums=ALL)(Y, M, K, Sigma)
    ref_value, ref_grads = jax.value_and_grad(reference.loglik, argnums=ALL)(Y, M, K, Sigma)
    assert np.isfinite(value) and abs(float(value - ref_value)) < 1e-10 * abs(float(ref_value))
    for g, r in zip(grads, ref_grads):
        assert np.all(np.isfinite(g)) and np.max(np.abs(g - r)) < 1e-9 * np.max(np.abs(r))
    kronlik.validate(Y, M, K, Sigma)
    # ...but not where M has a zero eigenvalue: there U = Σ, singular.
    G = jnp.asarray(np.random.default_rng(0).standard_normal((5, 2)))
    for M_singular in (G @ G.T, kronlik.LowRank(G)):
        _assert_nan_everywhere((Y, M_singular, K, Sigma))
        with pytest.raises(ValueError, match="U = M ⊗ K \\+ I ⊗ Σ is singular"):
            kronlik.validate(Y, M_singular, K, Sigma)


@pytest.mark.parametrize("which,name", [(1, "M"), (2, "K")])
def test_indefinite_m_or_k_gives_nan(good, which, name):
    args = list(good)
    n = args[which].shape[0]
    args[which] = args[which] - 1e-3 * jnp.eye(n) - jnp.min(jnp.linalg.eigvalsh(args[which])) * jnp.eye(n)
    _assert_nan_everywhere(args)
    message = rf"{name} is not positive semi-definite: smallest eigenvalue -0.001"
    with pytest.raises(ValueError, match=message):
        kronlik.validate(*args)


@pytest.mark.parametrize("which", [0, 1, 2, 3])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_gives_nan(good, which, bad):
    args = list(good)
    args[which] = args[which].at[0, 0].set(bad)
    _assert_nan_everywhere(args)
    name = ("Y", "M", "K", "Sigma")[which]
    with pytest.raises(ValueError, match=rf"{name} has 1 non-finite entries"):
        kronlik.validate(*args)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_bad_log_var_gives_nan(good, bad):
    Y, M, K, _ = good
    log_var = jnp.zeros(3).at[1].set(bad)
    _assert_nan_everywhere((Y, M, K, log_var), kronlik.loglik_diag)
    assert np.all(np.isnan(kronlik.grad_log_var(Y, M, K, log_var)))
    with pytest.raises(ValueError, match="log_var"):
        kronlik.validate(Y, M, K, log_var=log_var)


@pytest.mark.parametrize("tiny", [-709.0, -745.0, -800.0, -1e6])
def test_tiny_log_var_is_a_noise_free_output(good, tiny):
    # e^-800 underflows to 0: the output is noise-free, U = M ⊗ K + I ⊗ diag(1, 0, 1) stays
    # positive definite, and L is its finite limit; ∂L/∂s_1 = e^s (...) → 0.
    Y, M, K, _ = good
    log_var = jnp.array([0.0, tiny, -0.5])
    value, grads = jax.value_and_grad(kronlik.loglik_diag, argnums=ALL)(Y, M, K, log_var)
    sigma = jnp.diag(jnp.exp(log_var))
    ref_value, ref_grads = jax.value_and_grad(reference.loglik, argnums=ALL)(Y, M, K, sigma)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for g, r in zip(grads[:3], ref_grads[:3]):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(r))))
    np.testing.assert_allclose(grads[3], jnp.exp(log_var) * jnp.diagonal(ref_grads[3]), rtol=1e-9, atol=1e-300)
    kronlik.validate(Y, M, K, log_var=log_var)


def test_huge_log_var_stays_finite(good):
    # e^800 overflows float64, but the likelihood is well defined: output 1 decouples,
    # contributing -T·s/2 to L, so ∂L/∂s_1 → -T/2 with nothing of size e^800 formed.
    Y, M, K, _ = good
    log_var = jnp.array([0.0, 800.0, -1.0])
    value, grads = jax.value_and_grad(kronlik.loglik_diag, argnums=ALL)(Y, M, K, log_var)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(grads[3][1], -Y.shape[0] / 2, rtol=1e-12)
    np.testing.assert_allclose(kronlik.grad_log_var(Y, M, K, log_var), grads[3], rtol=1e-12)
    # the other outputs see the likelihood of their own columns (K restricted to them)
    keep = jnp.array([0, 2])
    rest = kronlik.loglik_diag(Y[:, keep], M, K[keep][:, keep], log_var[keep])
    rest = rest - Y.shape[0] * (800.0 + np.log(2 * np.pi)) / 2
    np.testing.assert_allclose(value, rest, rtol=1e-12)
    kronlik.validate(Y, M, K, log_var=log_var)


def test_validate_accepts_good_input_and_warns_on_asymmetry(good):
    Y, M, K, Sigma = good
    report = kronlik.validate(Y, M, K, Sigma)
    assert isinstance(report, kronlik.Validation) and report.dtype == "float64"
    assert 1.0 <= report.amplification < 1e3 and report.error_bound < 1e-12
    kronlik.validate(Y, M, K, log_var=jnp.zeros(3))
    with pytest.warns(UserWarning, match=r"K is not symmetric \(max \|K - Kᵀ\| = 0.1\); kronlik uses"):
        kronlik.validate(Y, M, K.at[0, 1].add(0.1), Sigma)
    with pytest.raises(TypeError, match="exactly one of Sigma"):
        kronlik.validate(Y, M, K)
    with pytest.raises(TypeError, match="exactly one of Sigma"):
        kronlik.validate(Y, M, K, Sigma, log_var=jnp.zeros(3))
    with pytest.raises(TypeError, match="concrete arrays"):
        jax.jit(kronlik.validate)(Y, M, K, Sigma)
    with pytest.raises(ValueError, match="M must have shape"):
        kronlik.validate(Y, M[:2, :2], K, Sigma)


def test_validate_structured_m(good):
    Y, M, K, Sigma = good
    kronlik.validate(Y, kronlik.LowRank(jnp.ones((5, 2))), K, Sigma)
    kronlik.validate(Y, kronlik.factorize(M), K, log_var=jnp.zeros(3))
    with pytest.raises(ValueError, match="M.factor has 1 non-finite"):
        kronlik.validate(Y, kronlik.LowRank(jnp.ones((5, 2)).at[1, 1].set(jnp.inf)), K, Sigma)
    fm = kronlik.factorize(M)
    with pytest.raises(ValueError, match="M.vectors is not orthonormal"):
        kronlik.validate(Y, kronlik.EighFactor(2.0 * fm.vectors, fm.values), K, Sigma)
    with pytest.raises(ValueError, match="M.values has a negative eigenvalue -1"):
        kronlik.validate(Y, kronlik.EighFactor(fm.vectors, fm.values.at[0].set(-1.0)), K, Sigma)
    with pytest.raises(ValueError, match="M.values has 5 non-finite"):
        kronlik.validate(Y, kronlik.factorize(M - 100.0 * jnp.eye(5)), K, Sigma)
    # and the likelihood agrees: NaN for each of these
    for bad in (
        kronlik.EighFactor(2.0 * fm.vectors, fm.values),
        kronlik.EighFactor(fm.vectors, fm.values.at[0].set(-1.0)),
        kronlik.EighFactor(fm.vectors, fm.values.at[0].set(jnp.inf)),
    ):
        _assert_nan_everywhere((Y, bad, K, Sigma))
