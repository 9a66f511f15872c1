"""Gappy series where tinygp's multiband kernel applies: K of rank one, against the joint-state filter.

tinygp's quasiseparable solver takes one observation per (time, band) cell, so a gappy (T, D)
table is its N observed cells sorted by time, with the "multiband" wrapper of its documentation
(an observation model ``amplitudes[band] · h``): the covariance M ⊗ aaᵀ + diag(noise), that is
kronlik's model with K = aaᵀ of rank one and Σ diagonal, and a J-dimensional state (one latent
process) instead of kronlik's J·D. Its gradients are autodiff through its scans; kronlik's are
hand-derived. kronlik's joint filter also takes a full-rank K, which tinygp's wrapper cannot.

Problem: Matérn 3/2 (amplitude 1, lengthscale 5), times with Exponential(1) gaps, a ~ N(0, I_D),
Σ = diag(exp(log_var)), log_var ~ U(-1, 1), a fraction of the cells missing at random (fixed
seed), float64, one CPU thread. Timed, jit'd, after a compile call, median of --repeats calls:
value, and value + gradient in (a or K, log_var, the kernel's amplitude and lengthscale); the two
values are checked to agree to 1e-9 relative.

    taskset -c 1 python benchmarks/multiband.py --json benchmarks/results_multiband.json

Needs tinygp (``pip install tinygp``).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # one CPU thread: must precede jax's import
    _FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAGS}".strip()

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kronlik  # noqa: E402
from benchmarks.statespace_missing import _median_time, write_json  # noqa: E402
from kronlik.statespace import Matern32  # noqa: E402


def problem(T: int, D: int, missing: float, seed: int = 0):
    """(t (T,), Y (T, D) zero on missing cells, mask (T, D), a (D,), log_var (D,))."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0, T))
    a = rng.standard_normal(D)
    Y = rng.standard_normal((T, D))
    mask = rng.uniform(size=(T, D)) >= missing
    mask[0] = True  # every output observed somewhere
    return t, np.where(mask, Y, 0.0), mask, a, rng.uniform(-1.0, 1.0, D)


def _kronlik_loglik(params, t, Y, mask):
    a, log_var, amplitude, lengthscale = params
    M = kronlik.StateSpace(t, Matern32(amplitude, lengthscale))
    return kronlik.loglik_diag(Y, M, jnp.outer(a, a), log_var, mask=mask)


def _tinygp_loglik(params, t_obs, band, y_obs):
    import tinygp

    @tinygp.helpers.dataclass
    class Multiband(tinygp.kernels.quasisep.Wrapper):
        amplitudes: jax.Array

        def coord_to_sortable(self, X):
            return X[0]

        def observation_model(self, X):
            return self.amplitudes[X[1]] * self.kernel.observation_model(X[0])

    a, log_var, amplitude, lengthscale = params
    base = tinygp.kernels.quasisep.Matern32(scale=lengthscale, sigma=jnp.sqrt(amplitude))
    gp = tinygp.GaussianProcess(Multiband(kernel=base, amplitudes=a), (t_obs, band), diag=jnp.exp(log_var)[band])
    return gp.log_probability(y_obs)


def bench(T: int, D: int, missing: float, repeats: int) -> dict:
    t, Y, mask, a, log_var = problem(T, D, missing)
    params = (jnp.asarray(a), jnp.asarray(log_var), jnp.asarray(1.0), jnp.asarray(5.0))
    rows, cols = np.nonzero(mask)  # row-major: sorted by time, then band
    args_k = (jnp.asarray(t), jnp.asarray(Y), jnp.asarray(mask))
    args_t = (jnp.asarray(t[rows]), jnp.asarray(cols), jnp.asarray(Y[rows, cols]))
    row = {"T": T, "D": D, "missing": missing, "observed_cells": int(mask.sum())}
    for name, fn, args in (("kronlik", _kronlik_loglik, args_k), ("tinygp", _tinygp_loglik, args_t)):
        value = jax.jit(fn)
        value_and_grad = jax.jit(jax.value_and_grad(fn))
        row[f"{name} value"], row[f"{name} loglik"] = _median_time(lambda v=value, x=args: v(params, *x), repeats)
        row[f"{name} value+grad"], _ = _median_time(lambda v=value_and_grad, x=args: v(params, *x), repeats)
        row[f"{name} loglik"] = float(row[f"{name} loglik"])
    difference = abs(row["kronlik loglik"] - row["tinygp loglik"]) / abs(row["tinygp loglik"])
    row["relative difference"] = difference
    assert difference < 1e-9, row
    row["tinygp / kronlik value+grad"] = row["tinygp value+grad"] / row["kronlik value+grad"]
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python benchmarks/multiband.py")
    parser.add_argument("--points", nargs="+", default=["10000x2x0.5", "10000x4x0.5", "10000x8x0.5", "100000x4x0.3"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    a = parser.parse_args(argv)
    rows = []
    for point in a.points:
        T, D, f = point.split("x")
        rows.append(bench(int(T), int(D), float(f), a.repeats))
    if a.json:
        write_json(a.json, rows)
    return rows


if __name__ == "__main__":
    main()
