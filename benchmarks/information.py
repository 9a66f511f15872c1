"""Cost of the information matrices against value + all gradients, and Newton vs L-BFGS fits.

Part 1, float64, same process: jax.value_and_grad(loglik_diag) in all four arguments (the
baseline, 1.0), hessian_log_var, fisher_log_var, and fisher_information over (log ℓ, log_var)
for an RBF M (P = D + 1, one parameter moving M), at each T×D.
Part 2: fit_log_var with method="newton" (closed-form Hessian + Fisher scoring) and with the
default L-BFGS, each run twice and the second timed (fit_log_var compiles its loop on every call, so
the time includes compilation): steps, time, final max|∂L/∂s|.

Run: python benchmarks/information.py [--sizes 256x64 1024x64] [--repeats 5] [--json out.json]
"""

import argparse
import json
import platform
import runpy
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kronlik
from kronlik import kernels

ROOT = Path(__file__).resolve().parent.parent


# the same timing as benchmarks/fit_step.py: compile once, then the median of repeats
_median_seconds = runpy.run_path(str(Path(__file__).with_name("fit_step.py")))["_median_seconds"]


def _rbf(x, log_ell):
    return kernels.rbf(x, x, jnp.exp(log_ell)) + 1e-6 * jnp.eye(x.shape[0], dtype=x.dtype)


def costs(T, D, repeats):
    rng = np.random.default_rng(0)
    x = jnp.linspace(0.0, 1.0, T)
    M = _rbf(x, jnp.log(0.1))
    A = rng.standard_normal((D, D))
    K = jnp.asarray(A @ A.T / D + 0.1 * np.eye(D))
    s = jnp.asarray(np.log(rng.uniform(0.1, 1.0, D)))
    Y = jnp.asarray(rng.standard_normal((T, D)))

    def cov_fn(p):
        return _rbf(x, p["log_ell"]), K, jnp.diag(jnp.exp(p["log_var"]))

    params = {"log_ell": jnp.log(0.1), "log_var": s}
    fns = {
        "value+all gradients": (jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3))), (Y, M, K, s)),
        "hessian_log_var": (jax.jit(kronlik.hessian_log_var), (Y, M, K, s)),
        "fisher_log_var": (jax.jit(kronlik.fisher_log_var), (M, K, s)),
        f"fisher_information (P={D + 1})": (jax.jit(lambda p: kronlik.fisher_information(cov_fn, p)), (params,)),
    }
    seconds = {name: _median_seconds(fn, args, repeats) for name, (fn, args) in fns.items()}
    base = seconds["value+all gradients"]
    return {"T": T, "D": D, "seconds": seconds, "ratio": {k: v / base for k, v in seconds.items()}}


def cost_rows(costs, sizes, repeats, extra=None):
    """``costs(T, D, repeats)`` for each "TxD" in ``sizes``, each row printed as it comes."""
    rows = []
    for size in sizes:
        T, D = (int(v) for v in size.split("x"))
        row = costs(T, D, repeats)
        rows.append(row)
        print(
            f"T={T} D={D}: "
            + ", ".join(f"{k} {v * 1e3:.1f} ms ({row['ratio'][k]:.2f}x)" for k, v in row["seconds"].items())
        )
        if extra:
            print("  " + extra + ": " + ", ".join(f"{k} {v:.1e}" for k, v in row[extra].items()))
    return rows


def _timed_fit(Y, M, K, method, warm_up=True):
    fit = lambda: kronlik.fit_log_var(Y, M, K, jnp.zeros(Y.shape[1]), method=method)  # noqa: E731
    if warm_up:
        jax.block_until_ready(fit().params)
    start = time.perf_counter()
    result = fit()
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - start
    grad = float(jnp.max(jnp.abs(kronlik.grad_log_var(Y, M, K, result.params))))
    return {
        "steps": int(result.num_steps),
        "seconds": seconds,
        "loglik": float(result.value),
        "max_abs_grad": grad,
        "converged": bool(result.converged),
    }


def _problems(small):
    from kronlik.datasets import load_macrodata

    if not small:
        t, Y, _ = load_macrodata()
        Y = (Y - Y.mean(0)) / Y.std(0)
        x = jnp.asarray((t - t.min()) / (t.max() - t.min()))
        K = 0.5 * np.eye(Y.shape[1]) + 0.5 * np.corrcoef(Y.T)
        yield "built-in macro data (RBF ℓ=0.0156)", jnp.asarray(Y), _rbf(x, jnp.log(0.0156)), jnp.asarray(K)
    T = 100 if small else 500
    rng = np.random.default_rng(1)
    for D in (4,) if small else (4, 20):
        tt = np.linspace(0.0, 1.0, T)
        M = np.asarray(kernels.rbf(jnp.asarray(tt), jnp.asarray(tt), 0.05))
        A = rng.standard_normal((D, D))
        K = A @ A.T / D + 0.1 * np.eye(D)
        truth = np.log(np.linspace(0.1, 1.0, D))
        F = np.linalg.cholesky(M + 1e-8 * np.eye(T)) @ rng.standard_normal((T, D)) @ np.linalg.cholesky(K).T
        Y = F + rng.standard_normal((T, D)) * np.exp(truth / 2)
        name = f"fit_log_variances-style T={T}, D={D}" + (" (the example's problem)" if D == 4 else "")
        yield name, jnp.asarray(Y), jnp.asarray(M), jnp.asarray(K)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["256x64", "1024x64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="small fitting problems (a smoke test)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    rows = cost_rows(costs, args.sizes, args.repeats)
    fits = {}
    for name, Y, M, K in _problems(args.small):
        fits[name] = {method: _timed_fit(Y, M, K, method, not args.small) for method in ("lbfgs", "newton")}
        for method, r in fits[name].items():
            print(
                f"{name}: {method:6s} {r['steps']:3d} steps {r['seconds']:.3f} s"
                f"  L {r['loglik']:.9f}  max|g| {r['max_abs_grad']:.1e}"
            )
    result = {
        "environment": {
            "jax": jax.__version__,
            "machine": platform.machine(),
            "cpu_count": __import__("os").cpu_count(),
        },
        "costs": rows,
        "fits": fits,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
