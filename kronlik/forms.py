r"""The forms in which M can be given, and what each contributes to the one structured core.

Every form is a small NamedTuple of arrays (so a pytree: it passes through ``jax.jit``,
``jax.vmap`` and ``jax.grad``, whose cotangent for it has the same form) with these methods:

* ``arrays()``: its arrays by name (``"M"``, ``"M.vectors"``, ...), for dtype checks and messages;
* ``check_shape(y_shape)``: raise ``ValueError`` at trace time unless it is (T, T) for Y of shape (T, D);
* ``eigenbasis(eigh_dtype)``: the :class:`Basis` M = V diag(λ) Vᵀ with V of orthonormal columns;
  where V has fewer than T columns, M is zero on the complement of span(V) (there λ = 0); a
  form that decomposes M computes it in ``eigh_dtype`` (None: M's dtype) and rounds the result;
* ``cotangent(basis, ct)``: the form's own cotangent given ∂L/∂M as an :class:`MCotangent`;
* ``dense()``: M as a (T, T) array (for references and small problems);
* ``take(rows)``: the form of M[rows][:, rows] (rows a concrete index array; missing entries
  drop the rows of Y that are never observed);
* ``matmul(X)``, ``rotated(basis)``, ``trace()``: M X, Vᵀ M V (the diagonal, (T,), for a basis
  with V = I) and tr M as plain functions of the form's arrays. The second-order rules take the
  tangent of M along a direction, and the form's part of a Hessian-vector product, from
  ``jax.jvp`` / ``jax.grad`` of these (they are polynomial in the arrays: no eigendecomposition
  is differentiated). ``linear`` says M is linear in the arrays (its second derivative vanishes).

The core (:mod:`kronlik._core`) never looks at the form otherwise. A new form (say M = M₁ ⊗ M₂)
is one class here plus one entry in ``FORMS`` and in the conformance test's list.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "Dense",
    "EighFactor",
    "LowRank",
    "Diagonal",
    "Basis",
    "MCotangent",
    "as_form",
    "psd_tolerance",
    "resolution",
]


def psd_tolerance(n: int, dtype) -> float:
    r"""Relative backward error below which a negative eigenvalue of an n×n PSD factor is round-off.

    ``min(10·sqrt(n)·eps, sqrt(eps))``: a symmetric matrix assembled in floating point (a kernel matrix, GGᵀ/m)
    and eigendecomposed by a backward-stable solver has computed eigenvalues within
    ‖ΔA‖ ≈ c·sqrt(n)·eps·‖A‖ of a PSD matrix, with c ≈ 0.05–0.25 measured on RBF, Matérn and
    GGᵀ matrices for n = 50…4000 in float32 and float64; 10 leaves a margin of 40×. The cap
    sqrt(eps) (3.5e-4 in float32, 1.5e-8 in float64) keeps an eigenvalue of -0.1 % of ‖A‖ from
    ever counting as round-off, whatever n. A negative eigenvalue within the tolerance is set to
    zero (a backward perturbation of A of that size); a more negative one makes the likelihood
    NaN and :func:`kronlik.validate` raise.
    """
    eps = float(jnp.finfo(dtype).eps)
    return min(10.0 * math.sqrt(n) * eps, math.sqrt(eps))


def resolution(n: int, dtype) -> float:
    """Relative size below which an eigenvalue of an n×n factor cannot be told from zero: psd_tolerance / 10.

    About four times the largest round-off eigenvalue measured (see :func:`psd_tolerance`).
    Such eigenvalues are kept as computed (zeroing them would cost accuracy in float32), but a
    direction of U whose every term is unresolved (noise zero there too) makes U numerically
    singular, and the likelihood NaN.
    """
    return psd_tolerance(n, dtype) / 10.0


def _clip_psd(lam: Array, dtype=None) -> tuple[Array, Array, Array]:
    """(eigenvalues with round-off negatives set to 0, 'finite and PSD to round-off', 'resolved from 0').

    ``dtype`` is the precision the matrix is known to (default: that of ``lam``).
    """
    n, dtype = lam.shape[0], dtype or lam.dtype
    scale = jnp.max(jnp.abs(lam))
    ok = jnp.all(lam >= -psd_tolerance(n, dtype) * scale) & jnp.isfinite(scale)  # False for NaN too
    return jnp.maximum(lam, 0.0), ok, lam > resolution(n, dtype) * scale


def _sym(a: Array) -> Array:
    return 0.5 * (a + a.T)


def _orthonormal(vectors: Array) -> Array:
    """Whether VᵀV = I to round-off, probed in O(T²) with one fixed vector x: ‖VᵀVx - x‖ ≤ tol ‖x‖.

    A non-orthonormal V makes every formula of the core wrong while staying finite, so it is part
    of the validity flag. For VᵀV ≠ I, (VᵀV - I) x = 0 only on a null set of x; this x (a
    deterministic quasi-random vector) is not chosen by the caller.
    """
    T = vectors.shape[0]
    x = jnp.sin(jnp.arange(1, T + 1, dtype=vectors.dtype) * 0.7548776662466927)  # a plastic-number sequence
    resid = vectors.T @ (vectors @ x) - x
    tol = 10.0 * psd_tolerance(T, vectors.dtype)
    return (jnp.linalg.norm(resid) <= tol * jnp.linalg.norm(x)) & jnp.all(jnp.isfinite(vectors))


class Basis(NamedTuple):
    """M = V diag(λ) Vᵀ (+ zeros on the complement of span(V) when V has r < T columns)."""

    vectors: Array | None  # (T, r) orthonormal columns; None means V = I (M is diagonal)
    lam: Array  # (r,) eigenvalues, round-off negatives set to 0
    ok: Array  # () bool: finite and PSD to round-off (psd_tolerance)
    resolved: Array  # (r,) bool: λ_t > resolution · max λ (told apart from zero)
    lam_min: Array  # () the smallest eigenvalue before clipping, for validate's message

    def rotate(self, Y: Array) -> Array:
        """Vᵀ Y, shape (r, D)."""
        return Y if self.vectors is None else self.vectors.T @ Y

    def unrotate(self, X: Array) -> Array:
        """V X, shape (T, D)."""
        return X if self.vectors is None else self.vectors @ X

    def num_complement(self) -> int:
        """T - r: how many eigenvalues of M are zero outside span(V) (a static int)."""
        return 0 if self.vectors is None else self.vectors.shape[0] - self.vectors.shape[1]


class MCotangent(NamedTuple):
    r"""g·∂L/∂M, described so that each form can use it without forming what it does not need.

    With R = unvec(U⁻¹v) P (T, D) the solve in the noise-balanced basis and A = Vᵀ R:

        g·∂L/∂M = h (R diag(κ) Rᵀ - V diag(a) Vᵀ - c₀ (I - V Vᵀ)),

    where R diag(κ) Rᵀ = W K Wᵀ, a_t = Σ_j κ_j / E_tj, c₀ = Σ_j κ_j / ν_j (a on the complement)
    and h = g/2 (already NaN when the value is NaN).
    """

    r: Array  # (T, D)
    a_rot: Array  # (r, D) Vᵀ R
    kappa: Array  # (D,)
    a: Array  # (r,)
    c0: Array  # ()
    h: Array  # ()

    def rotated(self) -> Array:
        """Vᵀ (g·∂L/∂M) V = h (A diag(κ) Aᵀ - diag(a)), shape (r, r)."""
        return self.h * (_sym((self.a_rot * self.kappa[None, :]) @ self.a_rot.T) - jnp.diag(self.a))

    def rotated_diagonal(self) -> Array:
        """diag(Vᵀ (g·∂L/∂M) V), shape (r,), without the (r, r) matrix."""
        return self.h * ((self.a_rot * self.a_rot) @ self.kappa - self.a)


class Dense(NamedTuple):
    """M as a (T, T) array: eigendecomposed by ``eigh`` on every call (kronlik wraps arrays in this)."""

    matrix: Array

    def arrays(self) -> dict[str, Array]:
        return {"M": self.matrix}

    def check_shape(self, y_shape: tuple[int, int]) -> None:
        T = y_shape[0]
        if self.matrix.shape != (T, T):
            raise ValueError(
                f"M must have shape (T, T) = {(T, T)} to match Y of shape {y_shape}; got {self.matrix.shape}"
            )

    def eigenbasis(self, eigh_dtype=None) -> Basis:
        dtype = self.matrix.dtype
        lam, q = jnp.linalg.eigh(self.matrix.astype(eigh_dtype or dtype))  # symmetrises, as cholesky does
        # round-off is judged in M's own dtype: its entries are only known to that precision
        clipped, ok, resolved = _clip_psd(lam, dtype)
        return Basis(q.astype(dtype), clipped.astype(dtype), ok, resolved, lam[0].astype(dtype))

    def cotangent(self, basis: Basis, ct: MCotangent) -> Dense:
        # One T×T×D and one T×T×T product: the second is the price of a dense output of rank T.
        g = (ct.r * ct.kappa[None, :]) @ ct.r.T - (basis.vectors * ct.a[None, :]) @ basis.vectors.T
        return Dense((0.5 * ct.h) * (g + g.T))  # symmetric to the last bit, one pass over T×T

    def dense(self) -> Array:
        return self.matrix

    linear = True

    def matmul(self, X: Array) -> Array:
        return 0.5 * (self.matrix @ X + self.matrix.T @ X)  # the symmetrised M, as eigh sees it

    def rotated(self, basis: Basis) -> Array:
        return basis.vectors.T @ self.matmul(basis.vectors)

    def trace(self) -> Array:
        return jnp.trace(self.matrix)

    def take(self, rows) -> Dense:
        return Dense(self.matrix[rows][:, rows])


class EighFactor(NamedTuple):
    """M = vectors @ diag(values) @ vectors.T, as :func:`kronlik.factorize` returns it.

    Pass it wherever an M is accepted to skip the O(T³) eigendecomposition of a fixed M (in a
    fitting loop, or for many Y), and differentiate with respect to its two arrays if you
    parametrise M by them: the cotangent is ∂L/∂values = diag(Vᵀ G V) and
    ∂L/∂vectors = 2 G V diag(values), G = ∂L/∂M.
    """

    vectors: Array  # (T, T), orthonormal columns
    values: Array  # (T,), non-negative; NaN if the M it came from was not PSD

    def arrays(self) -> dict[str, Array]:
        return {"M.vectors": self.vectors, "M.values": self.values}

    def check_shape(self, y_shape: tuple[int, int]) -> None:
        T = y_shape[0]
        if self.vectors.shape != (T, T) or self.values.shape != (T,):
            raise ValueError(
                f"an EighFactor for M must have vectors {(T, T)} and values {(T,)} to match Y of shape {y_shape}; "
                f"got {self.vectors.shape} and {self.values.shape}"
            )

    def eigenbasis(self, eigh_dtype=None) -> Basis:
        clipped, ok, resolved = _clip_psd(self.values)
        return Basis(self.vectors, clipped, ok & _orthonormal(self.vectors), resolved, jnp.min(self.values))

    def cotangent(self, basis: Basis, ct: MCotangent) -> EighFactor:
        rotated = ct.rotated()  # Vᵀ G V
        return EighFactor(2.0 * (basis.vectors @ (rotated * basis.lam[None, :])), jnp.diagonal(rotated))

    def dense(self) -> Array:
        return (self.vectors * self.values[None, :]) @ self.vectors.T

    linear = False

    def matmul(self, X: Array) -> Array:
        return self.vectors @ (self.values[:, None] * (self.vectors.T @ X))

    def rotated(self, basis: Basis) -> Array:
        vv = basis.vectors.T @ self.vectors
        return (vv * self.values[None, :]) @ vv.T

    def trace(self) -> Array:
        return jnp.sum((self.vectors * self.vectors) @ self.values)

    def take(self, rows) -> Dense:
        v = self.vectors[rows]  # not orthonormal any more: the submatrix, dense
        return Dense((v * self.values[None, :]) @ v.T)


def singular_basis(u: Array, sv: Array, factor: Array) -> Basis:
    """M = G Gᵀ's basis from the thin SVD G = U diag(s) Wᵀ (computed in any dtype): V = U, λ = s², in G's dtype."""
    u, sv = u.astype(factor.dtype), sv.astype(factor.dtype)
    lam = sv * sv
    ok = jnp.all(jnp.isfinite(lam)) & jnp.all(jnp.isfinite(u))
    resolved = lam > resolution(max(factor.shape), lam.dtype) * jnp.max(lam)
    return Basis(u, lam, ok, resolved, jnp.min(lam))


class LowRank(NamedTuple):
    """M = G Gᵀ given by its (T, r) factor G, typically r ≪ T (markers, random features).

    A thin SVD G = U_g S V_gᵀ gives the basis (λ = S², zero on the complement of span(G)), so the
    likelihood costs O(T r² + r³ + D³ + T D (r + D)) time and O(T (r + D)) memory, and its
    cotangent is LowRank(∂L/∂G) with ∂L/∂G = 2 (∂L/∂M) G, never forming a T×T matrix.
    """

    factor: Array  # (T, r)

    def arrays(self) -> dict[str, Array]:
        return {"M.factor": self.factor}

    def check_shape(self, y_shape: tuple[int, int]) -> None:
        T = y_shape[0]
        if self.factor.ndim != 2 or self.factor.shape[0] != T or self.factor.shape[1] == 0:
            raise ValueError(
                f"a LowRank M needs a factor G of shape (T, r) = ({T}, r >= 1) to match Y of shape {y_shape}; "
                f"got {self.factor.shape}"
            )

    def eigenbasis(self, eigh_dtype=None) -> Basis:
        u, sv, _ = jnp.linalg.svd(self.factor.astype(eigh_dtype or self.factor.dtype), full_matrices=False)
        return singular_basis(u, sv, self.factor)

    def cotangent(self, basis: Basis, ct: MCotangent) -> LowRank:
        # 2 G_M G with G_M = h (R diag(κ) Rᵀ - V diag(a) Vᵀ - c₀ (I - V Vᵀ)); no T×T matrix.
        # G = V VᵀG exactly (V spans range G), so the complement term is 0 and RᵀG = (VᵀR)ᵀ VᵀG.
        # Both taken in the basis: formed from G itself, R's and the complement's parts cancel to
        # O(1)·eps·‖G‖ against a true gradient of O(1/‖G‖), a relative error eps·‖G‖² (measured:
        # 25 at ‖G‖ = 1e8 against 60-digit arithmetic) — a finite wrong number.
        vtg = basis.vectors.T @ self.factor
        g = (ct.r * ct.kappa[None, :]) @ (ct.a_rot.T @ vtg) - basis.vectors @ (ct.a[:, None] * vtg)
        return LowRank(2.0 * ct.h * g)

    def dense(self) -> Array:
        return self.factor @ self.factor.T

    linear = False

    def matmul(self, X: Array) -> Array:
        return self.factor @ (self.factor.T @ X)

    def rotated(self, basis: Basis) -> Array:
        vg = basis.vectors.T @ self.factor
        return vg @ vg.T

    def trace(self) -> Array:
        return jnp.sum(self.factor * self.factor)

    def take(self, rows) -> LowRank:
        return LowRank(self.factor[rows])


class Diagonal(NamedTuple):
    """M = diag(values): already in its eigenbasis (Y rotated once by a fixed M's eigenvectors).

    The per-step form of a fitting loop: ``loglik_diag(fm.vectors.T @ Y, Diagonal(fm.values), K, s)``
    equals ``loglik_diag(Y, M, K, s)`` at O(TD² + D³) a call.
    """

    values: Array  # (T,)

    def arrays(self) -> dict[str, Array]:
        return {"M.values": self.values}

    def check_shape(self, y_shape: tuple[int, int]) -> None:
        T = y_shape[0]
        if self.values.shape != (T,):
            raise ValueError(
                f"a Diagonal M needs values of shape (T,) = ({T},) to match Y of shape {y_shape}; "
                f"got {self.values.shape}"
            )

    def eigenbasis(self, eigh_dtype=None) -> Basis:
        return Basis(None, *_clip_psd(self.values), jnp.min(self.values))

    def cotangent(self, basis: Basis, ct: MCotangent) -> Diagonal:
        return Diagonal(ct.rotated_diagonal())

    def dense(self) -> Array:
        return jnp.diag(self.values)

    linear = True

    def matmul(self, X: Array) -> Array:
        return self.values[:, None] * X

    def rotated(self, basis: Basis) -> Array:
        return self.values  # V = I: the diagonal of a diagonal matrix

    def trace(self) -> Array:
        return jnp.sum(self.values)

    def take(self, rows) -> Diagonal:
        return Diagonal(self.values[rows])


from .sharding import ShardedLowRank  # noqa: E402  (it builds on LowRank and Basis above)
from .statespace import StateSpace  # noqa: E402  (it uses psd_tolerance above, lazily)

FORMS = (Dense, EighFactor, LowRank, Diagonal, StateSpace, ShardedLowRank)
LOW_RANK_FORMS = (LowRank, ShardedLowRank)  # M = G Gᵀ: a thin basis of span(G)


def as_form(M) -> Dense | EighFactor | LowRank | Diagonal | StateSpace | ShardedLowRank:
    """A registered form as is; anything else is taken as a dense (T, T) array."""
    return M if isinstance(M, FORMS) else Dense(jnp.asarray(M))
