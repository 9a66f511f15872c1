"""Peak host memory of kronlik value + all gradients at one size (run it in a fresh process).

Run: python benchmarks/peak_memory.py --T 4096 --D 256
The inputs alone take (T² + TD + 2D²) numbers; a TD×TD matrix would take (TD)².
"""

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

import kronlik
from kronlik import kernels


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--D", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    args = parser.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    T, D = args.T, args.D
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, T)
    M = jnp.asarray(np.asarray(kernels.rbf(jnp.asarray(t), jnp.asarray(t), 0.1)) + 1e-2 * np.eye(T), dtype)
    A = rng.standard_normal((D, D))
    K = jnp.asarray(A @ A.T / D + 0.1 * np.eye(D), dtype)
    Y = jnp.asarray(rng.standard_normal((T, D)), dtype)
    Sigma = jnp.asarray(np.diag(rng.uniform(0.5, 2.0, D)), dtype)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    fn = jax.jit(jax.value_and_grad(kronlik.loglik, argnums=(0, 1, 2, 3)))
    value, grads = jax.block_until_ready(fn(Y, M, K, Sigma))
    seconds = time.perf_counter() - start
    itemsize = dtype.itemsize
    result = {
        "T": T,
        "D": D,
        "dtype": args.dtype,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_call_MiB": base,
        "inputs_MiB": (T * T + T * D + 2 * D * D) * itemsize / 2**20,
        "dense_U_would_be_MiB": (T * D) ** 2 * itemsize / 2**20,
        "seconds_incl_compile": seconds,
        "finite": bool(np.isfinite(float(value))),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
