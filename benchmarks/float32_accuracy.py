"""float32 accuracy on realistic GP problems: kronlik, kronlik in mixed precision, and a dense float32 Cholesky.

Problem: M an RBF kernel (lengthscale 0.1 on [0, 1]) + 1e-6 I, K random PSD, noise variance 1e-3
for every output, Y drawn from the model. Truth: kronlik in float64 (checked against exact
arithmetic in ``benchmarks/accuracy.py`` and the tests). Each float32 computation gets the
float32-rounded inputs; errors are relative (value: |L - L*|/|L*|; gradients: max|g - g*|/max|g*|)
for the value and the gradients in K, log_var (s) and M. ``mixed`` is ``eigh_dtype="float64"``:
M's eigendecomposition in float64, everything else in float32. Times are value + the four
gradients, jit-compiled, median of 3, in the same process.

Run: python -m benchmarks.float32_accuracy [--sizes 256x4 1024x8 ...] [--dense-limit 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # float64 for the truth and for the mixed mode

import kronlik  # noqa: E402
from kronlik import kernels, reference  # noqa: E402

ARGS = (0, 1, 2, 3)


def problem(T: int, D: int, seed: int = 0, ell: float = 0.1, noise: float = 1e-3):
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, T)
    M = np.asarray(kernels.rbf(jnp.asarray(t), jnp.asarray(t), ell)) + 1e-6 * np.eye(T)
    A = rng.standard_normal((D, D))
    K = A @ A.T / D + 0.1 * np.eye(D)
    F = np.linalg.cholesky(M) @ rng.standard_normal((T, D)) @ np.linalg.cholesky(K).T
    Y = F + np.sqrt(noise) * rng.standard_normal((T, D))
    return Y, M, K, np.full(D, np.log(noise))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _time(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(T: int, D: int, dense_limit: int) -> dict:
    Y, M, K, s = problem(T, D)
    f64 = tuple(jnp.asarray(a, jnp.float64) for a in (Y, M, K, s))
    f32 = tuple(jnp.asarray(a, jnp.float32) for a in (Y, M, K, s))
    truth = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=ARGS))(*f64)

    def errors(value, grads):
        return {
            "value": abs(float(value) - float(truth[0])) / abs(float(truth[0])),
            "K": _rel(grads[2], truth[1][2]),
            "log_var": _rel(grads[3], truth[1][3]),
            "M": _rel(grads[1], truth[1][1]),
        }

    row = {"T": T, "D": D, "errors": {}, "seconds": {}}
    runs = {
        "kronlik float32": jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=ARGS)),
        "kronlik mixed": jax.jit(
            jax.value_and_grad(lambda *a: kronlik.loglik_diag(*a, eigh_dtype="float64"), argnums=ARGS)
        ),
    }
    if T * D <= dense_limit:

        def dense(Y, M, K, s):
            return reference.loglik(Y, M, K, jnp.diag(jnp.exp(s)))

        runs["dense float32"] = jax.jit(jax.value_and_grad(dense, argnums=ARGS))
    for name, fn in runs.items():
        row["errors"][name] = errors(*fn(*f32))
        row["seconds"][name] = _time(fn, *f32)
    reports = {
        "float32": kronlik.validate(*f32[:3], log_var=f32[3], warn=False),
        "mixed": kronlik.validate(*f32[:3], log_var=f32[3], eigh_dtype="float64", warn=False),
    }
    row["validate"] = {k: [r.error_bound, r.gradient_error_bound] for k, r in reports.items()}
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["256x4", "256x32", "1024x4", "1024x8", "2048x4", "2048x32"])
    parser.add_argument("--dense-limit", type=int, default=8192, help="largest T·D for the dense float32 Cholesky")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'T':>5} {'D':>3} {'method':<16} {'value':>8} {'dK':>8} {'ds':>8} {'dM':>8} {'seconds':>8}")
    for size in args.sizes:
        T, D = (int(x) for x in size.split("x"))
        row = measure(T, D, args.dense_limit)
        rows.append(row)
        for name, e in row["errors"].items():
            print(
                f"{T:>5} {D:>3} {name:<16} {e['value']:>8.1e} {e['K']:>8.1e} {e['log_var']:>8.1e} {e['M']:>8.1e} "
                f"{row['seconds'][name]:>8.3f}",
                flush=True,
            )
        (f, fg), (m, mg) = row["validate"]["float32"], row["validate"]["mixed"]
        print(f"{'':>9} validate error bounds (terms, gradients): float32 {f:.1e}, {fg:.1e}; mixed {m:.1e}, {mg:.1e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
