"""A multi-output GP on real data: fit an RBF kernel over time, a free K and diagonal noise jointly.

The US macro series shipped with kronlik (GDP growth, unemployment, inflation, T-bill
rate; public domain). jax.grad of kronlik.loglik_diag runs the hand-derived backward
pass, so no eigendecomposition is differentiated. Then the posterior predictive on a
fine time grid, two years past the data, drawn with matplotlib.

Run: python examples/multioutput_gp.py [out.png] [number of quarters to use]
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import kronlik
from kronlik import kernels
from kronlik.datasets import load_macrodata

jax.config.update("jax_enable_x64", True)  # an example script may choose its precision


def rbf(a, b, log_ell):
    return kernels.rbf(a, b, jnp.exp(log_ell))


def main(out: str = "multioutput_gp.png", quarters: int = 202):
    years, Y, names = load_macrodata()
    years, Y = years[-quarters:], Y[-quarters:]
    mean, scale = Y.mean(0), Y.std(0)
    Ys = jnp.asarray((Y - mean) / scale)
    t = jnp.asarray((years - years[0]) / 10.0)  # decades
    T, D = Ys.shape

    def unpack(p):
        K = p["L"] @ p["L"].T + jnp.diag(jnp.exp(p["log_kappa"]))
        return rbf(t, t, p["log_ell"]), K, p["log_var"]

    def loss(p):
        return -kronlik.loglik_diag(Ys, *unpack(p)) / (T * D)

    p0 = {"log_ell": jnp.log(0.1), "L": 0.7 * jnp.eye(D), "log_kappa": jnp.full(D, -2.0), "log_var": jnp.full(D, -0.7)}
    result = kronlik.fit(loss, p0, tol=1e-6, progress=True)
    M, K, log_var = unpack(result.params)
    print(f"\nconverged {bool(result.converged)} after {int(result.num_steps)} steps")
    print(f"lengthscale {float(jnp.exp(result.params['log_ell'])) * 10:.2f} years")
    for j, n in enumerate(names):
        print(f"{n:>12}: noise variance {float(jnp.exp(log_var[j])):.4f} (standardised)")

    grid = jnp.linspace(0.0, float(t[-1]) + 0.2, 400)
    mu, var = kronlik.predict(
        Ys, M, K, jnp.diag(jnp.exp(log_var)), rbf(grid, t, result.params["log_ell"]), jnp.ones(400)
    )
    mu = np.asarray(mu) * scale + mean
    sd = np.sqrt(np.maximum(np.asarray(var), 0.0)) * scale
    x = years[0] + 10.0 * np.asarray(grid)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(D, 1, figsize=(8, 2 * D), sharex=True)
    for j, ax in enumerate(axes):
        ax.plot(years, Y[:, j], ".", ms=3, color="0.4")
        ax.plot(x, mu[:, j], color="C1")
        ax.fill_between(x, mu[:, j] - 2 * sd[:, j], mu[:, j] + 2 * sd[:, j], color="C1", alpha=0.25)
        ax.set_ylabel(names[j])
    axes[-1].set_xlabel("year")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return {
        "converged": bool(result.converged),
        "loglik_before": -float(loss(p0)) * T * D,
        "loglik_after": -float(result.value) * T * D,
    }


if __name__ == "__main__":
    main(*sys.argv[1:2], *(int(a) for a in sys.argv[2:3]))
