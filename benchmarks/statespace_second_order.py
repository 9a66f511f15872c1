"""Second derivatives with a state-space M: Hessian-vector products against value + all gradients.

The problem of ``benchmarks/statespace.py`` (Matérn 3/2, irregular times, K random SPD,
Σ = diag(exp(log_var))), float64, one CPU thread. For each (T, D) it times, jit'd, after a compile
call, the median of --repeats calls of:

* ``value+grad``: ``jax.value_and_grad`` of ``kronlik.loglik_diag`` in (Y, M, K, log_var);
* ``hvp θ,Y``: one Hessian-vector product (forward over reverse) along a direction moving Y, the
  times and the kernel's parameters (O(T D J²): forward mode through the per-output recursions);
* ``hvp K,s``: one along a direction moving K and the log-variances (adds the D(D-1)/2 pair
  traces, a joint filter per pair: O(T D² J³));
* ``hvp all``: one along a direction moving every argument.

Ratios to ``value+grad`` are taken within the run. Run:

    taskset -c 1 python benchmarks/statespace_second_order.py --json benchmarks/results_statespace_second_order.json
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
from kronlik.statespace import Matern32  # noqa: E402


def problem(T: int, D: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = jnp.asarray(np.cumsum(rng.exponential(1.0, T)))
    a = rng.standard_normal((D, D))
    K = jnp.asarray(a @ a.T / D + 0.1 * np.eye(D))
    M = kronlik.StateSpace(t, Matern32(jnp.asarray(1.0), jnp.asarray(5.0)))
    return jnp.asarray(rng.standard_normal((T, D))), M, K, jnp.asarray(rng.uniform(-1.0, 1.0, D))


def _direction(args, which, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for i, x in enumerate(args):
        leaves, tree = jax.tree_util.tree_flatten(x)
        scale = 1e-3 if i == 1 else 0.1
        moved = [
            jnp.asarray(scale * rng.standard_normal(np.shape(v))) if i in which else jnp.zeros_like(v) for v in leaves
        ]
        out.append(jax.tree_util.tree_unflatten(tree, moved))
    return tuple(out)


_GRAD = jax.grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3))
_VALUE_AND_GRAD = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3)))


def _hvp(which):
    """(args, v) ↦ H v for v moving only the arguments in ``which`` (the others are held fixed, so
    their tangents are JAX's symbolic zeros and the rule skips what they would need)."""

    def hvp(args, v):
        def grad_of(*moving):
            full = list(args)
            for i, x in zip(which, moving):
                full[i] = x
            return _GRAD(*full)

        return jax.jvp(grad_of, tuple(args[i] for i in which), tuple(v[i] for i in which))[1]

    return jax.jit(hvp)


def _median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(T: int, D: int, repeats: int) -> dict:
    args = problem(T, D)
    row = {"T": T, "D": D, "value+grad": _median_time(lambda: _VALUE_AND_GRAD(*args), repeats)}
    for name, which in (("hvp θ,Y", (0, 1)), ("hvp K,s", (2, 3)), ("hvp all", (0, 1, 2, 3))):
        v = _direction(args, which)
        hvp = _hvp(which)
        row[name] = _median_time(lambda v=v, hvp=hvp: hvp(args, v), repeats)
        row[f"{name} / value+grad"] = row[name] / row["value+grad"]
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python benchmarks/statespace_second_order.py")
    parser.add_argument("--sizes", nargs="+", default=["10000x2", "10000x8", "100000x2", "100000x8"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    a = parser.parse_args(argv)
    rows = [bench(*map(int, s.split("x")), a.repeats) for s in a.sizes]
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
