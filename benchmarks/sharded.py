"""M = G Gᵀ with G sharded by rows (issue 19, part 4): the cost of TSQR against the single-device SVD.

float64, one process with P CPU devices for each P of ``--devices`` (the script re-runs itself
with ``--xla_force_host_platform_device_count=P``). For G (T × r) of standard normals / √r and
Y (T × D):

* ``basis``: M's basis, the thin SVD of G on one device (``LowRank``) against TSQR + the r × r SVD
  on P devices (``ShardedLowRank``), and the largest difference of λ (relative to max λ);
* ``loglik + grad``: a REML-free value and gradient in (K, log-variances), basis included (both
  forms compute it on every call), compiled first; and the numbers' agreement;
* the bytes of G and of the basis each device holds.

On one host the P CPU devices share its cores: each child runs with OPENBLAS_NUM_THREADS =
cores / P (at least 1; the devices' LAPACK calls run at once, and P pools of every core contend),
the single-device baseline in the same process under the same setting. Beyond P = #cores the
times measure contention, not what P GPUs or P hosts would do; the point of sharding is that
each device holds 1/P of G and of the basis. P = 1 compares TSQR with the SVD it replaces.

Run: python benchmarks/sharded.py [--T 20000 --r 1000 --D 5 --devices 1 2 4] [--json benchmarks/results_sharded.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _timed(fn, *args, repeats: int = 2) -> tuple[float, object]:
    import jax

    out = jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best, out


def run(T: int, r: int, D: int) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)  # a benchmark script is a program: float64 throughout
    import jax.numpy as jnp
    import numpy as np

    import kronlik

    mesh = kronlik.row_mesh()
    P = mesh.shape["rows"]
    rng = np.random.default_rng(0)
    G = rng.standard_normal((T, r)) / np.sqrt(r)
    Y = rng.standard_normal((T, D))
    K = np.eye(D) * 0.5 + 0.1
    log_var = np.log(rng.uniform(0.2, 1.0, D))
    one, many = kronlik.LowRank(jnp.asarray(G)), kronlik.ShardedLowRank(kronlik.shard_rows(G, mesh), mesh)
    Y_one, Y_many = jnp.asarray(Y), kronlik.shard_rows(Y, mesh)

    basis = jax.jit(lambda m: m.eigenbasis())
    t_svd, b_one = _timed(basis, one)
    t_tsqr, b_many = _timed(basis, many)
    value_grad = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=(2, 3)))
    t_one, (v_one, g_one) = _timed(value_grad, Y_one, one, K, log_var)
    t_many, (v_many, g_many) = _timed(value_grad, Y_many, many, K, log_var)
    grad_diff = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        for a, b in zip(jax.tree.leaves(g_many), jax.tree.leaves(g_one))
    )
    per_device = lambda x: max(s.data.nbytes for s in x.addressable_shards)  # noqa: E731
    return {
        "T": T,
        "r": r,
        "D": D,
        "devices": P,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "basis_single_svd_s": t_svd,
        "basis_tsqr_s": t_tsqr,
        "lambda_max_diff_rel": float(jnp.max(jnp.abs(b_many.lam - b_one.lam)) / jnp.max(b_one.lam)),
        "loglik_grad_single_s": t_one,
        "loglik_grad_sharded_s": t_many,
        "loglik_rel_diff": float(abs(v_many - v_one) / abs(v_one)),
        "grad_rel_diff": grad_diff,
        "G_bytes_per_device": {"single": per_device(one.factor), "sharded": per_device(many.factor)},
        "basis_bytes_per_device": {"single": per_device(b_one.vectors), "sharded": per_device(b_many.vectors)},
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=20000)
    parser.add_argument("--r", type=int, default=1000)
    parser.add_argument("--D", type=int, default=5)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import jax

    rows = []
    for count in args.devices:
        if args.child or len(jax.devices()) == count:
            row = run(args.T, args.r, args.D)
        else:  # the device count is fixed when JAX starts: a fresh process
            flag = f"--xla_force_host_platform_device_count={count}"
            env = {
                **os.environ,
                "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip(),
                "JAX_PLATFORMS": "cpu",
            }
            # the devices' LAPACK calls run at once: P BLAS pools of every core each would contend
            env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
            size = ["--T", str(args.T), "--r", str(args.r), "--D", str(args.D), "--devices", str(count), "--child"]
            done = subprocess.run(
                [sys.executable, __file__, *size], env=env, capture_output=True, text=True, check=True
            )
            row = json.loads(done.stdout)[0]
        rows.append(row)
        if not args.child:
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.child:
        print(json.dumps(rows))
    elif args.json:
        with open(args.json, "w") as fh:
            json.dump({"xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
