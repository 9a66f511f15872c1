"""Low-rank M = G Gᵀ at scale: value and all gradients for T = 100 000, D = 8, r = 200.

The full-M path would need a 10¹⁰-entry M; the LowRank path holds O(T (r + D)) numbers.
Run: python benchmarks/lowrank.py [--T 100000 --D 8 --r 200 --dtype float64]
"""

import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import kronlik


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, default=100_000)
    parser.add_argument("--D", type=int, default=8)
    parser.add_argument("--r", type=int, default=200)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    T, D, r = args.T, args.D, args.r
    G = jnp.asarray(rng.standard_normal((T, r)) / np.sqrt(r), dtype)
    Y = jnp.asarray(rng.standard_normal((T, D)), dtype)
    A = rng.standard_normal((D, D))
    K = jnp.asarray(A @ A.T / D, dtype)
    log_var = jnp.zeros(D, dtype)
    fn = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3)))
    start = time.perf_counter()
    value, grads = jax.block_until_ready(fn(Y, kronlik.LowRank(G), K, log_var))
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(Y, kronlik.LowRank(G), K, log_var))
        times.append(time.perf_counter() - start)
    assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    result = {
        "T": T,
        "D": D,
        "r": r,
        "dtype": args.dtype,
        "value_and_all_grads_s": statistics.median(times),
        "first_call_incl_compile_s": first,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
