r"""Predictions with a state-space M in O((T + N) J² D): a Kalman filter and smoother over the merged times.

For vec(Y) ~ N(0, M ⊗ K + I ⊗ Σ), M_ik = k(t_i - t_k) a state-space kernel
(:mod:`kronlik.statespace`), the latent f = (f_1, ..., f_D) (covariance k ⊗ K) at new times t*
has, with the pencil P of (K, Σ) (Pᵀ K P = diag(κ), Pᵀ Σ P = diag(ν), Pᵀ(αK + Σ)P = I, so
K = P⁻ᵀ diag(κ) P⁻¹ and P⁻ᵀ = (αK + Σ) P), f = P⁻ᵀ g where the D processes g_j are
independent, g_j ~ GP(0, κ_j k), and Z = Y P observes them: z_ij = g_j(t_i) + e_ij,
e_ij ~ N(0, ν_j). Hence

    E[f_d(t*) | Y] = Σ_j (P⁻ᵀ)_dj E[g_j(t*) | z_j]           (= M_× W K, W = U⁻¹ Y)
    Var[f_d(t*) | Y] = Σ_j (P⁻ᵀ)_dj² Var[g_j(t*) | z_j]      (= k(0) K_dd - Σ_j (KP)_dj² k_*ᵀ C_j⁻¹ k_*)

and each g_j's posterior at every time comes from one Kalman filter and smoother over the data
times and the new times merged and sorted, the new times being steps with no observation. The
state of problem j is x_i = A_i x_{i-1} + q_i, q_i ~ N(0, κ_j Q_i), g_j(t_i) = hᵀ x_i (the
generators of :func:`kronlik.statespace.generators` over the merged times). The smoother is the
modified Bryson-Frazier form (no J×J inverse, only the scalar innovation variances S): from
λ̂ = 0, Λ̂ = 0 after the last step, backwards over step i with the predicted m⁻, P⁻,
u = P⁻h, S = hᵀu + ν, v = z_i - hᵀm⁻, and C̃ = I - u hᵀ / S where observed,

    λ̃ = C̃ᵀ λ̂ - h v / S,   Λ̃ = C̃ᵀ Λ̂ C̃ + h hᵀ / S     (λ̃ = λ̂, Λ̃ = Λ̂ at a new time)
    E[g(t_i)] = hᵀm⁻ - uᵀ λ̃,   Var[g(t_i)] = hᵀu - uᵀ Λ̃ u
    λ̂ ← A_iᵀ λ̃,   Λ̂ ← A_iᵀ Λ̃ A_i.

All D problems run side by side in the (J, D) layout of :mod:`kronlik._kalman` (broadcast
multiplies and sums over the small state axes, one ``lax.scan`` each way).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._kalman import _mm, _mmt, _mtv, _mtv_cov, _mv, _sym
from ._noise import FullNoise
from ._statespace_core import ss_factor
from .statespace import StateSpace, generators

Array = jax.Array

# Steps per loop iteration (kronlik._kalman unrolls 8): 2 here, as the smoother runs once per
# prediction, not once per optimizer step: compiles 2.5x faster than 8, runs ~20 % slower at T = 10⁶.
_UNROLL = 2


class Posterior(NamedTuple):
    """The latent f's posterior at the new times, (N, D) each, in the order given."""

    mean: Array
    var: Array
    ok: Array  # () the pencil and the kernel were valid (else mean and var are NaN)


def smooth(z: Array, observed: Array, a: Array, q: Array, h, kappa: Array, nu: Array) -> tuple[Array, Array]:
    """(E[g_j(t_i)], Var[g_j(t_i)]), each (T', D), for rows z (T', D) of which ``observed`` (T',) are data.

    ``a``, ``q`` (T', J, J): transitions and process covariances (Q_i/κ) over the sorted merged
    times; the prior of problem j is κ_j times that, its observation noise ν_j (module docstring).
    """
    n, D = z.shape
    J = a.shape[-1]
    h = jnp.asarray(h, z.dtype)
    hc = h[:, None]
    hh = (h[:, None] * h[None, :])[:, :, None]

    def predict(m, p, a_i, q_i):
        mp = _mv(a_i, m)
        pp = _sym(_mmt(_mm(a_i, p), a_i) + q_i[:, :, None] * kappa[None, None, :])
        u = jnp.sum(pp * hc[None], axis=1)  # P⁻ h
        s = jnp.sum(u * hc, axis=0) + nu
        return mp, pp, u, s

    def forward(carry, inp):
        m, p = carry
        a_i, q_i, z_i, o_i = inp
        mp, pp, u, s = predict(m, p, a_i, q_i)
        v = z_i - jnp.sum(mp * hc, axis=0)
        m_new = jnp.where(o_i, mp + u * (v / s)[None, :], mp)
        p_new = jnp.where(o_i, _sym(pp - u[:, None, :] * u[None, :, :] / s[None, None, :]), pp)
        return (m_new, p_new), (mp, pp)

    init = (jnp.zeros((J, D), z.dtype), jnp.zeros((J, J, D), z.dtype))
    _, (m_pred, p_pred) = jax.lax.scan(forward, init, (a, q, z, observed), unroll=_UNROLL)

    def backward(carry, inp):
        lam, big = carry  # λ̂ (J, D), Λ̂ (J, J, D): the adjoint after step i
        a_i, z_i, o_i, mp, pp = inp
        u = jnp.sum(pp * hc[None], axis=1)
        s = jnp.sum(u * hc, axis=0) + nu
        v = z_i - jnp.sum(mp * hc, axis=0)
        gain = u / s[None, :]
        # C̃ᵀ x = x - h (gainᵀ x): λ̃ and Λ̃ at an observed step
        lam_o = lam - hc * (jnp.sum(gain * lam, axis=0) + v / s)[None, :]
        left = big - hc[:, None] * jnp.sum(gain[:, None, :] * big, axis=0)[None]  # C̃ᵀ Λ̂
        big_o = (
            left - jnp.sum(left * gain[None], axis=1)[:, None] * hc[None] + hh / s[None, None, :]
        )  # (C̃ᵀ Λ̂) C̃ + h hᵀ/S
        lam_t = jnp.where(o_i, lam_o, lam)
        big_t = jnp.where(o_i, _sym(big_o), big)
        mean = jnp.sum(mp * hc, axis=0) - jnp.sum(u * lam_t, axis=0)
        var = jnp.sum(u * hc, axis=0) - jnp.sum(u * jnp.sum(big_t * u[None], axis=1), axis=0)
        return (_mtv(a_i, lam_t), _mtv_cov(a_i, big_t)), (mean, var)

    _, (mean, var) = jax.lax.scan(backward, init, (a, z, observed, m_pred, p_pred), reverse=True, unroll=_UNROLL)
    return mean, var


@jax.jit
def posterior(Y: Array, times: Array, kernel, K: Array, Sigma: Array, new_times: Array, mask=None) -> Posterior:
    """The posterior of f at ``new_times`` (N,) given Y (T, D) at ``times`` (T,), any order.

    vec(Y) ~ N(0, M ⊗ K + I ⊗ Σ) with M = k(times, times) for the state-space ``kernel``; Σ a
    full (D, D) matrix. ``var`` is the latent's (add Σ_dd for a new observation). O((T + N) J² D).
    With a (T, D) boolean ``mask`` (True = observed), given the observed cells only: the joint
    state's smoother (:func:`kronlik._kalman_joint.joint_smooth`), O((T + N) (J D)² (J + D)).
    """
    if mask is not None:
        return _posterior_masked(Y, times, kernel, K, Sigma, new_times, mask)
    T, D = Y.shape
    form = StateSpace(times, kernel)
    f = ss_factor(form, K, FullNoise(Sigma))
    pencil = f.pencil
    alpha = form.variance()
    alpha = jnp.where(alpha > 0, alpha, jnp.ones((), alpha.dtype))
    p_inv_t = (alpha * 0.5 * (K + K.T) + 0.5 * (Sigma + Sigma.T)) @ pencil.p  # P⁻ᵀ
    N = new_times.shape[0]
    g = generators(jnp.concatenate([times, new_times]), kernel)
    z = jnp.concatenate([Y @ pencil.p, jnp.zeros((N, D), Y.dtype)])[g.order]
    observed = (jnp.arange(T + N) < T)[g.order]
    mean, var = smooth(z, observed, g.a, g.q, g.h, pencil.kappa, pencil.nu)
    rows = jnp.zeros(T + N, jnp.int32).at[g.order].set(jnp.arange(T + N, dtype=jnp.int32))[T:]
    mean_f = mean[rows] @ p_inv_t.T
    var_f = jnp.maximum(var[rows], 0.0) @ (p_inv_t * p_inv_t).T
    ok = f.ok & jnp.all(jnp.isfinite(Y))
    nan = jnp.where(ok, 1.0, jnp.nan).astype(Y.dtype)
    return Posterior(mean_f * nan, var_f * nan, ok)


def _posterior_masked(Y, times, kernel, K, Sigma, new_times, mask) -> Posterior:
    from ._kalman_joint import joint_smooth
    from ._statespace_masked import joint_problem

    T, D = Y.shape
    N = new_times.shape[0]
    p = joint_problem(Y, StateSpace(times, kernel), K, FullNoise(Sigma), mask)
    g = generators(jnp.concatenate([times, new_times]), kernel)
    y = jnp.concatenate([jnp.where(mask, Y, jnp.zeros((), Y.dtype)), jnp.zeros((N, D), Y.dtype)])[g.order]
    obs = jnp.concatenate([mask, jnp.zeros((N, D), bool)])[g.order]
    mean, var = joint_smooth(y, obs, g.a, g.q, g.h, p.k, p.sigma)
    rows = jnp.zeros(T + N, jnp.int32).at[g.order].set(jnp.arange(T + N, dtype=jnp.int32))[T:]
    nan = jnp.where(p.ok, 1.0, jnp.nan).astype(Y.dtype)
    return Posterior(mean[rows] * nan, jnp.maximum(var[rows], 0.0) * nan, p.ok)
