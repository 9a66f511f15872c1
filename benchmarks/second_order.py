"""Cost of second derivatives through kronlik's rules, against value + all gradients in the same process.

float64, dense RBF M (with jitter), random K, log-variances s, at each T×D:

* ``value+all gradients``: ``jax.value_and_grad(loglik_diag, argnums=(0, 1, 2, 3))`` (the baseline, 1.0);
* ``HVP, all arguments``: ``jax.jvp(jax.grad(loglik_diag, argnums=(0, 1, 2, 3)), ...)`` along a random
  direction of (Y, M, K, s): one Hessian-vector product in every argument;
* ``HVP, s only``: the same with only s moving and only ∂L/∂s returned (M, K fixed);
* ``jax.hessian in s``: the (D, D) Hessian in s by ``jax.hessian`` (D forward-over-reverse products);
* ``hessian_log_var``: the closed form (:func:`kronlik.hessian_log_var`).

Each is checked against the others where they overlap before timing (jax.hessian in s =
hessian_log_var; the HVP in s = hessian_log_var @ v). Timing: compile once, then the median of
repeats (as benchmarks/fit_step.py).

Accuracy (``--accuracy``): the max relative error, per function and argument, of kronlik's second
derivatives against ``jax.hessian`` / ``jax.jvp`` of the dense Cholesky reference, float64, T = 6,
D = 3, on a random problem and on degenerate ones (M = I with K = 2I, Σ = I/2; K = 0; M of
rank 2; eigenvalue gaps of 1e-10). Errors are max|Δ| / max|reference| per block.

Run: python benchmarks/second_order.py [--sizes 256x64 1024x64] [--repeats 5] [--accuracy] [--json out.json]
"""

import argparse
import json
import os
import platform
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kronlik
from kronlik import kernels

_median_seconds = runpy.run_path(str(Path(__file__).with_name("fit_step.py")))["_median_seconds"]
_cost_rows = runpy.run_path(str(Path(__file__).with_name("information.py")))["cost_rows"]


def costs(T, D, repeats):
    rng = np.random.default_rng(0)
    x = jnp.linspace(0.0, 1.0, T)
    M = kernels.rbf(x, x, 0.1) + 1e-6 * jnp.eye(T)
    A = rng.standard_normal((D, D))
    K = jnp.asarray(A @ A.T / D + 0.1 * np.eye(D))
    s = jnp.asarray(np.log(rng.uniform(0.1, 1.0, D)))
    Y = jnp.asarray(rng.standard_normal((T, D)))
    args = (Y, M, K, s)
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in args)
    tangents = (tangents[0], 0.5 * (tangents[1] + tangents[1].T), 0.5 * (tangents[2] + tangents[2].T), tangents[3])
    grad_all = jax.grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3))
    grad_s = jax.grad(kronlik.loglik_diag, argnums=3)
    fns = {
        "value+all gradients": (jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3))), args),
        "HVP, all arguments": (jax.jit(lambda a, t: jax.jvp(lambda *z: grad_all(*z), a, t)[1]), (args, tangents)),
        "HVP, s only": (
            jax.jit(lambda a, v: jax.jvp(lambda q: grad_s(a[0], a[1], a[2], q), (a[3],), (v,))[1]),
            (args, tangents[3]),
        ),
        "jax.hessian in s": (jax.jit(jax.hessian(kronlik.loglik_diag, argnums=3)), args),
        "hessian_log_var": (jax.jit(kronlik.hessian_log_var), args),
    }
    closed = fns["hessian_log_var"][0](*args)
    agree = {
        "jax.hessian in s vs hessian_log_var": float(
            jnp.max(jnp.abs(fns["jax.hessian in s"][0](*args) - closed)) / jnp.max(jnp.abs(closed))
        ),
        "HVP in s vs hessian_log_var @ v": float(
            jnp.max(jnp.abs(fns["HVP, s only"][0](args, tangents[3]) - closed @ tangents[3]))
            / jnp.max(jnp.abs(closed @ tangents[3]))
        ),
    }
    seconds = {name: _median_seconds(fn, a, repeats) for name, (fn, a) in fns.items()}
    base = seconds["value+all gradients"]
    return {"T": T, "D": D, "seconds": seconds, "ratio": {k: v / base for k, v in seconds.items()}, "agree": agree}


def _accuracy_problems():
    rng = np.random.default_rng(5)
    T, D = 6, 3

    def spd(n, floor):
        a = rng.standard_normal((n, n))
        return a @ a.T / n + floor * np.eye(n)

    def spectrum(values):
        q, _ = np.linalg.qr(rng.standard_normal((len(values), len(values))))
        return (q * np.asarray(values)) @ q.T

    Y, M, K, S = rng.standard_normal((T, D)), spd(T, 0.1), spd(D, 0.1), spd(D, 0.3)
    g = rng.standard_normal((T, 2))
    gap = 1e-10
    return {
        "random": (Y, M, K, S),
        "M = I, K = 2I, Σ = I/2": (Y, np.eye(T), 2 * np.eye(D), 0.5 * np.eye(D)),
        "K = 0": (Y, M, np.zeros((D, D)), S),
        "M of rank 2": (Y, g @ g.T, K, S),
        "gaps 1e-10": (
            Y,
            spectrum([1, 1 + gap, 1 + 2 * gap, 2, 2 + gap, 3]),
            spectrum([1, 1 + gap, 3]),
            np.diag([0.5, 0.5 + gap, 0.5]),
        ),
    }


def accuracy():
    """{problem: {"function / argument": max relative error}} against the dense reference."""
    from kronlik import reference

    def rel(a, b):
        scale = float(jnp.max(jnp.abs(b)))
        return float(jnp.max(jnp.abs(a - b))) / (scale if scale > 0 else 1.0)

    def ref_diag(Y, M, K, s):
        return reference.loglik(Y, M, K, jnp.diag(jnp.exp(s)))

    names = ("Y", "M", "K", "noise")
    m_cross, m_new = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6))), jnp.ones(2) * 5.0
    out = {}
    for problem, arrays in _accuracy_problems().items():
        Y, M, K, S = (jnp.asarray(a) for a in arrays)
        s = jnp.log(jnp.diagonal(S))
        errors = {}
        for label, fn, ref, args in (
            ("loglik", kronlik.loglik, reference.loglik, (Y, M, K, S)),
            ("loglik_diag", kronlik.loglik_diag, ref_diag, (Y, M, K, s)),
        ):
            hess = jax.hessian(fn, argnums=(0, 1, 2, 3))(*args)
            want = jax.hessian(ref, argnums=(0, 1, 2, 3))(*args)
            for i, a in enumerate(names):
                errors[f"{label} ∂²/∂{a}∂(all)"] = max(rel(hess[i][j], want[i][j]) for j in range(4))
        tangents = tuple(jnp.asarray(np.random.default_rng(1).standard_normal(a.shape)) for a in (Y, M, K, S))

        def dense_solve(Y, M, K, S):
            return jnp.linalg.solve(reference.dense_covariance(M, K, S), Y.reshape(-1)).reshape(Y.shape)

        def dense_predict(Y, M, K, S):
            cross = jnp.kron(m_cross, 0.5 * (K + K.T))
            U = reference.dense_covariance(M, K, S)
            mean = (cross @ jnp.linalg.solve(U, Y.reshape(-1))).reshape(2, -1)
            var = jnp.kron(m_new, jnp.diagonal(K)) - jnp.sum(cross * jnp.linalg.solve(U, cross.T).T, axis=1)
            return mean, var.reshape(mean.shape)

        for label, fn, ref in (
            ("grad_sigma", kronlik.grad_sigma, jax.grad(reference.loglik, argnums=3)),
            ("solve", kronlik.solve, dense_solve),
            ("predict", lambda *a: kronlik.predict(*a, m_cross, m_new), dense_predict),
        ):
            for i, a in enumerate(names):
                t = tuple(x if j == i else jnp.zeros_like(x) for j, x in enumerate(tangents))
                got = jax.tree_util.tree_leaves(jax.jvp(fn, (Y, M, K, S), t)[1])
                want = jax.tree_util.tree_leaves(jax.jvp(ref, (Y, M, K, S), t)[1])
                errors[f"{label} d/d{a}"] = max(rel(g, w) for g, w in zip(got, want))
        t = tuple(jnp.zeros_like(x) for x in (Y, M, K)) + (tangents[3][0],)
        got = jax.jvp(kronlik.grad_log_var, (Y, M, K, s), t)[1]
        errors["grad_log_var d/dnoise"] = rel(got, jax.jvp(jax.grad(ref_diag, argnums=3), (Y, M, K, s), t)[1])
        out[problem] = errors
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["256x64", "1024x64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--accuracy", action="store_true", help="also the accuracy table")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    rows = _cost_rows(costs, args.sizes, args.repeats, extra="agree")
    result = {
        "environment": {"jax": jax.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "costs": rows,
    }
    if args.accuracy:
        result["accuracy"] = accuracy()
        for problem, errors in result["accuracy"].items():
            print(f"{problem}: worst {max(errors.values()):.1e}")
            print("  " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
