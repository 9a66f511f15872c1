r"""Information matrices in M's eigenbasis: the expected (Fisher) and observed information.

With the factorisation of the core (:mod:`kronlik._core`), (V ⊗ P)ᵀ U (V ⊗ P) = diag(E), a
direction of the parameters moves U by dU = dM ⊗ K + M ⊗ dK + I ⊗ dΣ, which rotates to

    (V ⊗ P)ᵀ dU (V ⊗ P) = M̃ ⊗ diag(κ) + diag(λ) ⊗ K̃ + I ⊗ S̃,
    M̃ = Vᵀ dM V (r×r),  K̃ = Pᵀ dK P,  S̃ = Pᵀ dΣ P (D×D),

and the Fisher information ½ tr(U⁻¹ dᵢU U⁻¹ dⱼU) = ½ Σ_αβ (dᵢU)~_αβ (dⱼU)~_βα / (E_α E_β) becomes

    ½ [ Σ_ts M̃ⁱ_ts M̃ʲ_ts H_ts                                     H = (h·κ)(h·κ)ᵀ, h = 1/E
      + Σ_t diag(M̃ⁱ)_t (c_λ diag(K̃ʲ) + c₁ diag(S̃ʲ))_t + (i ↔ j)    c_λ = λκh², c₁ = κh²
      + Σ_kl (K̃ⁱ K̃ʲ Ω₂ + K̃ⁱ S̃ʲ Ω₁ + S̃ⁱ K̃ʲ Ω₁ + S̃ⁱ S̃ʲ Ω₀)_kl ]       Ω_p = hᵀ diag(λᵖ) h

(products of K̃, S̃ and Ω elementwise), plus, for a thin V (a :class:`~kronlik.LowRank` M), the
terms of the complement of span(V), where E = ν. Only E appears in a denominator: exact where
eigenvalues repeat, and no eigendecomposition is differentiated (the tangents of M, K and Σ
come from forward-mode derivatives of the user's covariance function, not of the factors).

For Σ = diag(eˢ) the directions are S̃ᵈ = e^{s_d} p_d p_dᵀ (p_d row d of P) and both matrices
are closed forms in O(T D³) after the factorisation; see :func:`fisher_log_var` and
:func:`hessian_log_var`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from ._checks import as_float_arrays, check_eigh_dtype, prepare
from ._core import Factors, factor, forward, nan_unless, noise_weights
from ._noise import FullNoise, LogVarNoise
from .forms import as_form
from .structured import MForm

Array = jax.Array

__all__ = ["fisher_information", "fisher_log_var", "hessian_log_var"]


def _inputs_reaching(jaxpr, out_index: int) -> set[int]:
    """The indices of a closed jaxpr's inputs on which output ``out_index`` depends (dataflow)."""
    reach = {v: {i} for i, v in enumerate(jaxpr.jaxpr.invars)}
    for eqn in jaxpr.jaxpr.eqns:  # a nested jaxpr is one equation: conservative, never wrong
        found = set().union(*(reach.get(v, set()) for v in eqn.invars if not isinstance(v, Literal)))
        for v in eqn.outvars:
            reach[v] = found
    out = jaxpr.jaxpr.outvars[out_index]
    return set() if isinstance(out, Literal) else reach.get(out, set())


def _fisher_in_basis(f: Factors, dk: Array, ds: Array, moving: Array, dm: Array) -> Array:
    """½ tr(U⁻¹ dᵢU U⁻¹ dⱼU) for P directions dK, dΣ (P, D, D); dM (Q, T, T) for the Q directions ``moving``."""
    lam, kappa, nu, p = f.basis.lam, f.pencil.kappa, f.pencil.nu, f.pencil.p
    h, omega0, omega1, omega2 = noise_weights(f)
    k_rot = jnp.einsum("dk,ide,el->ikl", p, dk, p)
    s_rot = jnp.einsum("dk,ide,el->ikl", p, ds, p)
    fisher = (
        jnp.einsum("ikl,jkl,kl->ij", k_rot, k_rot, omega2)
        + jnp.einsum("ikl,jkl,kl->ij", k_rot, s_rot, omega1)
        + jnp.einsum("ikl,jkl,kl->ij", s_rot, k_rot, omega1)
        + jnp.einsum("ikl,jkl,kl->ij", s_rot, s_rot, omega0)
    )
    if moving.size:
        v = f.basis.vectors
        m_rot = dm if v is None else jnp.einsum("ta,its,sb->iab", v, dm, v)
        hk = h * kappa[None, :]
        m_block = jnp.einsum("iab,jab,ab->ij", m_rot, m_rot, hk @ hk.T)  # (Q, Q)
        m_diag = jnp.diagonal(m_rot, axis1=1, axis2=2)  # (Q, r)
        k_diag = jnp.diagonal(k_rot, axis1=1, axis2=2)
        s_diag = jnp.diagonal(s_rot, axis1=1, axis2=2)
        hk2 = hk * h
        cross = m_diag @ ((lam[:, None] * hk2) @ k_diag.T + hk2 @ s_diag.T)  # (Q, P)
        if f.num_complement():
            # dM's parts between span(V) and its complement (where E = ν) and within the complement.
            outside = jnp.einsum("its,sb->itb", dm, v) - jnp.einsum("ta,iab->itb", v, m_rot)  # (I - VVᵀ) dM V
            left = dm - jnp.einsum("ta,ias->its", v, jnp.einsum("ta,its->ias", v, dm))
            within = left - jnp.einsum("itb,sb->its", jnp.einsum("its,sb->itb", left, v), v)  # (I-VVᵀ)dM(I-VVᵀ)
            k2_nu = kappa * kappa / nu
            m_block = m_block + 2.0 * jnp.einsum("itb,jtb,b->ij", outside, outside, h @ k2_nu)
            m_block = m_block + jnp.sum(k2_nu / nu) * jnp.einsum("its,jts->ij", within, within)
            cross = cross + jnp.outer(jnp.trace(within, axis1=1, axis2=2), s_diag @ (kappa / (nu * nu)))
        fisher = fisher.at[moving[:, None], moving[None, :]].add(m_block)
        fisher = fisher.at[moving, :].add(cross).at[:, moving].add(cross.T)
    return nan_unless(f.flags.all(), 0.25 * (fisher + fisher.T))


def fisher_information(cov_fn: Callable[[Any], tuple], params: Any, *, eigh_dtype: str | None = None) -> Array:
    r"""The expected (Fisher) information of ``vec(Y) ~ N(0, M ⊗ K + I ⊗ Σ)`` over the parameters.

    F_ij = ½ tr(U⁻¹ ∂ᵢU U⁻¹ ∂ⱼU) for the P scalars of ``params`` in
    ``jax.flatten_util.ravel_pytree`` order, computed in the eigenbasis (module docstring): the
    tangents ∂ᵢM, ∂ᵢK, ∂ᵢΣ come from forward-mode derivatives of ``cov_fn``; no eigendecomposition
    is differentiated and no TD×TD matrix is formed. Cost after the factorisation:
    O(P (D³ + T D²) + P² D²), plus O(Q T³ + Q² T² + Q P T) for the Q parameters that move M
    (each ∂ᵢM is formed densely, (T, T), whatever the form of M, and rotated once). Which
    parameters move M is decided at trace time from the dataflow of ``cov_fn``, leaf by leaf of
    ``params`` (keep what moves M in its own leaves).

    The inverse of F is the asymptotic covariance of the maximum-likelihood estimate of ``params``.

    Args:
      cov_fn: ``params ↦ (M, K, Sigma)``: M a (T, T) array or any form of it, K and Sigma (D, D).
      params: a pytree of float arrays.
      eigh_dtype: as in :func:`kronlik.loglik`.

    Returns:
      (P, P) symmetric positive semi-definite; NaN where :func:`kronlik.loglik` would be NaN.

    >>> import jax.numpy as jnp, kronlik
    >>> cov = lambda p: (jnp.eye(3), jnp.eye(2), jnp.exp(p["s"]) * jnp.eye(2))
    >>> F = kronlik.fisher_information(cov, {"s": jnp.zeros(())})  # T D / 2 · (eˢ/(1 + eˢ))²
    >>> bool(jnp.isclose(F[0, 0], 3 * 2 / 2 * 0.25))
    True
    """
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    (flat,) = as_float_arrays(("params",), (flat,))

    def dense_cov(x):
        M, K, Sigma = cov_fn(unravel(x))
        return as_form(M), K, Sigma

    form, K, noise = _prepare_covariance(*dense_cov(flat), FullNoise)

    def tangents(select):
        # Tangents of select(form of M, K, Σ) along a batch of directions; under jit, what is not
        # selected is never computed (M's (T, T) tangent only for the directions that move it).
        def along(direction):
            return jax.jvp(lambda x: select(*dense_cov(x)), (flat,), (direction,))[1]

        return jax.jit(jax.vmap(along))

    # Which parameters move M, from the dataflow of cov_fn's tangent at trace time, leaf by leaf
    # of the params pytree: only their directions pay for a (T, T) tangent and its rotation.
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def tangents_by_leaf(*leaf_tangents):
        m, _, _ = jax.jvp(cov_fn, (params,), (jax.tree_util.tree_unflatten(treedef, leaf_tangents),))[1]
        return as_form(m).dense()

    by_leaf = _inputs_reaching(jax.make_jaxpr(tangents_by_leaf)(*leaves), 0)
    offsets = [0, *np.cumsum([np.size(leaf) for leaf in leaves])]
    moving = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in sorted(by_leaf)] + [np.zeros(0, int)])
    moving = jnp.asarray(moving, dtype=int)
    directions = jnp.eye(flat.shape[0], dtype=flat.dtype)
    dk, ds = tangents(lambda m, k, s: (k, s))(directions)
    dm = tangents(lambda m, k, s: m.dense())(directions[moving])
    sym = lambda a: 0.5 * (a + jnp.swapaxes(a, 1, 2))  # noqa: E731 (U is built from the symmetric parts)
    f = factor(form, K, noise, check_eigh_dtype(eigh_dtype))
    return _fisher_in_basis(f, sym(dk), sym(ds), moving, sym(dm))


def _prepare_covariance(M, K, noise, noise_model) -> tuple:
    """(form of M, K, noise model) with the dtype and shape checks of the likelihood, without a Y."""
    leaves = jax.tree_util.tree_leaves(as_form(M))
    sized_by = noise if noise_model is LogVarNoise else K  # D as the public function's docs say
    T, D = (leaves[0].shape[0] if leaves else 0), (jnp.shape(sized_by)[0] if jnp.ndim(sized_by) else 0)
    _, form, K, noise = prepare(jnp.zeros((T, D), jnp.asarray(noise).dtype), M, K, noise, noise_model)
    return form, K, noise


def _log_var_factors(Y, M, K, log_var, eigh_dtype) -> tuple[Factors, LogVarNoise, Array, Array]:
    if Y is None:
        form, K, noise = _prepare_covariance(M, K, log_var, LogVarNoise)
    else:
        Y, form, K, noise = prepare(Y, M, K, log_var, LogVarNoise)
    return factor(form, K, noise, check_eigh_dtype(eigh_dtype)), noise, Y, K


def _squared_blocks(f: Factors, omega0: Array) -> Array:
    """Σ_t (G̃_t ⊙ G̃_t), G̃_t = P̃ diag(1/E_t) P̃ᵀ (complement included through Ω₀): O(D⁴)."""
    ps = f.pencil.p_scaled
    return jnp.einsum("dk,ek,kl,dl,el->de", ps, ps, omega0, ps, ps, optimize=True)


def fisher_log_var(M: MForm, K: Array, log_var: Array, *, eigh_dtype: str | None = None) -> Array:
    r"""The (D, D) Fisher information of the log noise variances s, Σ = diag(eˢ).

    F_de = ½ tr(U⁻¹ ∂_d U U⁻¹ ∂_e U) = ½ w_d w_e Σ_t (G̃_t)²_de, with G̃_t = P̃ diag(1/E_t) P̃ᵀ and
    w_d = e^{s_d} / S_dd in the Jacobi-scaled pencil basis P̃ (e^{s_d} P_dk P_dl = w_d P̃_dk P̃_dl):
    equivalently F_de = ½ e^{s_d + s_e} Σ_t ((λ_t K + Σ)⁻¹)²_de. Cost O(T³) for M's eigenvalues
    (none for a factorised M) plus O(T D² + D⁴); no eˢ is formed, so it is finite for every finite s.

    Args:
      M: (T, T) PSD, or any form of it; K: (D, D) PSD; log_var: (D,).
      eigh_dtype: as in :func:`kronlik.loglik`.

    Returns:
      (D, D) symmetric positive semi-definite; NaN where :func:`kronlik.loglik_diag` is NaN.
    """
    f, _, _, _ = _log_var_factors(None, M, K, log_var, eigh_dtype)
    w = f.pencil.noise_weight
    fisher = 0.5 * jnp.outer(w, w) * _squared_blocks(f, noise_weights(f)[1])
    fisher = 0.5 * (fisher + fisher.T)  # exactly symmetric
    return nan_unless(f.flags.all(), fisher)


def hessian_log_var(Y: Array, M: MForm, K: Array, log_var: Array, *, eigh_dtype: str | None = None) -> Array:
    r"""The (D, D) Hessian of :func:`kronlik.loglik_diag` in s, Σ = diag(eˢ), in closed form.

    With g = ∂L/∂s (:func:`kronlik.grad_log_var`), A = Vᵀ W P the solve W = unvec(U⁻¹v) in the
    eigenbasis (r, D), X̃ = A P̃ᵀ (so that e^{s_d} (VᵀW)²_td = w_d X̃²_td) and G̃_t as in
    :func:`fisher_log_var`:

        ∂²L/∂s_d∂s_e = δ_de g_d + w_d w_e [½ Σ_t (G̃_t)²_de - Σ_t X̃_td X̃_te (G̃_t)_de],

    the derivative of g_d = e^{s_d} (∂L/∂Σ)_dd through U⁻¹ (−U⁻¹ dΣ U⁻¹) and W (−U⁻¹ dΣ W). The
    diagonal is summed in an equivalent form without cancellation (see the code). Its expectation
    under the model is −:func:`fisher_log_var`. Cost O(T D³) after the
    factorisation; no eigendecomposition is differentiated, so it is exact at repeated
    eigenvalues. −H at the maximum is the observed information.

    Returns:
      (D, D) symmetric; NaN where :func:`kronlik.loglik_diag` is NaN.
    """
    f, noise, Y, K = _log_var_factors(Y, M, K, log_var, eigh_dtype)
    s = forward(Y, f)
    ps, w = f.pencil.p_scaled, f.pencil.noise_weight
    h, omega0, _, _ = noise_weights(f)
    x_rot = s.a @ ps.T  # (r, D)
    data = jnp.einsum("td,te,tk,dk,ek->de", x_rot, x_rot, h, ps, ps, optimize=True)
    if f.num_complement():
        x_perp = s.a_perp @ ps.T  # (T, D), in the original rows
        g_perp = (ps / f.pencil.nu[None, :]) @ ps.T
        data = data + (x_perp.T @ x_perp) * g_perp
    hess = jnp.outer(w, w) * (0.5 * _squared_blocks(f, omega0) - data)
    # The diagonal without cancellation: g_d and the w_d² terms are each O(T) where an output's
    # noise dominates, while their sum can be as small as e^{-s_d}‖Y_d‖². With
    # φ_td = λ_t (K (λ_t K + Σ)⁻¹)_dd ∈ [0, 1] (signal's share; 0 on the complement) and
    # e^{s_d} W̃_td² = w_d X̃_td², the same derivative is Σ_t [w_d X̃_td² (φ_td - ½) - ½ φ_td (1 - φ_td)],
    # with φ and 1 - φ each computed as a sum of terms that do not cancel.
    log_diag_s = jnp.logaddexp(jnp.log(f.alpha) + jnp.log(jnp.diagonal(K)), noise.log_var)
    scale = jnp.exp(-0.5 * log_diag_s)
    k_scaled = scale[:, None] * (0.5 * (K + K.T)) * scale[None, :]  # D⁻¹ K D⁻¹, D² = diag(αK + Σ)
    phi = f.basis.lam[:, None] * (h @ ((k_scaled @ ps) * ps).T)  # (r, D)
    psi = w[None, :] * (h @ (ps * ps).T)  # 1 - φ_td = e^{s_d} ((λ_t K + Σ)⁻¹)_dd, a sum of positive terms
    diag = jnp.sum(w[None, :] * x_rot * x_rot * (phi - 0.5) - 0.5 * phi * psi, axis=0)
    if f.num_complement():
        diag = diag - 0.5 * w * jnp.sum(x_perp * x_perp, axis=0)
    hess = hess - jnp.diag(jnp.diagonal(hess)) + jnp.diag(diag)
    return nan_unless(s.ok, 0.5 * (hess + hess.T))
