"""Eager input validation: the exception that ``jax.jit`` cannot raise, from the likelihood's own flags.

:func:`validate` runs the very factorisation and forward pass that the likelihood runs (the same
compiled functions), reads the same :class:`kronlik._core.Flags`, and only then explains a failed
flag with numbers. So there is no input that it accepts while the likelihood is NaN, or refuses
while the likelihood is finite.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_eigh_dtype, prepare
from ._core import factor, forward, solve_in_pencil_basis
from ._noise import FullNoise, LogVarNoise
from .forms import Dense, EighFactor, psd_tolerance, resolution
from .statespace import StateSpace

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Validation:
    """What :func:`validate` measured on inputs that passed: how accurate kronlik is on them.

    ``amplification`` = max_tj (λ_max κ_j + ν_j) / E_tj ≥ 1 is how much an error of eps·λ_max in
    an eigenvalue of M (what any eigendecomposition of M commits) is magnified in the E_tj that
    the value and gradients divide by.

    ``error_bound`` = amplification · eps_eigh + (4 sqrt(amplification) + 10 + a_KΣ) · eps
    estimates the relative error of the worst term of L, with eps_eigh that of the dtype M is
    eigendecomposed in and eps that of the inputs. The square root is the rotation of Y into M's
    eigenbasis, whose error in a direction of small E_tj is divided by sqrt(E_tj);
    a_KΣ = max_tj ((λ_t/α) ‖K̂‖ + ‖Σ̂‖) ‖p̃_j‖² / E_tj is the same amplification for a normwise
    round-off perturbation of K and of a full Σ (diagonal noise enters exactly), large where K is
    nearly singular in a direction the noise barely covers. The constants are calibrated on
    ``benchmarks/float32_accuracy.py``, where every measured error is below its estimate; the
    error of L itself is usually 10–1000× smaller, since errors in many terms average.

    ``gradient_error_bound`` multiplies it by the cancellation in the gradients, each a
    difference of a data term and a log-det term (∂L/∂Σ = ½ (C - B), likewise for K and M, the
    last in M's eigenbasis): the largest (‖data‖ + ‖logdet‖) / ‖data - logdet‖ in the max norm,
    large near a maximum of L; plus the sensitivity of the data terms W K Wᵀ and Wᵀ M W to the
    same round-off in K and M, large when W is large where K or M is nearly zero.

    Both are measured as an absolute error E against the computed gradient ĝ, E / max|ĝ| = x;
    the bound reported is x / (1 - x), since the exact gradient is at least max|ĝ| - E, and
    ``inf`` once x ≥ 1: then ĝ may be all round-off and no digit of it is reliable (near a
    maximum of L, or where W is large in a direction M or K annihilates: exact duplicate times
    with a nearly noise-free output make ∂L/∂K round-off, the dense Cholesky's too).

    For a :class:`~kronlik.StateSpace` M the amplification is the filter's (the largest
    (ρ_j λ_max(M)/α + ν_j) / S_min,j, S_min,j the smallest innovation variance of pencil problem
    j), and the cancellation is measured in the pencil basis and rotated back by |P| (an entry of
    K̂ or Ŝ in that basis carries round-off relative to its two terms, and ∂L/∂K = P K̂ Pᵀ sums them).

    Large values come from a smooth M (tiny eigenvalues) with K large against the noise;
    float64, or ``eigh_dtype="float64"`` with float32 inputs (mixed precision), brings them down.
    """

    dtype: str
    amplification: float
    error_bound: float
    gradient_error_bound: float

    def __str__(self) -> str:
        if math.isfinite(self.gradient_error_bound):
            gradients = f"gradients to about {self.gradient_error_bound:.1e} (relative)"
        else:
            gradients = "gradients with no reliable digit (their estimated error exceeds them)"
        return (
            f"valid ({self.dtype}); eigenvalue error amplification {self.amplification:.3g}: terms of L accurate "
            f"to about {self.error_bound:.1e}, {gradients}"
        )


def _gradient_bound(x: float) -> float:
    """The relative error of a gradient g from x = (estimated absolute error E) / max|ĝ|, ĝ the
    computed gradient: max|g| ≥ max|ĝ| - E, so E / max|g| ≤ x / (1 - x), and there is no bound
    (inf) once E reaches max|ĝ|, where ĝ may be all round-off (dividing by ĝ alone would
    understate the error exactly where it is largest)."""
    return x / (1.0 - x) if x < 1.0 else math.inf


def _concrete(name: str, a: Array) -> np.ndarray:
    if isinstance(a, jax.core.Tracer):
        raise TypeError(
            f"kronlik.validate needs concrete arrays (it raises eagerly); {name} is traced. "
            "Call it outside jax.jit/vmap/grad; inside, loglik returns NaN for bad input."
        )
    return np.asarray(a)


@partial(jax.jit, static_argnums=4)
def _factor_and_forward(Y, form, K, noise, eigh_dtype):
    f = factor(form, K, noise, eigh_dtype)
    s = forward(Y, f)
    lam_max = jnp.max(f.basis.lam)
    top = (lam_max / f.alpha) * f.pencil.rho[None, :] + f.pencil.nu[None, :]
    amplification = jnp.max(top * f.inv_e)
    # ∂L/∂Σ = ½ (C - B) in the pencil basis: C = P RᵀR Pᵀ, B = P diag(b) Pᵀ.
    r = solve_in_pencil_basis(f, s)
    b = jnp.sum(f.inv_e, axis=0) + (f.num_complement() / f.pencil.nu if f.num_complement() else 0.0)
    rtr = r.T @ r
    c_mat = f.pencil.p @ rtr @ f.pencil.p.T
    b_mat = (f.pencil.p * b[None, :]) @ f.pencil.p.T
    # in the max norm, as gradients are compared; and on the weighted diagonal, ∂L/∂s for log_var
    ps, weight = f.pencil.p_scaled, f.pencil.noise_weight
    c_diag = weight * jnp.sum((ps @ rtr) * ps, axis=1)
    b_diag = weight * ((ps * ps) @ b)
    # ... and in ∂L/∂K = P ½ (Aᵀ diag(λ) A - diag(c)) Pᵀ and Vᵀ(∂L/∂M)V = ½ (A diag(κ) Aᵀ - diag(a))
    lam, kappa = f.basis.lam, f.pencil.kappa
    k_data = f.pencil.p @ (s.a.T @ (lam[:, None] * s.a)) @ f.pencil.p.T
    k_logdet = (f.pencil.p * (lam @ f.inv_e)[None, :]) @ f.pencil.p.T
    m_data = (s.a * kappa[None, :]) @ s.a.T
    m_logdet = jnp.diag(f.inv_e @ kappa)

    def ratio(data, logdet):
        return (jnp.max(jnp.abs(data)) + jnp.max(jnp.abs(logdet))) / jnp.max(jnp.abs(data - logdet))

    cancellation = jnp.max(
        jnp.stack(
            [
                ratio(c_mat, b_mat),
                jnp.max(c_diag + b_diag) / jnp.max(jnp.abs(c_diag - b_diag)),
                ratio(k_data, k_logdet),
                ratio(m_data, m_logdet),
            ]
        )
    )
    # The pencil is backward stable in K and Σ normwise: a perturbation of eps·‖K̂‖ (eps·‖Σ̂‖ for a
    # full Σ; diagonal noise is exact) moves ρ_j (ν_j) by that times ‖p̃_j‖², and E_tj by λ_t/α
    # times the first. Large where K is nearly singular in a direction the noise barely covers.
    norms = jnp.sum(f.pencil.p_scaled**2, axis=0)
    k_scale, s_scale = f.pencil.k_trace, f.pencil.noise_trace
    shift = ((lam / f.alpha)[:, None] * k_scale + s_scale) * norms[None, :]
    pencil_amplification = jnp.max(shift * f.inv_e)
    if f.num_complement():
        pencil_amplification = jnp.maximum(pencil_amplification, jnp.max(s_scale * norms / f.pencil.nu))
    # The data terms of the gradients, against the same perturbations: R diag(κ) Rᵀ in ∂L/∂M moves
    # by max_t R_tj² δκ_j, Aᵀ diag(λ) A in ∂L/∂K by eps·λ_max·AᵀA (per eps of the input dtype, and
    # of the eigh dtype); large when W is large where K or M is nearly zero.
    g_m = 0.5 * jnp.max(jnp.abs(m_data - m_logdet))
    g_k = 0.5 * jnp.max(jnp.abs(k_data - k_logdet))
    sens_m = 0.5 * jnp.max(jnp.max(r * r, axis=0) * k_scale * norms / f.alpha) / g_m
    sens_k = 0.5 * jnp.max(lam) * jnp.max(jnp.abs(f.pencil.p @ (s.a.T @ s.a) @ f.pencil.p.T)) / g_k
    return f, s, amplification, cancellation, pencil_amplification, sens_m, sens_k


def _smallest_eig(a: np.ndarray) -> tuple[float, float]:
    w = np.linalg.eigvalsh(0.5 * (a + a.T).astype(np.float64))
    return float(w[0]), float(np.max(np.abs(w)))


def validate(
    Y: Array,
    M,
    K: Array,
    Sigma: Array | None = None,
    *,
    log_var: Array | None = None,
    eigh_dtype: str | None = None,
    mask=None,
    warn: bool = True,
) -> Validation:
    """Raise ``ValueError`` naming the input that makes the likelihood undefined, and by how much.

    Pass the noise as ``Sigma`` (D, D) for :func:`kronlik.loglik`, or as ``log_var=`` (D,) for
    :func:`kronlik.loglik_diag`; M as an array or any form (:class:`kronlik.EighFactor`,
    :class:`kronlik.LowRank`, :class:`kronlik.Diagonal`). The likelihood is defined (finite)
    exactly when all of these hold, checked in this order:

    * every entry of Y, M, K and the noise is finite;
    * M is positive semi-definite up to the round-off allowance ``psd_tolerance(T, dtype)``
      (a negative eigenvalue down to -10·sqrt(T)·eps·max|λ| counts as zero); for an
      :class:`~kronlik.EighFactor`, also its vectors are orthonormal;
    * αK + Σ is positive definite (α the mean eigenvalue of M);
    * K and Σ are positive semi-definite up to ``psd_tolerance(D, dtype)``, measured in the basis
      that diagonalises both (so a negative direction of K counts against K's own scale there);
    * U = M ⊗ K + I ⊗ Σ is positive definite: no E_tj = λ_t κ_j + ν_j is zero (for example Σ is
      singular in a direction where M has a zero eigenvalue);
    * the value does not overflow.

    Non-symmetric M, K or Σ pass with a warning (kronlik uses their symmetric parts). Pass the
    ``eigh_dtype`` you give the likelihood: it changes the accuracy estimate, not the flags.

    Returns:
      A :class:`Validation` with the estimated accuracy in this dtype; with ``warn`` (default)
      a ``UserWarning`` is also issued when its error bound exceeds 1e-3.

    Eager only: under ``jax.jit`` the likelihood signals the same failures with NaN.
    """
    if (Sigma is None) == (log_var is None):
        raise TypeError("validate needs exactly one of Sigma (D, D) or log_var= (D,)")
    model = FullNoise if log_var is None else LogVarNoise
    Y, form, K, noise = prepare(Y, M, K, Sigma if log_var is None else log_var, model)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != Y.shape:
            raise ValueError(f"mask must be a boolean array of Y's shape {Y.shape}; got {mask.dtype} {mask.shape}")
        Y = jnp.where(mask, Y, jnp.zeros((), Y.dtype))  # missing cells do not enter L
        if mask.all():
            mask = None
    named = {"Y": Y, **form.arrays(), "K": K, model.name: noise[0]}
    named = {n: _concrete(n, a) for n, a in named.items()}

    for n, a in named.items():
        bad = ~np.isfinite(a)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{n} has {int(bad.sum())} non-finite entries (NaN or inf), the first at index {first}")

    if isinstance(form, StateSpace):
        if mask is not None:
            return _validate_statespace_masked(Y, form, K, noise, model, mask, warn)
        return _validate_statespace(Y, form, K, noise, model, named, warn)
    eigh_dtype = check_eigh_dtype(eigh_dtype)
    f, s, amplification, cancellation, pencil_amplification, sens_m, sens_k = _factor_and_forward(
        Y, form, K, noise, eigh_dtype
    )
    flags = jax.tree_util.tree_map(bool, f.flags)
    dtype = Y.dtype
    T, D = Y.shape

    if isinstance(form, EighFactor):
        # The likelihood probes VᵀV = I with one fixed vector (O(T²)); here the whole of it (O(T³)),
        # so vectors made orthonormal on that probe alone are refused too.
        V = named["M.vectors"].astype(np.float64)
        off = float(np.max(np.abs(V.T @ V - np.eye(T))))
        if off > 10 * psd_tolerance(T, dtype):
            raise ValueError(f"M.vectors is not orthonormal: max |VᵀV - I| = {off:.3g}")

    if not flags.m_psd:
        lam = np.asarray(f.basis.lam)
        # (lam is clipped at 0: for a negative definite M its largest magnitude is |λ_min|)
        low = float(f.basis.lam_min)
        scale = max(float(np.max(np.abs(lam))) if lam.size else 0.0, abs(low))
        allowed = psd_tolerance(T, dtype) * scale
        if isinstance(form, Dense):
            name, what = "M", "is not positive semi-definite: smallest eigenvalue"
        else:
            name, what = next(reversed(form.arrays())), "has a negative eigenvalue"  # M.values
        raise ValueError(
            f"{name} {what} {low:.6g} (largest magnitude {scale:.6g}); the round-off allowance is "
            f"-{allowed:.3g} = -10·sqrt(T)·eps·max|λ|"
        )

    k_low, k_scale = _smallest_eig(named["K"])
    if model is FullNoise:
        s_low, s_scale = _smallest_eig(named["Sigma"])
    else:
        with np.errstate(over="ignore"):
            s_low, s_scale = (float(np.exp(f(named["log_var"]))) for f in (np.min, np.max))
    noise_word = "Sigma" if model is FullNoise else "diag(exp(log_var))"
    allowed = psd_tolerance(D, dtype)
    for flag, name, low, scale in ((flags.k_psd, "K", k_low, k_scale), (flags.noise_psd, noise_word, s_low, s_scale)):
        if not flag:
            raise ValueError(
                f"{name} is not positive semi-definite: smallest eigenvalue {low:.6g} (largest magnitude "
                f"{scale:.6g}; relative {low / scale:.3g}, beyond the round-off allowance -{allowed:.3g} "
                "= -10·sqrt(D)·eps)"
            )
    if not flags.s_pd:
        raise ValueError(
            f"αK + Σ is not positive definite (α = {float(f.alpha):.6g}, the mean eigenvalue of M), so neither is "
            f"U: K has smallest eigenvalue {k_low:.6g} (largest magnitude {k_scale:.6g}), {noise_word} "
            f"{s_low:.6g} (largest magnitude {s_scale:.6g})"
        )
    if not flags.u_pd:
        e_min = float(jnp.min(f.e))
        raise ValueError(
            f"U = M ⊗ K + I ⊗ Σ is singular: the smallest E_tj = λ_t κ_j + ν_j is {e_min:.3g} "
            f"(M's smallest eigenvalue {float(f.basis.lam_min):.3g}, {noise_word}'s {s_low:.3g}): the noise "
            "vanishes in a direction where M ⊗ K does too"
        )
    if not bool(s.ok):
        raise ValueError(f"the log-likelihood overflows in {dtype.name} (|L| too large to represent)")

    for n in ("M", "K", "Sigma"):
        a = named.get(n)
        if a is not None and a.ndim == 2:
            asym = float(np.max(np.abs(a - a.T)))
            if asym > psd_tolerance(a.shape[0], dtype) * float(np.max(np.abs(a))):
                warnings.warn(
                    f"{n} is not symmetric (max |{n} - {n}ᵀ| = {asym:.3g}); kronlik uses (A + Aᵀ)/2",
                    stacklevel=2,
                )
    amp = float(amplification)
    # The eigendecomposition's error, amplified; the rotations of Y and W in the inputs' dtype, whose
    # error in a small-E direction is amplified by the square root; the rest at ~10 eps.
    eps = float(jnp.finfo(dtype).eps)
    bound = amp * float(jnp.finfo(eigh_dtype or dtype).eps) + (4 * amp**0.5 + 10 + float(pencil_amplification)) * eps
    eps_eigh = float(jnp.finfo(eigh_dtype or dtype).eps)
    sensitivity = float(sens_m) * eps + float(sens_k) * eps_eigh
    report = Validation(dtype.name, amp, bound, _gradient_bound(bound * float(cancellation) + sensitivity))
    if warn and report.error_bound > 1e-3:
        warnings.warn(
            f"kronlik in {dtype.name} on these inputs: {report}. Use float64, or "
            "eigh_dtype='float64' (kronlik's mixed precision: M's eigendecomposition in float64).",
            stacklevel=2,
        )
    return report


@jax.jit
def _statespace_forward(Y, form, K, noise):
    from ._kalman import recursions_of

    with recursions_of(form):  # the recursions the likelihood runs for this form
        return _statespace_forward_traced(Y, form, K, noise)


def _statespace_forward_traced(Y, form, K, noise):
    from ._kalman import kalman_reverse, matmul_sorted
    from ._statespace_core import ss_factor, ss_forward

    f = ss_factor(form, K, noise)
    s = ss_forward(Y, f, store=True)
    pencil = f.pencil
    # The filter is backward stable: its errors are a perturbation of M of relative size ~eps
    # (and the rounding of the times, eps·max|t| against the kernel's fastest rate ‖F‖), which
    # C_j = ρ_j M/α + ν_j I amplifies by (ρ_j λ_max(M)/α + ν_j) / S_min,j, S_min,j ≥ ν_j the
    # smallest innovation variance (a pivot of C_j's block LDLᵀ; prior variance ρ_j + ν_j = 1).
    # λ_max(M) by 30 steps of power iteration, O(T) each.
    T = Y.shape[0]
    lam_max, time_scale = _kernel_scales(form, f.g, Y.dtype)
    alpha = form.variance()
    conditioning = (pencil.rho * lam_max / alpha + pencil.nu) / s.filtered.s_min
    amplification = jnp.max(conditioning) * time_scale
    # The pencil's normwise round-off in K and a full Σ moves ρ_j, ν_j by eps·trace·‖p̃_j‖², and
    # C_j = ρ_j M/α + ν_j I by that times ‖C_j⁻¹ M/α‖ ≤ min(1/ρ_j, T/ν_j) and ‖C_j⁻¹‖ ≤ 1/ν_j.
    norms = jnp.sum(pencil.p_scaled**2, axis=0)
    on_k = jnp.minimum(1.0 / pencil.rho, T / pencil.nu)
    pencil_amplification = jnp.max(norms * (pencil.k_trace * on_k + pencil.noise_trace / pencil.nu))
    # Cancellation in the gradients, each a data term minus a log-det term. In the pencil basis
    # ∂L/∂K = P K̂ Pᵀ with K̂ = ½ RᵀMR - ½ diag(tr C_j⁻¹ M) and ∂L/∂Σ = P Ŝ Pᵀ with
    # Ŝ = ½ RᵀR - ½ diag(tr C_j⁻¹). Each entry of K̂, Ŝ carries round-off relative to its two terms,
    # and the rotation back by P sums such entries: the error is bounded by |P| (|data| + |logdet|) |Pᵀ|
    # entrywise, against the gradient itself in the max norm (as gradients are compared).
    rv = kalman_reverse(s.z, f.g.a, f.g.q, f.g.h, pencil.kappa, pencil.nu, s.filtered)
    r = -rv.z
    mr = matmul_sorted(f.g, r)
    k_data = 0.25 * (r.T @ mr + mr.T @ r)  # ½ RᵀMR, symmetrised
    s_data = 0.5 * (r.T @ r)
    k_logdet = jnp.diag(jnp.diagonal(k_data) - rv.kappa)
    s_logdet = jnp.diag(jnp.diagonal(s_data) - rv.nu)
    p, absp = pencil.p, jnp.abs(pencil.p)
    ps, abs_ps = pencil.p_scaled, jnp.abs(pencil.p_scaled)

    grad_k = p @ (k_data - k_logdet) @ p.T  # ∂L/∂K, as the reverse pass's map back forms it

    def ratio(data, logdet, q, abs_q, diagonal, grad=None):
        err = abs_q @ (jnp.abs(data) + jnp.abs(logdet)) @ abs_q.T
        grad = q @ (data - logdet) @ q.T if grad is None else grad
        if diagonal:  # ∂L/∂s = weight ⊙ diag(P̃ Ŝ P̃ᵀ) for log-variances
            err, grad = (pencil.noise_weight * jnp.diagonal(x) for x in (err, grad))
        return jnp.max(err) / jnp.max(jnp.abs(grad))

    def per_problem(data, grad):  # each pencil problem's own ∂ℓ_j/∂κ_j, ∂ℓ_j/∂ν_j: the kernel's gradients
        return jnp.max((jnp.abs(data) + jnp.abs(data - grad)) / jnp.abs(grad))  # sum these over j

    cancellation = jnp.max(
        jnp.stack(
            [
                ratio(k_data, k_logdet, p, absp, False, grad_k),
                ratio(s_data, s_logdet, p, absp, False),
                ratio(s_data, s_logdet, ps, abs_ps, True),
                per_problem(jnp.diagonal(k_data), rv.kappa),
                per_problem(jnp.diagonal(s_data), rv.nu),
            ]
        )
    )
    # The data term RᵀMR against the perturbation of M that the filter commits (eps·λ_max(M)):
    # |δ(r_jᵀ M r_k)| ≤ eps·λ_max ‖r_j‖ ‖r_k‖, rotated back by |P|; large when W is large where M
    # nearly vanishes (duplicate times, an output with a tiny noise variance).
    norms_r = jnp.sqrt(jnp.sum(r * r, axis=0))
    sens_k = 0.5 * lam_max * jnp.max(absp @ norms_r) ** 2 / jnp.max(jnp.abs(grad_k))
    return f, s, amplification, pencil_amplification, cancellation, sens_k


def _check_kernel(form) -> None:
    if not bool(form.valid()):
        raise ValueError(
            f"the kernel's parameters are not valid: {form.kernel} (amplitudes must be ≥ 0, lengthscales, "
            "frequencies and qualities > 0, all finite)"
        )


def _kernel_scales(form, g, dtype) -> tuple[Array, Array]:
    """(λ_max(M) by 30 steps of power iteration, O(T) each; 1 + max|t|·‖dA/dτ(0)‖, the factor by which
    the rounding of the times, eps·max|t| against the kernel's fastest rate, enters)."""
    from ._kalman import matmul_sorted

    v = jnp.ones((form.times.shape[0], 1), dtype)
    v = jax.lax.fori_loop(0, 30, lambda _, v: (w := matmul_sorted(g, v)) / jnp.max(jnp.abs(w)), v)
    lam_max = jnp.max(jnp.abs(matmul_sorted(g, v))) / jnp.max(jnp.abs(v))
    rate = jnp.max(jnp.abs(jax.jvp(form.kernel.transition, (jnp.zeros((), dtype),), (jnp.ones((), dtype),))[1]))
    return lam_max, 1.0 + jnp.max(jnp.abs(form.times)) * rate


def _validate_statespace(Y, form, K, noise, model, named, warn) -> Validation:
    """validate for a StateSpace M: the same flags as the likelihood's O(T) path, in O(T)."""
    f, s, amplification, pencil_amplification, cancellation, sens_k = _statespace_forward(Y, form, K, noise)
    dtype = Y.dtype
    T, D = Y.shape
    _check_kernel(form)
    pencil = f.pencil
    k_low, k_scale = _smallest_eig(named["K"])
    noise_word = "Sigma" if model is FullNoise else "diag(exp(log_var))"
    allowed = psd_tolerance(D, dtype)
    for flag, name in ((pencil.ok_k, "K"), (pencil.ok_noise, noise_word)):
        if not bool(flag):
            raise ValueError(f"{name} is not positive semi-definite (beyond the round-off allowance -{allowed:.3g})")
    if not bool(pencil.ok_s):
        raise ValueError(
            f"αK + Σ is not positive definite (α = k(0) = {float(form.variance()):.6g}), so neither is U: K has "
            f"smallest eigenvalue {k_low:.6g} (largest magnitude {k_scale:.6g})"
        )
    s_min = float(jnp.min(s.filtered.s_min))
    if not bool(s.ok):
        if not s_min > resolution(T, dtype):
            raise ValueError(
                f"U = M ⊗ K + I ⊗ Σ is numerically singular: an innovation variance of the Kalman filter is "
                f"{s_min:.3g} of its prior variance (at or below round-off): the noise vanishes in a direction "
                "where M ⊗ K does too (e.g. repeated times with a noise-free output)"
            )
        raise ValueError(f"the log-likelihood overflows in {dtype.name} (|L| too large to represent)")
    amp, eps = float(amplification), float(jnp.finfo(dtype).eps)
    bound = (amp + 10 + float(pencil_amplification)) * eps
    report = Validation(dtype.name, amp, bound, _gradient_bound(bound * float(cancellation) + float(sens_k) * eps))
    if warn and report.error_bound > 1e-3:
        warnings.warn(f"kronlik in {dtype.name} on these inputs: {report}. Use float64.", stacklevel=3)
    return report


def _validate_statespace_masked(Y, form, K, noise, model, mask, warn) -> Validation:
    """validate for a StateSpace M with cells missing: the joint-state filter's flags and accuracy."""
    from ._kalman_joint import joint_reverse
    from ._statespace_masked import _psd, _run, joint_problem

    dtype = Y.dtype
    T, D = Y.shape
    _check_kernel(form)
    p = joint_problem(Y, form, K, noise, jnp.asarray(mask))
    allowed = psd_tolerance(D, dtype)
    noise_word = "Sigma" if model is FullNoise else "diag(exp(log_var))"
    for a, name in ((p.k, "K"), (p.sigma, noise_word)):
        if not bool(_psd(a)):
            raise ValueError(f"{name} is not positive semi-definite (beyond the round-off allowance -{allowed:.3g})")
    value, f, ok = _run(p, store=True)
    resolved = float(f.resolved)
    if not bool(ok):
        if not resolved > resolution(T, dtype):
            pivot = f"{resolved:.3g} of its cell's prior variance" if np.isfinite(resolved) else "not positive"
            raise ValueError(
                "U_oo (the covariance of the observed cells) is numerically singular: a Cholesky pivot of the "
                f"joint Kalman filter's innovation covariance is {pivot} (at or below round-off), e.g. a "
                "noise-free output observed twice at one time"
            )
        raise ValueError(f"the log-likelihood overflows in {dtype.name} (|L| too large to represent)")
    g = p.g
    lam_max, time_scale = _kernel_scales(form, g, dtype)
    amp = float(lam_max / form.variance() / f.resolved * time_scale)
    # cancellation in ∂L/∂Σ_dd = ½ (Σ_t W_td² - B_dd): data term against the gradient
    rv = joint_reverse(p.y, p.obs, g.a, g.q, g.h, p.k, p.sigma, f)
    data = 0.5 * jnp.sum(rv.y * rv.y, axis=0)
    grad = jnp.diagonal(rv.sigma)
    observed = jnp.any(p.obs, axis=0)
    cancellation = jnp.max(jnp.where(observed, (jnp.abs(data) + jnp.abs(data - grad)) / jnp.abs(grad), 1.0))
    eps = float(jnp.finfo(dtype).eps)
    bound = (amp + 10) * eps
    report = Validation(dtype.name, amp, bound, _gradient_bound(bound * float(cancellation)))
    if warn and report.error_bound > 1e-3:
        warnings.warn(f"kronlik in {dtype.name} on these inputs: {report}. Use float64.", stacklevel=3)
    return report
