"""Fitting with optax: the log-variances by their hand-derived gradient, or any loss through kronlik."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.scipy.linalg
import optax

from ._checks import prepare
from ._noise import LogVarNoise
from .forms import Dense, Diagonal, EighFactor
from .information import fisher_information, fisher_log_var, hessian_log_var
from .structured import factorize, loglik_diag

Array = jax.Array


class FitResult(NamedTuple):
    """What :func:`fit_log_var` and :func:`fit` return (a pytree).

    ``params``: the fitted parameters (the log-variances for :func:`fit_log_var`).
    ``value``: the objective there (L for :func:`fit_log_var`, which maximises it; the
    loss for :func:`fit`, which minimises it). ``value_history`` and
    ``grad_norm_history`` (max-abs gradient) have one entry per step, NaN after the
    last; ``num_steps`` is how many were taken; ``converged`` says the gradient test held
    (max-abs gradient ≤ ``tol``) at the returned parameters, ``stalled`` that the fit stopped
    because the objective's relative change fell below ``rtol`` while the gradient was still
    above ``tol`` (a float32 fit at rounding level, or a flat ridge). Both are False if it hit
    ``num_steps`` or the value went NaN.

    ``information``: the (P, P) information matrix at ``params`` (P scalars in
    ``jax.flatten_util.ravel_pytree`` order), observed or expected as the fitting function
    says, or None; ``std_errors``: sqrt(diag(information⁻¹)) shaped like ``params``, the
    asymptotic standard errors of the maximum-likelihood estimate, NaN where the information
    is not positive definite (a parameter the data do not identify, e.g. a log-variance on
    its plateau at -∞).
    """

    params: Any
    value: Array
    value_history: Array
    grad_norm_history: Array
    num_steps: Array
    converged: Array
    information: Array | None = None
    std_errors: Any = None
    stalled: Array | bool = False


def _std_errors(information: Array, params) -> Any:
    """sqrt(diag(F⁻¹)) unravelled like ``params``; NaN unless F is positive definite."""
    _, unravel = jax.flatten_util.ravel_pytree(params)
    chol = jnp.linalg.cholesky(0.5 * (information + information.T))  # NaN unless positive definite
    inv_chol = jax.scipy.linalg.solve_triangular(chol, jnp.eye(chol.shape[0], dtype=chol.dtype), lower=True)
    return unravel(jnp.sqrt(jnp.sum(inv_chol * inv_chol, axis=0)))  # diag(L⁻ᵀ L⁻¹)


def _max_abs(tree) -> Array:
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _minimise(
    value_and_grad_fn: Callable,
    value_fn: Callable,
    params,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    tol: float,
    rtol: float,
    progress: bool | Callable[[float, float], str],
    chunk_size: int,
    sign: float,
    progress_every: float = 5.0,
) -> FitResult:
    """The optax loop, jit-compiled in chunks of at most ``chunk_size`` steps.

    ``value_and_grad_fn`` gives the objective to *minimise* and its gradient; ``sign``
    flips the recorded values back (-1 when the caller maximises L). Between chunks
    control returns to Python, which prints progress if asked: the steps themselves
    run in one compiled ``lax.while_loop`` per chunk, sized from the measured time per
    step so that a line appears about every ``progress_every`` seconds (the step bound is
    an argument of the compiled loop: resizing does not recompile). A callable ``progress``
    formats each line's (recorded value, max-abs gradient) itself.
    """
    opt = optax.with_extra_args_support(optimizer)
    leaves = jax.tree_util.tree_leaves(params)
    dtype = leaves[0].dtype
    dtypes = jax.tree_util.tree_map(lambda x: x.dtype, params)

    def line_search_value(p):
        # optax's line search may hand float32 params back as float64 under x64.
        return value_fn(jax.tree_util.tree_map(lambda x, d: x.astype(d), p, dtypes))

    nan_history = jnp.full((num_steps,), jnp.nan, dtype)

    def body(carry):
        p, state, step, _, previous, _, values, gnorms = carry
        value, grad = value_and_grad_fn(p)
        gnorm = _max_abs(grad)
        # Stop on a small gradient, or when the objective stops changing (a float32 fit
        # stalls at rounding level above any useful gradient tolerance), or on NaN.
        stalled = jnp.abs(sign * value - previous) <= rtol * jnp.abs(value)
        done = (gnorm <= tol) | stalled | ~jnp.isfinite(value)
        # optax mixes int32 and int64 counters internally (L-BFGS under x64), which a
        # caller's strict dtype-promotion mode would reject; scope standard promotion to it.
        with jax.numpy_dtype_promotion("standard"):
            updates, new_state = opt.update(grad, state, p, value=value, grad=grad, value_fn=line_search_value)
        new_p = optax.apply_updates(p, updates)
        keep = lambda old, new: jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), old, new)  # noqa: E731
        return (
            keep(p, new_p),
            keep(state, new_state),
            step + 1,
            done,
            sign * value,
            gnorm,
            values.at[step].set(sign * value),
            gnorms.at[step].set(gnorm),
        )

    @jax.jit
    def run_chunk(carry, limit):
        return jax.lax.while_loop(lambda c: (c[2] < limit) & ~c[3], body, carry)

    nan = jnp.full((), jnp.nan, dtype)
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(params)
    carry = (params, state, jnp.array(0), jnp.array(False), nan, nan, nan_history, nan_history)
    # optax's state holds weakly typed scalars that its first update makes strong: strong from the
    # start, so that the second chunk does not compile the loop again.
    carry = jax.tree_util.tree_map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype), carry)
    start = time.perf_counter()
    size = 1 if progress else chunk_size  # the first chunk (compile included) times a step
    while int(carry[2]) < num_steps and not bool(carry[3]):
        before, tick = int(carry[2]), time.perf_counter()
        carry = run_chunk(carry, jnp.array(min(before + size, num_steps)))
        taken = int(carry[2]) - before
        if progress:
            per_step = (time.perf_counter() - tick) / max(taken, 1)
            size = int(min(chunk_size, max(1, progress_every / max(per_step, 1e-9))))
            value, gnorm = float(carry[4]), float(carry[5])
            text = progress(value, gnorm) if callable(progress) else f"objective {value: .8g}   max|grad| {gnorm:.3e}"
            print(
                f"  step {int(carry[2]):6d}   {text}   {time.perf_counter() - start:7.1f} s",
                file=sys.stderr,
                flush=True,
            )
    params, _, steps, done, _, gnorm, values, gnorms = carry
    # Without stopping the last step moved params after its value was recorded.
    value = sign * jax.jit(value_fn)(params)
    finite = jnp.isfinite(value)
    converged = done & (gnorm <= tol) & finite
    return FitResult(params, value, values, gnorms, steps, converged, stalled=done & ~converged & finite)


# Upward steps tried for each log-scale parameter when a fit has stopped (see _escape_plateaus).
_ESCAPE_STEPS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
_MAX_ESCAPES = 5


def _escape_plateaus(value_fn: Callable, params, mask, rtol: float):
    """A better point one log-scale parameter up from ``params``, or None.

    A log-variance s far below where it matters sits on a plateau: L changes by O(eˢ) there,
    so its gradient vanishes and any gradient method stops, though L is higher (the loss lower)
    back up at the optimum. (A noise-free output is the usual way in: the first steps overshoot
    a narrow maximum at a tiny variance.) So try each masked parameter at s + 1, 2, 4, ..., 32
    and return the best such point if it lowers ``value_fn`` by more than rtol·|value|.
    """
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    flat_mask, _ = jax.flatten_util.ravel_pytree(mask)
    index = jnp.flatnonzero(flat_mask.astype(bool))
    if index.size == 0:
        return None
    steps = jnp.asarray(_ESCAPE_STEPS, flat.dtype)
    bumps = jnp.zeros((index.size, steps.size, flat.size), flat.dtype)
    bumps = bumps.at[jnp.arange(index.size)[:, None], jnp.arange(steps.size)[None, :], index[:, None]].set(
        steps[None, :]
    )
    candidates = (flat[None, None, :] + bumps).reshape(-1, flat.size)
    # The current point is evaluated in the same compiled program (row 0): an eager call of
    # value_fn would compile each of its operations on its own (seconds, in every fit).
    values = jax.jit(jax.vmap(lambda x: value_fn(unravel(x))))(jnp.concatenate([flat[None, :], candidates]))
    current, values = values[0], values[1:]
    best = jnp.nanargmin(values)
    if not bool(values[best] < current - rtol * jnp.abs(current)):
        return None
    return unravel(candidates[best])


def _minimise_escaping(
    value_and_grad_fn, value_fn, params, optimizer, num_steps, tol, rtol, progress, chunk_size, sign, mask
):
    """:func:`_minimise`, restarted from a better point while :func:`_escape_plateaus` finds one."""
    result = _minimise(value_and_grad_fn, value_fn, params, optimizer, num_steps, tol, rtol, progress, chunk_size, sign)
    steps, values, gnorms = int(result.num_steps), [result.value_history], [result.grad_norm_history]
    for _ in range(_MAX_ESCAPES):
        if mask is None or steps >= num_steps or not bool(jnp.isfinite(result.value)):
            break
        better = _escape_plateaus(value_fn, result.params, mask, max(rtol, 1e-10))
        if better is None:
            break
        if progress:
            print("  a log-scale parameter was on a plateau: restarting from a better point", file=sys.stderr)
        result = _minimise(
            value_and_grad_fn, value_fn, better, optimizer, num_steps - steps, tol, rtol, progress, chunk_size, sign
        )
        values.append(result.value_history)
        gnorms.append(result.grad_norm_history)
        steps += int(result.num_steps)

    def history(parts):
        taken = jnp.concatenate([h[: int(jnp.sum(jnp.isfinite(h)))] for h in parts])
        return jnp.full((num_steps,), jnp.nan, taken.dtype).at[: taken.size].set(taken[:num_steps])

    return result._replace(
        value_history=history(values), grad_norm_history=history(gnorms), num_steps=jnp.asarray(steps)
    )


def information_step(
    information_fn: Callable[[Any], Array],
    fallback_fn: Callable[[Any], Array] | None = None,
    max_step: float = 4.0,
) -> optax.GradientTransformation:
    """An optax transformation: the Newton or Fisher-scoring direction -J⁻¹ g of a negative log-likelihood.

    g is the gradient optax passes in (of the loss -L), J = ``information_fn(params)`` a (P, P)
    information matrix over ``params`` in ``ravel_pytree`` order: the observed information
    -∂²L (a Newton step) or the expected one (Fisher scoring, :func:`kronlik.fisher_information`).
    Where J is not positive definite (a Newton step far from the maximum), ``fallback_fn`` is
    used instead (typically the expected information, always PSD); where that fails too, -g.
    The step is scaled so that no coordinate moves by more than ``max_step`` (log-scale
    parameters: a factor e⁴). Chain it with a line search, as :func:`fit_log_var` does::

        optax.chain(information_step(info), optax.scale_by_backtracking_linesearch(30))
    """

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("information_step needs params (optax's update(updates, state, params))")
        flat_g, unravel = jax.flatten_util.ravel_pytree(updates)
        flat_p, _ = jax.flatten_util.ravel_pytree(params)

        def direction(information):
            chol = jnp.linalg.cholesky(0.5 * (information + information.T))  # NaN unless positive definite
            d = -jax.scipy.linalg.cho_solve((chol, True), flat_g)
            return d, jnp.all(jnp.isfinite(d))

        step, ok = direction(information_fn(params).astype(flat_p.dtype))
        if fallback_fn is not None:
            step, ok = jax.lax.cond(ok, lambda: (step, ok), lambda: direction(fallback_fn(params).astype(flat_p.dtype)))
        step = jnp.where(ok, step, -flat_g)
        largest = jnp.max(jnp.abs(step))
        step = step * jnp.minimum(1.0, max_step / jnp.where(largest > 0, largest, 1.0))
        return unravel(step.astype(flat_g.dtype)), state

    return optax.GradientTransformation(init, update)


def observed_information(grad_fn: Callable[[Any], Any], params) -> Array:
    """The Hessian of a loss at ``params`` by central differences of its exact gradient, (P, P).

    For -L this is the observed information. Used where no closed form exists (missing
    entries): each column costs two gradients, with the step h_i = eps^(1/3) max(1, |θ_i|)
    that balances truncation (h²) against rounding (eps/h): about eps^(2/3) relative
    (4e-11 in float64, 2e-5 in float32). Symmetrised; ``jax.flatten_util.ravel_pytree`` order.
    """
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    steps = float(jnp.finfo(flat.dtype).eps) ** (1.0 / 3.0) * jnp.maximum(1.0, jnp.abs(flat))
    flat_grad = jax.jit(lambda x: jax.flatten_util.ravel_pytree(grad_fn(unravel(x)))[0])
    eye = jnp.eye(flat.size, dtype=flat.dtype)
    cols = [
        (flat_grad(flat + steps[i] * eye[i]) - flat_grad(flat - steps[i] * eye[i])) / (2 * steps[i])
        for i in range(flat.size)
    ]
    h = jnp.stack(cols, axis=1)
    return 0.5 * (h + h.T)


def _default_tol(dtype) -> float:
    return float(jnp.sqrt(jnp.finfo(dtype).eps))


def fit_log_var(
    Y: Array,
    M: Array | EighFactor,
    K: Array,
    log_var0: Array,
    optimizer: optax.GradientTransformation | None = None,
    *,
    num_steps: int = 500,
    tol: float | None = None,
    rtol: float | None = None,
    progress: bool | Callable[[float, float], str] = False,
    chunk_size: int = 25,
    eigh_dtype: str | None = None,
    information: str | None = "observed",
    method: str = "lbfgs",
    mask: Array | None = None,
) -> FitResult:
    """Maximise L over the log noise variances s, Σ = diag(eˢ), with M and K fixed.

    M is eigendecomposed once (or pass :func:`kronlik.factorize` of it) and Y rotated
    once, O(T³ + T²D); each step then costs O(TD² + D³) (M as :class:`kronlik.Diagonal`).
    Other forms of M (:class:`kronlik.LowRank`) are used as they are, at their own cost per
    step. The gradient given to optax is kronlik's hand-derived eˢ ⊙ diag(∂L/∂Σ).

    Args:
      Y, M, K: as in :func:`kronlik.loglik_diag`.
      log_var0: (D,) starting log-variances.
      optimizer: any optax transformation (minimising -L); default ``optax.lbfgs()``,
        whose line search keeps every step an ascent step on this smooth problem.
      method: ``"lbfgs"`` (the default optimizer above) or ``"newton"``: Newton steps with the
        closed-form Hessian (:func:`kronlik.hessian_log_var`), Fisher scoring
        (:func:`kronlik.fisher_log_var`) where -H is not positive definite, and a backtracking
        line search (:func:`information_step`); each step costs O(T D³) instead of O(T D² + D³),
        and few are needed. Not with ``optimizer``.
      num_steps: the most steps to take.
      tol: stop when max_d |∂L/∂s_d| ≤ tol·T (each ∂L/∂s_d sums T terms of order one);
        default sqrt(eps) of the dtype.
      rtol: or stop when |ΔL| ≤ rtol·|L| between steps; default 4·eps of the dtype
        (only a fit stalled at rounding level triggers it).
      progress: print step, L and gradient norm to stderr between chunks; or a function
        (L, max|∂L/∂s|) ↦ the text to print for them (e.g. L in other units).
      chunk_size: steps per compiled chunk (how often progress is printed).
      eigh_dtype: the dtype of M's one eigendecomposition (``"float64"`` with float32 inputs:
        mixed precision, see :func:`kronlik.loglik`).
      information: ``"observed"`` (default): the result carries -∂²L/∂s∂sᵀ at the fit
        (:func:`kronlik.hessian_log_var`) and the standard errors of s from it; ``"expected"``:
        the Fisher information (:func:`kronlik.fisher_log_var`) instead; None: neither. Both are
        closed forms, O(T D³) once. The standard error of the variance eˢᵈ is eˢᵈ times that of s_d.
      mask: optional (T, D) boolean, True where Y is observed (see :func:`kronlik.loglik`): the
        likelihood of the observed entries is maximised. Y is then not rotated (each step costs
        O(T² D) plus the missing entries' share), ``method`` must be ``"lbfgs"``, and the
        observed information is :func:`observed_information` of the exact gradient.

    Returns:
      A :class:`FitResult` whose ``params`` are the fitted log-variances, ``value`` the final
      L, and ``information``/``std_errors`` as chosen.
    """
    if information not in ("observed", "expected", None):
        raise ValueError(f"information must be 'observed', 'expected' or None; got {information!r}")
    if method not in ("lbfgs", "newton"):
        raise ValueError(f"method must be 'lbfgs' or 'newton'; got {method!r}")
    if method == "newton" and optimizer is not None:
        raise ValueError("method='newton' chooses its own optimizer; pass optimizer only with method='lbfgs'")
    if mask is not None and (method == "newton" or information == "expected"):
        raise ValueError("with a mask, fit_log_var takes method='lbfgs' and information='observed' or None")
    Y, form, K, noise = prepare(Y, M, K, log_var0, LogVarNoise)
    log_var0 = noise.log_var
    if isinstance(form, Dense):
        form = factorize(form.matrix, eigh_dtype=eigh_dtype)
    if isinstance(form, EighFactor) and mask is None:  # rotate once; each step is then O(TD² + D³)
        y_fit, m_fit = form.vectors.T @ Y, Diagonal(form.values)
    else:  # (missing entries are where they are: no rotation)
        y_fit, m_fit = Y, form
    tol = _default_tol(Y.dtype) if tol is None else tol
    rtol = 4 * float(jnp.finfo(Y.dtype).eps) if rtol is None else rtol

    def objective(s):
        return loglik_diag(y_fit, m_fit, K, s, mask=mask)

    value_and_grad = jax.value_and_grad(objective)  # the hand-derived backward pass

    def neg_value_and_grad(s):
        value, grad = value_and_grad(s)
        return -value, -grad

    def neg_value(s):  # for line searches
        return -objective(s)

    if method == "newton":
        optimizer = optax.chain(
            information_step(lambda s: -hessian_log_var(y_fit, m_fit, K, s), lambda s: fisher_log_var(m_fit, K, s)),
            optax.scale_by_backtracking_linesearch(max_backtracking_steps=40),
        )
    optimizer = optax.lbfgs() if optimizer is None else optimizer
    plateau = jnp.ones(log_var0.shape, bool)  # every log-variance can stall on the plateau at -inf
    result = _minimise_escaping(
        neg_value_and_grad,
        neg_value,
        log_var0,
        optimizer,
        num_steps,
        tol * Y.shape[0],
        rtol,
        progress,
        chunk_size,
        -1.0,
        plateau,
    )
    if information is None:
        return result
    if information == "observed" and mask is not None:
        info = observed_information(jax.grad(lambda s: -objective(s)), result.params)
    elif information == "observed":
        info = -jax.jit(hessian_log_var)(y_fit, m_fit, K, result.params)
    else:
        info = jax.jit(fisher_log_var)(m_fit, K, result.params)
    return result._replace(information=info, std_errors=_std_errors(info, result.params))


def fit(
    loss_fn: Callable[[Any], Array],
    params,
    optimizer: optax.GradientTransformation | None = None,
    *,
    num_steps: int = 1000,
    tol: float = 1e-6,
    rtol: float | None = None,
    progress: bool | Callable[[float, float], str] = False,
    chunk_size: int = 50,
    log_scale_keys: tuple[str, ...] = (),
    cov_fn: Callable[[Any], tuple] | None = None,
) -> FitResult:
    """Minimise ``loss_fn(params)`` over a pytree of parameters with optax, jit-compiled.

    The idiom for fitting M(θ), K(φ), Σ(s) jointly: write the loss with
    :func:`kronlik.loglik` (or ``loglik_diag``) and ``jax.grad`` runs kronlik's
    hand-derived backward pass, so no eigendecomposition is differentiated::

        def loss(p):
            return -kronlik.loglik_diag(Y, rbf(t, p["log_ell"]), p["L"] @ p["L"].T, p["log_var"])

        result = kronlik.fit(loss, params)

    Args:
      loss_fn: a scalar function of ``params``, to be minimised.
      params: the starting pytree of float arrays.
      optimizer: any optax transformation; default ``optax.lbfgs()``.
      num_steps: the most steps to take.
      tol: stop when the max-abs gradient entry is ≤ tol.
      rtol: or when the loss changes by ≤ rtol·|loss| in a step; default 4·eps.
      progress: print progress to stderr between chunks of ``chunk_size`` steps; or a function
        (loss, max-abs gradient) ↦ the text to print for them (e.g. a log-likelihood in other units).
      log_scale_keys: for a dict ``params``, the keys holding log-variances (or other log
        scales whose gradient vanishes as they go to -inf). When the fit stops, each is tried
        1, 2, 4, ..., 32 higher and the fit restarts from a better point if there is one: a
        gradient method stalls on that plateau, e.g. after overshooting the narrow maximum of
        a nearly noise-free output. :func:`fit_log_var` does this for all its parameters.
      cov_fn: ``params ↦ (M, K, Sigma)``, the model whose negative log-likelihood ``loss_fn``
        is; when given, the result carries the expected (Fisher) information at the fit
        (:func:`kronlik.fisher_information`) and the standard errors of ``params`` from it.
    """
    optimizer = optax.lbfgs() if optimizer is None else optimizer
    if rtol is None:
        rtol = 4 * float(jnp.finfo(jax.tree_util.tree_leaves(params)[0].dtype).eps)
    mask = None
    if log_scale_keys:
        mask = {k: jnp.full(jnp.shape(v), k in log_scale_keys) for k, v in params.items()}
    result = _minimise_escaping(
        jax.value_and_grad(loss_fn), loss_fn, params, optimizer, num_steps, tol, rtol, progress, chunk_size, 1.0, mask
    )
    if cov_fn is None:
        return result
    info = jax.jit(lambda p: fisher_information(cov_fn, p))(result.params)
    return result._replace(information=info, std_errors=_std_errors(info, result.params))
