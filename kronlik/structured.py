r"""The structured log-likelihood of ``vec(Y) ~ N(0, M ⊗ K + I_T ⊗ Σ)`` and its gradients.

Conventions: ``Y`` is (T, D), ``v = Y.reshape(-1)`` (row t of Y is block t of v), so
``(A ⊗ B) v = vec(A Y Bᵀ)``, and ``U = M ⊗ K + I_T ⊗ Σ`` is (TD, TD) but never formed.

The derivation (checked against :mod:`kronlik.reference` in the tests):

* Whiten the noise. With Σ = C Cᵀ (Cholesky, or C = diag(σ) in the diagonal case) put
  K̃ = C⁻¹ K C⁻ᵀ = Q_K diag(μ) Q_Kᵀ and M = Q_M diag(λ) Q_Mᵀ, and P = C⁻ᵀ Q_K. Then
  Pᵀ Σ P = I and Pᵀ K P = diag(μ), so (Q_M ⊗ P)ᵀ U (Q_M ⊗ P) = E with
  E[t, j] = 1 + λ_t μ_j, and U⁻¹ = (Q_M ⊗ P) diag(1/E) (Q_M ⊗ P)ᵀ.
* Value: Z = Q_Mᵀ Y P, A = Z / E,
  log det U = T log det Σ + Σ log E,  vᵀU⁻¹v = Σ Z ⊙ A.
* Solve: W = unvec(U⁻¹ v) = Q_M A Pᵀ, so ∂L/∂Y = -W.
* With dL = -½ tr(U⁻¹ dU) + ½ wᵀ dU w and U⁻¹ = Σ_tj (q_t ⊗ p_j)(q_t ⊗ p_j)ᵀ / E_tj:

  - ∂L/∂M = ½ (W K Wᵀ - Q_M diag(Σ_j μ_j / E_tj) Q_Mᵀ),   W K Wᵀ = R diag(μ) Rᵀ, R = Q_M A;
  - ∂L/∂K = ½ (Wᵀ M W - P diag(Σ_t λ_t / E_tj) Pᵀ),       Wᵀ M W = S diag(λ) Sᵀ, S = P Aᵀ;
  - ∂L/∂Σ = ½ (C - B),  C = Wᵀ W = S Sᵀ,  B = Σ_k bldiag(U⁻¹, k) = P diag(Σ_t 1 / E_tj) Pᵀ;
  - Σ = diag(eˢ): ∂L/∂s = eˢ ⊙ ½ (colsum(W ⊙ W) - (P ⊙ P) Σ_t 1 / E_t·)
    = ½ (colsum(W̃ ⊙ W̃) - (Q_K ⊙ Q_K) Σ_t 1 / E_t·), W̃ = Q_M A Q_Kᵀ (eˢ cancels).

No eigenvalue gap appears in any denominator (only E ≥ 1), so the backward pass is
exact for repeated eigenvalues, unlike jax.grad through ``eigh``. Cost: two symmetric
eigendecompositions plus O(TD(T + D)) matrix products, one O(T³) product for ∂L/∂M.

Validity: M and K must be PSD and Σ positive definite. Negative eigenvalues of M or K̃
that are round-off (no larger than :func:`kronlik._checks.psd_rtol` times the largest
eigenvalue magnitude) are clipped to zero; anything worse, a Σ whose Cholesky fails, or
a non-finite input makes the value and every gradient NaN. That is the only way to
signal failure under ``jax.jit``; :func:`kronlik.validate` raises eagerly instead.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from ._checks import EighFactor, LowRank, as_float_arrays, check_shapes, prepare, psd_rtol

Array = jax.Array

__all__ = [
    "EighFactor",
    "LowRank",
    "factorize",
    "loglik",
    "loglik_diag",
    "loglik_diag_rotated",
    "grad_sigma",
    "grad_log_var",
    "solve",
    "predict",
]


def _sym(a: Array) -> Array:
    return 0.5 * (a + a.T)


class _Factors(NamedTuple):
    """The whitened eigendecomposition of U (see the module docstring)."""

    q_m: Array  # (T, T) eigenvectors of M
    lam: Array  # (T,)  eigenvalues of M, clipped at 0
    q_k: Array  # (D, D) eigenvectors of K̃ = C⁻¹ K C⁻ᵀ
    p: Array  # (D, D) C⁻ᵀ Q_K: Pᵀ Σ P = I, Pᵀ K P = diag(μ)
    mu: Array  # (D,)  eigenvalues of K̃ = C⁻¹ K C⁻ᵀ, clipped at 0
    logdet_sigma: Array  # ()
    ok: Array  # () bool: finite inputs, M and K PSD to round-off, Σ positive definite


def _clip_psd(w: Array) -> tuple[Array, Array]:
    """Eigenvalues with round-off negatives clipped to 0, and 'is PSD to round-off'."""
    tol = psd_rtol(w.shape[0], w.dtype) * jnp.max(jnp.abs(w))
    ok = jnp.all(w >= -tol)  # False for NaN eigenvalues too
    return jnp.maximum(w, 0.0), ok


def _eigh_psd(a: Array) -> tuple[Array, Array, Array]:
    """Eigenvalues (round-off negatives clipped to 0), eigenvectors, and 'is PSD'."""
    w, q = jnp.linalg.eigh(a)
    w, ok = _clip_psd(w)
    return w, q, ok


def _eig_m(M: Array | EighFactor) -> tuple[Array, Array, Array]:
    if isinstance(M, EighFactor):
        lam, ok = _clip_psd(M.values)
        return lam, M.vectors, ok
    return _eigh_psd(M)


def factorize(M: Array) -> EighFactor:
    """Eigendecompose a fixed (T, T) PSD M once, for reuse by every kronlik function.

    Every function that takes M accepts the returned :class:`EighFactor` instead and
    then skips the O(T³) ``eigh``; its values are NaN when M is not PSD to round-off, so
    the likelihood is NaN as it would be for M itself.

    >>> import jax.numpy as jnp, kronlik
    >>> Y, M, K, s = jnp.ones((4, 2)), 2.0 * jnp.eye(4), jnp.eye(2), jnp.zeros(2)
    >>> fm = kronlik.factorize(M)
    >>> bool(jnp.isclose(kronlik.loglik_diag(Y, fm, K, s), kronlik.loglik_diag(Y, M, K, s)))
    True
    """
    (M,) = as_float_arrays(("M",), (M,))
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square 2-D array; got shape {M.shape}")
    lam, q, ok = _eigh_psd(M)
    return EighFactor(q, jnp.where(ok, lam, jnp.nan))


class _Whitened(NamedTuple):
    """The noise-whitened K: K̃ = C⁻¹ K C⁻ᵀ = Q_K diag(μ) Q_Kᵀ, P = C⁻ᵀ Q_K, Σ = C Cᵀ."""

    q_k: Array
    p: Array
    mu: Array
    logdet_sigma: Array
    ok: Array  # K PSD to round-off, Σ positive definite and finite


def _whiten(K: Array, Sigma: Array) -> _Whitened:
    chol = jnp.linalg.cholesky(Sigma)  # symmetrises Sigma; NaN if not positive definite
    half = solve_triangular(chol, _sym(K), lower=True)  # C⁻¹ K
    k_white = solve_triangular(chol, half.T, lower=True)  # C⁻¹ K C⁻ᵀ
    mu, q_k, ok_k = _eigh_psd(k_white)
    p = solve_triangular(chol, q_k, lower=True, trans="T")
    logdet_sigma = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return _Whitened(q_k, p, mu, logdet_sigma, ok_k & jnp.isfinite(logdet_sigma))


def _whiten_diag(K: Array, log_var: Array) -> _Whitened:
    # Σ = diag(σ²): whitening is a rescaling, no Cholesky needed.
    inv_sd = jnp.exp(-0.5 * log_var)
    k_white = _sym(K) * inv_sd[:, None] * inv_sd[None, :]
    mu, q_k, ok_k = _eigh_psd(k_white)
    ok = ok_k & jnp.all(jnp.isfinite(log_var))
    return _Whitened(q_k, q_k * inv_sd[:, None], mu, jnp.sum(log_var), ok)


def _combine(lam: Array, q_m: Array, ok_m: Array, n: _Whitened) -> _Factors:
    return _Factors(q_m, lam, n.q_k, n.p, n.mu, n.logdet_sigma, ok_m & n.ok)


def _factor(M: Array | EighFactor, K: Array, Sigma: Array) -> _Factors:
    return _combine(*_eig_m(M), _whiten(K, Sigma))


def _factor_diag(M: Array | EighFactor, K: Array, log_var: Array) -> _Factors:
    return _combine(*_eig_m(M), _whiten_diag(K, log_var))


class _Solved(NamedTuple):
    value: Array  # () the log-likelihood, NaN if not ok
    a: Array  # (T, D) A = Z / E, the solve in the rotated basis
    inv_e: Array  # (T, D) 1 / E
    ok: Array  # () bool


def _forward(Y: Array, f: _Factors) -> _Solved:
    return _forward_rotated(f.q_m.T @ Y, f, jnp.all(jnp.isfinite(Y)))


def _forward_rotated(y_rot: Array, f: _Factors, y_ok: Array) -> _Solved:
    """The value from Q_Mᵀ Y: O(TD²) once Y is rotated (a fitting loop rotates it once)."""
    T, D = y_rot.shape
    z = y_rot @ f.p
    lam_mu = f.lam[:, None] * f.mu[None, :]
    inv_e = 1.0 / (1.0 + lam_mu)
    a = z * inv_e
    logdet_u = T * f.logdet_sigma + jnp.sum(jnp.log1p(lam_mu))
    value = -0.5 * (logdet_u + jnp.sum(z * a) + T * D * math.log(2.0 * math.pi))
    ok = f.ok & y_ok
    return _Solved(jnp.where(ok, value, jnp.nan), a, inv_e, ok)


def _scale(s: _Solved, g: Array) -> Array:
    # NaN cotangents whenever the value is NaN: never a finite gradient of a NaN.
    return jnp.where(s.ok, g, jnp.nan)


def _grad_k_twice(p: Array, a: Array, lam: Array, inv_e: Array) -> tuple[Array, Array]:
    """2·∂L/∂K = S diag(λ) Sᵀ - P diag(Σ_t λ_t / E_tj) Pᵀ with S = P Aᵀ; returns it and S."""
    sm = p @ a.T  # (D, rows of A)
    return _sym((sm * lam[None, :]) @ sm.T - (p * (lam @ inv_e)[None, :]) @ p.T), sm


def _cotangents_y_m_k(
    f: _Factors, s: _Solved, g: Array, r: Array, w: Array, m_is_factor: bool
) -> tuple[Array, Array | EighFactor, Array, Array]:
    """g·∂L/∂Y, g·∂L/∂M, g·∂L/∂K given R = Q_M A and W = R Pᵀ; also S = P Aᵀ for ∂L/∂Σ.

    For M given as an EighFactor (V, λ) with M = V diag(λ) Vᵀ and G = ∂L/∂M symmetric:
    ∂L/∂λ = diag(Vᵀ G V) and ∂L/∂V = 2 G V diag(λ), where Vᵀ G V = ½ (A diag(μ) Aᵀ - diag(a)).
    """
    g = _scale(s, g)
    grad_k, sm = _grad_k_twice(f.p, s.a, f.lam, s.inv_e)
    if m_is_factor:
        rotated = _sym((s.a * f.mu[None, :]) @ s.a.T) - jnp.diag(s.inv_e @ f.mu)  # 2 Vᵀ G V
        g_m = EighFactor((g * f.q_m) @ (rotated * f.lam[None, :]), (0.5 * g) * jnp.diagonal(rotated))
    else:
        grad_m = (r * f.mu[None, :]) @ r.T - (f.q_m * (s.inv_e @ f.mu)[None, :]) @ f.q_m.T
        g_m = (0.5 * g) * _sym(grad_m)
    return -g * w, g_m, (0.5 * g) * grad_k, sm


def _grad_sigma_full(f: _Factors, s: _Solved, sm: Array) -> Array:
    """∂L/∂Σ = ½ (C - B) with C = S Sᵀ and B = P diag(Σ_t 1/E_tj) Pᵀ."""
    c_minus_b = sm @ sm.T - (f.p * jnp.sum(s.inv_e, axis=0)[None, :]) @ f.p.T
    return 0.5 * _sym(c_minus_b)


def _grad_log_var(f: _Factors, s: _Solved, w_white: Array) -> Array:
    """∂L/∂s = eˢ ⊙ diag(∂L/∂Σ) = eˢ ⊙ ½ (colsum(W ⊙ W) - diag(B)) for Σ = diag(eˢ).

    Both terms carry the factor eˢ into the whitened quantities, where it cancels
    exactly: eˢ ⊙ colsum(W ⊙ W) = colsum(W̃ ⊙ W̃) with W̃ = W diag(e^{s/2}) = Q_M A Q_Kᵀ,
    and eˢ ⊙ diag(B) = (Q_K ⊙ Q_K) Σ_t 1/E_t·. So no exp(s) is formed and the gradient
    stays finite for any finite s (e^800 overflows; the -T/2 it tends to does not).
    """
    return 0.5 * (jnp.sum(w_white * w_white, axis=0) - (f.q_k * f.q_k) @ jnp.sum(s.inv_e, axis=0))


# --- dense Σ -------------------------------------------------------------------------


# m_is_factor is a static Python bool (M an array or an EighFactor), never an array.
@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loglik(Y: Array, M, K: Array, Sigma: Array, m_is_factor: bool) -> Array:
    return _forward(Y, _factor(M, K, Sigma)).value


def _loglik_fwd(Y, M, K, Sigma, m_is_factor):
    f = _factor(M, K, Sigma)
    s = _forward(Y, f)
    return s.value, (f, s)


def _loglik_bwd(m_is_factor, res, g):
    f, s = res
    r = f.q_m @ s.a
    g_y, g_m, g_k, sm = _cotangents_y_m_k(f, s, g, r, r @ f.p.T, m_is_factor)
    g_sigma = _scale(s, g) * _grad_sigma_full(f, s, sm)
    return g_y, g_m, g_k, g_sigma


_loglik.defvjp(_loglik_fwd, _loglik_bwd)


def loglik(Y: Array, M: Array | EighFactor, K: Array, Sigma: Array) -> Array:
    r"""Log-density of ``vec(Y) ~ N(0, M ⊗ K + I_T ⊗ Σ)``, constant included.

    L = -½ log det U - ½ vᵀ U⁻¹ v - (TD/2) log 2π with v = ``Y.reshape(-1)``, in
    O(T³ + D³ + TD(T + D)) time and O(T² + D² + TD) memory.

    Differentiable in all four arguments by reverse mode (``jax.grad``,
    ``jax.value_and_grad``, ``jax.vjp``) through a hand-derived backward pass that
    reuses the forward eigendecompositions; forward mode (``jax.jvp``) is not defined.
    M, K and Σ are symmetrised, as ``jnp.linalg.cholesky`` does, so their gradients are
    symmetric.

    Args:
      Y: (T, D) observations.
      M: (T, T) PSD covariance across rows (samples, time points), or its
        :func:`factorize` (then no eigendecomposition of M is done, and the gradient
        is an :class:`EighFactor` of cotangents for its vectors and values).
      K: (D, D) PSD covariance across outputs.
      Sigma: (D, D) positive-definite noise covariance.

    Returns:
      A scalar of the inputs' dtype; NaN if an input is not finite, Σ is not positive
      definite, or M or K has a negative eigenvalue beyond round-off.

    Raises:
      ValueError: at trace time, for shapes that do not fit together.
      TypeError: for non-floating inputs or mixed float dtypes.

    >>> import jax.numpy as jnp, kronlik
    >>> T, D = 3, 2
    >>> L = kronlik.loglik(jnp.ones((T, D)), jnp.eye(T), jnp.eye(D), jnp.eye(D))
    >>> bool(jnp.isclose(L, -0.5 * (T * D * jnp.log(2.0) + T * D / 2 + T * D * jnp.log(2 * jnp.pi))))
    True
    """
    Y, M, K, Sigma = prepare(Y, M, K, Sigma, "Sigma")
    if isinstance(M, LowRank):
        return _loglik_lowrank(Y, M.factor, K, Sigma, False)
    return _loglik(Y, M, K, Sigma, isinstance(M, EighFactor))


# --- diagonal Σ = diag(exp(log_var)) ------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loglik_diag(Y: Array, M, K: Array, log_var: Array, m_is_factor: bool) -> Array:
    return _forward(Y, _factor_diag(M, K, log_var)).value


def _loglik_diag_fwd(Y, M, K, log_var, m_is_factor):
    f = _factor_diag(M, K, log_var)
    s = _forward(Y, f)
    return s.value, (f, s, log_var)


def _loglik_diag_bwd(m_is_factor, res, g):
    f, s, log_var = res
    r = f.q_m @ s.a
    w_white = r @ f.q_k.T  # W diag(e^{s/2}); W = unvec(U⁻¹v) is a column scaling away
    w = w_white * jnp.exp(-0.5 * log_var)[None, :]
    g_y, g_m, g_k, _ = _cotangents_y_m_k(f, s, g, r, w, m_is_factor)
    return g_y, g_m, g_k, _scale(s, g) * _grad_log_var(f, s, w_white)


_loglik_diag.defvjp(_loglik_diag_fwd, _loglik_diag_bwd)


def loglik_diag(Y: Array, M: Array | EighFactor, K: Array, log_var: Array) -> Array:
    """:func:`loglik` with Σ = diag(exp(log_var)), whitened by rescaling (no Cholesky).

    Args:
      Y: (T, D) observations.
      M: (T, T) PSD covariance across rows, or its :func:`factorize`.
      K: (D, D) PSD covariance across outputs.
      log_var: (D,) log noise variances s, Σ = diag(eˢ).

    Returns:
      The scalar log-density; its gradient in ``log_var`` is :func:`grad_log_var`.
    """
    Y, M, K, log_var = prepare(Y, M, K, log_var, "log_var")
    if isinstance(M, LowRank):
        return _loglik_lowrank(Y, M.factor, K, log_var, True)
    return _loglik_diag(Y, M, K, log_var, isinstance(M, EighFactor))


# --- gradients and solves as plain functions -------------------------------------


def grad_sigma(Y: Array, M: Array | EighFactor, K: Array, Sigma: Array) -> Array:
    """∂L/∂Σ = ½ (C - B), the (D, D) gradient of :func:`loglik` in Σ.

    B = Σ_k bldiag(U⁻¹, k) is the sum of the T diagonal D×D blocks of U⁻¹ and
    C = Wᵀ W with W = unvec(U⁻¹ v) of shape (T, D); both come from the structured
    factorisation, never from U⁻¹. Equal to ``jax.grad(loglik, argnums=3)``.
    """
    Y, M, K, Sigma = prepare(Y, M, K, Sigma, "Sigma")
    if isinstance(M, LowRank):  # the same formula, in the low-rank backward pass
        return jax.grad(loglik, argnums=3)(Y, M, K, Sigma)
    f = _factor(M, K, Sigma)
    s = _forward(Y, f)
    sm = f.p @ s.a.T
    return _scale(s, jnp.ones((), Y.dtype)) * _grad_sigma_full(f, s, sm)


def grad_log_var(Y: Array, M: Array | EighFactor, K: Array, log_var: Array) -> Array:
    """∂L/∂s = eˢ ⊙ diag(∂L/∂Σ) for Σ = diag(eˢ), shape (D,).

    diag(∂L/∂Σ) = ½ (colsum(W ⊙ W) - diag(B)) with W = unvec(U⁻¹v) and
    diag(B) = (P ⊙ P) Σ_t 1/E_t·: Hadamard products, the D×D gradient is never built.
    The factor eˢ is folded into the whitened eigenvectors, where it cancels, so the
    result is finite for every finite ``log_var``. Equal to
    ``jax.grad(loglik_diag, argnums=3)``.
    """
    Y, M, K, log_var = prepare(Y, M, K, log_var, "log_var")
    if isinstance(M, LowRank):  # the same Hadamard formula, in the low-rank backward pass
        return jax.grad(loglik_diag, argnums=3)(Y, M, K, log_var)
    f = _factor_diag(M, K, log_var)
    s = _forward(Y, f)
    # colsum(W̃ ⊙ W̃) with W̃ = Q_M A Q_Kᵀ: Q_M is orthogonal and preserves column norms.
    w_white = s.a @ f.q_k.T
    return _scale(s, jnp.ones((), Y.dtype)) * _grad_log_var(f, s, w_white)


def solve(Y: Array, M: Array | EighFactor, K: Array, Sigma: Array) -> Array:
    """W = unvec(U⁻¹ vec(Y)), shape (T, D): the solve behind every gradient (∂L/∂Y = -W)."""
    Y, M, K, Sigma = prepare(Y, M, K, Sigma, "Sigma")
    if isinstance(M, LowRank):  # ∂L/∂Y = -W
        return -jax.grad(loglik)(Y, M, K, Sigma)
    f = _factor(M, K, Sigma)
    s = _forward(Y, f)
    return _scale(s, jnp.ones((), Y.dtype)) * (f.q_m @ s.a @ f.p.T)


# --- M already diagonalised: the per-step cost of a loop over Σ (and K) -------------


def _rotated_parts(y_rot: Array, lam: Array, K: Array, log_var: Array) -> tuple[_Factors, _Solved]:
    lam, ok_m = _clip_psd(lam)
    f = _combine(lam, None, ok_m, _whiten_diag(K, log_var))
    return f, _forward_rotated(y_rot, f, jnp.all(jnp.isfinite(y_rot)))


def _rotated_value_and_grad_log_var(y_rot: Array, lam: Array, K: Array, log_var: Array):
    """L and the hand-derived ∂L/∂s (eˢ ⊙ diag(∂L/∂Σ)) in O(TD² + D³), no autodiff."""
    f, s = _rotated_parts(y_rot, lam, K, log_var)
    return s.value, _scale(s, jnp.ones((), y_rot.dtype)) * _grad_log_var(f, s, s.a @ f.q_k.T)


@jax.custom_vjp
def _loglik_rotated(y_rot: Array, lam: Array, K: Array, log_var: Array) -> Array:
    return _rotated_parts(y_rot, lam, K, log_var)[1].value


def _loglik_rotated_fwd(y_rot, lam, K, log_var):
    f, s = _rotated_parts(y_rot, lam, K, log_var)
    return s.value, (f, s, log_var)


def _loglik_rotated_bwd(res, g):
    # The same formulas as _cotangents_y_m_k with Q_M = I: M = diag(λ), so ∂L/∂λ is the
    # diagonal of ½ (A diag(μ) Aᵀ - diag(Σ_j μ_j / E_tj)).
    f, s, log_var = res
    g = _scale(s, g)
    grad_k, _ = _grad_k_twice(f.p, s.a, f.lam, s.inv_e)
    grad_lam = (s.a * s.a) @ f.mu - s.inv_e @ f.mu
    w_white = s.a @ f.q_k.T  # W diag(e^{s/2}); W itself is a column scaling away, as in _loglik_diag_bwd
    return (
        -g * (w_white * jnp.exp(-0.5 * log_var)[None, :]),
        (0.5 * g) * grad_lam,
        (0.5 * g) * grad_k,
        g * _grad_log_var(f, s, w_white),
    )


_loglik_rotated.defvjp(_loglik_rotated_fwd, _loglik_rotated_bwd)


def loglik_diag_rotated(Y_rot: Array, lam: Array, K: Array, log_var: Array) -> Array:
    """:func:`loglik_diag` for data already rotated by a fixed M's eigenvectors.

    With ``fm = factorize(M)`` and ``Y_rot = fm.vectors.T @ Y`` (done once, O(T²D)),
    ``loglik_diag_rotated(Y_rot, fm.values, K, log_var) == loglik_diag(Y, M, K, log_var)``
    because L is invariant under the orthogonal change of rows Y → QᵀY, M → QᵀMQ = diag(λ).
    Each call then costs O(TD² + D³) instead of O(T³): the idiom for a loop over the
    noise (and K) with M fixed, as in :func:`kronlik.fit_log_var`. Differentiable in all
    four arguments by the same hand-derived backward pass.

    Args:
      Y_rot: (T, D) rotated observations Q_Mᵀ Y.
      lam: (T,) eigenvalues of M (non-negative; round-off negatives are clipped).
      K: (D, D) PSD covariance across outputs.
      log_var: (D,) log noise variances.
    """
    Y_rot, lam, K, log_var = as_float_arrays(("Y_rot", "lam", "K", "log_var"), (Y_rot, lam, K, log_var))
    if Y_rot.ndim != 2 or lam.shape != Y_rot.shape[:1]:
        raise ValueError(f"need Y_rot of shape (T, D) and lam of shape (T,); got {Y_rot.shape} and {lam.shape}")
    check_shapes(Y_rot, jax.ShapeDtypeStruct((lam.shape[0],) * 2, lam.dtype), K, log_var, "log_var")
    return _loglik_rotated(Y_rot, lam, K, log_var)


# --- prediction ------------------------------------------------------------------------


def predict(
    Y: Array,
    M: Array | EighFactor,
    K: Array,
    Sigma: Array,
    M_cross: Array,
    m_new_diag: Array,
    *,
    include_noise: bool = False,
) -> tuple[Array, Array]:
    r"""Posterior predictive of the multi-output GP at N new rows: mean and marginal variances.

    The latent F (T, D) has vec(F) ~ N(0, M ⊗ K) and Y = F + noise with rows ~ N(0, Σ).
    For new rows with cross-covariance ``M_cross`` (N, T) to the training rows and prior
    variances ``m_new_diag`` (N,) = diag(M_new):

    * mean = M_cross W K, with W = unvec(U⁻¹ vec(Y));
    * var[n, d] = m_new[n] K_dd - Σ_tj ((M_cross Q_M)[n, t] (K P)[d, j])² / E_tj, plus Σ_dd if
      ``include_noise`` (the predictive of a new observation rather than of F).

    Cost O(N T² + N T D + N D² + T D (T + D)) after the factorisation; no TD×TD matrix.

    Returns:
      (mean, var), both (N, D).
    """
    Y, M, K, Sigma = prepare(Y, M, K, Sigma, "Sigma")
    if isinstance(M, LowRank):
        raise TypeError("predict takes M as an array or an EighFactor, not a LowRank")
    (M_cross, m_new_diag) = as_float_arrays(("M_cross", "m_new_diag"), (M_cross, m_new_diag))
    if M_cross.ndim != 2 or M_cross.shape[1] != Y.shape[0] or m_new_diag.shape != M_cross.shape[:1]:
        raise ValueError(
            f"M_cross must be (N, T) with T = {Y.shape[0]} and m_new_diag (N,); "
            f"got {M_cross.shape} and {m_new_diag.shape}"
        )
    if M_cross.dtype != Y.dtype or m_new_diag.dtype != Y.dtype:
        raise TypeError(f"M_cross and m_new_diag must be {Y.dtype}; got {M_cross.dtype}, {m_new_diag.dtype}")
    f = _factor(M, K, Sigma)
    s = _forward(Y, f)
    k_sym = _sym(K)
    w = f.q_m @ s.a @ f.p.T
    mean = M_cross @ w @ k_sym
    cross = M_cross @ f.q_m  # (N, T)
    kp = k_sym @ f.p  # (D, D)
    var = m_new_diag[:, None] * jnp.diagonal(k_sym)[None, :] - (cross * cross) @ s.inv_e @ (kp * kp).T
    if include_noise:
        var = var + jnp.diagonal(Sigma)[None, :]
    nan = _scale(s, jnp.ones((), Y.dtype))
    return nan * mean, nan * var


# --- low-rank M = G Gᵀ ------------------------------------------------------------------
#
# With the thin SVD G = U_g S V_gᵀ (U_g of shape (T, r)), M = U_g diag(λ) U_gᵀ with λ = S², and
# M is zero on the complement of span(U_g): there E = 1. Writing Q_M = [U_g, U_⊥] and never
# forming U_⊥, with Z₁ = U_gᵀ Y P and the residual R = Y P - U_g Z₁ = U_⊥ U_⊥ᵀ Y P:
#   vᵀU⁻¹v = Σ Z₁ ⊙ A₁ + ‖R‖²  (A₁ = Z₁ / E₁),   log det U = T log det Σ + Σ log E₁,
#   W = (R + U_g A₁) Pᵀ,   Aᵀ A (all T rows) = A₁ᵀ A₁ + Rᵀ R,   Σ_t 1/E_tj = Σ_{t≤r} 1/E_tj + (T - r).
# ∂L/∂K keeps only the r rows with λ > 0. For G: dM = dG Gᵀ + G dGᵀ, so
#   ∂L/∂G = 2 (∂L/∂M) G = W K (Wᵀ G) - c₀ G - U_g diag(a - c₀) (U_gᵀ G),
# with a_t = Σ_j μ_j / E_tj and c₀ = Σ_j μ_j (the value of a on the complement): no T×T
# matrix and no derivative of the SVD. R is formed explicitly rather than as ‖YP‖² - ‖Z₁‖²
# to avoid cancellation when Y lies mostly in span(G).


class _LowRankSolved(NamedTuple):
    value: Array
    u: Array  # (T, r) left singular vectors of G
    lam: Array  # (r,) squared singular values
    a1: Array  # (r, D)
    inv_e: Array  # (r, D)
    resid: Array  # (T, D)
    ok: Array


def _lowrank_forward(Y: Array, G: Array, n: _Whitened) -> _LowRankSolved:
    T, D = Y.shape
    u, sv, _ = jnp.linalg.svd(G, full_matrices=False)
    lam = sv * sv
    yp = Y @ n.p
    z1 = u.T @ yp
    resid = yp - u @ z1
    lam_mu = lam[:, None] * n.mu[None, :]
    inv_e = 1.0 / (1.0 + lam_mu)
    a1 = z1 * inv_e
    logdet_u = T * n.logdet_sigma + jnp.sum(jnp.log1p(lam_mu))
    quad = jnp.sum(z1 * a1) + jnp.sum(resid * resid)
    value = -0.5 * (logdet_u + quad + T * D * math.log(2.0 * math.pi))
    ok = n.ok & jnp.all(jnp.isfinite(Y)) & jnp.all(jnp.isfinite(G))
    return _LowRankSolved(jnp.where(ok, value, jnp.nan), u, lam, a1, inv_e, resid, ok)


def _lowrank_whiten(K: Array, noise: Array, diag: bool) -> _Whitened:
    return _whiten_diag(K, noise) if diag else _whiten(K, noise)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loglik_lowrank(Y: Array, G: Array, K: Array, noise: Array, diag: bool) -> Array:
    return _lowrank_forward(Y, G, _lowrank_whiten(K, noise, diag)).value


def _loglik_lowrank_fwd(Y, G, K, noise, diag):
    n = _lowrank_whiten(K, noise, diag)
    s = _lowrank_forward(Y, G, n)
    return s.value, (G, K, n, s)


def _loglik_lowrank_bwd(diag, res, g):
    G, K, n, s = res
    g = jnp.where(s.ok, g, jnp.nan)
    T = G.shape[0]
    w = (s.resid + s.u @ s.a1) @ n.p.T
    ata = s.a1.T @ s.a1 + s.resid.T @ s.resid
    c = jnp.sum(s.inv_e, axis=0) + (T - s.lam.shape[0])
    grad_k, _ = _grad_k_twice(n.p, s.a1, s.lam, s.inv_e)  # only the r rows with λ > 0 contribute
    a = s.inv_e @ n.mu
    c0 = jnp.sum(n.mu)
    grad_g = w @ (_sym(K) @ (w.T @ G)) - c0 * G - s.u @ ((a - c0)[:, None] * (s.u.T @ G))
    if diag:  # eˢ ⊙ diag(∂L/∂Σ) in the whitened basis, as in _grad_log_var
        grad_noise = 0.5 * (jnp.sum((n.q_k @ ata) * n.q_k, axis=1) - (n.q_k * n.q_k) @ c)
    else:
        grad_noise = 0.5 * _sym(n.p @ ata @ n.p.T - (n.p * c[None, :]) @ n.p.T)
    return -g * w, g * grad_g, (0.5 * g) * grad_k, g * grad_noise


_loglik_lowrank.defvjp(_loglik_lowrank_fwd, _loglik_lowrank_bwd)
