r"""The D scalar problems κ_j M + ν_j I of the pencil for a state-space M: Kalman recursions.

With complete data and the pencil P (Pᵀ K P = diag(κ), Pᵀ Σ P = diag(ν)), Z = Y P has
independent columns z_j ~ N(0, C_j), C_j = κ_j M + ν_j I. For a state-space M
(:mod:`kronlik.statespace`: x_i = A_i x_{i-1} + q_i, q_i ~ N(0, κ_j Q_i), f_i = hᵀ x_i) a
Kalman filter gives ℓ_j = log N(z_j; 0, C_j) in O(T J²), all D problems side by side in one scan.
One step, for one problem (m, P the previous posterior mean and covariance):

    m⁻ = A m,   P⁻ = A P Aᵀ + κ Q,   u = P⁻ h,   S = hᵀ u + ν,   v = z - hᵀ m⁻
    m' = m⁻ + u v / S,   P' = P⁻ - u uᵀ / S,   ℓ += -½ (log S + v² / S + log 2π).

Reverse (hand-derived adjoint of that step; m̄, P̄ the adjoints of m', P', P̄ symmetric):

    ū = m̄ v / S - 2 P̄ u / S
    S̄ = (uᵀ P̄ u - v uᵀ m̄) / S² - ½ (1/S - v²/S²),   v̄ = uᵀ m̄ / S - v / S
    P̄⁻ = P̄ + ½ (ū hᵀ + h ūᵀ) + S̄ h hᵀ,   m̄⁻ = m̄ - h v̄
    ∂ℓ/∂z_i = v̄ (= -(C⁻¹ z)_i, the solve),   ∂ℓ/∂ν += S̄,   ∂ℓ/∂κ += ⟨P̄⁻, Q⟩
    m̄ ← Aᵀ m̄⁻,   P̄ ← Aᵀ P̄⁻ A,   Ā = 2 P̄⁻ A P + m̄⁻ mᵀ,   Q̄ = κ P̄⁻

The filter stores its posteriors for it (O(T J² D) memory); it costs about twice the filter.
Ā and Q̄ (summed over the D problems) are then mapped to the kernel's parameters and the
times by the derivative of the closed-form map (τ, θ) ↦ (A(τ), P∞ - A P∞ Aᵀ), one step at a
time with no recursion in it (``jax.vjp`` of :func:`kronlik.statespace.generators`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Steps per loop iteration: the recursions are a few flops per step, so the loop's own overhead
# would dominate; unrolling lets XLA fuse several steps (measured: 2-3x at T = 10⁵ on CPU). It
# multiplies compile time about 3x under second derivatives, so the test suite sets
# KRONLIK_SCAN_UNROLL=1 (read once, at import; the same per-step arithmetic).
_UNROLL = int(os.environ.get("KRONLIK_SCAN_UNROLL", "8"))

# Layout: the D problems (or N columns) are the LAST axis, states (J, D) and covariances
# (J, J, D), and every product is written as a broadcast multiply and a sum over a small axis
# (J ≤ a few). XLA fuses those into one elementwise loop per step; batched matmul/einsum over
# (D, J, J) calls a tiny GEMM per step instead (measured 5-6x slower at T = 10⁵, D = 8, J = 2).


def _mv(a: Array, x: Array) -> Array:
    """A x for A (J, K) and x (K, D): (J, D)."""
    return jnp.sum(a[:, :, None] * x[None, :, :], axis=1)


def _mtv(a: Array, x: Array) -> Array:
    """Aᵀ x for A (K, J) and x (K, D): (J, D)."""
    return jnp.sum(a[:, :, None] * x[:, None, :], axis=0)


def _mm(a: Array, p: Array) -> Array:
    """A P for A (J, K) and P (K, L, D): (J, L, D)."""
    return jnp.sum(a[:, :, None, None] * p[None, :, :, :], axis=1)


def _mmt(p: Array, a: Array) -> Array:
    """P Aᵀ for P (J, K, D) and A (L, K): (J, L, D)."""
    return jnp.sum(p[:, None, :, :] * a[None, :, :, None], axis=2)


def _sym(p: Array) -> Array:
    return 0.5 * (p + jnp.swapaxes(p, 0, 1))


class Filtered(NamedTuple):
    """The filter's output: ℓ_j for each problem and, if stored, what the reverse pass reads."""

    loglik: Array  # (D,) ℓ_j = log N(z_j; 0, κ_j M + ν_j I)
    s_min: Array  # (D,) min_i S_i / (κ_j hᵀP∞h + ν_j): how resolved the innovations are
    m_prev: Array | None  # (T, J, D) posterior mean after step i - 1 (0 before the first)
    p_prev: Array | None  # (T, J, J, D) posterior covariance after step i - 1


def _predict_update(m, p, a, q, z, h, kappa, nu):
    """One step's prediction and innovation, m (J, D), p (J, J, D), z (D,)."""
    mp = _mv(a, m)
    ap = _mm(a, p)
    pp = _mmt(ap, a) + q[:, :, None] * kappa[None, None, :]
    u = jnp.sum(pp * h[None, :, None], axis=1)  # P⁻ h (P⁻ symmetric)
    s = jnp.sum(u * h[:, None], axis=0) + nu
    v = z - jnp.sum(mp * h[:, None], axis=0)
    return mp, ap, pp, u, s, v


def _filter_sequential(z: Array, a: Array, q: Array, h, kappa: Array, nu: Array, store: bool) -> Filtered:
    """ℓ_j for z (T, D) with transitions a (T, J, J), process covariances κ_j q (T, J, J), noise ν_j."""
    T, D = z.shape
    J = a.shape[-1]
    h = jnp.asarray(h, z.dtype)
    scale = kappa * (h @ q[0] @ h) + nu  # prior variance of each observation: κ_j k(0) + ν_j
    log2pi = math.log(2.0 * math.pi)

    def step(carry, inp):
        m, p, ll, s_min = carry
        a_i, q_i, z_i = inp
        mp, _, pp, u, s, v = _predict_update(m, p, a_i, q_i, z_i, h, kappa, nu)
        m_new = mp + u * (v / s)[None, :]
        p_new = _sym(pp - u[:, None, :] * u[None, :, :] / s[None, None, :])
        ll = ll - 0.5 * (jnp.log(s) + v * v / s + log2pi)
        # The reverse pass recomputes the prediction from these: storing A P, u, S, v as well
        # was measured slower (memory traffic costs more than the flops here).
        out = (m, p) if store else None
        return (m_new, p_new, ll, jnp.minimum(s_min, s / scale)), out

    init = (
        jnp.zeros((J, D), z.dtype),
        jnp.zeros((J, J, D), z.dtype),
        jnp.zeros((D,), z.dtype),
        jnp.full((D,), jnp.inf, z.dtype),
    )
    (_, _, ll, s_min), out = jax.lax.scan(step, init, (a, q, z), unroll=_UNROLL)
    return Filtered(ll, s_min, *(out if store else (None, None)))


class Reversed(NamedTuple):
    """The filter's adjoint for ℓ = Σ_j ℓ_j."""

    z: Array  # (T, D) ∂ℓ_j/∂z_ij = -(C_j⁻¹ z_j)_i
    kappa: Array  # (D,) ∂ℓ_j/∂κ_j
    nu: Array  # (D,) ∂ℓ_j/∂ν_j
    a: Array  # (T, J, J) Σ_j ∂ℓ_j/∂A_i
    q: Array  # (T, J, J) Σ_j ∂ℓ_j/∂Q_i
    upper: Array | None  # (T, D) Σ_{k>i} M_ik z̄_k (z̄ = the first field), if p_inf_h was given


def _reverse_sequential(
    z: Array, a: Array, q: Array, h, kappa: Array, nu: Array, f: Filtered, p_inf_h: Array | None = None
) -> Reversed:
    """The hand-derived reverse pass (module docstring), from the filter's stored posteriors.

    Given p_inf_h = P∞ h, it also returns the strictly upper part of M z̄ for the z̄ it produces:
    M_ik = hᵀ A_k ⋯ A_{i+1} P∞ h for k > i, so u_i = Σ_{k>i} M_ik z̄_k = (P∞h)ᵀ g_i with
    g_{i-1} = A_iᵀ (h z̄_i + g_i), a recursion that runs backward with the pass itself. Then
    z̄ᵀ M z̄ = k(0) z̄ᵀ z̄ + z̄ᵀ u + uᵀ z̄ without a separate M z̄ (matmul_sorted's two scans).
    """
    T, D = z.shape
    J = a.shape[-1]
    h = jnp.asarray(h, z.dtype)
    hc = h[:, None]
    upper = p_inf_h is not None
    phc = None if not upper else jnp.asarray(p_inf_h, z.dtype)[:, None]

    def step(carry, inp):
        mbar, pbar, kbar, nbar, g = carry
        a_i, q_i, z_i, m, p = inp
        _, ap, _, u, s, v = _predict_update(m, p, a_i, q_i, z_i, h, kappa, nu)
        mpbar, ppbar, vbar, sbar, abar, qbar, kbar_i = reverse_local(mbar, pbar, m, q_i, ap, u, s, v, h, kappa)
        kbar = kbar + kbar_i
        nbar = nbar + sbar
        mbar_prev = _mtv(a_i, mpbar)
        pbar_prev = _mtv_cov(a_i, ppbar)
        if upper:
            u_i = jnp.sum(phc * g, axis=0)
            g = _mtv(a_i, g + hc * vbar[None, :])
        else:
            u_i = None
        return (mbar_prev, pbar_prev, kbar, nbar, g), (vbar, abar, qbar, u_i)

    init = (
        jnp.zeros((J, D), z.dtype),
        jnp.zeros((J, J, D), z.dtype),
        jnp.zeros((D,), z.dtype),
        jnp.zeros((D,), z.dtype),
        jnp.zeros((J, D), z.dtype) if upper else None,
    )
    (_, _, kbar, nbar, _), (zbar, abar, qbar, u) = jax.lax.scan(
        step, init, (a, q, z, f.m_prev, f.p_prev), reverse=True, unroll=_UNROLL
    )
    return Reversed(zbar, kbar, nbar, abar, qbar, u)


def reverse_local(mbar, pbar, m, q_i, ap, u, s, v, h, kappa):
    """One step of the reverse pass without its propagation (module docstring).

    From m̄, P̄ (the adjoints of step i's posterior, (J, D) and (J, J, D)), the previous posterior
    mean m and step i's prediction (A P, u = P⁻h, S, v): (m̄⁻, P̄⁻, v̄, S̄, Ā_i, Q̄_i, ⟨P̄⁻, Q_i⟩).
    The sequential pass propagates m̄ ← Aᵀ m̄⁻, P̄ ← Aᵀ P̄⁻ A itself; the parallel one
    (:mod:`kronlik._kalman_parallel`) has m̄, P̄ for every step from associative scans first.
    """
    hc = h[:, None]
    inv_s = 1.0 / s
    um = jnp.sum(u * mbar, axis=0)
    pu = jnp.sum(pbar * u[None, :, :], axis=1)
    upu = jnp.sum(u * pu, axis=0)
    ubar = mbar * (v * inv_s)[None, :] - 2.0 * pu * inv_s[None, :]
    sbar = (upu - v * um) * inv_s * inv_s - 0.5 * (inv_s - v * v * inv_s * inv_s)
    vbar = (um - v) * inv_s
    ppbar = pbar + 0.5 * (ubar[:, None, :] * hc[None] + hc[:, None] * ubar[None, :, :])
    ppbar = ppbar + sbar[None, None, :] * (h[:, None] * h[None, :])[:, :, None]
    mpbar = mbar - hc * vbar[None, :]
    # Ā = Σ_d 2 P̄⁻ A P + m̄⁻ mᵀ, with A P from the recomputed prediction
    abar = 2.0 * jnp.sum(ppbar[:, :, None, :] * ap[None, :, :, :], axis=(1, 3))
    abar = abar + jnp.sum(mpbar[:, None, :] * m[None, :, :], axis=2)
    qbar = jnp.sum(ppbar * kappa[None, None, :], axis=2)
    return mpbar, ppbar, vbar, sbar, abar, qbar, jnp.sum(ppbar * q_i[:, :, None], axis=(0, 1))


def _mtv_cov(a: Array, pbar: Array) -> Array:
    """Aᵀ P̄ A for A (J, J) and P̄ (J, J, D)."""
    left = jnp.sum(a[:, :, None, None] * pbar[:, None, :, :], axis=0)  # (Aᵀ P̄)[j, l]
    return jnp.sum(left[:, :, None, :] * a[None, :, :, None], axis=1)


def matmul(g, X: Array) -> Array:
    """M X for the state-space M of generators ``g`` (sorted rows), X (T, N): O(T J N).

    M_ik = hᵀ A_{i←k} P∞ h for i ≥ k (A_{i←k} = A_i ⋯ A_{k+1}) and symmetric: the lower part by
    s_i = A_i s_{i-1} + P∞ h x_i (M X)_i ∋ hᵀ s_i, the strictly upper part by the transposed
    recursion from the end. X is given and returned in the user's row order.
    """
    out = matmul_sorted(g, X[g.order])
    return jnp.zeros_like(out).at[g.order].set(out)


def matmul_sorted(g, x: Array, method: str | None = None) -> Array:
    """M X with the rows of X (T, N) in sorted-time order (see :func:`matmul`), by the recursions
    ``method`` names (as :func:`kalman_filter`)."""
    if _parallel(method):
        from ._kalman_parallel import matmul_sorted as parallel

        return parallel(g, x)
    return _matmul_sequential(g, x)


def _matmul_sequential(g, x: Array) -> Array:
    T, N = x.shape
    h = jnp.asarray(g.h, x.dtype)
    ph = g.p_inf @ h
    hc, phc = h[:, None], ph[:, None]

    def lower(s, inp):
        a_i, x_i = inp
        s = _mv(a_i, s) + phc * x_i[None, :]
        return s, jnp.sum(hc * s, axis=0)

    J = h.shape[0]
    zero = jnp.zeros((J, N), x.dtype)
    _, low = jax.lax.scan(lower, zero, (g.a, x), unroll=_UNROLL)
    # step i needs A_{i+1} and x_{i+1}: shift by one (the last row has no successor)
    a_next = jnp.concatenate([g.a[1:], jnp.zeros((1, J, J), x.dtype)])
    x_next = jnp.concatenate([x[1:], jnp.zeros((1, N), x.dtype)])

    def upper_step(r, inp):
        a_n, x_n = inp
        r = _mtv(a_n, r + hc * x_n[None, :])
        return r, jnp.sum(phc * r, axis=0)

    _, up = jax.lax.scan(upper_step, zero, (a_next, x_next), reverse=True, unroll=_UNROLL)
    return low + up


def pair_log_det(a: Array, q: Array, h, kc: Array, rc: Array) -> Array:
    """log det of the joint covariance of two problems sharing M, for n pairs side by side.

    Problem pair (j, k) coupled as [[κ_j M + ν_j I, c₁ M + c₂ I], [c₁ M + c₂ I, κ_k M + ν_k I]]:
    kc = [[κ_j, c₁], [c₁, κ_k]] and rc = [[ν_j, c₂], [c₂, ν_k]], each (2, 2, n). A Kalman filter on
    the joint state (2J) without data: Σ_i log det S_i (S_i the 2×2 innovation covariance). Only
    its derivatives at c = 0 are used (:func:`pair_traces`), so kc and rc need not be PSD.
    """
    J = a.shape[-1]
    n = kc.shape[-1]
    h = jnp.asarray(h, kc.dtype)

    def step(p, inp):  # p (2, J, 2, J, n): the joint posterior covariance, blocks (b, c)
        a_i, q_i = inp
        # broadcast products summed over one small axis (fused elementwise loops, as above)
        ap = jnp.sum(a_i[None, :, :, None, None, None] * p[:, None], axis=2)  # (I₂ ⊗ A) P
        pp = jnp.sum(ap[:, :, :, None] * a_i[None, None, None, :, :, None], axis=4)
        pp = pp + kc[:, None, :, None, :] * q_i[None, :, None, :, None]
        u = jnp.sum(pp * h[None, None, None, :, None], axis=3)  # P⁻ Hᵀ, H = I₂ ⊗ hᵀ: (2, J, 2, n)
        s = jnp.sum(u * h[None, :, None, None], axis=1) + rc
        det = s[0, 0] * s[1, 1] - s[0, 1] * s[1, 0]
        inv = jnp.stack([jnp.stack([s[1, 1], -s[0, 1]]), jnp.stack([-s[1, 0], s[0, 0]])]) / det[None, None, :]
        gain = jnp.sum(u[:, :, :, None, :] * inv[None, None], axis=2)
        p_new = pp - jnp.sum(gain[:, :, None, None] * u[None, None], axis=4)
        return 0.5 * (p_new + jnp.transpose(p_new, (2, 3, 0, 1, 4))), jnp.log(det)

    p0 = jnp.zeros((2, J, 2, J, n), kc.dtype)
    # not unrolled: unrolling was measured no faster here, and compile time matters
    _, log_dets = jax.lax.scan(step, p0, (a, q))
    return jnp.sum(log_dets, axis=0)


def pair_traces(a: Array, q: Array, h, kappa: Array, nu: Array) -> tuple[Array, Array, Array]:
    """Ω₀, Ω₁, Ω₂ (D, D), (Ω_p)_jk = tr(C_j⁻¹ M C_k⁻¹ ...) for j ≠ k (zero on the diagonal):

        Ω₀_jk = tr(C_j⁻¹ C_k⁻¹),  Ω₁_jk = tr(C_j⁻¹ M C_k⁻¹),  Ω₂_jk = tr(M C_j⁻¹ M C_k⁻¹),

    C_j = κ_j M + ν_j I. With c = (c₁, c₂) the coupling of :func:`pair_log_det`,
    ∂² log det / ∂c_a ∂c_b at c = 0 is -tr(A⁻¹ E_a A⁻¹ E_b) = -2 tr(C_j⁻¹ E_a' C_k⁻¹ E_b') for
    E₁' = M, E₂' = I: forward over forward mode through the filter, O(T J³) per pair and D(D-1)/2
    pairs. The second derivatives in K and the noise (Hessian-vector products) need these.
    """
    D = kappa.shape[0]
    j, k = np.triu_indices(D, 1)
    n = j.shape[0]
    zero = jnp.zeros((n,), kappa.dtype)
    one = jnp.ones((n,), kappa.dtype)

    def log_det(c1, c2):
        kc = jnp.stack([jnp.stack([kappa[j], c1]), jnp.stack([c1, kappa[k]])])
        rc = jnp.stack([jnp.stack([nu[j], c2]), jnp.stack([c2, nu[k]])])
        return pair_log_det(a, q, h, kc, rc)

    def second(inner, outer):
        def first(c1, c2):
            return jax.jvp(log_det, (c1, c2), inner)[1]

        return -0.5 * jax.jvp(first, (zero, zero), outer)[1]

    # the three (inner, outer) direction pairs (c₂c₂, c₁c₂, c₁c₁) batched into one pass of the scan
    inner1 = jnp.stack([zero, one, one])
    inner2 = jnp.stack([one, zero, zero])
    outer1 = jnp.stack([zero, zero, one])
    outer2 = jnp.stack([one, one, zero])
    traces = jax.vmap(lambda i1, i2, o1, o2: second((i1, i2), (o1, o2)))(inner1, inner2, outer1, outer2)
    out = []
    for p in range(3):
        w = jnp.zeros((D, D), kappa.dtype).at[j, k].set(traces[p])
        out.append(w + w.T)
    return tuple(out)


# -- which recursions run: sequential scans, or associative scans of O(log T) depth ------------
# A StateSpace form carries its choice (``scan``, static); the entry points that trace a form's
# recursions enter recursions_of(form), and the functions below read it (or take ``method``).

SCAN_METHODS = ("auto", "sequential", "parallel")
_ENV = "KRONLIK_STATESPACE_SCAN"
_active: contextvars.ContextVar[str | None] = contextvars.ContextVar("kronlik_statespace_scan", default=None)


def checked_scan(method: str, what: str) -> str:
    if method not in SCAN_METHODS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, SCAN_METHODS))}; got {method!r}")
    return method


def scan_method(setting: str = "auto") -> str:
    """The recursions a :class:`~kronlik.StateSpace` with ``scan=setting`` runs: ``"sequential"``
    or ``"parallel"``.

    ``"sequential"``: ``lax.scan`` over the T steps, O(T J² D) work in T dependent steps, the
    fastest on a CPU. ``"parallel"``: ``lax.associative_scan``, O(T J³ D) work in O(log T)
    dependent rounds, for accelerators, where a sequential scan runs one step (or one unrolled
    group) per kernel launch. ``"auto"`` is the environment variable ``KRONLIK_STATESPACE_SCAN``
    if set, else sequential where JAX's default backend is the CPU and parallel elsewhere; it is
    resolved when a function is traced.
    """
    setting = checked_scan(setting, "the scan setting")
    if setting == "auto":
        setting = checked_scan(os.environ.get(_ENV, "auto"), _ENV)
    if setting == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "parallel"
    return setting


@contextlib.contextmanager
def recursions_of(form):
    """Trace the recursions of ``form`` (a StateSpace) by its ``scan`` in this block."""
    token = _active.set(scan_method(getattr(form, "scan", "auto")))
    try:
        yield
    finally:
        _active.reset(token)


def _parallel(method: str | None) -> bool:
    return (method or _active.get() or scan_method()) == "parallel"


def kalman_filter(
    z: Array, a: Array, q: Array, h, kappa: Array, nu: Array, store: bool, method: str | None = None
) -> Filtered:
    """ℓ_j for z (T, D) with transitions a (T, J, J), process covariances κ_j q (T, J, J), noise ν_j,
    by the recursions ``method`` names (default: the form's being traced, :func:`recursions_of`)."""
    if _parallel(method):
        from ._kalman_parallel import kalman_filter as parallel

        return parallel(z, a, q, h, kappa, nu, store)
    return _filter_sequential(z, a, q, h, kappa, nu, store)


def kalman_reverse(
    z: Array,
    a: Array,
    q: Array,
    h,
    kappa: Array,
    nu: Array,
    f: Filtered,
    p_inf_h: Array | None = None,
    method: str | None = None,
) -> Reversed:
    """The filter's hand-derived adjoint (:func:`_reverse_sequential`), by the recursions ``method``
    names (as :func:`kalman_filter`)."""
    if _parallel(method):
        from ._kalman_parallel import kalman_reverse as parallel

        return parallel(z, a, q, h, kappa, nu, f, p_inf_h)
    return _reverse_sequential(z, a, q, h, kappa, nu, f, p_inf_h)
