"""One run of kronlik on a device mesh against the same computation on one device (used by test_sharding.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharding_worker.py devices
    python tests/sharding_worker.py process 0 2 PORT & python tests/sharding_worker.py process 1 2 PORT

Prints one JSON line: the max relative difference (max |a - b| / max |b|) of every quantity, the
sharded against the single-device LowRank, plus what the compiled program gathers. The devices
run takes every entry point; the processes run (CI's time: it runs twice on two cores) loglik
and its gradients, fit_mixed and scan.
"""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

import kronlik
from kronlik.sharding import host_array

T, D = 240, 3


def rel(a, b) -> float:
    a, b = host_array(a).astype(np.float64), host_array(b).astype(np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def leaves(tree):
    """The arrays of a result, gathered from every process (a sharded gradient spans them)."""
    return [host_array(x) for x in jax.tree_util.tree_leaves(tree)]


def main(every_entry_point: bool = True) -> dict:
    """The differences; ``every_entry_point=False``: loglik and its gradients, the fit and the scan only."""
    rng = np.random.default_rng(7)
    mesh = kronlik.row_mesh()
    P = mesh.shape["rows"]
    out = {"devices": P, "processes": jax.process_count()}
    shard = lambda x: kronlik.shard_rows(x, mesh)  # noqa: E731
    # a graded factor (column scales over 4 decades) with r < T/P, and one with r > T/P (the
    # devices' local QRs are then wide)
    G = rng.standard_normal((T, 40)) * np.logspace(0, -4, 40) / np.sqrt(40)
    G_wide = rng.standard_normal((T, T // P + 20)) / np.sqrt(T)
    Y = rng.standard_normal((T, D))
    K = np.array([[1.0, 0.4, 0.2], [0.4, 0.8, -0.1], [0.2, -0.1, 0.6]])
    Sigma = np.array([[0.5, 0.1, 0.0], [0.1, 0.3, 0.005], [0.0, 0.005, 1e-3]])
    log_var = np.log(np.array([0.5, 0.3, 1e-3]))

    def compare(name, fn, G):
        one = fn(jnp.asarray(Y), kronlik.LowRank(jnp.asarray(G)))
        many = fn(shard(Y), kronlik.ShardedLowRank(shard(G), mesh))
        out[name] = max(rel(a, b) for a, b in zip(leaves(many), leaves(one)))

    for label, g in (("", G), ("wide ", G_wide))[: 2 if every_entry_point else 1]:
        compare(label + "loglik", lambda y, m: kronlik.loglik(y, m, K, Sigma), g)
        grad = jax.grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3))
        compare(label + "grad Y, G, K, s", lambda y, m, grad=grad: grad(y, m, K, log_var), g)
    F = np.column_stack([np.ones(T), rng.standard_normal(T)])
    Y_mixed = G_wide @ rng.standard_normal((G_wide.shape[1], D)) + rng.standard_normal((T, D)) + 1.0
    if every_entry_point:
        compare("grad Sigma", lambda y, m: jax.grad(kronlik.loglik, argnums=3)(y, m, K, Sigma), G)
        compare("solve", lambda y, m: kronlik.solve(y, m, K, Sigma), G)
        compare("loglik_mixed", lambda y, m: kronlik.loglik_mixed(y, m, K, Sigma, F), G_wide)
        grad_mixed = jax.grad(kronlik.loglik_mixed, (2, 3))
        compare("grad loglik_mixed K, Sigma", lambda y, m: grad_mixed(y, m, K, Sigma, F), G_wide)
        compare("information_mixed", lambda y, m: kronlik.information_mixed(m, K, Sigma, F), G_wide)

    one = kronlik.fit_mixed(jnp.asarray(Y_mixed), kronlik.LowRank(jnp.asarray(G_wide)), F)
    many = kronlik.fit_mixed(shard(Y_mixed), kronlik.ShardedLowRank(shard(G_wide), mesh), F)
    out["fit loglik"] = rel(many.loglik, one.loglik)
    out["fit K, Sigma (abs)"] = float(max(np.max(np.abs(many.K - one.K)), np.max(np.abs(many.Sigma - one.Sigma))))
    out["fit steps"] = [int(one.num_steps), int(many.num_steps)]
    # the scan with the same null (the two fits stop at their own rounding of the optimum)
    many = many._replace(K=one.K, Sigma=one.Sigma)
    Z = rng.standard_normal((T, 12))
    s_one = kronlik.scan(one, jnp.asarray(Z), batch_size=8)
    s_many = kronlik.scan(many, shard(Z), batch_size=8)
    out["scan"] = max(
        rel(a, b) for a, b in zip((s_many.chi2, s_many.effect, s_many.se), (s_one.chi2, s_one.effect, s_one.se))
    )

    # What the compiled value + gradient moves between devices: the largest gathered array
    M = kronlik.ShardedLowRank(shard(G), mesh)
    hlo = (
        jax.jit(jax.grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3))).lower(shard(Y), M, K, log_var).compile().as_text()
    )
    gathered = [re.search(r"=\s*\w+\[([\d,]*)\]", line) for line in hlo.splitlines() if " all-gather(" in line]
    sizes = [int(np.prod([int(d) for d in m.group(1).split(",") if d])) for m in gathered if m]
    out["all-gathers"] = len(sizes)
    out["largest all-gather"] = max(sizes, default=0)
    spec = tuple(M.eigenbasis().vectors.sharding.spec)
    out["basis sharded"] = list(spec) + [None] * (2 - len(spec))  # P('rows') is P('rows', None)
    if P > 1:  # T that the devices cannot split evenly
        try:
            kronlik.loglik(Y[: T - 1], kronlik.ShardedLowRank(jnp.asarray(G[: T - 1]), mesh), K, Sigma)
            out["uneven"] = "accepted"
        except ValueError as e:
            out["uneven"] = str(e)
    return out


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    if sys.argv[1] == "process":  # before any computation: the processes meet at the coordinator
        pid, nproc, port = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        try:  # recent jax's default; jax 0.5 needs it (a later jax may drop the option)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except AttributeError:
            pass
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid)
    print(json.dumps(main(every_entry_point=sys.argv[1] == "devices")), flush=True)
