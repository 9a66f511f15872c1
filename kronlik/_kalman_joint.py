r"""Missing cells with a state-space M: one Kalman filter on the joint state of all D outputs.

With cells missing, the pencil no longer splits U_oo into D scalar problems, but the model is
still linear-Gaussian in time. The latent F (T, D) has vec(F) ~ N(0, M ⊗ K), so with M_ik =
hᵀ A_{i←k} P∞ h (:mod:`kronlik.statespace`) F's rows are f_i = Xᵢᵀ h for a joint state X_i
(J, D) whose columns share the kernel's transitions and whose process noise is Q_i ⊗ K:

    vec X_i = (A_i ⊗ I_D) vec X_{i-1} + q_i,   q_i ~ N(0, Q_i ⊗ K)       (index (a, d) ↦ a·D + d)
    y_i[o_i] = f_i[o_i] + e_i[o_i],             e_i ~ N(0, Σ)

and row i observes only its observed outputs o_i. A missing output is given observation row 0,
residual 0 and unit noise, uncoupled from the rest: its innovation is the constant 1, which adds
log 1 = 0 to log det and 0 to the quadratic form, so a traced mask (any pattern, fixed shapes)
gives exactly log N(y_o; 0, U_oo). One step, n = J·D, H = diag(o)(hᵀ ⊗ I_D):

    m⁻ = Ã m,   P⁻ = Ã P Ãᵀ + Q ⊗ K   (Ã = A ⊗ I_D),   u = P⁻ Hᵀ (n, D)
    S = H u + R,  R = (o oᵀ) ⊙ Σ + diag(1 - o),   v = o ⊙ (y - H₀ m⁻),   w = S⁻¹ v
    m' = m⁻ + u w,   P' = P⁻ - u S⁻¹ uᵀ,   ℓ += -½ (log det S + vᵀ w + |o| log 2π).

O(T (J D)² (J + D)) time whatever the fraction missing; a row with nothing observed is a
prediction step. The reverse pass (hand-derived; m̄, P̄ the adjoints of m', P', P̄ symmetric):

    w̄ = uᵀ m̄,   ū = m̄ wᵀ - 2 P̄ u S⁻¹
    S̄ = S⁻¹ uᵀ P̄ u S⁻¹ - ½ (S⁻¹ w̄ wᵀ + w w̄ᵀ S⁻¹) - ½ S⁻¹ + ½ w wᵀ,   v̄ = S⁻¹ w̄ - w
    P̄⁻ = P̄ + Hᵀ S̄ H + ½ (ū H + Hᵀ ūᵀ),   m̄⁻ = m̄ - Hᵀ v̄
    ∂ℓ/∂y_i = o ⊙ v̄ (= -(U_oo⁻¹ y_o) on the observed cells),   ∂ℓ/∂Σ += (o oᵀ) ⊙ S̄
    ∂ℓ/∂K += Σ_ab P̄⁻[a·, b·] Q_ab,   Q̄_i = Σ_de P̄⁻[·d, ·e] K_de
    Ā_i = Σ_d (m̄⁻ mᵀ + 2 P̄⁻ Ã P)[·d, ·d],   m̄ ← Ãᵀ m̄⁻,   P̄ ← Ãᵀ P̄⁻ Ã.

Ā and Q̄ are mapped to the times and kernel parameters by the generators' VJP, as for complete
data (:mod:`kronlik._statespace_core`). The solve U_oo⁻¹ y_o is -∂ℓ/∂y, the m̄ recursion alone
(P̄ does not enter it). The smoother (:func:`joint_smooth`) is the Bryson-Frazier form of
:mod:`kronlik._smoother` on the joint state.

Layout: means (J, D), covariances (J, D, J, D); the products are einsums over those axes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

Array = jax.Array


class JointFiltered(NamedTuple):
    loglik: Array  # () log N(y_o; 0, U_oo)
    resolved: Array  # () min over observed cells of S's Cholesky pivot² / the cell's prior variance
    m_prev: Array | None  # (T, J, D) posterior mean after step i - 1
    p_prev: Array | None  # (T, J, D, J, D) posterior covariance after step i - 1


class JointReversed(NamedTuple):
    y: Array  # (T, D) ∂ℓ/∂y (0 on missing cells)
    k: Array  # (D, D) ∂ℓ/∂K (not symmetrised)
    sigma: Array  # (D, D) ∂ℓ/∂Σ (symmetric)
    a: Array  # (T, J, J) ∂ℓ/∂A_i
    q: Array  # (T, J, J) ∂ℓ/∂Q_i


def _sym4(p: Array) -> Array:
    return 0.5 * (p + jnp.transpose(p, (2, 3, 0, 1)))


class _Step(NamedTuple):
    mp: Array  # (J, D) m⁻
    pp: Array  # (J, D, J, D) P⁻
    u: Array  # (J, D, D) P⁻ Hᵀ
    chol: Array  # (D, D) Cholesky factor of S
    v: Array  # (D,)
    w: Array  # (D,) S⁻¹ v


def _noise_block(sigma: Array, o: Array) -> Array:
    """R = (o oᵀ) ⊙ Σ + diag(1 - o): the observed block of Σ, unit variance on missing outputs."""
    D = o.shape[0]
    eye = jnp.eye(D, dtype=bool)
    both = o[:, None] & o[None, :]
    return jnp.where(both, sigma, jnp.where(eye, jnp.ones((), sigma.dtype), jnp.zeros((), sigma.dtype)))


def _step(m, p, a_i, q_i, y_i, o_i, h, K, sigma) -> _Step:
    dtype = m.dtype
    mp = a_i @ m
    pp = jnp.einsum("ab,bdce,fc->adfe", a_i, p, a_i) + q_i[:, None, :, None] * K[None, :, None, :]
    pp = _sym4(pp)
    of = o_i.astype(dtype)
    u = jnp.einsum("adbe,b->ade", pp, h) * of[None, None, :]
    s = jnp.einsum("a,ade->de", h, u) * of[:, None] + _noise_block(sigma, o_i)
    chol = jnp.linalg.cholesky(0.5 * (s + s.T))
    v = jnp.where(o_i, y_i - h @ mp, jnp.zeros((), dtype))
    w = cho_solve((chol, True), v)
    return _Step(mp, pp, u, chol, v, w)


def joint_filter(y, obs, a, q, h, K, sigma, variance, store: bool) -> JointFiltered:
    """ℓ = log N(y_o; 0, U_oo) for y (T, D) with ``obs`` (T, D) bool, rows sorted by time.

    a, q (T, J, J): the generators (A_1 = 0, Q_1 = P∞); K, Σ (D, D) symmetric; ``variance`` = k(0),
    which scales each cell's prior variance k(0) K_dd + Σ_dd for the resolution check.
    """
    T, D = y.shape
    J = a.shape[-1]
    dtype = y.dtype
    h = jnp.asarray(h, dtype)
    prior = variance * jnp.diagonal(K) + jnp.diagonal(sigma)
    log2pi = math.log(2.0 * math.pi)

    def body(carry, inp):
        m, p, ll, res = carry
        a_i, q_i, y_i, o_i = inp
        st = _step(m, p, a_i, q_i, y_i, o_i, h, K, sigma)
        m_new = st.mp + jnp.einsum("ade,e->ad", st.u, st.w)
        gain = cho_solve((st.chol, True), st.u.reshape(J * D, D).T).T.reshape(J, D, D)  # u S⁻¹
        p_new = _sym4(st.pp - jnp.einsum("ade,bfe->adbf", gain, st.u))
        piv = jnp.diagonal(st.chol)
        ll = ll - jnp.sum(jnp.log(piv)) - 0.5 * (st.v @ st.w + jnp.sum(o_i.astype(dtype)) * log2pi)
        res = jnp.minimum(res, jnp.min(jnp.where(o_i, piv * piv / prior, jnp.inf)))
        return (m_new, p_new, ll, res), ((m, p) if store else None)

    init = (
        jnp.zeros((J, D), dtype),
        jnp.zeros((J, D, J, D), dtype),
        jnp.zeros((), dtype),
        jnp.full((), jnp.inf, dtype),
    )
    (_, _, ll, res), out = jax.lax.scan(body, init, (a, q, y, obs))
    return JointFiltered(ll, res, *(out if store else (None, None)))


def joint_reverse(y, obs, a, q, h, K, sigma, f: JointFiltered) -> JointReversed:
    """The hand-derived reverse pass of :func:`joint_filter` (module docstring)."""
    T, D = y.shape
    J = a.shape[-1]
    dtype = y.dtype
    h = jnp.asarray(h, dtype)
    eye = jnp.eye(D, dtype=dtype)

    def body(carry, inp):
        mbar, pbar, kbar, sbar_acc = carry
        a_i, q_i, y_i, o_i, m, p = inp
        st = _step(m, p, a_i, q_i, y_i, o_i, h, K, sigma)
        of = o_i.astype(dtype)
        s_inv = cho_solve((st.chol, True), eye)
        wbar = jnp.einsum("ade,ad->e", st.u, mbar)
        pu = jnp.einsum("adbf,bfe->ade", pbar, st.u)  # P̄ u
        upu = jnp.einsum("ade,adf->ef", st.u, pu)
        si_wbar = s_inv @ wbar
        ubar = mbar[:, :, None] * st.w[None, None, :] - 2.0 * jnp.einsum("ade,ef->adf", pu, s_inv)
        ww = st.w[:, None] * st.w[None, :]
        cross = si_wbar[:, None] * st.w[None, :]
        sbar = s_inv @ upu @ s_inv - 0.5 * (cross + cross.T) - 0.5 * s_inv + 0.5 * ww
        sbar = 0.5 * (sbar + sbar.T)
        vbar = (si_wbar - st.w) * of
        # P̄⁻ = P̄ + Hᵀ S̄ H + ½ (ū H + Hᵀ ūᵀ), H[d, (a, e)] = o_d h_a δ_de
        hs = sbar * (of[:, None] * of[None, :])
        ppbar = pbar + h[:, None, None, None] * h[None, None, :, None] * hs[None, :, None, :]
        uh = ubar * of[None, None, :]  # ū diag(o): (ū H)[(a,d),(b,e)] = ū[a,d,e] o_e h_b
        uh4 = uh[:, :, None, :] * h[None, None, :, None]
        ppbar = ppbar + 0.5 * (uh4 + jnp.transpose(uh4, (2, 3, 0, 1)))
        mpbar = mbar - h[:, None] * vbar[None, :]
        abar = jnp.einsum("ad,bd->ab", mpbar, m) + 2.0 * jnp.einsum("adce,cf,febd->ab", ppbar, a_i, p)
        qbar = jnp.einsum("adbe,de->ab", ppbar, K)
        kbar = kbar + jnp.einsum("adbe,ab->de", ppbar, q_i)
        sbar_acc = sbar_acc + hs
        mbar_prev = a_i.T @ mpbar
        pbar_prev = jnp.einsum("ba,bdce,cf->adfe", a_i, ppbar, a_i)
        return (mbar_prev, pbar_prev, kbar, sbar_acc), (vbar, abar, qbar)

    init = (
        jnp.zeros((J, D), dtype),
        jnp.zeros((J, D, J, D), dtype),
        jnp.zeros((D, D), dtype),
        jnp.zeros((D, D), dtype),
    )
    (_, _, kbar, sbar), (ybar, abar, qbar) = jax.lax.scan(body, init, (a, q, y, obs, f.m_prev, f.p_prev), reverse=True)
    return JointReversed(ybar, kbar, sbar, abar, qbar)


def joint_solve(y, obs, a, q, h, K, sigma, f: JointFiltered) -> Array:
    """W (T, D) = U_oo⁻¹ y_o on the observed cells, 0 elsewhere: the m̄ recursion of the reverse pass.

    Only the stored means depend on y, so this is linear in y and batches (``vmap``) over right-
    hand sides with the covariance recursion shared.
    """
    T, D = y.shape
    dtype = y.dtype
    h = jnp.asarray(h, dtype)

    def body(mbar, inp):
        a_i, q_i, y_i, o_i, m, p = inp
        st = _step(m, p, a_i, q_i, y_i, o_i, h, K, sigma)
        wbar = jnp.einsum("ade,ad->e", st.u, mbar)
        vbar = (cho_solve((st.chol, True), wbar) - st.w) * o_i.astype(dtype)
        return a_i.T @ (mbar - h[:, None] * vbar[None, :]), vbar

    J = a.shape[-1]
    _, ybar = jax.lax.scan(body, jnp.zeros((J, D), dtype), (a, q, y, obs, f.m_prev, f.p_prev), reverse=True)
    return -ybar


def joint_smooth(y, obs, a, q, h, K, sigma) -> tuple[Array, Array]:
    """(E[f_i | y_o], Var[f_i | y_o]), each (T, D), at every (sorted) row, observed or not.

    Bryson-Frazier on the joint state (no inverse of P): from λ̂ = 0, Λ̂ = 0 after the last step,
    with C̃ = I - u S⁻¹ H at step i,

        λ̃ = C̃ᵀ λ̂ - Hᵀ w,   Λ̃ = C̃ᵀ Λ̂ C̃ + Hᵀ S⁻¹ H,   E f_i = H₀ (m⁻ - P⁻ λ̃),
        Var f_i = diag(H₀ P⁻ H₀ᵀ - H₀ P⁻ Λ̃ P⁻ H₀ᵀ),   λ̂ ← Ãᵀ λ̃,   Λ̂ ← Ãᵀ Λ̃ Ã.
    """
    T, D = y.shape
    J = a.shape[-1]
    dtype = y.dtype
    h = jnp.asarray(h, dtype)
    eye = jnp.eye(D, dtype=dtype)
    f = joint_filter(y, obs, a, q, h, K, sigma, jnp.ones((), dtype), True)

    def body(carry, inp):
        lam, big = carry
        a_i, q_i, y_i, o_i, m, p = inp
        st = _step(m, p, a_i, q_i, y_i, o_i, h, K, sigma)
        of = o_i.astype(dtype)
        s_inv = cho_solve((st.chol, True), eye)
        gain = jnp.einsum("ade,ef->adf", st.u, s_inv)  # u S⁻¹ (J, D, D)
        # C̃ᵀ x = x - Hᵀ (gainᵀ x): (Hᵀ c)[a, d] = h_a o_d c_d
        gl = jnp.einsum("adf,ad->f", gain, lam) * of
        lam_t = lam - h[:, None] * gl[None, :] - h[:, None] * (st.w * of)[None, :]
        gb = jnp.einsum("adf,adbe->fbe", gain, big) * of[:, None, None]  # gainᵀ Λ̂ (D, J, D)
        left = big - h[:, None, None, None] * gb[None]  # C̃ᵀ Λ̂
        lg = jnp.einsum("adbe,bef->adf", left, gain) * of[None, None, :]  # (C̃ᵀ Λ̂) gain
        big_t = left - lg[:, :, None, :] * h[None, None, :, None]
        hsh = (of[:, None] * of[None, :]) * s_inv
        big_t = _sym4(big_t + h[:, None, None, None] * h[None, None, :, None] * hsh[None, :, None, :])
        hp = jnp.einsum("a,adbe->dbe", h, st.pp)  # H₀ P⁻ (D, J, D)
        mean = h @ st.mp - jnp.einsum("dbe,be->d", hp, lam_t)
        prior_var = jnp.einsum("dbe,b->de", hp, h)
        var = jnp.diagonal(prior_var) - jnp.einsum("dbe,becf,dcf->d", hp, big_t, hp)
        return (a_i.T @ lam_t, jnp.einsum("ba,bdce,cf->adfe", a_i, big_t, a_i)), (mean, var)

    init = (jnp.zeros((J, D), dtype), jnp.zeros((J, D, J, D), dtype))
    _, (mean, var) = jax.lax.scan(body, init, (a, q, y, obs, f.m_prev, f.p_prev), reverse=True)
    return mean, var
