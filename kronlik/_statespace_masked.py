r"""Missing cells with a state-space M: value, gradients, solve and predictions of log N(y_o; 0, U_oo).

The joint-state Kalman filter of :mod:`kronlik._kalman_joint` gives L = log N(y_o; 0, U_oo) in
O(T (J D)² (J + D)) whatever the fraction missing, and its hand-derived reverse pass the
gradients in Y (0 on missing cells), K, Σ (full or log-variances) and, through the generators'
VJP, the times and every kernel parameter. K and Σ enter as they are (no pencil, no whitening):
a singular Σ is fine wherever U_oo is positive definite, e.g. a noise-free output that M ⊗ K
covers. Where all cells are observed the complete-data pencil path (:mod:`kronlik._statespace_core`,
D scalar filters, J² D per step) is cheaper; the public functions take it for a concrete mask
that is all True.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._core import nan_unless
from ._kalman_joint import JointFiltered, joint_filter, joint_reverse, joint_solve
from ._noise import LogVarNoise
from ._statespace_core import generators_and_pull
from .forms import resolution
from .statespace import Generators, StateSpace

Array = jax.Array


def noise_matrix(noise) -> Array:
    """Σ (D, D) from the noise model: diag(eˢ) for log-variances, the symmetrised array otherwise."""
    if isinstance(noise, LogVarNoise):
        return jnp.diag(jnp.exp(noise.log_var))
    return 0.5 * (noise.sigma + noise.sigma.T)


def _psd(a: Array) -> Array:
    """Whether a symmetric matrix is finite and PSD to round-off (the eigenbasis core's tolerance)."""
    from .forms import psd_tolerance

    lam = jnp.linalg.eigvalsh(a)
    scale = jnp.max(jnp.abs(lam))
    return jnp.all(jnp.isfinite(a)) & (jnp.min(lam) >= -psd_tolerance(a.shape[0], a.dtype) * scale)


class JointProblem(NamedTuple):
    g: Generators
    y: Array  # (T, D) sorted rows, 0 on missing cells
    obs: Array  # (T, D) bool, sorted rows
    k: Array  # (D, D) symmetrised K
    sigma: Array  # (D, D) Σ
    variance: Array  # () k(0)
    ok: Array  # () inputs valid: K, Σ PSD, kernel valid, everything observed finite
    pull: object = None  # (Ā, Q̄) ↦ (∂/∂times, ∂/∂kernel), if asked for


def joint_problem(Y, form: StateSpace, K, noise, mask, with_pull: bool = False) -> JointProblem:
    g, pull = generators_and_pull(form, with_pull)
    obs = mask[g.order]
    ys = Y[g.order]
    y = jnp.where(obs, ys, jnp.zeros((), Y.dtype))
    k = 0.5 * (K + K.T)
    sigma = noise_matrix(noise)
    fixed = jax.lax.stop_gradient
    ok = (
        _psd(fixed(k))
        & _psd(fixed(sigma))
        & form.valid()
        & jnp.all(jnp.where(obs, jnp.isfinite(ys), True))
        & jnp.all(jnp.isfinite(sigma))
    )
    return JointProblem(g, y, obs, k, sigma, form.variance(), ok, pull)


def _run(p: JointProblem, store: bool) -> tuple[Array, JointFiltered, Array]:
    f = joint_filter(p.y, p.obs, p.g.a, p.g.q, p.g.h, p.k, p.sigma, p.variance, store)
    T = p.y.shape[0]
    # U_oo is numerically singular where an innovation's Cholesky pivot is round-off relative to
    # that cell's prior variance k(0) K_dd + Σ_dd (as for the complete-data filter).
    ok = p.ok & (f.resolved > resolution(T, p.y.dtype)) & jnp.isfinite(f.loglik)
    return jnp.where(ok, f.loglik, jnp.nan), f, ok


def value(Y, form, K, noise, mask) -> Array:
    return _run(joint_problem(Y, form, K, noise, mask), store=False)[0]


def value_and_grads(Y, form, K, noise, mask):
    """(L, (∂L/∂Y, ∂L/∂M as a StateSpace, ∂L/∂K, ∂L/∂noise)): the joint filter and its reverse pass."""
    p = joint_problem(Y, form, K, noise, mask, with_pull=True)
    value, f, ok = _run(p, store=True)
    rv = joint_reverse(p.y, p.obs, p.g.a, p.g.q, p.g.h, p.k, p.sigma, f)
    nan = jnp.where(ok, 1.0, jnp.nan).astype(p.y.dtype)
    y_cot = jnp.zeros_like(rv.y).at[p.g.order].set(rv.y)
    k_cot = 0.5 * (rv.k + rv.k.T)
    _, noise_pull = jax.vjp(noise_matrix, noise)
    (noise_cot,) = noise_pull(rv.sigma)
    t_bar, kernel_bar = p.pull((rv.a, rv.q))
    form_cot = form.like(t_bar, kernel_bar)
    grads = (y_cot, form_cot, k_cot, noise_cot)
    return value, jax.tree_util.tree_map(lambda x: x * nan, grads)


def solve_sorted(p: JointProblem, rhs: Array) -> Array:
    """U_oo⁻¹ rhs_o (T, D) on the sorted rows, 0 on missing cells (vmap over rhs shares the covariances)."""
    f = joint_filter(rhs, p.obs, p.g.a, p.g.q, p.g.h, p.k, p.sigma, p.variance, True)
    return joint_solve(rhs, p.obs, p.g.a, p.g.q, p.g.h, p.k, p.sigma, f)


def solve(Y, form, K, noise, mask) -> Array:
    p = joint_problem(Y, form, K, noise, mask)
    ok = _run(p, store=False)[2]
    w = solve_sorted(p, p.y)
    return nan_unless(ok, jnp.zeros_like(w).at[p.g.order].set(w))


def predict(Y, form, K, noise, mask, M_cross, m_new_diag):
    """mean = M_× W K, var_nd = m_n K_dd - b_ndᵀ U_oo⁻¹ b_nd with b_nd = (M_×[n] ⊗ K[:, d])_o: N·D solves."""
    p = joint_problem(Y, form, K, noise, mask)
    ok = _run(p, store=False)[2]
    w = solve_sorted(p, p.y)
    w = jnp.zeros_like(w).at[p.g.order].set(w)
    mean = M_cross @ (w @ p.k)
    N = M_cross.shape[0]
    D = p.k.shape[0]
    x = M_cross.T[p.g.order]  # (T, N) sorted
    rhs = x.T[:, None, :, None] * p.k.T[None, :, None, :]  # (N, D, T, D): b_nd[t, e] = x_n[t] K_ed
    rhs = jnp.where(p.obs[None, None], rhs, jnp.zeros((), rhs.dtype)).reshape(N * D, *p.y.shape)
    sol = jax.vmap(lambda b: solve_sorted(p, b))(rhs)
    quad = jnp.sum(rhs * sol, axis=(1, 2)).reshape(N, D)
    var = m_new_diag[:, None] * jnp.diagonal(p.k)[None, :] - quad
    return nan_unless(ok, mean), nan_unless(ok, var)
