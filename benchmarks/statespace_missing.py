"""Missing cells with a state-space M: the joint-state Kalman filter against the Schur path and dense U_oo.

The problem of ``benchmarks/statespace_second_order.py`` (Matérn 3/2, lengthscale 5, irregular
times with Exponential(1) gaps, K random SPD, Σ = diag(exp(log_var))), float64, one CPU thread, with
a fraction of the cells missing at random (a fixed seed). For each (T, D, fraction) it times, jit'd,
after a compile call, the median of --repeats calls of:

* ``joint value`` / ``joint value+grad``: ``kronlik.loglik_diag(..., mask=mask)`` with the mask an
  argument of the compiled function (traced: the joint-state filter whatever the pattern), and
  ``jax.value_and_grad`` of it in (Y, M, K, log_var); ``backward / forward`` is their ratio less 1;
* at 0 % missing, ``pencil value+grad``: the complete-data path that a concrete all-True mask takes
  (D scalar filters);
* for T ≤ --dense-max-T: ``schur value+grad`` (the eigh engine with the dense M and the concrete
  mask: the Schur complement over the m missing cells) and ``dense value`` (a Cholesky of U_oo,
  ``kronlik.reference.loglik``), each once the value agrees with the joint filter's (checked).

Run (one pinned core; the JSON records the flags):

    taskset -c 1 python benchmarks/statespace_missing.py --json benchmarks/results_statespace_missing.json
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # one CPU thread: must precede jax's import
    _FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAGS}".strip()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kronlik  # noqa: E402
from kronlik import reference  # noqa: E402
from kronlik.statespace import Matern32  # noqa: E402


def problem(T: int, D: int, missing: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = jnp.asarray(np.cumsum(rng.exponential(1.0, T)))
    a = rng.standard_normal((D, D))
    K = jnp.asarray(a @ a.T / D + 0.1 * np.eye(D))
    M = kronlik.StateSpace(t, Matern32(jnp.asarray(1.0), jnp.asarray(5.0)))
    Y = rng.standard_normal((T, D))
    mask = rng.uniform(size=(T, D)) >= missing
    return jnp.asarray(np.where(mask, Y, 0.0)), M, K, jnp.asarray(rng.uniform(-1.0, 1.0, D)), mask


def _masked(Y, M, K, s, mask):
    return kronlik.loglik_diag(Y, M, K, s, mask=mask)


_VALUE = jax.jit(_masked)
_VALUE_AND_GRAD = jax.jit(jax.value_and_grad(_masked, argnums=(0, 1, 2, 3)))
_COMPLETE = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3)))


def _median_time(fn, repeats: int) -> tuple[float, object]:
    out = jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def bench(T: int, D: int, missing: float, repeats: int, dense_max_T: int) -> dict:
    Y, M, K, s, mask = problem(T, D, missing)
    m = jnp.asarray(mask)
    row = {"T": T, "D": D, "missing": missing, "missing_cells": int((~mask).sum())}
    row["joint value"], value = _median_time(lambda: _VALUE(Y, M, K, s, m), repeats)
    row["joint value+grad"], _ = _median_time(lambda: _VALUE_AND_GRAD(Y, M, K, s, m), repeats)
    row["backward / forward"] = row["joint value+grad"] / row["joint value"] - 1.0
    row["loglik"] = float(value)
    if mask.all():
        row["pencil value+grad"], (complete, _) = _median_time(lambda: _COMPLETE(Y, M, K, s), repeats)
        assert abs(float(complete) - float(value)) < 1e-9 * abs(float(value))
    if T <= dense_max_T:
        dense_m = M.dense()
        schur = jax.jit(jax.value_and_grad(lambda y, k, v: kronlik.loglik_diag(y, dense_m, k, v, mask=mask), (0, 1, 2)))
        # one timed call each: at 50-90 % missing and T = 1000 a call takes tens of seconds
        row["schur value+grad"], (schur_value, _) = _median_time(lambda: schur(Y, K, s), 1)
        sigma = jnp.diag(jnp.exp(s))
        row["dense value"], dense_value = _median_time(lambda: reference.loglik(Y, dense_m, K, sigma, mask=mask), 1)
        for name, v in (("schur", schur_value), ("dense", dense_value)):
            row[f"{name} relative difference"] = abs(float(v) - float(value)) / abs(float(v))
            assert row[f"{name} relative difference"] < 1e-9, (name, row)
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python benchmarks/statespace_missing.py")
    parser.add_argument(
        "--sizes", nargs="+", default=["1000x4", "1000x8", "10000x4", "10000x8", "100000x4", "100000x8"]
    )
    parser.add_argument("--missing", nargs="+", type=float, default=[0.0, 0.1, 0.5, 0.9])
    parser.add_argument("--extra", nargs="*", default=["1000000x4x0.3"], help="TxDxfraction points run alone")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-max-T", type=int, default=1000)
    parser.add_argument("--json", help="write the results here")
    a = parser.parse_args(argv)
    rows = []
    for size in a.sizes:
        T, D = map(int, size.split("x"))
        rows += [bench(T, D, f, a.repeats, a.dense_max_T) for f in a.missing]
    for point in a.extra:
        T, D, f = point.split("x")
        rows.append(bench(int(T), int(D), float(f), a.repeats, a.dense_max_T))
    if a.json:
        write_json(a.json, rows)
    return rows


def write_json(path: str, rows: list[dict]) -> None:
    """The rows and the XLA flags they were measured under (one thread or not)."""
    with open(path, "w") as fh:
        json.dump({"xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
