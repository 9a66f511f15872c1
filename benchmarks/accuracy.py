"""Accuracy against exact arithmetic: kronlik and a dense float64 Cholesky of U on graded and scaled problems.

For each case, the value and every gradient of kronlik (float64) and of the dense reference
(``jax.grad`` of ``kronlik.reference.loglik``, a Cholesky of the TD×TD U, float64) are compared with
``kronlik.reference.exact`` (mpmath, 80 digits, the float64 inputs taken exactly). Errors are
relative: |L - L*| / |L*| for the value, max|g - g*| / max|g*| for a gradient; the table prints, per
case, the worst over (value, Y, M, K, noise) for both, and whether kronlik meets the bar
max(10 × dense error, 1e-12 for the value / 1e-10 for gradients).

Run: python -m benchmarks.accuracy [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # a benchmark program chooses its precision

import kronlik  # noqa: E402
from kronlik import kernels, reference  # noqa: E402

NAMES = ("value", "Y", "M", "K", "noise")


def _rotation(rng, n):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q


def _spd(rng, n, floor):
    a = rng.standard_normal((n, n))
    return a @ a.T / n + floor * np.eye(n)


def _rbf(T, ell):
    t = np.linspace(0.0, 1.0, T)
    return np.asarray(kernels.rbf(jnp.asarray(t), jnp.asarray(t), ell))


def cases(quick: bool = False) -> dict[str, tuple]:
    """name -> (Y, M, K, Sigma or None, log_var or None)."""
    rng = np.random.default_rng(7)
    out = {}
    k_ones = np.eye(3) + 0.5
    y23 = rng.standard_normal((2, 3))
    y53, m5, k3 = rng.standard_normal((5, 3)), _spd(rng, 5, 0.1), _spd(rng, 3, 0.1)
    for s in (-20, -30, -40, -60):
        out[f"M=I 2x3, log_var [0,0,{s}]"] = (y23, np.eye(2), k_ones, None, np.array([0.0, 0.0, s]))
        out[f"random 5x3, log_var [0,{s},{2 * s}]"] = (y53, m5, k3, None, np.array([0.0, s, 2.0 * s]))
        out[f"random 5x3, log_var [{2 * s},{s},0]"] = (y53, m5, k3, None, np.array([2.0 * s, s, 0.0]))
        r = _rotation(rng, 3)
        sigma = (r * np.exp([0.0, s, 2.0 * s])) @ r.T
        out[f"random 5x3, full Sigma eig [1,e^{s},e^{2 * s}] rotated"] = (y53, m5, k3, sigma, None)
    for scale in (1e-8, 1e-6, 1e6, 1e8):
        out[f"random 5x3, M x {scale:g}, K x {1 / scale:g}"] = (
            y53,
            m5 * scale,
            k3 / scale,
            None,
            np.array([-1.0, 0.0, 0.5]),
        )
    T = 30 if quick else 100
    m_rbf = _rbf(T, 0.1) + 1e-6 * np.eye(T)
    k2 = _spd(rng, 2, 0.2)
    f = np.linalg.cholesky(m_rbf) @ rng.standard_normal((T, 2)) @ np.linalg.cholesky(k2).T
    y_rbf = f + rng.standard_normal((T, 2)) * np.exp(np.array([-0.5, -20.0]))
    out[f"RBF(0.1)+1e-6 I, T={T}, D=2, log_var [-1, -40]"] = (y_rbf, m_rbf, k2, None, np.array([-1.0, -40.0]))
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)


def measure(Y, M, K, Sigma, log_var) -> dict:
    args = tuple(jnp.asarray(a) for a in (Y, M, K))
    if Sigma is not None:
        noise = jnp.asarray(Sigma)
        ours = jax.value_and_grad(kronlik.loglik, argnums=(0, 1, 2, 3))(*args, noise)
        dense_fn = reference.loglik
        ex = reference.exact(Y, M, K, Sigma)
    else:
        noise = jnp.asarray(log_var)
        ours = jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3))(*args, noise)

        def dense_fn(Y, M, K, s):
            return reference.loglik(Y, M, K, jnp.diag(jnp.exp(s)))

        ex = reference.exact(Y, M, K, log_var=log_var)
    dense = jax.value_and_grad(dense_fn, argnums=(0, 1, 2, 3))(*args, noise)
    truth = (ex.value, ex.y, ex.m, ex.k, ex.noise)
    row = {}
    for label, (value, grads) in (("kronlik", ours), ("dense", dense)):
        errs = [abs(float(value) - ex.value) / abs(ex.value)] + [_rel(g, t) for g, t in zip(grads, truth[1:])]
        row[label] = dict(zip(NAMES, errs))
    row["passes"] = all(row["kronlik"][n] <= max(10 * row["dense"][n], 1e-12 if n == "value" else 1e-10) for n in NAMES)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T=30 instead of 100 for the RBF case")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = {}
    print(f"{'case':<52} {'kronlik':>9} {'dense':>9}  worst of value and gradients (rel. to exact)  bar")
    for name, case in cases(args.quick).items():
        row = measure(*case)
        rows[name] = row
        k, d = max(row["kronlik"].values()), max(row["dense"].values())
        print(f"{name:<52} {k:>9.1e} {d:>9.1e}  {'ok' if row['passes'] else 'FAIL'}", flush=True)
    print("all cases meet the bar" if all(r["passes"] for r in rows.values()) else "SOME CASES FAIL", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
