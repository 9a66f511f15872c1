"""Low-rank M = G Gᵀ: the thin-SVD path against the full-M path and the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_rel, random_problem

import kronlik
from kronlik import reference

ALL = (0, 1, 2, 3)


def _dense_via_g(Y, G, K, noise, diag):
    S = jnp.diag(jnp.exp(noise)) if diag else noise
    return reference.loglik(Y, G @ G.T, K, S)


_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "T,D,r",  # r < T and r > T in the fast tier, edge shapes in the second
    [
        (8, 3, 2),
        pytest.param(1, 2, 1, marks=_SLOW),
        pytest.param(6, 1, 3, marks=_SLOW),
        pytest.param(5, 4, 5, marks=_SLOW),
        (4, 3, 7),
        pytest.param(30, 2, 4, marks=_SLOW),
    ],
)
@pytest.mark.parametrize("diag", [False, True])
def test_lowrank_matches_dense_and_full(rng, T, D, r, diag):
    Y, _, K, Sigma = random_problem(rng, T, D)
    G = jnp.asarray(rng.standard_normal((T, r)))
    noise = jnp.asarray(rng.uniform(-1, 1, D)) if diag else Sigma
    fn = kronlik.loglik_diag if diag else kronlik.loglik
    value, grads = jax.value_and_grad(fn, argnums=ALL)(Y, kronlik.LowRank(G), K, noise)
    ref_value, ref_grads = jax.value_and_grad(_dense_via_g, argnums=(0, 1, 2, 3))(Y, G, K, noise, diag)
    assert max_rel(value, ref_value) < 1e-10
    assert isinstance(grads[1], kronlik.LowRank)
    assert max_rel(grads[1].factor, ref_grads[1]) < 1e-10
    for i in (0, 2, 3):
        assert max_rel(grads[i], ref_grads[i]) < 1e-10
    # and the full-M structured path on M = GGᵀ
    assert max_rel(value, fn(Y, G @ G.T, K, noise)) < 1e-10


def test_lowrank_degenerate_and_helpers(rng):
    T, D = 7, 3
    Y, _, K, Sigma = random_problem(rng, T, D)
    G = jnp.asarray(rng.standard_normal((T, 3))).at[:, 2].set(0.0)  # a zero column: rank 2
    lr = kronlik.LowRank(G)
    grads = jax.grad(kronlik.loglik, argnums=ALL)(Y, lr, jnp.zeros((D, D)), 0.5 * jnp.eye(D))
    ref = jax.grad(_dense_via_g, argnums=ALL)(Y, G, jnp.zeros((D, D)), 0.5 * jnp.eye(D), False)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert max_rel(grads[1].factor, ref[1]) < 1e-10 and max_rel(grads[2], ref[2]) < 1e-10
    M = G @ G.T
    assert max_rel(kronlik.grad_sigma(Y, lr, K, Sigma), kronlik.grad_sigma(Y, M, K, Sigma)) < 1e-10
    assert max_rel(kronlik.solve(Y, lr, K, Sigma), kronlik.solve(Y, M, K, Sigma)) < 1e-10
    s = jnp.zeros(D)
    assert max_rel(kronlik.grad_log_var(Y, lr, K, s), kronlik.grad_log_var(Y, M, K, s)) < 1e-10


def test_lowrank_errors_and_nan(rng):
    Y, _, K, Sigma = random_problem(rng, 6, 2)
    with pytest.raises(ValueError, match=r"LowRank M needs a factor G of shape \(T, r\) = \(6, r >= 1\)"):
        kronlik.loglik(Y, kronlik.LowRank(jnp.ones((5, 2))), K, Sigma)
    with pytest.raises(TypeError, match="M.factor float32"):
        kronlik.loglik(Y, kronlik.LowRank(jnp.ones((6, 2), jnp.float32)), K, Sigma)
    G = jnp.ones((6, 2)).at[0, 0].set(jnp.nan)
    value, grads = jax.value_and_grad(kronlik.loglik, argnums=ALL)(Y, kronlik.LowRank(G), K, Sigma)
    assert np.isnan(value) and np.all(np.isnan(grads[1].factor))


@pytest.mark.slow
def test_lowrank_large_t_float32(rng):
    # O(T (r + D)) memory: T = 20 000 would need a 400M-entry M on the full path.
    T, D, r = 20_000, 3, 10
    G = jnp.asarray(rng.standard_normal((T, r)) / np.sqrt(r), jnp.float32)
    Y = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    value, grads = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=ALL))(
        Y, kronlik.LowRank(G), jnp.eye(D, dtype=jnp.float32), jnp.zeros(D, jnp.float32)
    )
    assert np.isfinite(value) and grads[1].factor.shape == (T, r)
    g64 = jax.grad(kronlik.loglik_diag, argnums=3)(
        Y.astype(jnp.float64), kronlik.LowRank(G.astype(jnp.float64)), jnp.eye(D), jnp.zeros(D)
    )
    assert max_rel(grads[3], g64) < 1e-3


def _exact_factor_gradient(Y, G, K, Sigma, digits=50):
    """(L, ∂L/∂G) in mpmath with M = G Gᵀ formed exactly: ∂L/∂G = 2 (∂L/∂M) G, ∂L/∂M = ½ Σ_de Γ_(td)(se) K_de."""
    import mpmath

    with mpmath.workdps(digits):
        T, D = Y.shape
        g = mpmath.matrix(G.tolist())
        m = g * g.T
        U = mpmath.matrix(T * D, T * D)
        for t in range(T):
            for u in range(T):
                for d in range(D):
                    for e in range(D):
                        U[t * D + d, u * D + e] = m[t, u] * K[d, e] + (Sigma[d, e] if t == u else 0)
        v = mpmath.matrix(Y.reshape(-1).tolist())
        U_inv = U**-1
        w = U_inv * v
        value = -(mpmath.log(mpmath.det(U)) + (v.T * w)[0] + T * D * mpmath.log(2 * mpmath.pi)) / 2
        gm = mpmath.matrix(T, T)
        for t in range(T):
            for u in range(T):
                gm[t, u] = (
                    mpmath.fsum(
                        K[d, e] * (w[t * D + d] * w[u * D + e] - U_inv[t * D + d, u * D + e])
                        for d in range(D)
                        for e in range(D)
                    )
                    / 2
                )
        grad = 2 * gm * g
        return float(value), np.array([[float(grad[i, j]) for j in range(G.shape[1])] for i in range(T)])


def test_factor_gradient_at_every_scale_against_exact():
    # ∂L/∂G = 2 G_M G, whose complement and R terms cancel to O(eps ‖G‖) against a true gradient
    # O(1/‖G‖) if formed from G itself: relative error eps·‖G‖², 25 at ‖G‖ = 1e8 before the
    # cotangent took both in the basis (issue 19's hostile test); at 1e100 (λ ~ 1e200, ν ~ 1e-200
    # in the pencil) also the Jacobi refinement's underflow (tests/test_exact.py). Both low-rank
    # forms, against exact arithmetic; tolerance 1e-10 (measured ≤ 3e-15 at every scale).
    rng = np.random.default_rng(2)
    T, D = 6, 2
    K, Sigma = np.array([[1.0, 0.3], [0.3, 0.5]]), np.array([[0.5, 0.1], [0.1, 0.3]])
    G0, Y = rng.standard_normal((T, 2)), rng.standard_normal((T, D))
    value_and_grad = jax.jit(jax.value_and_grad(kronlik.loglik, argnums=1))
    for scale in (1e-8, 1.0, 1e4, 1e8, 1e16, 1e100):
        G = G0 * scale
        # U's eigenvalues span scale² (M's) to 0.1 (Σ's): digits to spare beyond that
        value, grad = _exact_factor_gradient(Y, G, K, Sigma, digits=40 + 2 * max(0, int(np.log10(scale))))
        for M in (kronlik.LowRank(jnp.asarray(G)), kronlik.ShardedLowRank(jnp.asarray(G), kronlik.row_mesh())):
            got, ct = value_and_grad(jnp.asarray(Y), M, jnp.asarray(K), jnp.asarray(Sigma))
            assert abs(float(got) - value) <= 1e-12 * abs(value), (scale, type(M).__name__)
            assert max_rel(ct.factor, grad) < 1e-10, (scale, type(M).__name__, max_rel(ct.factor, grad))
