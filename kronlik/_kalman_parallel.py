r"""The Kalman recursions of :mod:`kronlik._kalman` in O(log T) depth: associative scans.

A sequential scan runs T dependent steps of a few flops each, which an accelerator runs one
kernel launch (or one unrolled group) at a time. Here every recursion is written as the
composition of per-step maps, which is associative, and ``jax.lax.associative_scan`` evaluates
all prefixes (or suffixes) in O(log T) rounds of O(T) independent work (Blelloch). The results
are the same quantities as the sequential pass (:class:`~kronlik._kalman.Filtered`,
:class:`~kronlik._kalman.Reversed`), summed in a different order.

**The filter** (Särkkä & García-Fernández, "Temporal parallelization of Bayesian smoothers",
IEEE TAC 2021, Lemmas 7-8). For one problem (κ, ν) step i conditions x_i = A_i x_{i-1} + q_i,
q_i ~ N(0, κ Q_i), on z_i = hᵀ x_i + e_i, e_i ~ N(0, ν). As a function of the previous state,

    p(x_i | x_{i-1}, z_i) = N(x_i; F_i x_{i-1} + b_i, C_i),   p(z_i | x_{i-1}) ∝ N_I(x_{i-1}; η_i, J_i)

with S = κ hᵀQ_i h + ν, k = κ Q_i h / S, F_i = (I - k hᵀ) A_i, b_i = k z_i,
C_i = κ Q_i - S k kᵀ, η_i = A_iᵀ h z_i / S, J_i = A_iᵀ h hᵀ A_i / S. Two consecutive elements
combine (i before j) as

    X = (I + C_i J_j)⁻¹:   F = F_j X F_i,   b = F_j X (b_i + C_i η_j) + b_j,   C = F_j X C_i F_jᵀ + C_j,
                           η = F_iᵀ Xᵀ (η_j - J_j b_i) + η_i,   J = F_iᵀ Xᵀ J_j F_i + J_i,

and the prefix 1..i of these, applied to x_0 = 0 (the first step has A_1 = 0, Q_1 = P∞), is the
posterior (b, C) after step i. The innovations S_i, v_i and ℓ then follow in parallel from the
posteriors, exactly as the sequential filter computes them.

**The reverse pass.** With m̄_i, P̄_i the adjoints of step i's posterior, G_i = I - u_i hᵀ / S_i
and Φ_i = G_i A_i, the sequential pass (:mod:`kronlik._kalman`) is

    m̄_{i-1} = Φ_iᵀ m̄_i + A_iᵀ h v_i / S_i,
    P̄_{i-1} = Φ_iᵀ P̄_i Φ_i + A_iᵀ N_i A_i,
    N_i = ½ (v_i / S_i)(w hᵀ + h wᵀ) - ½ (1/S_i - v_i² / S_i²) h hᵀ,   w = G_iᵀ m̄_i,

two affine backward recursions: the first alone, the second once the first has given every
m̄_i. Composing x ↦ Φᵀ x + e (and X ↦ Φᵀ X Φ + Ψ) is associative, so each is one suffix scan;
the recursion for the upper part of M z̄ (g_{i-1} = A_iᵀ (g_i + h z̄_i)) rides along with the
second. Every per-step quantity then comes from :func:`kronlik._kalman.reverse_local`, the
sequential pass's own step, applied to all steps at once.

Cost: O(T J³ D) work (the filter's combine inverts a J × J matrix) against the sequential
O(T J² D), in O(log T) depth, and the same O(T J² D) memory. On a CPU the sequential scans are
faster; :func:`kronlik.statespace.scan_method` picks this one on accelerators.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ._kalman import Filtered, Reversed, _predict_update, reverse_local

Array = jax.Array

# Layout: batch axes (T, and the D problems) lead, small matrices trail: (T, D, J, J). Products
# are broadcast multiplies summed over one small axis (fused elementwise loops, as in _kalman).


def _mm(x: Array, y: Array) -> Array:
    """X Y for (..., J, K) and (..., K, L)."""
    return jnp.sum(x[..., :, :, None] * y[..., None, :, :], axis=-2)


def _tmm(x: Array, y: Array) -> Array:
    """Xᵀ Y for (..., K, J) and (..., K, L)."""
    return jnp.sum(x[..., :, :, None] * y[..., :, None, :], axis=-3)


def _mv(x: Array, v: Array) -> Array:
    """X v for (..., J, K) and (..., K)."""
    return jnp.sum(x * v[..., None, :], axis=-1)


def _tmv(x: Array, v: Array) -> Array:
    """Xᵀ v for (..., K, J) and (..., K)."""
    return jnp.sum(x * v[..., :, None], axis=-2)


def _sym(x: Array) -> Array:
    return 0.5 * (x + jnp.swapaxes(x, -1, -2))


def _outer(x: Array, y: Array) -> Array:
    return x[..., :, None] * y[..., None, :]


def _solve_small(a: Array, b: Array) -> Array:
    """A⁻¹ B for A (..., J, J), B (..., J, K), J small and static: Gaussian elimination with
    partial pivoting unrolled over the J columns, every step a broadcast over the batch.

    The combine's solves, on every backend: fused elementwise work rather than a batched LAPACK
    or cuSOLVER call per level (XLA:CPU, jaxlib 0.10.2, deadlocked in the batched
    ``jnp.linalg.solve`` on two threads), with the same pivoting and the same accuracy as LAPACK's
    LU on the extreme cases of ``benchmarks/statespace_accuracy.py``.

    Rows are swapped and masked by selection (``jnp.where``), never by arithmetic: a swap
    written as ``m + (row_p - m)`` rounds away a small row beside a large one (the combine's rows
    differ by 1/ν, 1e17 at a log-variance of -40), and a mask written as a product turns an
    infinite entry into NaN in rows it should not touch.
    """
    J = a.shape[-1]
    m = jnp.concatenate([a, b], axis=-1)  # the augmented rows [A | B]
    rows = jnp.arange(J).reshape((1,) * (a.ndim - 2) + (J,))  # (1, ..., 1, J): the batch rank
    for k in range(J):
        # swap row k with the row of the largest |entry| in column k at or below it
        pivot = jnp.argmax(jnp.where(rows >= k, jnp.abs(m[..., :, k]), -1.0), axis=-1)
        is_pivot = (rows == pivot[..., None])[..., :, None]
        row_p = jnp.take_along_axis(m, pivot[..., None, None], axis=-2)  # (..., 1, J + K)
        row_k = m[..., k : k + 1, :]
        m = jnp.where(rows[..., :, None] == k, row_p, jnp.where(is_pivot, row_k, m))
        below = (rows > k)[..., :, None]
        m = jnp.where(below, m - (m[..., :, k : k + 1] / m[..., k : k + 1, k : k + 1]) * m[..., k : k + 1, :], m)
    x = [None] * J
    for k in reversed(range(J)):  # back substitution on the upper triangle
        acc = m[..., k, J:]
        for j in range(k + 1, J):
            acc = acc - m[..., k, j : j + 1] * x[j]
        x[k] = acc / m[..., k, k : k + 1]
    return jnp.stack(x, axis=-2)


def _filter_elements(z, a, q, h, kappa, nu):
    """The per-step elements (F, b, C, η, J), (T, D, ...) each."""
    T, D = z.shape
    J = a.shape[-1]
    hb = jnp.broadcast_to(h, (T, D, J))
    qk = kappa[None, :, None, None] * q[:, None, :, :]  # (T, D, J, J)
    qh = _mv(qk, hb)
    s = jnp.sum(qh * hb, axis=-1) + nu[None, :]
    gain = qh / s[..., None]
    a_b = jnp.broadcast_to(a[:, None], (T, D, J, J))
    ha = _tmv(a_b, hb)  # Aᵀ h
    f = a_b - _outer(gain, jnp.sum(hb[..., :, None] * a_b, axis=-2))
    b = gain * z[..., None]
    c = _sym(qk - _outer(qh, qh) / s[..., None, None])
    eta = ha * (z / s)[..., None]
    jm = _outer(ha, ha) / s[..., None, None]
    return f, b, c, eta, jm


def _combine_filter(first, second):
    """Element ``first`` (earlier steps) then ``second`` (later steps): the module docstring's rule."""
    f1, b1, c1, e1, j1 = first
    f2, b2, c2, e2, j2 = second
    J = f1.shape[-1]
    eye = jnp.eye(J, dtype=f1.dtype)[(None,) * (f1.ndim - 2)]
    lhs = eye + _mm(c1, j2)
    rhs = jnp.concatenate([f1, (b1 + _mv(c1, e2))[..., None], c1], axis=-1)
    x = _solve_small(lhs, rhs)
    xf, xb, xc = x[..., :J], x[..., J], x[..., J + 1 :]
    f = _mm(f2, xf)
    b = _mv(f2, xb) + b2
    c = _sym(_mm(_mm(f2, xc), jnp.swapaxes(f2, -1, -2)) + c2)
    rhs_t = jnp.concatenate([(e2 - _mv(j2, b1))[..., None], _mm(j2, f1)], axis=-1)
    y = _solve_small(jnp.swapaxes(lhs, -1, -2), rhs_t)  # (I + J₂C₁)⁻¹ [...]
    e = _tmv(f1, y[..., 0]) + e1
    jm = _sym(_tmm(f1, y[..., 1:]) + j1)
    return f, b, c, e, jm


def _shift_back(x: Array) -> Array:
    """x_{i-1} at row i, zero at row 0."""
    return jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]])


def _shift_forward(x: Array) -> Array:
    """x_{i+1} at row i, zero at the last row."""
    return jnp.concatenate([x[1:], jnp.zeros_like(x[:1])])


def kalman_filter(z: Array, a: Array, q: Array, h, kappa: Array, nu: Array, store: bool) -> Filtered:
    """:func:`kronlik._kalman.kalman_filter` by an associative scan (same arguments and results)."""
    T, D = z.shape
    h = jnp.asarray(h, z.dtype)
    elems = _filter_elements(z, a, q, h, kappa, nu)
    _, b, c, _, _ = jax.lax.associative_scan(_combine_filter, elems)
    # previous posteriors in the sequential filter's layout, (T, J, D) and (T, J, J, D)
    m_prev = _shift_back(jnp.moveaxis(b, 1, -1))
    p_prev = _shift_back(jnp.moveaxis(c, 1, -1))
    step = jax.vmap(_predict_update, in_axes=(0, 0, 0, 0, 0, None, None, None))
    _, _, _, _, s, v = step(m_prev, p_prev, a, q, z, h, kappa, nu)
    scale = kappa * (h @ q[0] @ h) + nu
    loglik = -0.5 * jnp.sum(jnp.log(s) + v * v / s + math.log(2.0 * math.pi), axis=0)
    s_min = jnp.min(s / scale[None, :], axis=0)
    return Filtered(loglik, s_min, *((m_prev, p_prev) if store else (None, None)))


def _compose_vector(later, earlier):
    """(earlier ∘ later) for maps x ↦ Φᵀ x + e: the suffix scan's rule."""
    f_l, e_l = later
    f_e, e_e = earlier
    return _mm(f_l, f_e), _tmv(f_e, e_l) + e_e


def _compose_both(later, earlier):
    """(earlier ∘ later) for X ↦ Φᵀ X Φ + Ψ, and for g ↦ Aᵀ g + e (A shared by the D problems;
    g may be absent)."""
    (f_l, psi_l, *g_later), (f_e, psi_e, *g_earlier) = later, earlier
    f = _mm(f_l, f_e)
    psi = _sym(_tmm(f_e, _mm(psi_l, f_e)) + psi_e)
    if g_later[0] is None:
        return f, psi, None, None
    return f, psi, *_compose_transposed(g_later, g_earlier)


def kalman_reverse(
    z: Array, a: Array, q: Array, h, kappa: Array, nu: Array, f: Filtered, p_inf_h: Array | None = None
) -> Reversed:
    """:func:`kronlik._kalman.kalman_reverse` by associative scans (same arguments and results)."""
    T, D = z.shape
    J = a.shape[-1]
    h = jnp.asarray(h, z.dtype)
    step = jax.vmap(_predict_update, in_axes=(0, 0, 0, 0, 0, None, None, None))
    _, ap, _, u, s, v = step(f.m_prev, f.p_prev, a, q, z, h, kappa, nu)
    # the scans' layout: (T, D, J[, J])
    u_t = jnp.moveaxis(u, -1, 1)
    hb = jnp.broadcast_to(h, (T, D, J))
    a_b = jnp.broadcast_to(a[:, None], (T, D, J, J))
    ha = _tmv(a_b, hb)
    phi = a_b - _outer(u_t / s[..., None], jnp.sum(hb[..., :, None] * a_b, axis=-2))  # (I - u hᵀ/S) A
    # m̄_{i-1} for every i, then m̄_i (the adjoint of step i's posterior; zero after the last)
    _, mbar_prev = jax.lax.associative_scan(_compose_vector, (phi, ha * (v / s)[..., None]), reverse=True)
    mbar = _shift_forward(mbar_prev)
    um = jnp.sum(u_t * mbar, axis=-1)
    w = mbar - hb * (um / s)[..., None]
    vs = v / s
    n = 0.5 * vs[..., None, None] * (_outer(w, hb) + _outer(hb, w))
    n = n - 0.5 * (1.0 / s - vs * vs)[..., None, None] * _outer(hb, hb)
    psi = _sym(_tmm(a_b, _mm(n, a_b)))
    upper = p_inf_h is not None
    if upper:
        zbar = (um - v) / s  # v̄_i, the same expression as reverse_local's
        g_elems = (a, _tmv(a_b, hb * zbar[..., None]))  # A (T, J, J): one product per step, not D
    else:
        g_elems = (None, None)
    _, pbar_prev, _, g_prev = jax.lax.associative_scan(_compose_both, (phi, psi, *g_elems), reverse=True)
    pbar = _shift_forward(pbar_prev)
    # every step's local adjoints, by the sequential pass's own step (layout (T, J[, J], D))
    local = jax.vmap(reverse_local, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, None, None))
    _, _, vbar, sbar, abar, qbar, kbar = local(
        jnp.moveaxis(mbar, 1, -1), jnp.moveaxis(pbar, 1, -1), f.m_prev, q, ap, u, s, v, h, kappa
    )
    up = None
    if upper:
        g = _shift_forward(g_prev)  # g_i: the carry when step i is reached from the end
        up = jnp.sum(g * jnp.asarray(p_inf_h, z.dtype)[None, None, :], axis=-1)
    return Reversed(vbar, jnp.sum(kbar, axis=0), jnp.sum(sbar, axis=0), abar, qbar, up)


def _compose_forward(earlier, later):
    """(later ∘ earlier) for maps s ↦ A s + c (A (…, J, J) shared by the N columns of c)."""
    a_e, c_e = earlier
    a_l, c_l = later
    return _mm(a_l, a_e), _mv(a_l[:, None], c_e) + c_l


def _compose_transposed(later, earlier):
    """(earlier ∘ later) for maps r ↦ Aᵀ r + e (A shared by the N columns of e)."""
    a_l, e_l = later
    a_e, e_e = earlier
    return _mm(a_l, a_e), _tmv(a_e[:, None], e_l) + e_e


def matmul_sorted(g, x: Array) -> Array:
    """:func:`kronlik._kalman.matmul_sorted` by two associative scans (same arguments and result)."""
    h = jnp.asarray(g.h, x.dtype)
    ph = g.p_inf @ h
    a = g.a
    # lower part: s_i = A_i s_{i-1} + P∞h x_i, (M X)_i ∋ hᵀ s_i
    _, low = jax.lax.associative_scan(_compose_forward, (a, x[:, :, None] * ph[None, None, :]))
    # strictly upper part: r_i = A_{i+1}ᵀ (r_{i+1} + h x_{i+1}), (M X)_i ∋ (P∞h)ᵀ r_i
    a_next = _shift_forward(a)
    x_next = _shift_forward(x)
    e = _tmv(a_next[:, None], x_next[:, :, None] * h[None, None, :])
    _, up = jax.lax.associative_scan(_compose_transposed, (a_next, e), reverse=True)
    return jnp.sum(low * h[None, None, :], axis=-1) + jnp.sum(up * ph[None, None, :], axis=-1)
