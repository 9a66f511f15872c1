"""Structured value and gradients against the dense references: three witnesses per gradient.

Tolerances: float64 structured vs float64 dense differ by rounding only, κ(U)·eps with
κ ≲ 1e3 on these problems, so 1e-10 relative (max-norm) has several digits of margin.
Central differences with h = 1e-5 err by O(h²·L''') + O(eps·|L|/h) ≈ 1e-9 relative
to ‖g‖‖V‖, hence 1e-7. float32 vs float64: κ·eps32 ≈ 1e-5 at worst here; the issue
asks for 1e-4.
"""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from helpers import eqns, max_rel, random_problem

import kronlik
from kronlik import reference

_SLOW = pytest.mark.slow
# (1, 1) and (6, 3) in the fast tier; the other shapes in the second
SHAPES = [
    (1, 1),
    pytest.param(1, 4, marks=_SLOW),
    pytest.param(5, 1, marks=_SLOW),
    (6, 3),
    pytest.param(48, 3, marks=_SLOW),
    pytest.param(3, 36, marks=_SLOW),
    pytest.param(9, 7, marks=_SLOW),
]
ALL = (0, 1, 2, 3)


def _diag_reference(Y, M, K, log_var):
    return reference.loglik(Y, M, K, jnp.diag(jnp.exp(log_var)))


@pytest.mark.parametrize("T,D", SHAPES)
def test_value_and_all_gradients_match_dense_autodiff(rng, T, D):
    args = random_problem(rng, T, D)
    value, grads = jax.value_and_grad(kronlik.loglik, argnums=ALL)(*args)
    ref_value, ref_grads = jax.value_and_grad(reference.loglik, argnums=ALL)(*args)
    assert max_rel(value, ref_value) < 1e-10
    for name, g, r in zip("Y M K Sigma".split(), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == jnp.float64
        assert max_rel(g, r) < 1e-10, name


@pytest.mark.parametrize("T,D", SHAPES)
def test_grad_sigma_three_ways(rng, T, D):
    # structured ½(C - B), the literal block-diagonal sums of the original answer, and
    # jax.grad of the dense Cholesky likelihood must all agree.
    args = random_problem(rng, T, D)
    structured = kronlik.grad_sigma(*args)
    literal = reference.grad_sigma(*args)
    autodiff = jax.grad(reference.loglik, argnums=3)(*args)
    assert max_rel(literal, autodiff) < 1e-10
    assert max_rel(structured, literal) < 1e-10
    assert max_rel(structured, jax.grad(kronlik.loglik, argnums=3)(*args)) < 1e-12


@pytest.mark.parametrize("T,D", SHAPES)
def test_diagonal_noise(rng, T, D):
    Y, M, K, _ = random_problem(rng, T, D)
    log_var = jnp.asarray(rng.uniform(-1.0, 1.0, D))
    value, grads = jax.value_and_grad(kronlik.loglik_diag, argnums=ALL)(Y, M, K, log_var)
    ref_value, ref_grads = jax.value_and_grad(_diag_reference, argnums=ALL)(Y, M, K, log_var)
    assert max_rel(value, ref_value) < 1e-10
    for g, r in zip(grads, ref_grads):
        assert max_rel(g, r) < 1e-10
    # grad_log_var: the Hadamard formula eˢ ⊙ diag(∂L/∂Σ), three ways.
    hadamard = kronlik.grad_log_var(Y, M, K, log_var)
    via_sigma = jnp.exp(log_var) * jnp.diagonal(reference.grad_sigma(Y, M, K, jnp.diag(jnp.exp(log_var))))
    assert hadamard.shape == (D,)
    assert max_rel(hadamard, ref_grads[3]) < 1e-10
    assert max_rel(hadamard, via_sigma) < 1e-10


def _central_difference(f, args, i, direction, h):
    plus, minus = list(args), list(args)
    plus[i] = args[i] + h * direction
    minus[i] = args[i] - h * direction
    return (f(*plus) - f(*minus)) / (2 * h)


@pytest.mark.parametrize("T,D", [(1, 1), (6, 3), (4, 9)])
@pytest.mark.parametrize("diag", [False, True])
def test_gradients_match_central_differences(rng, T, D, diag):
    Y, M, K, Sigma = random_problem(rng, T, D)
    if diag:
        args = (Y, M, K, jnp.asarray(rng.uniform(-1.0, 1.0, D)))
        f, f_ref = kronlik.loglik_diag, jax.jit(_diag_reference)
    else:
        args = (Y, M, K, Sigma)
        f, f_ref = kronlik.loglik, jax.jit(reference.loglik)
    grads = jax.grad(f, argnums=ALL)(*args)
    for i, g in enumerate(grads):
        for _ in range(3):
            v = rng.standard_normal(args[i].shape)
            if v.ndim == 2 and i > 0:
                v = v + v.T  # stay in the symmetric matrices, where M, K, Σ live
            v = jnp.asarray(v)
            fd = _central_difference(f_ref, args, i, v, 1e-5)
            err = abs(float(jnp.vdot(g, v) - fd)) / float(jnp.linalg.norm(g) * jnp.linalg.norm(v))
            assert err < 1e-7, (i, err)


def test_solve_matches_dense(rng):
    Y, M, K, Sigma = random_problem(rng, 7, 4)
    U = reference.dense_covariance(M, K, Sigma)
    dense = jnp.linalg.solve(U, Y.reshape(-1)).reshape(7, 4)
    assert max_rel(kronlik.solve(Y, M, K, Sigma), dense) < 1e-10
    assert max_rel(jax.grad(kronlik.loglik)(Y, M, K, Sigma), -dense) < 1e-10


def test_dense_covariance_vec_convention(rng):
    # (A ⊗ B) vec(Y) = vec(A Y Bᵀ) with vec = row-major reshape: row t of Y is block t.
    Y, M, K, Sigma = random_problem(rng, 4, 3)
    U = reference.dense_covariance(M, K, Sigma)
    assert U.shape == (12, 12)
    np.testing.assert_allclose(U @ Y.reshape(-1), (M @ Y @ K + Y @ Sigma).reshape(-1), rtol=1e-13)


def test_blockdiag_sum_rectangular_blocks(rng):
    n, m, p = 4, 3, 2
    A = jnp.asarray(rng.standard_normal((n * m, n * p)))
    expected = sum(np.asarray(A)[k * m : (k + 1) * m, k * p : (k + 1) * p] for k in range(n))
    np.testing.assert_allclose(reference.blockdiag_sum(A, n), expected, rtol=1e-14)
    with pytest.raises(ValueError, match="divide by n=5"):
        reference.blockdiag_sum(A, 5)


def test_gradients_are_exactly_symmetric(rng):
    args = random_problem(rng, 9, 5)
    _, g_m, g_k, g_s = jax.grad(kronlik.loglik, argnums=ALL)(*args)
    for g in (g_m, g_k, g_s, kronlik.grad_sigma(*args)):
        np.testing.assert_array_equal(g, g.T)


def test_nonsymmetric_inputs_are_symmetrised_like_cholesky(rng):
    Y, M, K, Sigma = random_problem(rng, 5, 3)
    skew = jnp.asarray(rng.standard_normal((5, 5))) * 1e-3
    args = (Y, M + skew - skew.T, K, Sigma)
    np.testing.assert_allclose(kronlik.loglik(*args), kronlik.loglik(Y, M, K, Sigma), rtol=1e-13)
    np.testing.assert_allclose(kronlik.loglik(*args), reference.loglik(*args), rtol=1e-12)


@pytest.mark.parametrize("fn", ["loglik", "loglik_diag"])
def test_jax_check_grads(rng, fn):
    Y, M, K, Sigma = random_problem(rng, 5, 3)
    noise = Sigma if fn == "loglik" else jnp.asarray(rng.uniform(-0.5, 0.5, 3))
    jax.test_util.check_grads(getattr(kronlik, fn), (Y, M, K, noise), order=1, modes=("rev",))


@pytest.mark.slow
def test_float32_matches_float64_reference(rng):
    for T, D in [(6, 3), (20, 4), (4, 16)]:
        args64 = random_problem(rng, T, D)
        args32 = tuple(a.astype(jnp.float32) for a in args64)
        value, grads = jax.value_and_grad(kronlik.loglik, argnums=ALL)(*args32)
        ref_value, ref_grads = jax.value_and_grad(reference.loglik, argnums=ALL)(*args64)
        assert value.dtype == jnp.float32
        assert max_rel(value, ref_value) < 1e-4
        for g, r in zip(grads, ref_grads):
            assert g.dtype == jnp.float32
            assert max_rel(g, r) < 1e-4
        log_var = jnp.zeros(D, jnp.float32)
        g32 = kronlik.grad_log_var(*args32[:3], log_var)
        g64 = jax.grad(_diag_reference, argnums=3)(*args64[:3], log_var.astype(jnp.float64))
        assert g32.dtype == jnp.float32 and max_rel(g32, g64) < 1e-4


@pytest.mark.slow
def test_jit_vmap_and_value_and_grad(rng):
    B, T, D = 4, 6, 3
    _, M, K, Sigma = random_problem(rng, T, D)
    Ys = jnp.asarray(rng.standard_normal((B, T, D)))
    # a batch of Y with shared M, K, Sigma
    batched = jax.jit(jax.vmap(kronlik.loglik, in_axes=(0, None, None, None)))(Ys, M, K, Sigma)
    one_by_one = jnp.stack([reference.loglik(y, M, K, Sigma) for y in Ys])
    assert max_rel(batched, one_by_one) < 1e-10
    # a batch of everything, with gradients
    probs = [random_problem(rng, T, D) for _ in range(B)]
    stacked = tuple(jnp.stack(a) for a in zip(*probs))
    vg = jax.jit(jax.vmap(jax.value_and_grad(kronlik.loglik, argnums=ALL)))
    values, grads = vg(*stacked)
    for b, p in enumerate(probs):
        ref_value, ref_grads = jax.value_and_grad(reference.loglik, argnums=ALL)(*p)
        assert max_rel(values[b], ref_value) < 1e-10
        for g, r in zip(grads, ref_grads):
            assert max_rel(g[b], r) < 1e-10
    # gradient of a batched sum, and the diagonal API under jit + vmap
    log_vars = jnp.asarray(rng.uniform(-1, 1, (B, D)))
    g_batch = jax.jit(jax.vmap(kronlik.grad_log_var, in_axes=(0, None, None, 0)))(Ys, M, K, log_vars)
    g_sum = jax.grad(lambda s: jnp.sum(jax.vmap(kronlik.loglik_diag, (0, None, None, 0))(Ys, M, K, s)))(log_vars)
    assert max_rel(g_batch, g_sum) < 1e-12


def test_vmap_over_y_does_not_batch_the_eigendecomposition_of_m(rng):
    _, M, K, Sigma = random_problem(rng, 6, 3)
    Ys = jnp.zeros((5, 6, 3))
    for fn in (kronlik.loglik, jax.grad(kronlik.loglik, argnums=ALL)):
        jaxpr = jax.make_jaxpr(jax.vmap(fn, in_axes=(0, None, None, None)))(Ys, M, K, Sigma)
        eighs = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "eigh"]
        assert eighs, "expected the eigendecompositions in the jaxpr"
        # unbatched: eigenvectors (6, 6) of M and (3, 3) of the pencil, no leading batch axis of 5
        assert {e.outvars[0].aval.shape for e in eighs} <= {(6, 6), (3, 3)} and (6, 6) in {
            e.outvars[0].aval.shape for e in eighs
        }
        assert all(e.outvars[0].aval.shape[0] != 5 for e in eighs)
