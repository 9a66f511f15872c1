r"""Covariates in M's eigenbasis: generalised least squares, ML and REML, and the REML information.

The mean of vec(Y) is X vec(B) with X = [F₁ ⊗ A₁, F₂ ⊗ A₂, ...] (Fᵢ: T×cᵢ covariates, Aᵢ: D×aᵢ
trait designs; row-major vec, so vec(Fᵢ Bᵢ Aᵢᵀ) = (Fᵢ ⊗ Aᵢ) vec(Bᵢ)). In the core's basis,
(V ⊗ P)ᵀ U (V ⊗ P) = diag(E), so U^{-1/2}-whitened columns are cheap:

    X̃ = diag(E)^{-1/2} (V ⊗ P)ᵀ X,   block i = (Vᵀ Fᵢ) ⊗ (Pᵀ Aᵢ) scaled row (t, j) by E_tj^{-1/2}

(rows of the complement of span(V) have E = ν and use Fᵢ - V VᵀFᵢ), and with ỹ the same whitening
of y, XᵀU⁻¹X = X̃ᵀX̃ and XᵀU⁻¹y = X̃ᵀỹ. A thin QR X̃ = Q R (TD × q, never TD × TD) gives

    B̂ = R⁻¹ Qᵀ ỹ,  Cov(B̂) = (XᵀU⁻¹X)⁻¹ = R⁻¹R⁻ᵀ,  log det XᵀU⁻¹X = 2 Σ log |R_kk|,
    r̂ᵀU⁻¹r̂ = ‖(I - QQᵀ) ỹ‖²  (the whitened residual, an orthogonal projection: no cancellation).

Values (q = Σ cᵢaᵢ, n = TD):
    ML    L = -½ (n log 2π + log det U + r̂ᵀU⁻¹r̂)
    REML  L = -½ ((n - q) log 2π + log det U + log det XᵀU⁻¹X + r̂ᵀU⁻¹r̂)   (Harville)
          + ½ log det XᵀX                                                 (LaMotte's convention)

Gradients. B̂ maximises the ML value, so (envelope) ∂L/∂U = ½ (w wᵀ - U⁻¹) with w = U⁻¹r̂; REML
adds -½ ∂ log det XᵀU⁻¹X / ∂U = ½ U⁻¹X (XᵀU⁻¹X)⁻¹ XᵀU⁻¹ = ½ Σ_k q_k q_kᵀ, q_k = U⁻¹ X R⁻¹ e_k,
exactly the core's data-like terms (``DataTerms``): in the basis, the k-th is column k of Q
scaled by E^{-1/2}. So the core's one backward kernel gives ∂L/∂M, ∂L/∂K, ∂L/∂Σ and
∂L/∂Y = -w, with E the only denominator (exact at ties, no eigendecomposition differentiated).

REML information. With N the q columns n_k = E^{-1/2} Q_k in the basis and a direction rotating to
G(t) = λ_t K̃ + S̃ on row t (K̃ = PᵀdKP, S̃ = PᵀdΣP), ½ tr(P dᵢU P dⱼU) for P = U⁻¹ - U⁻¹X C XᵀU⁻¹ is

    ½ tr(U⁻¹dᵢU U⁻¹dⱼU) - tr(Nᵀ Gᵢ E⁻¹ Gⱼ N) + ½ tr((Nᵀ Gᵢ N)(Nᵀ Gⱼ N)),

and both correction terms are sums over t of products of K̃, S̃ with D×D×D or q×q×D×D moments of
N (:func:`reml_information_correction`): O(T q² D² + P² (D³ + q² D²)) for P directions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from ._core import DataTerms, Factors, PencilColumnTerms, Solved, log_det, noise_weights

Array = jax.Array

ML, REML, LAMOTTE = "ml", "reml", "reml-lamotte"
METHODS = (ML, REML, LAMOTTE)


class Profiled(NamedTuple):
    """B profiled out: the value, the solve of the residual, and what REML's gradient adds."""

    value: Array  # () L (ML or REML)
    solved: Solved  # the core's forward pass for r̂ = y - X B̂
    b: Array  # (q,) B̂, the blocks vec(Bᵢ) side by side
    b_cov: Array  # (q, q) Cov(B̂) = (XᵀU⁻¹X)⁻¹ (dead code unless used: XLA drops it)
    extra: DataTerms | PencilColumnTerms | None  # REML's q_k; None for ML
    q: Array | None  # (rows, q) Q of the whitened design X̃ = QR; None on the separable path
    residual: Array | None  # (rows,) (I - QQᵀ) ỹ, the whitened residual; None on the separable path


def separable(terms: tuple[tuple[Array, Array], ...]) -> bool:
    """True when every trait design is I_D and known (not traced): the GLS splits over the pencil.

    With X = F ⊗ I_D, (V ⊗ P)ᵀ X = VᵀF ⊗ Pᵀ spans the same columns as VᵀF ⊗ I_D, so in the
    pencil basis the whitened design is block diagonal: D independent (T × c) least-squares
    problems, one per column j with row weights E_tj^{-1/2} (:func:`profile`).
    """
    for _, A in terms:
        try:
            a = np.asarray(A)
        except jax.errors.TracerArrayConversionError:
            return False
        if a.ndim != 2 or a.shape[0] != a.shape[1] or not np.array_equal(a, np.eye(a.shape[0], dtype=a.dtype)):
            return False
    return True


def _whiten(f: Factors, Y: Array) -> tuple[Array, Array | None]:
    """E^{-1/2} Vᵀ Y P (r·D,) and, with a complement, (Y - VVᵀY) P / √ν (T·D,)."""
    p = f.pencil.p
    y_rot = f.basis.rotate(Y)
    main = (y_rot @ p) * jnp.sqrt(f.inv_e)
    perp = None
    if f.num_complement():
        perp = ((Y - f.basis.unrotate(y_rot)) @ p) / jnp.sqrt(f.pencil.nu)[None, :]
    return main, perp


def whitened_design(f: Factors, terms: tuple[tuple[Array, Array], ...]) -> Array:
    """X̃ = diag(E)^{-1/2} (V ⊗ P)ᵀ X, shape (r·D [+ T·D], q): column (i, c, a) is block i's F[:, c] ⊗ A[:, a]."""
    p, sq = f.pencil.p, jnp.sqrt(f.inv_e)
    blocks = []
    for F, A in terms:
        a_rot = p.T @ A  # (D, a)
        f_rot = f.basis.rotate(F)  # (r, c)
        main = f_rot[:, None, :, None] * a_rot[None, :, None, :] * sq[:, :, None, None]
        cols = main.reshape(main.shape[0] * main.shape[1], -1)
        if f.num_complement():
            f_perp = F - f.basis.unrotate(f_rot)
            perp = f_perp[:, None, :, None] * (a_rot / jnp.sqrt(f.pencil.nu)[:, None])[None, :, None, :]
            cols = jnp.concatenate([cols, perp.reshape(perp.shape[0] * perp.shape[1], -1)], axis=0)
        blocks.append(cols)
    return jnp.concatenate(blocks, axis=1)


class Cells(NamedTuple):
    """Missing cells as covariates of their own: cell k is the column f[:, k] ⊗ e_{col[k]}.

    In the original coordinates f[:, k] is the unit vector e_t of the cell's row t; in a problem
    rotated by M's eigenvectors V (:func:`kronlik.mixed.make_problem`) it is Vᵀe_t.
    """

    f: Array  # (T, m)
    col: Array  # (m,) int: the trait d of each cell


def whitened_cells(f: Factors, cells: Cells) -> Array:
    """X̃ of the cells' columns, shape (r·D [+ T·D], m), as :func:`whitened_design` for F = cells.f, A = e_d."""
    p, sq = f.pencil.p, jnp.sqrt(f.inv_e)
    a_rot = p[cells.col]  # (m, D): Pᵀ e_d
    f_rot = f.basis.rotate(cells.f)  # (r, m)
    cols = (f_rot[:, None, :] * a_rot.T[None, :, :] * sq[:, :, None]).reshape(-1, f_rot.shape[1])
    if f.num_complement():
        f_perp = cells.f - f.basis.unrotate(f_rot)
        perp = f_perp[:, None, :] * (a_rot.T / jnp.sqrt(f.pencil.nu)[:, None])[None, :, :]
        cols = jnp.concatenate([cols, perp.reshape(-1, f_rot.shape[1])], axis=0)
    return cols


def profile(
    f: Factors,
    Y: Array,
    terms: tuple[tuple[Array, Array], ...],
    method: str,
    split: bool = False,
    cells: Cells | None = None,
) -> Profiled:
    r"""GLS and the ML/REML value from the core's factors (module docstring).

    ``split`` (every trait design I_D, :func:`separable`) takes the per-column path of
    :func:`_profile_split`: O(T c² D) in place of the joint QR's O(T D q²) = O(T c² D³).

    ``cells``: m missing cells (Y holds 0 there), each a covariate of its own, QR'd first. With
    G the cells' whitened columns, pad(U_oo⁻¹) = W (I - G(GᵀG)⁻¹Gᵀ) Wᵀ for U⁻¹ = WWᵀ and
    GᵀG = (U⁻¹)_mm, so log det U_oo = log det U + log det GᵀG (Schur) = log det U + 2 Σ_{k≤m}
    log |R_kk|, and projecting the covariates after the cells is GLS on the observed cells
    (Frisch-Waugh): the observed-data ML/REML value is the complete-data one with the m cells'
    columns always "REML'd", n - m observations, B̂ and Cov(B̂) the covariates' block. The
    gradient's extra terms are the cells' m columns of Q (ML) or all m + q (REML). Exact, no
    iteration; O(T D (m + q)²) a value + gradient, O(T D (m + q)) memory.
    """
    if split and cells is None:
        return _profile_split(f, Y, terms, method)
    T, D = Y.shape
    rd = f.e.shape[0] * D
    x_w = whitened_design(f, terms)
    q = x_w.shape[1]
    m = 0
    y_main, y_perp = _whiten(f, Y)
    y_w = y_main.reshape(-1) if y_perp is None else jnp.concatenate([y_main.reshape(-1), y_perp.reshape(-1)])
    if cells is None:
        qmat, r = jnp.linalg.qr(x_w)
        r_diag, r_x = jnp.diagonal(r), r
    else:
        m = cells.f.shape[1]
        x_c = whitened_cells(f, cells)
        qmat, r_diag, r_x = _qr_cells_first(x_c, x_w)
        x_w = jnp.concatenate([x_c, x_w], axis=1)
    qty = qmat.T @ y_w
    res_w = y_w - qmat @ qty  # (I - QQᵀ) ỹ
    res_w = res_w - qmat @ (qmat.T @ res_w)  # once more: Q from CholeskyQR2 is orthonormal to rounding, not exactly
    b = jax.scipy.linalg.solve_triangular(r_x, qty[m:], lower=False)
    sq = jnp.sqrt(f.inv_e)
    a = res_w[:rd].reshape(-1, D) * sq
    a_perp = None
    if y_perp is not None:
        a_perp = res_w[rd:].reshape(T, D) / jnp.sqrt(f.pencil.nu)[None, :]
    quad = jnp.sum(res_w * res_w)
    n = T * D - m
    log_r = jnp.log(jnp.abs(r_diag))
    value = -0.5 * (log_det(f, T) + 2.0 * jnp.sum(log_r[:m]) + quad + n * math.log(2.0 * math.pi))
    n_extra = q + m if method != ML else m
    if method != ML:
        value = value - jnp.sum(log_r[m:]) + 0.5 * q * math.log(2.0 * math.pi)
    extra = None
    if n_extra:
        qk = qmat[:, :n_extra]
        qa = jnp.transpose(qk[:rd].reshape(-1, D, n_extra) * sq[:, :, None], (2, 0, 1))  # (n, r, D)
        qa_perp, qr_ = None, jax.vmap(f.basis.unrotate)(qa)
        if y_perp is not None:
            qa_perp = jnp.transpose(qk[rd:].reshape(T, D, n_extra) / jnp.sqrt(f.pencil.nu)[None, :, None], (2, 0, 1))
            qr_ = qr_ + qa_perp
        extra = DataTerms(qa, qa_perp, qr_)
    # X of full column rank: each |R_kk| resolved against its column's norm (numpy's rank rule)
    resolution = max(x_w.shape) * jnp.finfo(x_w.dtype).eps
    full_rank = jnp.all(jnp.abs(r_diag) > resolution * jnp.linalg.norm(x_w, axis=0))
    ok = f.flags.all() & full_rank & jnp.all(jnp.isfinite(Y)) & jnp.isfinite(value)
    solved = Solved(jnp.where(ok, value, jnp.nan), a, a_perp, ok)
    r_inv = jax.scipy.linalg.solve_triangular(r_x, jnp.eye(q, dtype=r_x.dtype), lower=False)
    return Profiled(solved.value, solved, b, r_inv @ r_inv.T, extra, qmat, res_w)


def _qr_cells_first(x_c: Array, x_x: Array) -> tuple[Array, Array, Array]:
    """The thin QR of [X̃_cells, X̃_x] (N × (m + q)): Q, diag R and the covariates' block R_xx.

    The cells' block by CholeskyQR2 with its columns scaled to unit norm (two Gram products and
    two triangular solves, BLAS-3: several times faster than Householder QR for m in the
    thousands), accepted when the second Gram QᵀQ is within 0.1 of I, which makes the second pass
    orthonormal to rounding (Yamamoto et al., 2015); the covariates are then projected out of it
    twice and QR'd (q columns). Otherwise, when the cells' columns are too ill-conditioned for the
    Gram (cond ≳ 1e7 after scaling), Householder QR of the whole: the same factorisation, exact.
    """
    m = x_c.shape[1]
    dtype = x_c.dtype
    scale = jnp.linalg.norm(x_c, axis=0)
    scale = jnp.where(scale > 0, scale, jnp.ones((), dtype))
    xs = x_c / scale[None, :]
    tri = jax.scipy.linalg.solve_triangular
    l1 = jnp.linalg.cholesky(xs.T @ xs)
    q1 = tri(l1, xs.T, lower=True).T
    gram = q1.T @ q1
    ok = jnp.all(jnp.isfinite(gram)) & (jnp.max(jnp.abs(gram - jnp.eye(m, dtype=dtype))) < 0.1)

    def cholesky_qr2(_):
        l2 = jnp.linalg.cholesky(gram)
        qc = tri(l2, q1.T, lower=True).T
        xp = x_x - qc @ (qc.T @ x_x)
        xp = xp - qc @ (qc.T @ xp)
        qx, rx = jnp.linalg.qr(xp)
        diag_c = jnp.diagonal(l2) * jnp.diagonal(l1) * scale  # R_c = L₂ᵀ L₁ᵀ diag(scale)
        return jnp.concatenate([qc, qx], axis=1), jnp.concatenate([diag_c, jnp.diagonal(rx)]), rx

    def householder(_):
        qmat, r = jnp.linalg.qr(jnp.concatenate([x_c, x_x], axis=1))
        return qmat, jnp.diagonal(r), r[m:, m:]

    return jax.lax.cond(ok, cholesky_qr2, householder, None)


def _profile_split(f: Factors, Y: Array, terms: tuple[tuple[Array, Array], ...], method: str) -> Profiled:
    r"""GLS with every trait design I_D: one (rows × c) QR per column j of the pencil basis.

    With F = [F₁, F₂, ...] (T × c) and the coefficients B' = B P (so that X vec(B) = (F ⊗ P⁻ᵀ) vec(B')),
    the whitened design is block diagonal: column j's block is X̃_j = E_·j^{-1/2} ⊙ VᵀF (rows of
    the complement: (F - VVᵀF)/√ν_j), and ỹ_j the same whitening of (Y P)_·j. Then

        X̃_j = Q_j R_j,   B'_·j = R_j⁻¹ Q_jᵀ ỹ_j,   r̂ᵀU⁻¹r̂ = Σ_j ‖(I - Q_jQ_jᵀ) ỹ_j‖²,
        log det XᵀU⁻¹X = Σ_j log det R_jᵀR_j + 2c log |det P| = Σ_j log det R_jᵀR_j - c log det(αK + Σ)

    (Pᵀ(αK + Σ)P = I), B = B' P⁻¹ and Cov(B_ad, B_be) = Σ_j (P⁻¹)_jd (P⁻¹)_je (R_j⁻¹R_j⁻ᵀ)_ab.
    REML's q_k are the columns of E^{-1/2} Q_j, each on column j alone (:class:`PencilColumnTerms`).
    """
    T, D = Y.shape
    F = jnp.concatenate([f_i for f_i, _ in terms], axis=1)  # (T, c)
    c = F.shape[1]
    nu = f.pencil.nu
    sq = jnp.sqrt(f.inv_e)  # (r, D)
    n_main = sq.shape[0]
    f_rot = f.basis.rotate(F)  # (r, c)
    x_w = sq.T[:, :, None] * f_rot[None, :, :]  # (D, r, c)
    y_main, y_perp = _whiten(f, Y)
    y_w = y_main.T  # (D, r)
    if y_perp is not None:
        f_perp = F - f.basis.unrotate(f_rot)
        x_w = jnp.concatenate([x_w, f_perp[None, :, :] / jnp.sqrt(nu)[:, None, None]], axis=1)
        y_w = jnp.concatenate([y_w, y_perp.T], axis=1)
    qmat, r = jnp.linalg.qr(x_w)  # (D, rows, c), (D, c, c)
    qty = jnp.einsum("jrc,jr->jc", qmat, y_w)
    b_rot = jax.vmap(lambda r_j, v: jax.scipy.linalg.solve_triangular(r_j, v, lower=False))(r, qty)  # (D, c)
    res_w = y_w - jnp.einsum("jrc,jc->jr", qmat, qty)
    a = res_w[:, :n_main].T * sq
    a_perp = None if y_perp is None else res_w[:, n_main:].T / jnp.sqrt(nu)[None, :]
    quad = jnp.sum(res_w * res_w)
    value = -0.5 * (log_det(f, T) + quad + T * D * math.log(2.0 * math.pi))
    r_diag = jnp.diagonal(r, axis1=1, axis2=2)  # (D, c)
    extra = None
    if method != ML:
        log_det_xux = 2.0 * jnp.sum(jnp.log(jnp.abs(r_diag))) - c * f.pencil.logdet_s
        value = value - 0.5 * log_det_xux + 0.5 * c * D * math.log(2.0 * math.pi)
        qa = jnp.einsum("jrc,rj->crj", qmat[:, :n_main], sq)  # (c, r, D)
        qa_perp, q_full = None, jax.vmap(f.basis.unrotate)(qa)
        if y_perp is not None:
            qa_perp = jnp.transpose(qmat[:, n_main:], (2, 1, 0)) / jnp.sqrt(nu)[None, None, :]
            q_full = q_full + qa_perp
        extra = PencilColumnTerms(qa, qa_perp, q_full)
    resolution = max(x_w.shape[1:]) * jnp.finfo(x_w.dtype).eps
    full_rank = jnp.all(jnp.abs(r_diag) > resolution * jnp.linalg.norm(x_w, axis=1))
    ok = f.flags.all() & full_rank & jnp.all(jnp.isfinite(Y)) & jnp.isfinite(value)
    solved = Solved(jnp.where(ok, value, jnp.nan), a, a_perp, ok)
    # back from B' = B P to B, and Cov(vec B) (row-major, c·D × c·D)
    p_inv = jnp.linalg.solve(f.pencil.p, jnp.eye(D, dtype=Y.dtype))
    b = (b_rot.T @ p_inv).reshape(-1)
    eye = jnp.eye(c, dtype=Y.dtype)
    r_inv = jax.vmap(lambda r_j: jax.scipy.linalg.solve_triangular(r_j, eye, lower=False))(r)
    cov_rot = jnp.einsum("jak,jbk->jab", r_inv, r_inv)  # (D, c, c)
    b_cov = jnp.einsum("jd,je,jab->adbe", p_inv, p_inv, cov_rot).reshape(c * D, c * D)
    return Profiled(solved.value, solved, b, b_cov, extra, None, None)


def reml_information_correction(f: Factors, extra: DataTerms, k_rot: Array, s_rot: Array) -> Array:
    """-tr(Nᵀ Gᵢ E⁻¹ Gⱼ N) + ½ tr((NᵀGᵢN)(NᵀGⱼN)) for P directions K̃ᵢ, S̃ᵢ (P, D, D) (module docstring)."""
    lam, h = f.basis.lam, f.inv_e
    a = extra.a  # (q, r, D): n_k on the rows of span(V)
    nn = jnp.einsum("krd,kre->rde", a, a)
    psi = [jnp.einsum("r,rd,ref->def", lam**pw, h, nn) for pw in (0, 1, 2)]
    phi0 = jnp.einsum("krd,lre->klde", a, a)
    phi1 = jnp.einsum("krd,r,lre->klde", a, lam, a)
    if extra.a_perp is not None:  # the complement: λ = 0, E = ν
        ap = extra.a_perp
        psi[0] = psi[0] + jnp.einsum("d,tef->def", 1.0 / f.pencil.nu, jnp.einsum("kte,ktf->tef", ap, ap))
        phi0 = phi0 + jnp.einsum("ktd,lte->klde", ap, ap)
    t2 = (
        jnp.einsum("ide,jdf,def->ij", k_rot, k_rot, psi[2])
        + jnp.einsum("ide,jdf,def->ij", k_rot, s_rot, psi[1])
        + jnp.einsum("ide,jdf,def->ij", s_rot, k_rot, psi[1])
        + jnp.einsum("ide,jdf,def->ij", s_rot, s_rot, psi[0])
    )
    sandwich = jnp.einsum("ide,klde->ikl", k_rot, phi1) + jnp.einsum("ide,klde->ikl", s_rot, phi0)
    t3 = jnp.einsum("ikl,jlk->ij", sandwich, sandwich)
    corr = -t2 + 0.5 * t3
    return 0.5 * (corr + corr.T)


def split_information(f: Factors, extra: PencilColumnTerms | None, unit: Array) -> Array:
    r"""The ML or REML expected information over (vech K, vech Σ) when the GLS is split by column.

    Every term of the information is a sum over the pencil's (j, k) pairs, ½ tr(U⁻¹dᵢU U⁻¹dⱼU) =
    Σ_jk [½Ω₂ K̃ᵢK̃ⱼ + ½Ω₁ (K̃ᵢS̃ⱼ + S̃ᵢK̃ⱼ) + ½Ω₀ S̃ᵢS̃ⱼ]_jk (:func:`kronlik._core.noise_weights`),
    and with the q_k of :class:`PencilColumnTerms` the REML corrections of
    :func:`reml_information_correction` are sums of the same form: t₂ has weights
    ψ_p[j, k] = Σ_t λ_tᵖ h_tj Σ_c n_tkc², t₃ weights Ψ_xy[j, k] = Σ_cc' Φ_x[c,c',j,k] Φ_y[c,c',j,k]
    with Φ₀[c,c',j,k] = Σ_t n_tjc n_tkc', Φ₁ the same with λ_t (the sums over c, c' factor out
    because each q_k lives on one column). So the whole matrix is four weighted Gram products of
    the rotated unit directions G_a = PᵀE_aP: O(D² (D(D+1)/2)²) with no q in it.

    Args:
      unit: (n, D, D) the vech unit directions (:func:`kronlik.mixed.vech_directions`).

    Returns:
      (2n, 2n), K's directions first.
    """
    h, lam, nu, p = f.inv_e, f.basis.lam, f.pencil.nu, f.pencil.p
    _, omega0, omega1, omega2 = noise_weights(f)
    w_kk, w_ks, w_ss = 0.5 * omega2, 0.5 * omega1, 0.5 * omega0
    w_sk = w_ks
    if extra is not None:
        a = extra.a  # (c, r, D)
        n_sq = jnp.einsum("crj,crj->rj", a, a)
        psi = [(lam**pw)[:, None] * h for pw in (0, 1, 2)]
        psi = [x.T @ n_sq for x in psi]  # ψ_p[j, k] = Σ_t λᵖ h_tj n²_tk
        phi0 = jnp.einsum("crj,drk->cdjk", a, a)
        phi1 = jnp.einsum("crj,r,drk->cdjk", a, lam, a)
        if extra.a_perp is not None:  # the complement: λ = 0, E = ν
            ap = extra.a_perp
            psi[0] = psi[0] + jnp.outer(1.0 / nu, jnp.einsum("ctk,ctk->k", ap, ap))
            phi0 = phi0 + jnp.einsum("ctj,dtk->cdjk", ap, ap)
        big = lambda x, y: jnp.einsum("cdjk,cdjk->jk", x, y)  # noqa: E731
        w_kk = w_kk - psi[2] + 0.5 * big(phi1, phi1)
        w_ks = w_ks - psi[1] + 0.5 * big(phi1, phi0)
        w_sk = w_sk - psi[1] + 0.5 * big(phi0, phi1)
        w_ss = w_ss - psi[0] + 0.5 * big(phi0, phi0)
    g = jnp.einsum("dk,ide,el->ikl", p, unit, p)
    block = lambda w: jnp.einsum("ikl,jkl,kl->ij", g, g, w)  # noqa: E731
    info = jnp.block([[block(w_kk), block(w_ks)], [block(w_sk), block(w_ss)]])
    return 0.5 * (info + info.T)
