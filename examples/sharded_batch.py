"""Many datasets at once, across devices: a batch of Y sharing M and K, and a batch of whole problems.

1. Shared M, K, Σ (thousands of phenotypes on one kinship matrix, replicate series on one time
   grid): factorise M once with ``kronlik.factorize`` and ``jax.vmap`` over Y. Put the batch axis
   of Y on a ``NamedSharding`` over a device mesh and replicate the rest; ``jax.jit`` then runs
   each device's slice of the batch where it lives. (Passing the raw M instead would have each
   device eigendecompose the replicated M itself, once, not once per Y.)
2. Independent problems (each with its own M, K, Σ): ``jax.shard_map`` gives each device a
   block of problems to ``vmap`` over, with no communication at all.

Both scale the same way to several GPUs or hosts: start each process with
``jax.distributed.initialize()``, build the mesh over ``jax.devices()`` (all hosts), and feed
each host its slice of the batch (``jax.make_array_from_process_local_data``). What does not
shard is a single huge dense problem: one ``eigh`` of one T×T M runs on one device (when
M = GGᵀ, ``kronlik.ShardedLowRank`` splits G's rows over the devices instead).

Run on CPU as 4 devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/sharded_batch.py
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kronlik
from kronlik import kernels

try:
    from jax import shard_map
except ImportError:  # older jax (kronlik's minimum is 0.5) has it under experimental, without
    # replication rules for the while loop in kronlik's factorisation
    from functools import partial

    from jax.experimental.shard_map import shard_map

    shard_map = partial(shard_map, check_rep=False)

jax.config.update("jax_enable_x64", True)  # an example script may choose its precision


def main(batch: int = 16, T: int = 40, D: int = 3) -> dict:
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("batch",))
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, T)
    M = jnp.asarray(np.asarray(kernels.rbf(jnp.asarray(t), jnp.asarray(t), 0.2)) + 1e-3 * np.eye(T))
    K = jnp.asarray(np.eye(D) + 0.3)
    Sigma = jnp.asarray(0.5 * np.eye(D))
    Ys = jnp.asarray(rng.standard_normal((batch, T, D)))

    # 1. a batch of Y sharing one factorisation of M
    fm = kronlik.factorize(M)
    per_y = jax.jit(jax.vmap(kronlik.loglik, in_axes=(0, None, None, None)))
    single = per_y(Ys, fm, K, Sigma)
    replicated = NamedSharding(mesh, P())
    sharded = per_y(
        jax.device_put(Ys, NamedSharding(mesh, P("batch"))),
        jax.device_put(fm, replicated),
        jax.device_put(K, replicated),
        jax.device_put(Sigma, replicated),
    )

    # 2. a batch of independent problems, a block per device
    Ms = jnp.stack([M * (1 + 0.1 * b) for b in range(batch)])
    Ks = jnp.stack([K * (1 + 0.05 * b) for b in range(batch)])
    Sigmas = jnp.broadcast_to(Sigma, (batch, D, D))
    value_and_grad = jax.vmap(jax.value_and_grad(kronlik.loglik_diag, argnums=3), in_axes=(0, 0, 0, 0))
    log_vars = jnp.log(jax.vmap(jnp.diagonal)(Sigmas))
    single_vg = jax.jit(value_and_grad)(Ys, Ms, Ks, log_vars)
    spec = P("batch")
    blockwise = jax.jit(shard_map(value_and_grad, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec, spec)))
    sharded_vg = blockwise(*(jax.device_put(a, NamedSharding(mesh, spec)) for a in (Ys, Ms, Ks, log_vars)))

    err = max(
        float(jnp.max(jnp.abs(sharded - single))),
        float(jnp.max(jnp.abs(sharded_vg[0] - single_vg[0]))),
        float(jnp.max(jnp.abs(sharded_vg[1] - single_vg[1]))),
    )
    devices = len(sharded.sharding.device_set)
    print(f"{n} devices; batch sharded over {devices}; max |sharded - single device| = {err:.1e}")
    return {"devices": n, "output_devices": devices, "max_abs_diff": err}


if __name__ == "__main__":
    main()
