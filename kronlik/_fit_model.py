"""The model behind ``kronlik fit``: a kernel over time for M (dense, Nyström low rank, or exact state
space), a free K = LLᵀ + diag(e^κ), Σ = diag(eˢ), fitted to the standardised table, reported in data units.

Model, in the data's units: vec(Y - 1 μᵀ) ~ N(0, M ⊗ K + I ⊗ diag(noise_variance)), μ the
column means over the observed entries, M = k(t, t) + 1e-6 I with k the kernel expression
(first term's amplitude 1: K carries the overall scale), or M = G Gᵀ with
G = k(t, z) chol(k(z, z) + 1e-6 I)⁻ᵀ for inducing times z (low rank). For a kernel of Matérns
only, the state-space path fits the dense path's model exactly in O(T): M ⊗ K + I ⊗ Σ with
M = k(t, t) + 1e-6 I is k(t, t) ⊗ K + I ⊗ (Σ + 1e-6 K), k(t, t) a kronlik.StateSpace (Kalman
recursions). Missing cells enter through ``mask=`` (the exact likelihood of the observed entries).

Predictions on the state-space path (:mod:`kronlik._smoother`) are a Kalman filter and smoother
over the data and new times merged, O(T + N), with the same posterior mean and sd as the dense path.
"""

from __future__ import annotations

import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.linalg import solve_triangular

from . import fisher_information, fit, fit_log_var, kernels, loglik, loglik_diag, predict, validate
from . import statespace as ss
from ._fit_command import NUGGET
from .datasets import DataError, from_decimal_year, whole_days
from .fitting import _std_errors, observed_information
from .forms import LowRank

F64 = jnp.float64


class Report(NamedTuple):
    text: str
    warnings: list[str]
    json: dict[str, Any]
    predictions: str | None  # CSV text
    figure: Any  # () -> matplotlib Figure


def progress_line(per_value: float, offset: float, per_gradient: float):
    """The fit's progress as the user reads the report: (recorded value, max|gradient|) ↦ text
    with L = per_value · value + offset, the log-likelihood in data units, and the gradient per
    observation (what --tol is compared with). The CSV path minimises -L_std/n (per_value = -n,
    offset = -Σ over observed cells of log(column scale)); the .npz path records L itself."""

    def line(value: float, gradient: float) -> str:
        loglik = per_value * value + offset
        return f"objective L = {loglik: .10g} (data units)   max|grad| {gradient / per_gradient:.3e}"

    return line


def noise_table(names, var, var_se, k_diag, k_se) -> list[str]:
    """The noise variance and K diagonal table: each column's header word ends where its widest
    "value ± se" cell ends, values right-aligned and "±" in one column, for names of any length."""
    headers = ("noise variance", "K diagonal")
    columns = [
        ([f"{v:.4g}" for v in values], [f"{e:.3g}" for e in errors])
        for values, errors in ((var, var_se), (k_diag, k_se))
    ]
    width = max(len("output"), *(len(n) for n in names))
    head = f"{'output':<{width}}"
    cells = [[f"{n:<{width}}"] for n in names]
    for header, (values, errors) in zip(headers, columns):
        wv, we = max(len(v) for v in values), max(len(e) for e in errors)
        wv = max(wv, len(header) - 3 - we)  # a wider header widens the value part
        head += f"   {header:>{wv + 3 + we}}"
        for row, v, e in zip(cells, values, errors):
            row.append(f"   {v:>{wv}} ± {e:<{we}}")
    return [head] + ["".join(row).rstrip() for row in cells]


_STATE_SPACE = {"matern12": ss.Matern12, "matern32": ss.Matern32, "matern52": ss.Matern52}


class KernelModel:
    """M(θ) for the kernel expression over times x (offsets from the first time).

    ``method`` "dense" (k(x, x) + 1e-6 I), "lowrank" (Nyström) or "statespace" (k(x, x) as a
    :class:`kronlik.StateSpace`; the 1e-6 I nugget then enters the likelihood as 1e-6 K added to
    Σ, :meth:`loglik`, so that the model is the dense one).
    """

    def __init__(self, spec: str, x: np.ndarray, method: str, rank: int):
        self.kernel = kernels.parse(spec)
        self.x = jnp.asarray(x, F64)
        self.method = method
        if method == "statespace" and any(c.name not in _STATE_SPACE for c in self.kernel.components()):
            raise ValueError(f"kernel {spec!r}: the state-space path takes {', '.join(_STATE_SPACE)} only")
        self.z = jnp.linspace(float(x.min()), float(x.max()), rank, dtype=F64) if method == "lowrank" else None
        self.n_terms = len(self.kernel.terms)

    def init(self, lengthscale: float, period: float) -> dict[str, np.ndarray]:
        p = self.kernel.init_params(lengthscale, period, F64)
        out = {"log_lengthscale": p["log_lengthscale"]}
        if self.kernel.num_free_periods():
            out["log_period"] = p["log_period"]
        if self.n_terms > 1:
            out["log_amplitude"] = jnp.zeros(self.n_terms - 1, F64)  # relative to the first term's
        return out

    def params(self, q) -> dict[str, jax.Array]:
        """The kernel's parameters (float64) from the fitted ones: first amplitude fixed at 1."""
        q = {k: jnp.asarray(v).astype(F64) for k, v in q.items()}
        return {
            "log_lengthscale": q["log_lengthscale"],
            "log_period": q.get("log_period", jnp.zeros(0, F64)),
            "log_amplitude": jnp.concatenate([jnp.zeros(1, F64), q.get("log_amplitude", jnp.zeros(0, F64))]),
        }

    def _times(self):
        # (x, z) behind a barrier: as constants of a compiled loss, XLA would constant-fold the
        # T×r distance computations at compile time (seconds, with alarms on stderr).
        if self.z is None:
            return jax.lax.optimization_barrier(self.x), None
        return jax.lax.optimization_barrier((self.x, self.z))

    def _inducing(self, kp):
        z = self._times()[1]
        return jnp.linalg.cholesky(self.kernel(kp, z) + NUGGET * jnp.eye(z.shape[0], dtype=F64))

    def state_space(self, kp, dtype=F64):
        """The kernel expression as a state-space kernel: each term's amplitude on its first factor."""
        ell, amp = jnp.exp(kp["log_lengthscale"]), jnp.exp(kp["log_amplitude"])
        total, c = None, 0
        for t, term in enumerate(self.kernel.terms):
            product = None
            for comp in term:
                a = amp[t] if product is None else jnp.ones((), F64)
                k = _STATE_SPACE[comp.name](a.astype(dtype), ell[c].astype(dtype))
                product, c = (k if product is None else product * k), c + 1
            total = product if total is None else total + product
        return total

    def loglik(self, y, m, k, log_var, mask=None, eigh_dtype=None):
        """L of the model at (M from :meth:`m`, K, log noise variances) in Y's units."""
        if self.method == "statespace":
            # Y behind a barrier: as a constant of a compiled loss XLA would fold O(T) work on it
            y = jax.lax.optimization_barrier(y)
            return loglik(y, m, k, self.noise(k, log_var), mask=mask)
        return loglik_diag(y, m, k, log_var, mask=mask, eigh_dtype=eigh_dtype)

    def noise(self, k, log_var):
        """The noise matrix the likelihood takes: Σ, plus the nugget's 1e-6 K on the state-space path."""
        sigma = jnp.diag(jnp.exp(log_var))
        return sigma + NUGGET * k if self.method == "statespace" else sigma

    def m(self, q, dtype):
        """M as a dense (T, T) array, a LowRank form, or a StateSpace (without the nugget), in ``dtype``
        (built in float64)."""
        kp = self.params(q)
        x, z = self._times()
        if self.method == "statespace":
            return ss.StateSpace(x.astype(dtype), self.state_space(kp, dtype))
        if self.method == "dense":
            return (self.kernel(kp, x) + NUGGET * jnp.eye(x.shape[0], dtype=F64)).astype(dtype)
        chol = self._inducing(kp)
        return LowRank(solve_triangular(chol, self.kernel(kp, z, x), lower=True).T.astype(dtype))

    def cross(self, q, x_new, m):
        """(M_×, m_new_diag) of new times against the training times, float64, in the model's own
        terms; ``m`` is :meth:`m` at ``q`` (for the low-rank path M_× = G_new Gᵀ reuses its G)."""
        kp = self.params(q)
        x_new = jnp.asarray(x_new, F64)
        if self.method == "dense":
            diag = jnp.diagonal(self.kernel(kp, x_new[:1])) * jnp.ones_like(x_new) + NUGGET  # stationary: k(x, x)
            return self.kernel(kp, x_new, self._times()[0]), diag
        g_new = solve_triangular(self._inducing(kp), self.kernel(kp, self._times()[1], x_new), lower=True).T
        return g_new @ m.factor.T, jnp.sum(g_new * g_new, axis=1)


def kernel_lines(ell, ell_se, periods, period_se, amps, amp_se) -> list[str]:
    """ "lengthscales: 0.7856 ± 0.0275, ..." and likewise the fitted periods and relative amplitudes."""

    def pairs(values, errors):
        return ", ".join(f"{a:.4g} ± {b:.3g}" for a, b in zip(values, errors))

    lines = [f"  lengthscales: {pairs(ell, ell_se)}"]
    if len(periods):
        lines.append(f"  fitted periods: {pairs(periods, period_se)}")
    if len(amps):
        lines.append(f"  relative amplitudes: {pairs(amps, amp_se)}")
    return lines


def _k_of(p):
    return p["L"] @ p["L"].T + jnp.diag(jnp.exp(p["log_kappa"]))


def _last_finite(history) -> float:
    h = np.asarray(history, np.float64)
    h = h[np.isfinite(h)]
    return float(h[-1]) if h.size else float("nan")


def _convergence(r, steps: int, tol: float, per: float) -> tuple[str, bool]:
    g = _last_finite(r.grad_norm_history) / per
    if bool(r.converged):
        return f"converged: yes (max|gradient| {g:.2e} ≤ --tol {tol:g}, per observation)", True
    if bool(r.stalled):
        return (
            f"converged: no (stalled: the log-likelihood stopped changing while max|gradient| {g:.2e} "
            f"is above --tol {tol:g}; --float64 may get further)"
        ), False
    if int(r.num_steps) >= steps:
        return f"converged: no (reached --steps {steps}; max|gradient| {g:.2e}; raise --steps)", False
    return "converged: no (the log-likelihood became NaN)", False


def _best_start(loss, p0: dict, span: float, t: np.ndarray) -> dict:
    """``p0`` with every lengthscale scaled by the best of 1, 1/10, 1/100, 1/1000 (by ``loss``).

    The default start, a tenth of the time span, sits on the wrong side of a plateau for a long
    series with short-scale structure (a daily cycle over decades: from there the fit runs to a
    constant kernel and white noise, a local optimum). The candidates stop at ten times the
    median spacing of the times; each costs one evaluation of L (one compiled program).
    """
    spacing = float(np.median(np.diff(t))) if t.size > 1 else 1.0
    factors = [f for f in (1.0, 1e-1, 1e-2, 1e-3) if f == 1.0 or 0.1 * span * f >= 10.0 * spacing]
    if len(factors) == 1:
        return p0
    value = jax.jit(loss)
    best, best_value = p0, float(value(p0))
    for f in factors[1:]:
        p = dict(p0, log_lengthscale=p0["log_lengthscale"] + float(np.log(f)))
        v = float(value(p))
        if np.isfinite(v) and not v >= best_value:
            best, best_value, chosen = p, v, f
    if best is not p0:
        print(
            f"  starting lengthscales: {chosen:g} × a tenth of the time span (the best of {len(factors)} by L)",
            file=sys.stderr,
        )
    return best


def fit_table(args, table, data, method: str, rank: int, new_t) -> Report:
    T, D = table.Y.shape
    # The state-space path computes in float64 whatever --float64 says (see _fit_command.run's note).
    dtype = jnp.float64 if args.float64 or method == "statespace" else jnp.float32
    eigh = "float64"  # float32 data, float64 eigendecompositions: see kronlik.loglik
    mask = data.mask
    n_obs = T * D - (0 if mask is None else int((~mask).sum()))
    ys = jnp.asarray(data.Y, dtype)
    ys64 = jnp.asarray(data.Y, F64)
    optimizer = optax.lbfgs() if args.optimizer == "lbfgs" else optax.adam(args.lr)
    scale, mean = data.scale, data.mean
    start = time.perf_counter()
    model = None
    if table.M is not None:
        m64, k_std = jnp.asarray(table.M, F64), jnp.asarray(table.K, F64)
        observed_var = np.nanvar(table.Y, axis=0)
        r = fit_log_var(
            ys,
            m64.astype(dtype),
            k_std.astype(dtype),
            jnp.asarray(np.log(0.5 * observed_var), dtype),
            optimizer,
            num_steps=args.steps,
            tol=args.tol * n_obs / T,  # fit_log_var's test is max|∂L/∂s| ≤ tol·T
            progress=progress_line(1.0, 0.0, n_obs),  # L in the data's units (M, K and Y as given)
            eigh_dtype=eigh,
            information=None,
            mask=mask,
        )
        log_var = jnp.asarray(r.params, F64)
    else:
        t = np.arange(T, dtype=float) if table.t is None else table.t
        span = float(t[-1] - t[0]) or 1.0
        model = KernelModel("rbf" if args.kernel is None else args.kernel, t - t[0], method, rank)
        period = args.period or (1.0 if table.dates else span / 4)
        p0 = dict(model.init(0.1 * span, period))
        p0.update(
            L=0.7 * jnp.eye(D, dtype=F64),
            log_kappa=jnp.full(D, np.log(0.1), F64),
            log_var=jnp.full(D, np.log(0.5), F64),
        )
        p0 = jax.tree_util.tree_map(lambda a: a.astype(dtype), p0)

        def loss(p):  # per observation, so that --tol does not depend on the table's size
            return -model.loglik(ys, model.m(p, dtype), _k_of(p), p["log_var"], mask=mask, eigh_dtype=eigh) / n_obs

        p0 = _best_start(loss, p0, span, t)

        observed = np.isfinite(table.Y).sum(axis=0)
        r = fit(
            loss,
            p0,
            optimizer,
            num_steps=args.steps,
            tol=args.tol,
            # L in data units: the standardised L less Σ over observed cells of log(column scale)
            progress=progress_line(-float(n_obs), -float(np.sum(observed * np.log(scale))), 1.0),
            log_scale_keys=("log_var", "log_kappa"),
        )
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, F64), r.params)
        m64, k_std, log_var = model.m(p64, F64), _k_of(p64), p64["log_var"]
    seconds = time.perf_counter() - start
    convergence, converged = _convergence(r, args.steps, args.tol, 1.0 if model is not None else n_obs)

    # What is reported is evaluated in float64 at the fitted point, in the data's units.
    k_data = np.asarray(k_std) * np.outer(scale, scale)
    var_data = np.exp(np.asarray(log_var)) * scale**2
    y_data = jnp.asarray(np.where(np.isfinite(table.Y), table.Y - mean, 0.0), F64)

    def likelihood(y, m, k, s):  # float64: M from model.m, K, log noise variances
        return loglik_diag(y, m, k, s, mask=mask) if model is None else model.loglik(y, m, k, s, mask=mask)

    try:
        if method == "statespace":  # L and its checks in one O(T) pass (validate's are O(T³))
            k_data64 = jnp.asarray(k_data)
            L, accuracy = state_space_check(
                y_data, m64, k_data64, model.noise(k_data64, jnp.log(jnp.asarray(var_data))), mask
            )
        else:
            L = float(jax.jit(likelihood)(y_data, m64, jnp.asarray(k_data), jnp.log(jnp.asarray(var_data))))
            if not np.isfinite(L):
                raise DataError("the likelihood is NaN at the fitted point")
            accuracy = validate(ys64, m64, k_std, log_var=log_var, warn=False)
    except ValueError as e:
        raise DataError(f"the likelihood is not defined at the fitted point: {e}") from None

    # Standard errors: the expected (Fisher) information at the fit for a complete table and a
    # dense M; the observed information (central differences of the exact gradient) with missing
    # cells, a low-rank M (the Fisher route forms each dM as a T×T matrix) or a state-space M
    # (2 gradients per parameter, each O(T)); float64, over
    # the K_ij (i ≤ j), the log noise variances and the kernel's free parameters.
    upper = np.triu_indices(D)
    theta = {"log_var": log_var}
    if model is not None:  # (an .npz fixes M and K: only the noise is a parameter)
        theta["K"] = k_std[upper]
        theta.update({k: v for k, v in p64.items() if k.startswith(("log_length", "log_period", "log_amp"))})

    def parts(q):
        if model is None:
            return m64, k_std
        k_upper = jnp.zeros((D, D), F64).at[upper].set(q["K"])
        return model.m(q, F64), k_upper + k_upper.T - jnp.diag(jnp.diagonal(k_upper))

    if mask is None and method == "dense":
        info = jax.jit(lambda th: fisher_information(lambda q: (*parts(q), jnp.diag(jnp.exp(q["log_var"]))), th))(theta)
    else:
        info = observed_information(jax.grad(lambda q: -likelihood(ys64, *parts(q), q["log_var"])), theta)
    se = jax.tree_util.tree_map(np.asarray, _std_errors(info, theta))
    var_se = var_data * se["log_var"]
    k_se = np.zeros((D, D))
    if "K" in se:
        k_se[upper] = se["K"]
    k_se = (k_se + k_se.T - np.diag(np.diag(k_se))) * np.outer(scale, scale)

    names = table.names
    if not all(np.all(np.isfinite(v)) for v in jax.tree_util.tree_leaves(se)):
        warnings_se = "standard errors are NaN: the information matrix is not positive definite here" + (
            " (the fit did not converge)" if not bool(r.converged) else " (a parameter the data do not identify)"
        )
    else:
        warnings_se = None
    fisher = mask is None and method == "dense"
    lines = [f"\nstandard errors (±) from the {'Fisher' if fisher else 'observed'} information at the fit; data units"]
    lines += noise_table(names, var_data, var_se, np.diag(k_data), np.diag(k_se))
    for i, j in zip(*upper):
        if i < j:
            lines.append(f"K[{names[i]}, {names[j]}] = {k_data[i, j]:.4g} ± {k_se[i, j]:.3g}")
    kernel_json = None
    if model is not None:
        kp = model.params(p64)
        ell, ell_se = np.exp(np.asarray(kp["log_lengthscale"])), None
        ell_se = ell * se["log_lengthscale"]
        periods = np.exp(np.asarray(kp["log_period"]))
        period_se = periods * se["log_period"] if "log_period" in se else np.zeros(0)
        amps = np.exp(np.asarray(kp["log_amplitude"]))
        amp_se = np.concatenate([[0.0], amps[1:] * se["log_amplitude"]]) if "log_amplitude" in se else np.zeros(1)
        units = table.time_label
        path = {"lowrank": f" (low rank {rank})", "statespace": " (exact state space, O(T))"}.get(method, "")
        lines.append(f"kernel over {units}: {model.kernel.spec}{path}")
        for line in model.kernel.describe(kp):
            lines.append(f"  {line}")
        lines += kernel_lines(ell, ell_se, periods, period_se, amps[1:], amp_se[1:])
        kernel_json = {
            "spec": model.kernel.spec,
            "lengthscale": ell.tolist(),
            "lengthscale_se": ell_se.tolist(),
            "period": periods.tolist(),
            "period_se": np.asarray(period_se).tolist(),
            "amplitude": amps.tolist(),
            "amplitude_se": np.asarray(amp_se).tolist(),
            "nugget": NUGGET,
            "method": method,
            "inducing_times": None if model.z is None else (np.asarray(model.z) + t[0]).tolist(),
        }
    centred = "" if table.M is not None else ", column means subtracted"
    lines.append(f"log-likelihood (data units, float64{centred}): {L:.6f}")
    lines.append(f"steps: {int(r.num_steps)}, {convergence}, time: {seconds:.2f} s")
    lines.append(f"accuracy at the fit: {accuracy}")
    warnings = [] if warnings_se is None else [warnings_se]
    if not converged:
        warnings.append(convergence.replace("converged: no ", "the fit did not converge "))
    if accuracy.error_bound > 1e-3:
        warnings.append(
            "L and its gradient may be inaccurate here (a nearly singular covariance)"
            + ("" if args.float64 else "; try --float64")
        )

    predictions, grid = None, None
    if model is not None:
        if method == "statespace":
            sd_of = _state_space_predictor(model, p64, ys64, k_std, log_var, mask, scale, mean)
        else:
            sd_of = _predictor(model, p64, ys64, k_std, log_var, mask, scale, mean)
        # Gap filling: with missing cells, the predictions also hold every row that has one (the
        # posterior of each output there), marked "gap"; the new times are marked "new".
        gap_t = None
        if mask is not None and (new_t is not None or args.predictions is not None):
            gap_t = t[~mask.all(axis=1)]
        pred_t = [x for x in (gap_t, new_t) if x is not None]
        kinds = (["gap"] * (0 if gap_t is None else gap_t.size)) + (["new"] * (0 if new_t is None else new_t.size))
        pred_t = np.concatenate(pred_t) if pred_t else None
        # the predicted times and the plot's curves (only with --plot) in one call: one pass, one compilation
        n_new = 0 if pred_t is None else pred_t.size
        t_all = t if new_t is None else np.concatenate([t, new_t])
        queries = [] if pred_t is None else [pred_t]
        if args.plot:
            queries.append(np.linspace(float(t_all.min()), float(t_all.max()), min(1000, max(200, t_all.size))))
        if queries:
            at = np.concatenate(queries)
            answers = sd_of(at - t[0])
            new = tuple(a[:n_new] for a in answers)
            if args.plot:
                grid = (at[n_new:], *(a[n_new:] for a in answers))
        if pred_t is not None:
            header = ["decimal_year", "date"] if table.dates else [args.time_column or "row"]
            for n in names:
                header += [f"{n}_mean", f"{n}_sd_latent", f"{n}_sd_observation"]
            header.append("kind")
            rows = [",".join(header)]
            days = table.dates and whole_days(t) and whole_days(pred_t)  # print at the input's resolution
            for i, tn in enumerate(pred_t):
                cells = [f"{tn:.17g}"] + ([from_decimal_year(tn, days)] if table.dates else [])
                for j in range(D):
                    cells += [f"{new[0][i, j]:.8g}", f"{new[1][i, j]:.8g}", f"{new[2][i, j]:.8g}"]
                cells.append(kinds[i])
                rows.append(",".join(cells))
            predictions = "\n".join(rows) + "\n"

    out = {
        "source": args.data or "built-in US macro data (statsmodels macrodata, public domain)",
        "model": __doc__.split("\n\n")[1].replace("\n", " "),
        "outputs": names,
        "rows": T,
        "missing_cells": T * D - n_obs,
        "dtype": "float64" if dtype == jnp.float64 else "float32",
        "time": None
        if model is None
        else {
            "column": args.time_column,
            "dates": table.dates,
            "units": "decimal years" if table.dates else ("rows" if table.t is None else "as given"),
            "origin": float(t[0]),
            "note": "kernel distances are in these units; the origin only labels them",
        },
        "kernel": kernel_json,
        "column_mean": mean.tolist(),
        "column_std": scale.tolist(),
        "K": k_data.tolist(),
        "K_se": k_se.tolist(),
        "noise_variance": var_data.tolist(),
        "noise_variance_se": var_se.tolist(),
        "K_standardised": np.asarray(k_std).tolist(),
        "log_var_standardised": np.asarray(log_var).tolist(),
        "params": jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64).tolist(), r.params),
        "loglik": L,
        "converged": bool(r.converged),
        "stalled": bool(r.stalled),
        "steps": int(r.num_steps),
        "tol": args.tol,
        "error_bound": accuracy.error_bound,
        "seconds": seconds,
    }

    def figure():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = np.arange(T) if table.t is None else table.t
        fig, axes = plt.subplots(D, 1, figsize=(9, 1.9 * D + 0.8), sharex=True, squeeze=False)
        for j, ax in enumerate(axes[:, 0]):
            if grid is not None:
                gt, mu, sd_f, sd_y = grid[0], grid[1][:, j], grid[2][:, j], grid[3][:, j]
                ax.fill_between(
                    gt,
                    mu - 2 * sd_y,
                    mu + 2 * sd_y,
                    color="C0",
                    alpha=0.15,
                    lw=0,
                    zorder=2,
                    label="new observation ±2 sd",
                )
                ax.fill_between(
                    gt, mu - 2 * sd_f, mu + 2 * sd_f, color="C0", alpha=0.35, lw=0, zorder=2, label="latent ±2 sd"
                )
                ax.plot(gt, mu, color="C0", lw=1.2, zorder=3, label="posterior mean")
                if new_t is not None and new_t.max() > xs[-1]:
                    ax.axvspan(xs[-1], new_t.max(), color="0.92", zorder=0, label="forecast")
            ok = np.isfinite(table.Y[:, j])
            dense_data = ok.sum() > 2000  # many points: small and light, under the fit
            ax.plot(
                xs[ok],
                table.Y[ok, j],
                ".",
                ms=1 if dense_data else 3,
                color="0.25",
                alpha=0.4 if dense_data else 1.0,
                zorder=1,
                label="data",
            )
            ax.set_ylabel(names[j])
        axes[-1, 0].set_xlabel(table.time_label)
        axes[0, 0].legend(loc="upper left", fontsize=7, ncol=5)
        fig.tight_layout()
        return fig

    return Report("\n".join(lines), warnings, out, predictions, figure)


class StateSpaceAccuracy(NamedTuple):
    """What the state-space path reports in place of :func:`kronlik.validate` (whose checks are O(T³))."""

    s_min: float  # the smallest Kalman innovation variance over its prior variance κ_j k(0) + ν_j
    error_bound: float

    def __str__(self) -> str:
        return (
            f"valid (float64); Kalman innovation variances down to {self.s_min:.3g} of their prior variance: "
            f"terms of L accurate to about {self.error_bound:.1e} (relative)"
        )


@jax.jit
def _filtered(y, m, k, sigma):
    from ._kalman import recursions_of
    from ._noise import FullNoise
    from ._statespace_core import ss_factor, ss_forward

    # kronlik.loglik's value with a StateSpace M is this pass's (structured._ss_loglik)
    with recursions_of(m):
        s = ss_forward(y, ss_factor(m, k, FullNoise(sigma)), store=False)
    return s.value, s.ok, jnp.min(s.filtered.s_min)


@jax.jit
def _filtered_masked(y, m, k, sigma, mask):
    from ._noise import FullNoise
    from ._statespace_masked import _run, joint_problem

    # kronlik.loglik's value with a StateSpace M and a mask is this pass's (_statespace_masked.value)
    value, f, ok = _run(joint_problem(y, m, k, FullNoise(sigma), mask), store=False)
    return value, ok, f.resolved


def state_space_check(y, m, k, sigma, mask=None) -> tuple[float, StateSpaceAccuracy]:
    """(L, accuracy) at (Y, M a StateSpace, K, Σ) in O(T), or ValueError where L is not defined.

    An innovation variance S = hᵀP⁻h + ν carries round-off of eps times its prior variance (P⁻ is
    formed at that scale), so relative to itself eps / (S / prior) at the smallest ratio. With
    missing cells, the joint filter's smallest Cholesky pivot² of S over its cell's prior variance.
    """
    if mask is None or mask.all():
        value, ok, s_min = _filtered(y, m, k, sigma)
    else:
        value, ok, s_min = _filtered_masked(y, m, k, sigma, jnp.asarray(mask))
    if not bool(ok):
        raise ValueError(
            "K, Σ or the kernel is invalid, or U is numerically singular (an innovation variance is round-off)"
        )
    s_min = float(s_min)
    return float(value), StateSpaceAccuracy(s_min, 10.0 * float(jnp.finfo(F64).eps) / s_min)


def _state_space_predictor(model: KernelModel, p64, ys64, k_std, log_var, mask, scale, mean):
    """x ↦ (mean, sd of the latent, sd of a new observation), (N, D) in data units: O(T + N)."""
    from ._smoother import posterior

    kernel = model.state_space(model.params(p64))
    sigma = model.noise(k_std, log_var)
    nugget = NUGGET * np.diagonal(np.asarray(k_std))[None, :]  # the latent's white part at a new time
    noise = np.exp(np.asarray(log_var))[None, :]

    def at(x_new):
        post = posterior(ys64, model.x, kernel, k_std, sigma, jnp.asarray(x_new, F64), mask)
        var = np.maximum(np.asarray(post.var), 0.0) + nugget
        return np.asarray(post.mean) * scale + mean, np.sqrt(var) * scale, np.sqrt(var + noise) * scale

    return at


def _predictor(model: KernelModel, p64, ys64, k_std, log_var, mask, scale, mean):
    """x ↦ (mean, sd of the latent, sd of a new observation), each (N, D) in data units."""
    m64 = model.m(p64, F64)
    sigma = jnp.diag(jnp.exp(log_var))

    @jax.jit
    def batch(x):
        return predict(ys64, m64, k_std, sigma, *model.cross(p64, x, m64), mask=mask)

    def at(x_new):
        out = []
        for lo in range(0, len(x_new), 500):  # M_× is (N, T): bounded memory for long tables
            mu, var = batch(jnp.asarray(x_new[lo : lo + 500], F64))
            out.append((np.asarray(mu), np.asarray(var)))
        mu = np.concatenate([o[0] for o in out])
        var = np.maximum(np.concatenate([o[1] for o in out]), 0.0)
        noise = np.exp(np.asarray(log_var))[None, :]
        return mu * scale + mean, np.sqrt(var) * scale, np.sqrt(var + noise) * scale

    return at
