r"""Missing entries: the exact likelihood of the observed entries through the complete-data factors.

With o the observed and m the missing entries of vec(Y) (a ``mask``, True = observed), the model
of the observed entries is y_o ~ N(0, U_oo). Fill the missing entries with zeros (v₀) and write
P = U⁻¹ (applied through the complete-data factorisation), Z = P E_m (TD × m: one column per
missing entry, E_m its unit vectors), S = P_mm = E_mᵀ Z (m × m, positive definite: S⁻¹ is the
covariance of y_m given y_o, which is at least the noise). Block inversion gives

    log det U_oo = log det U + log det S
    y_oᵀ U_oo⁻¹ y_o = v₀ᵀ P v₀ - αᵀ S⁻¹ α,          α = (P v₀)_m
    pad(U_oo⁻¹ y_o) = w̃ = P v₀ - Z S⁻¹ α          (w̃_m = 0)
    pad(U_oo⁻¹)     = P - Z S⁻¹ Zᵀ,

so L_obs = -½ (log det U + log det S + y_oᵀ w̃_o + (TD - m) log 2π), and dL_obs = ½ tr((w̃w̃ᵀ - P + Z S⁻¹ Zᵀ) dU):
the complete-data backward kernel with W replaced by w̃ plus m more data-like terms q_k q_kᵀ,
q = Z L⁻ᵀ for S = L Lᵀ (their R's and A's are concatenated into the form's cotangent, since every
form uses them only as R diag(κ) Rᵀ and A diag(κ) Aᵀ). No derivative of an eigendecomposition,
no TD×TD matrix: Z is built in M's eigenbasis (each column E⁻¹ ⊙ (Vᵀe_t ⊗ Pᵀe_d)), at
O(m T D (r + D)) time, plus O(m² T D + m³) to form S, q and the Cholesky, and O(m T D) memory.
The missing set is padded to a static size (``size``); padded slots have zero columns and an
identity block in S, so they change nothing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve, solve_triangular

from ._core import DataTerms, Factors, Solved, forward, log_det, solve_in_pencil_basis

Array = jax.Array


class Missing(NamedTuple):
    """Where the missing entries are: the mask and the padded list of (row, column) pairs."""

    mask: Array  # (T, D) bool, True = observed
    row: Array  # (size,) int: t of each missing entry (0 in padded slots)
    col: Array  # (size,) int: d of each missing entry (0 in padded slots)
    valid: Array  # (size,) bool: the slot holds a missing entry
    fits: Array  # () bool: the number of missing entries is at most size
    guarded: Array  # () bool: traced mask, nothing dropped: NaN where eps·cond(U) > sqrt(eps)

    @property
    def size(self) -> int:
        return self.row.shape[0]


def missing_entries(mask, shape: tuple[int, int], max_missing: int | None) -> Missing | None:
    """The :class:`Missing` of a (T, D) boolean ``mask``, or None when nothing is missing.

    A concrete mask gives the exact count as the static size; a traced one (inside ``jit`` or
    ``vmap``) needs ``max_missing``, and more missing entries than that make the value NaN.
    """
    concrete = _concrete(mask)
    mask = jnp.asarray(mask) if concrete is None else concrete
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be a boolean array (True = observed); got dtype {mask.dtype}")
    if mask.shape != tuple(shape):
        raise ValueError(f"mask must have the shape of Y, {tuple(shape)}; got {mask.shape}")
    if max_missing is not None:
        if not isinstance(max_missing, (int, np.integer)) or isinstance(max_missing, bool) or max_missing < 0:
            raise ValueError(f"max_missing must be a non-negative int; got {max_missing!r}")
    if concrete is not None and not np.any(~concrete):
        return None
    if max_missing is not None:
        size = int(max_missing)
    elif concrete is None:
        raise ValueError(
            "mask is traced (inside jit or vmap), so the number of missing entries is not known "
            "when the program is built: pass max_missing=<an int at least that number> (a static "
            "bound; more missing entries than that give NaN)"
        )
    else:
        size = int(np.sum(~concrete))
    mask = jnp.asarray(mask)
    flat = jnp.reshape(~mask, (-1,))
    (idx,) = jnp.nonzero(flat, size=size, fill_value=0)
    count = jnp.sum(flat)
    valid = jnp.arange(size) < count
    D = shape[1]
    return Missing(mask, idx // D, idx % D, valid, count <= size, jnp.asarray(concrete is None))


class MaskedSolved(NamedTuple):
    """The forward pass with missing entries: ``solved`` holds w̃ (in place of W), ``q`` the extra terms."""

    solved: Solved  # value L_obs, A and A_⊥ of w̃, ok
    q_a: Array  # (size, r, D) Vᵀ q_k P
    q_perp: Array | None  # (size, T, D) the complement part of q_k P
    chol: Array  # (size, size) L with S = L Lᵀ
    a_unit: Array  # (size, r, D) Vᵀ Z_i P in the pencil basis: E⁻¹ ⊙ (Vᵀ e_t ⊗ Pᵀ e_d)
    perp_unit: Array | None  # (size, T) the part of e_t outside span(V)


def _unrotate_stack(f: Factors, a: Array) -> Array:
    """V A_i for a stack (n, r, D) → (n, T, D), in one product."""
    n, r, D = a.shape
    flat = f.basis.unrotate(jnp.transpose(a, (1, 0, 2)).reshape(r, n * D))
    return jnp.transpose(flat.reshape(-1, n, D), (1, 0, 2))


def masked_forward(Y: Array, f: Factors, miss: Missing, apply_u) -> MaskedSolved:
    """L_obs and w̃ (module docstring) from the complete-data factors.

    ``apply_u(W)`` = unvec(U vec(W)) computed from M, K and Σ themselves: w̃ gets one step of
    iterative refinement with it. The Schur formula subtracts Z S⁻¹ α from P v₀, which cancel
    where a missing entry's noise is far below the observed entries' (P_mm ≫ U_oo⁻¹); the
    residual y_o - U_oo w̃_o, computed without P, gives those digits back.
    """
    T, D = Y.shape
    dtype = Y.dtype
    p, nu = f.pencil.p, f.pencil.nu
    zero = jnp.zeros((), dtype)
    y0 = jnp.where(miss.mask, Y, zero)
    valid = miss.valid.astype(dtype)
    onehot = (jnp.arange(T)[:, None] == miss.row[None, :]).astype(dtype) * valid[None, :]  # (T, size)
    unit_rot = f.basis.rotate(onehot)  # (r, size) Vᵀ e_t
    p_rows = p[miss.col, :]  # (size, D) Pᵀ e_d
    a_unit = unit_rot.T[:, :, None] * p_rows[:, None, :] * f.inv_e[None, :, :]
    r_unit = _unrotate_stack(f, a_unit)  # (size, T, D) R of each Z_i
    perp_unit = None
    if f.num_complement():
        perp_unit = (onehot - f.basis.unrotate(unit_rot)).T  # (size, T)
        r_unit = r_unit + perp_unit[:, :, None] * (p_rows / nu[None, :])[:, None, :]
    s = (r_unit @ p.T)[:, miss.row, miss.col]  # S_ij = (Z_i)_(t_j, d_j), Z_i = unvec(U⁻¹ e_i) = R_i Pᵀ
    pair = miss.valid[:, None] & miss.valid[None, :]
    s = jnp.where(pair, 0.5 * (s + s.T), jnp.eye(miss.size, dtype=dtype))
    chol = jnp.linalg.cholesky(s)

    def solve_observed(y_fill):
        """A and A_⊥ of pad(U_oo⁻¹ y_o) for y_fill zero at the missing entries."""
        s0 = forward(y_fill, f)
        alpha = (solve_in_pencil_basis(f, s0) @ p.T)[miss.row, miss.col] * valid
        beta = cho_solve((chol, True), alpha)  # S⁻¹ α
        a = s0.a - jnp.einsum("i,irk->rk", beta, a_unit)
        a_perp = None
        if perp_unit is not None:
            a_perp = s0.a_perp - (perp_unit.T * beta[None, :]) @ p_rows / nu[None, :]
        return s0, a, a_perp

    def unvec_w(a, a_perp):
        r = f.basis.unrotate(a) if a_perp is None else f.basis.unrotate(a) + a_perp
        return jnp.where(miss.mask, r @ p.T, zero)

    s0, a, a_perp = solve_observed(y0)
    residual = jnp.where(miss.mask, y0 - apply_u(unvec_w(a, a_perp)), zero)
    refine = jnp.all(jnp.isfinite(residual))  # (not where an overflowing eˢ makes U w̃ inf)
    _, da, da_perp = solve_observed(jnp.where(refine, residual, zero))
    a = a + da
    a_perp = None if a_perp is None else a_perp + da_perp
    logdet = log_det(f, T) + 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    quad = jnp.sum(y0 * unvec_w(a, a_perp))  # y_oᵀ U_oo⁻¹ y_o: no difference of large terms
    n_obs = T * D - jnp.sum(valid)
    value = -0.5 * (logdet + quad + n_obs * math.log(2.0 * math.pi))
    # q = Z L⁻ᵀ: Σ_k q_k q_kᵀ = Z S⁻¹ Zᵀ.
    inv_lt = solve_triangular(chol, jnp.eye(miss.size, dtype=dtype), lower=True).T
    q_a = jnp.einsum("irk,ij->jrk", a_unit, inv_lt)
    q_perp = None
    if perp_unit is not None:
        q_perp = jnp.einsum("it,ij,ik->jtk", perp_unit, inv_lt, p_rows / nu[None, :])
    # A traced mask cannot drop the rows and outputs never observed (observed_problem), so U may
    # be far worse conditioned than U_oo; the error is then bounded by eps·cond(U) only: NaN
    # rather than a number with fewer than half the digits.
    cond = jnp.max(f.e) / jnp.min(f.e)
    if f.num_complement():
        cond = jnp.maximum(jnp.max(f.e), jnp.max(nu)) / jnp.minimum(jnp.min(f.e), jnp.min(nu))
    eps = float(jnp.finfo(dtype).eps)
    trusted = ~miss.guarded | (cond * eps <= math.sqrt(eps))
    ok = s0.ok & miss.fits & trusted & jnp.all(jnp.isfinite(chol)) & jnp.isfinite(value)
    solved = Solved(jnp.where(ok, value, jnp.nan), a, a_perp, ok)
    return MaskedSolved(solved, q_a, q_perp, chol, a_unit, perp_unit)


def extra_terms(f: Factors, ms: MaskedSolved) -> DataTerms:
    """The q_k q_kᵀ terms of the gradient (module docstring) for the core's backward kernel."""
    r = _unrotate_stack(f, ms.q_a)
    return DataTerms(ms.q_a, ms.q_perp, r if ms.q_perp is None else r + ms.q_perp)


def predictive_correction(f: Factors, ms: MaskedSolved, miss: Missing, kp: Array, cross: Array, outside) -> Array:
    r"""x_ndᵀ Z S⁻¹ Zᵀ x_nd, shape (N, D): what the missing entries add back to the complete-data
    predictive variance m_n K_dd - x_ndᵀ U⁻¹ x_nd (pad(U_oo⁻¹) = U⁻¹ - Z S⁻¹ Zᵀ).

    x_ndᵀ Z_i = Σ_sj (M_× V)_ns (K P)_dj (A_i)_sj plus the complement part; ``kp`` = K P,
    ``cross`` = M_× V, ``outside`` = the part of M_× outside span(V) (or None).
    """
    g = jnp.einsum("ns,isj,dj->ndi", cross, ms.a_unit, kp)
    if outside is not None:
        p_rows = f.pencil.p[miss.col, :] / f.pencil.nu[None, :]
        g = g + jnp.einsum("ni,dj,ij->ndi", outside @ ms.perp_unit.T, kp, p_rows)
    n, d, size = g.shape
    white = solve_triangular(ms.chol, g.reshape(n * d, size).T, lower=True)
    return jnp.sum(white * white, axis=0).reshape(n, d)


class Observed(NamedTuple):
    """The problem that a concrete mask leaves: rows never observed dropped, outputs never
    observed given a benign noise variance (neither changes U_oo), and what is still missing."""

    args: tuple  # (Y, form, K, noise) of the reduced problem
    miss: Missing | None  # the missing entries left (None: none)
    rows: np.ndarray | None  # the rows kept (None: all)
    nothing_observed: bool


def _concrete(mask):
    try:  # a numpy array or a concrete JAX array (a jnp.asarray of it inside jit would be traced)
        return np.asarray(mask)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def observed_problem(args: tuple, mask, max_missing: int | None, keep_k: bool = False) -> Observed:
    r"""The observed entries' problem, made as well conditioned as U_oo allows without a TD×TD matrix.

    The Schur complement works through the complete U, whose conditioning can be far worse than
    U_oo's where whole rows or outputs are missing (a zero row of M, a near-duplicate time, a
    noise-free or singular output that is never observed). Rows of Y never observed are dropped
    (``form.take``: M[rows][:, rows], exact); an output never observed gets noise variance
    α·mean(diag K) (α = tr M / T) and no coupling in K (with ``keep_k``, for prediction, K is
    kept: the latent of that output is still predicted through it). U_oo is unchanged, and so
    are L and its gradients, which are exactly 0 in what was replaced. Needs a concrete mask; a
    traced one (with ``max_missing``) is used as it is.
    """
    Y, form, K, noise = args
    if mask is None:
        if max_missing is not None:
            raise ValueError("max_missing is given without a mask")
        return Observed(args, None, None, False)
    concrete = _concrete(mask)
    if concrete is None:
        return Observed(args, missing_entries(mask, Y.shape, max_missing), None, False)
    missing_entries(concrete, Y.shape, max_missing)  # the checks of dtype, shape and bound
    if not concrete.any():
        return Observed(args, None, None, True)
    rows = None
    if not concrete.any(axis=1).all():
        rows = np.flatnonzero(concrete.any(axis=1))
        Y, form, concrete = Y[rows], form.take(rows), concrete[rows]
    dead = ~concrete.any(axis=0)
    if dead.any():
        dtype = Y.dtype
        scale = jax.lax.stop_gradient(form.trace() / Y.shape[0] * jnp.mean(jnp.diagonal(K)))
        scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, jnp.ones((), dtype))
        noise = noise.with_outputs_replaced(dead, scale)
        if not keep_k:
            cut = dead[:, None] | dead[None, :]
            kept = jnp.where(np.eye(len(dead), dtype=bool), jax.lax.stop_gradient(K), jnp.zeros((), dtype))
            K = jnp.where(cut, kept, K)
    return Observed((Y, form, K, noise), missing_entries(concrete, Y.shape, max_missing), rows, False)
