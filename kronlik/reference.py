r"""Dense, obviously-correct references: they build the (TD, TD) matrix U.

These exist to check the structured code against, on small problems: memory is O(T²D²) and
time O(T³D³). ``jax.grad(reference.loglik)`` is the autodiff witness of the tests and of
:func:`kronlik.check_gradients`. Like the structured code they symmetrise M, K and Σ, so both
define the same function of non-symmetric inputs.

:func:`exact` is the reference for the references: the same formulas in arbitrary precision
(mpmath, the ``test`` extra), for tiny problems where float64 itself is in doubt (graded noise,
extreme scales). Its inputs are the float64 numbers given, taken exactly.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve, solve_triangular

from ._checks import prepare
from ._noise import FullNoise
from .forms import Dense

Array = jax.Array

__all__ = [
    "as_dense_arrays",
    "dense_covariance",
    "loglik",
    "blockdiag_sum",
    "grad_sigma",
    "fisher_information",
    "exact",
    "Exact",
]


def _sym(a: Array) -> Array:
    return 0.5 * (a + a.T)


def as_dense_arrays(Y, M, K, Sigma) -> tuple[Array, Array, Array, Array]:
    """(Y, M, K, Σ) as arrays of one floating dtype with fitting shapes (the checks of kronlik.loglik)."""
    Y, form, K, noise = prepare(Y, M, K, Sigma, FullNoise)
    if not isinstance(form, Dense):
        raise TypeError(f"the dense references take M as a (T, T) array; got {type(form).__name__}")
    return Y, form.matrix, K, noise.sigma


@jax.jit
def _dense_covariance(M: Array, K: Array, Sigma: Array) -> Array:
    eye_t = jnp.eye(M.shape[0], dtype=M.dtype)
    return jnp.kron(_sym(M), _sym(K)) + jnp.kron(eye_t, _sym(Sigma))


def dense_covariance(M: Array, K: Array, Sigma: Array) -> Array:
    """U = M ⊗ K + I_T ⊗ Σ, the (TD, TD) covariance of ``Y.reshape(-1)``."""
    T, D = jnp.shape(M)[0], jnp.shape(K)[0]
    _, M, K, Sigma = as_dense_arrays(jnp.zeros((T, D), jnp.asarray(M).dtype), M, K, Sigma)
    return _dense_covariance(M, K, Sigma)


@jax.jit
def _loglik(Y: Array, M: Array, K: Array, Sigma: Array) -> Array:
    v = Y.reshape(-1)
    chol = jnp.linalg.cholesky(_dense_covariance(M, K, Sigma))
    white = solve_triangular(chol, v, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return -0.5 * (logdet + white @ white + v.shape[0] * math.log(2.0 * math.pi))


def loglik(Y: Array, M: Array, K: Array, Sigma: Array, mask=None) -> Array:
    """L = -½ log det U - ½ vᵀU⁻¹v - (TD/2) log 2π via the Cholesky factor of U.

    With a concrete (T, D) boolean ``mask`` (True = observed): log N(y_o; 0, U_oo) via the
    Cholesky factor of U_oo, the rows and columns of U at the observed entries.
    """
    Y, M, K, Sigma = as_dense_arrays(Y, M, K, Sigma)
    if mask is None:
        return _loglik(Y, M, K, Sigma)
    obs = observed(mask)
    v = Y.reshape(-1)[obs]
    chol = jnp.linalg.cholesky(_dense_covariance(M, K, Sigma)[obs][:, obs])
    white = solve_triangular(chol, v, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return -0.5 * (logdet + white @ white + v.shape[0] * math.log(2.0 * math.pi))


def observed(mask) -> np.ndarray:
    """The indices into vec(Y) of the observed entries of a concrete (T, D) boolean mask."""
    return np.flatnonzero(np.asarray(mask, bool).reshape(-1))


def predict(Y, M, K, Sigma, M_cross, m_new_diag, mask=None) -> tuple[Array, Array]:
    """The posterior mean and variance of the latent F at new rows (N, D), from dense U_oo."""
    Y, M, K, Sigma = as_dense_arrays(Y, M, K, Sigma)
    T, D = Y.shape
    obs = observed(np.ones((T, D), bool) if mask is None else mask)
    K = _sym(K)
    u_oo = _dense_covariance(M, K, Sigma)[obs][:, obs]
    cross = jnp.kron(M_cross, K)[:, obs]  # (N D, n_o): Cov(vec F_new, y_o)
    chol = jnp.linalg.cholesky(u_oo)
    white = solve_triangular(chol, cross.T, lower=True)
    mean = white.T @ solve_triangular(chol, Y.reshape(-1)[obs], lower=True)
    var = jnp.kron(m_new_diag, jnp.diagonal(K)) - jnp.sum(white * white, axis=0)
    N = M_cross.shape[0]
    return mean.reshape(N, D), var.reshape(N, D)


@partial(jax.jit, static_argnums=1)
def blockdiag_sum(A: Array, n: int) -> Array:
    """B = Σ_k bldiag(A, k, n): the sum of the n diagonal blocks of A.

    A is (n·m, n·p) and B is (m, p), block k being ``A[k m:(k+1) m, k p:(k+1) p]``. As
    in the original answer, each block is read by index ranges and added into B; no
    vector or stacked copy of the blocks is made.
    """
    if A.ndim != 2 or n < 1 or A.shape[0] % n or A.shape[1] % n:
        raise ValueError(f"blockdiag_sum needs a 2-D A whose sides divide by n={n}; got {A.shape}")
    m, p = A.shape[0] // n, A.shape[1] // n

    def add_block(k, acc):
        return acc + jax.lax.dynamic_slice(A, (k * m, k * p), (m, p))

    return jax.lax.fori_loop(0, n, add_block, jnp.zeros((m, p), A.dtype))


@jax.jit
def _grad_sigma(Y: Array, M: Array, K: Array, Sigma: Array) -> Array:
    T = Y.shape[0]
    v = Y.reshape(-1)
    chol = jnp.linalg.cholesky(_dense_covariance(M, K, Sigma))
    u_inv = cho_solve((chol, True), jnp.eye(v.shape[0], dtype=v.dtype))
    w = u_inv @ v
    b = blockdiag_sum(u_inv, T)  # ∂ log det U / ∂Σ
    c = blockdiag_sum(jnp.outer(w, w), T)  # -∂ (vᵀU⁻¹v) / ∂Σ
    return 0.5 * (c - b)


def grad_sigma(Y: Array, M: Array, K: Array, Sigma: Array) -> Array:
    """∂L/∂Σ = ½ (C - B) built literally: B and C are block-diagonal sums of U⁻¹ and U⁻¹vvᵀU⁻¹."""
    return _grad_sigma(*as_dense_arrays(Y, M, K, Sigma))


def fisher_information(cov_fn, params) -> Array:
    """½ tr(U⁻¹ ∂ᵢU U⁻¹ ∂ⱼU) over the ``ravel_pytree`` scalars of ``params``, from the dense U.

    ``cov_fn(params)`` returns (M, K, Σ), M as a (T, T) array or any form (its ``dense()``);
    ∂ᵢU is ``jax.jacfwd`` of the (TD, TD) matrix.
    """
    import jax.flatten_util

    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def dense_u(x):
        M, K, Sigma = cov_fn(unravel(x))
        return dense_covariance(M.dense() if hasattr(M, "dense") else M, K, Sigma)

    u_inv_du = jnp.einsum("ab,bci->aci", jnp.linalg.inv(dense_u(flat)), jax.jacfwd(dense_u)(flat))
    return 0.5 * jnp.einsum("abi,baj->ij", u_inv_du, u_inv_du)


class Exact(NamedTuple):
    """L and its gradients in arbitrary precision, rounded to float64 at the end."""

    value: float
    y: np.ndarray  # (T, D) ∂L/∂Y = -W
    m: np.ndarray  # (T, T) ∂L/∂M (symmetric)
    k: np.ndarray  # (D, D) ∂L/∂K (symmetric)
    noise: np.ndarray  # (D, D) ∂L/∂Σ, or (D,) ∂L/∂s for log_var
    solve: np.ndarray  # (T, D) W = unvec(U⁻¹ v)


def exact(Y, M, K, Sigma=None, *, log_var=None, mask=None, digits: int = 80, gradients: bool = True) -> Exact:
    """The likelihood and every gradient with ``digits`` significant digits (mpmath), for tiny problems.

    With a (T, D) boolean ``mask`` (True = observed), of log N(y_o; 0, U_oo): U_oo is factorised
    and w, U⁻¹ below are U_oo⁻¹ y_o and U_oo⁻¹ padded with zeros at the missing entries.

    Inputs are converted to float64 and then used exactly (Σ = diag(exp(log_var)) is
    exponentiated in the working precision). U is factorised by an mpmath Cholesky; with
    Γ = wwᵀ - U⁻¹, dL = ½ tr(Γ dU) gives ∂L/∂M_ts = ½ Σ_de Γ_(td)(se) K_de,
    ∂L/∂K_de = ½ Σ_ts Γ_(td)(se) M_ts, ∂L/∂Σ_de = ½ Σ_t Γ_(td)(te), ∂L/∂s = eˢ ⊙ diag(∂L/∂Σ).
    Cost O((TD)³) in Python arithmetic: TD of a few dozen takes seconds.
    """
    import mpmath

    if (Sigma is None) == (log_var is None):
        raise TypeError("exact needs exactly one of Sigma or log_var=")
    with mpmath.workdps(digits):
        mp = mpmath.mpf
        Y, M, K = (np.asarray(a, np.float64) for a in (Y, M, K))
        T, D = Y.shape

        def sym(a):
            return [[(mp(a[i, j]) + mp(a[j, i])) / 2 for j in range(a.shape[0])] for i in range(a.shape[0])]

        m, k = sym(M), sym(K)
        if log_var is None:
            s = sym(np.asarray(Sigma, np.float64))
        else:
            lv = np.asarray(log_var, np.float64)
            s = [[mpmath.exp(mp(lv[i])) if i == j else mp(0) for j in range(D)] for i in range(D)]
        n = T * D
        U = mpmath.matrix(n, n)
        for t in range(T):
            for u in range(T):
                for d in range(D):
                    for e in range(D):
                        U[t * D + d, u * D + e] = m[t][u] * k[d][e] + (s[d][e] if t == u else 0)
        obs = observed(np.ones((T, D), bool) if mask is None else mask)
        no = len(obs)
        U_oo = mpmath.matrix(no, no)
        for i, a in enumerate(obs):
            for j, b in enumerate(obs):
                U_oo[i, j] = U[int(a), int(b)]
        v = mpmath.matrix([mp(float(Y.reshape(-1)[a])) for a in obs])
        L = mpmath.cholesky(U_oo)
        logdet = 2 * mpmath.fsum(mpmath.log(L[i, i]) for i in range(no))
        w_o = mpmath.cholesky_solve(U_oo, v)
        quad = mpmath.fsum(v[i] * w_o[i] for i in range(no))
        value = -(logdet + quad + no * mpmath.log(2 * mpmath.pi)) / 2
        w = [mp(0)] * n
        for i, a in enumerate(obs):
            w[int(a)] = w_o[i]
        W = np.array([[float(w[t * D + d]) for d in range(D)] for t in range(T)])
        if not gradients:
            nan = np.full((1,), np.nan)
            return Exact(float(value), -W, nan, nan, nan, W)
        # U⁻¹ from the Cholesky factor: L⁻¹ by forward substitution, then U⁻¹ = L⁻ᵀ L⁻¹.
        Linv = mpmath.inverse(L)
        Uinv_oo = Linv.T * Linv
        Uinv = [[mp(0)] * n for _ in range(n)]
        for i, a in enumerate(obs):
            for j, b in enumerate(obs):
                Uinv[int(a)][int(b)] = Uinv_oo[i, j]
        gamma = [[w[i] * w[j] - Uinv[i][j] for j in range(n)] for i in range(n)]

        def g(t, d, u, e):
            return gamma[t * D + d][u * D + e]

        gm = [
            [mpmath.fsum(g(t, d, u, e) * k[d][e] for d in range(D) for e in range(D)) / 2 for u in range(T)]
            for t in range(T)
        ]
        gk = [
            [mpmath.fsum(g(t, d, u, e) * m[t][u] for t in range(T) for u in range(T)) / 2 for e in range(D)]
            for d in range(D)
        ]
        gs = [[mpmath.fsum(g(t, d, t, e) for t in range(T)) / 2 for e in range(D)] for d in range(D)]
        if log_var is None:
            noise = np.array([[float(x) for x in row] for row in gs])
        else:
            noise = np.array([float(s[d][d] * gs[d][d]) for d in range(D)])
        return Exact(
            float(value),
            -W if mask is None else np.where(mask, -W, 0.0),
            np.array([[float(x) for x in row] for row in gm]),
            np.array([[float(x) for x in row] for row in gk]),
            noise,
            W,
        )


# ---------------------------------------------------------------------------------------------
# Mixed models (kronlik.mixed): covariates, ML/REML, GLS, information, per-variant association
# ---------------------------------------------------------------------------------------------


def mixed_design(terms) -> Array:
    """X = [F₁ ⊗ A₁, F₂ ⊗ A₂, ...] of vec(Y) = Y.reshape(-1), shape (TD, q)."""
    return jnp.concatenate([jnp.kron(F, A) for F, A in terms], axis=1)


def _mixed_pieces(Y, M, K, Sigma, terms, obs=None):
    U = _dense_covariance(M, K, Sigma)
    X = mixed_design(terms)
    y = Y.reshape(-1)
    if obs is not None:  # the observed cells only: U_oo, X_o, y_o
        U, X, y = U[obs][:, obs], X[obs], y[obs]
    chol = jnp.linalg.cholesky(U)
    ui_x = cho_solve((chol, True), X)
    info = X.T @ ui_x
    b = jnp.linalg.solve(info, ui_x.T @ y)
    r = y - X @ b
    quad = r @ cho_solve((chol, True), r)
    logdet_u = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return U, X, chol, info, b, quad, logdet_u


def _observed_or_none(mask):
    return None if mask is None else jnp.asarray(observed(mask))


def loglik_mixed(Y, M, K, Sigma, terms, method: str = "reml", mask=None) -> Array:
    """The ML / REML (Harville) / REML (LaMotte) value of vec(Y) ~ N(X vec B, U), B profiled out, densely.

    ``terms`` is a sequence of (F, A) pairs (X = [F ⊗ A, ...]); differentiable by ``jax.grad``
    in Y, M, K and Σ (B̂ = (XᵀU⁻¹X)⁻¹XᵀU⁻¹y is differentiated through, no envelope argument).
    A concrete boolean ``mask`` (True = observed) keeps the observed cells: U_oo, X_o, y_o.
    """
    return _loglik_mixed(Y, M, K, Sigma, terms, _observed_or_none(mask), method)


@partial(jax.jit, static_argnames=("method",))
def _loglik_mixed(Y, M, K, Sigma, terms, obs, method: str) -> Array:
    U, X, chol, info, b, quad, logdet_u = _mixed_pieces(Y, M, K, Sigma, terms, obs)
    n, q = X.shape
    if method == "ml":
        return -0.5 * (n * math.log(2 * math.pi) + logdet_u + quad)
    value = -0.5 * ((n - q) * math.log(2 * math.pi) + logdet_u + jnp.linalg.slogdet(info)[1] + quad)
    if method == "reml-lamotte":
        value = value + 0.5 * jnp.linalg.slogdet(X.T @ X)[1]
    return value


def gls(Y, M, K, Sigma, terms, mask=None) -> tuple[Array, Array]:
    """(B̂ stacked as in X's columns (q,), (XᵀU⁻¹X)⁻¹ (q, q)), densely (observed cells of ``mask``)."""
    return _gls(Y, M, K, Sigma, terms, _observed_or_none(mask))


@jax.jit
def _gls(Y, M, K, Sigma, terms, obs):
    _, _, _, info, b, _, _ = _mixed_pieces(Y, M, K, Sigma, terms, obs)
    return b, jnp.linalg.inv(info)


def information_mixed(M, K, Sigma, terms, method: str = "reml", mask=None) -> Array:
    """½ tr(P ∂ᵢU P ∂ⱼU) over θ = (vech K, vech Σ) (P = U⁻¹ for ML, U⁻¹ - U⁻¹X(XᵀU⁻¹X)⁻¹XᵀU⁻¹ for
    REML), densely; with a ``mask``, U_oo and X_o of the observed cells."""
    return _information_mixed(M, K, Sigma, terms, _observed_or_none(mask), method)


@partial(jax.jit, static_argnames=("method",))
def _information_mixed(M, K, Sigma, terms, obs, method: str) -> Array:
    T, D = M.shape[0], K.shape[0]
    U = _dense_covariance(M, K, Sigma)
    X = mixed_design(terms)
    if obs is not None:
        U, X = U[obs][:, obs], X[obs]
    ui = jnp.linalg.inv(U)
    P = ui
    if method != "ml":
        P = ui - ui @ X @ jnp.linalg.solve(X.T @ ui @ X, X.T @ ui)
    rows, cols = np.tril_indices(D)
    dirs = []
    for part in (0, 1):
        for a, b in zip(rows, cols):
            E = np.zeros((D, D))
            E[a, b] = E[b, a] = 1.0
            E = jnp.asarray(E, M.dtype)
            d = jnp.kron(M, E) if part == 0 else jnp.kron(jnp.eye(T, dtype=M.dtype), E)
            dirs.append(d if obs is None else d[obs][:, obs])
    pd = [P @ d for d in dirs]
    return 0.5 * jnp.array([[jnp.sum(a * b.T) for b in pd] for a in pd])


def scan_mixed(Y, M, K, Sigma, terms, G, design, mask=None) -> tuple[Array, Array, Array]:
    """Per variant g (column of G): the GLS effect of g ⊗ ``design`` beside ``terms`` with U fixed,
    its covariance, and the Wald χ² β̂ᵀ Cov⁻¹ β̂; returns (chi2 (m,), effects (m, a), se (m, a)).
    With a ``mask``, on the observed cells (U_oo, X_o)."""
    chi2, eff, se = [], [], []
    a = design.shape[1]
    for g in np.asarray(G).T:
        b, cov = gls(Y, M, K, Sigma, (*terms, (jnp.asarray(g)[:, None], design)), mask=mask)
        bg, cg = b[-a:], cov[-a:, -a:]
        chi2.append(bg @ jnp.linalg.solve(cg, bg))
        eff.append(bg)
        se.append(jnp.sqrt(jnp.diagonal(cg)))
    return jnp.stack(chi2), jnp.stack(eff), jnp.stack(se)
