"""Simulate from known (M, K, Σ), fit the log noise variances with kronlik.fit_log_var, recover the truth.

Run: python examples/fit_log_variances.py [T] [D]
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import kronlik
from kronlik import kernels

jax.config.update("jax_enable_x64", True)  # an example script may choose its precision


def main(T: int = 500, D: int = 4):
    rng = np.random.default_rng(1)
    t = np.linspace(0.0, 1.0, T)
    M = np.asarray(kernels.rbf(jnp.asarray(t), jnp.asarray(t), 0.05))
    A = rng.standard_normal((D, D))
    K = A @ A.T / D + 0.1 * np.eye(D)
    truth = np.log(np.linspace(0.1, 1.0, D))
    # vec(Y) ~ N(0, M ⊗ K + I ⊗ Σ) drawn as F + E with F = L_M Z L_Kᵀ: no TD×TD matrix needed
    lm = np.linalg.cholesky(M + 1e-8 * np.eye(T))
    F = lm @ rng.standard_normal((T, D)) @ np.linalg.cholesky(K).T
    Y = F + rng.standard_normal((T, D)) * np.exp(truth / 2)

    result = kronlik.fit_log_var(jnp.asarray(Y), jnp.asarray(M), jnp.asarray(K), jnp.zeros(D), progress=True)
    fitted = np.asarray(result.params)
    # standard errors from the observed information -∂²L/∂s∂sᵀ, in closed form (kronlik.hessian_log_var)
    se = np.asarray(result.std_errors)
    print(f"\nT={T}, D={D}: {int(result.num_steps)} L-BFGS steps, converged {bool(result.converged)}")
    print(f"{'output':>6} {'true log var':>13} {'fitted':>9} {'std. err.':>10}")
    for j in range(D):
        print(f"{j:>6} {truth[j]:>13.3f} {fitted[j]:>9.3f} {se[j]:>10.3f}")
    return truth, fitted, se


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
