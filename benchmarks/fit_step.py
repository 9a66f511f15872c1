"""Per-step cost of fit_log_var's cached loop against recomputing the full factorisation each step.

The cached step (M eigendecomposed and Y rotated once) is O(TD² + D³); the uncached
step is jax.value_and_grad(kronlik.loglik_diag) on the raw M: one eigh of M, O(T³), per step. Both are
jit-compiled and timed in the same process; the ratio is what to quote.

Run: python benchmarks/fit_step.py [--T 1024 --D 8 --repeats 20]
"""

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import kronlik
from kronlik import kernels


def _median_seconds(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--D", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    T, D = args.T, args.D
    t = np.linspace(0, 1, T)
    M = jnp.asarray(kernels.rbf(jnp.asarray(t), jnp.asarray(t), 0.1), jnp.float32)
    K = jnp.asarray(np.eye(D) + 0.5, jnp.float32)
    Y = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    s = jnp.zeros(D, jnp.float32)

    # one factorisation of M per step: value and gradient from one forward pass
    uncached = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=3))

    fm = kronlik.factorize(M)
    y_rot = fm.vectors.T @ Y
    cached = jax.jit(jax.value_and_grad(kronlik.loglik_diag_rotated, argnums=3))  # what fit_log_var runs
    v1, g1 = uncached(Y, M, K, s)
    v2, g2 = cached(y_rot, fm.values, K, s)
    np.testing.assert_allclose(v1, v2, rtol=1e-4)
    np.testing.assert_allclose(g1, g2, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(g1))))
    t_uncached = _median_seconds(uncached, (Y, M, K, s), args.repeats)
    t_cached = _median_seconds(cached, (y_rot, fm.values, K, s), args.repeats)
    result = {
        "T": T,
        "D": D,
        "dtype": "float32",
        "uncached_step_s": t_uncached,
        "cached_step_s": t_cached,
        "ratio": t_uncached / t_cached,
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
