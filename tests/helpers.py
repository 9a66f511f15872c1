"""Shared test helpers: problem generators, error measures and jaxpr walking."""

import jax.numpy as jnp
import numpy as np


def spd(rng: np.random.Generator, n: int, floor: float) -> np.ndarray:
    x = rng.standard_normal((n, n))
    return x @ x.T / n + floor * np.eye(n)


def random_problem(rng: np.random.Generator, T: int, D: int, dtype=jnp.float64, diag_noise=False):
    """A well-conditioned random (Y, M, K, Sigma): PSD M, K and SPD Sigma with eigenvalues ≳ 0.1."""
    Y = rng.standard_normal((T, D))
    M, K = spd(rng, T, 0.1), spd(rng, D, 0.1)
    Sigma = np.diag(rng.uniform(0.3, 2.0, D)) if diag_noise else spd(rng, D, 0.3)
    return tuple(jnp.asarray(a, dtype) for a in (Y, M, K, Sigma))


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q


def with_spectrum(rng: np.random.Generator, eigenvalues) -> np.ndarray:
    q = orthogonal(rng, len(eigenvalues))
    return (q * np.asarray(eigenvalues)) @ q.T


def max_rel(a, b) -> float:
    """max |a - b| / max |b| in float64 (the error measure used throughout the tests)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0))


def eqns(jaxpr):
    """Every equation of a jaxpr, recursing into every sub-jaxpr (pjit, custom_vjp/jvp, while, cond, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from eqns(inner)


def exact_log_var_hessian(Y, M, K, s, digits=60):
    """(Hessian, Fisher) in s, in mpmath, from U⁻¹ and w = U⁻¹v (E_d = I ⊗ e_d e_dᵀ):

    ∂²L/∂s_d∂s_e = δ_de g_d + e^{s_d+s_e} [½ tr(U⁻¹E_dU⁻¹E_e) - wᵀE_dU⁻¹E_e w],
    F_de = ½ e^{s_d+s_e} tr(U⁻¹E_dU⁻¹E_e).
    """
    import mpmath

    with mpmath.workdps(digits):
        T, D = Y.shape
        var = [mpmath.exp(mpmath.mpf(x)) for x in s]
        U = mpmath.matrix(T * D, T * D)
        for i in range(T * D):
            for j in range(T * D):
                (t, d), (u, e) = divmod(i, D), divmod(j, D)
                U[i, j] = mpmath.mpf(M[t, u]) * mpmath.mpf(K[d, e]) + (var[d] if i == j else 0)
        u_inv = mpmath.inverse(U)
        w = u_inv * mpmath.matrix([mpmath.mpf(x) for x in Y.reshape(-1)])
        rows = lambda d: [t * D + d for t in range(T)]  # noqa: E731
        hess, fisher = np.zeros((D, D)), np.zeros((D, D))
        for d in range(D):
            for e in range(D):
                tr = mpmath.fsum(u_inv[i, j] ** 2 for i in rows(d) for j in rows(e))
                quad = mpmath.fsum(w[i] * u_inv[i, j] * w[j] for i in rows(d) for j in rows(e))
                h = var[d] * var[e] * (tr / 2 - quad)
                fisher[d, e] = float(var[d] * var[e] * tr / 2)
                if d == e:
                    h += (
                        var[d]
                        * (mpmath.fsum(w[i] ** 2 for i in rows(d)) - mpmath.fsum(u_inv[i, i] for i in rows(d)))
                        / 2
                    )
                hess[d, e] = float(h)
        return hess, fisher


def rebuild_fit(fitted: dict, t, Y):
    """(Y - μ, M, K, Σ, mask) in data units from a ``kronlik fit --out`` JSON and the table it fitted.

    Uses only what the JSON holds (kernel, its parameters, nugget, time origin, K, noise
    variances, column means), so a test of it is a test that the JSON rebuilds the model.
    """
    import jax.numpy as jnp

    from kronlik import kernels

    kern = fitted["kernel"]
    k = kernels.parse(kern["spec"])
    params = {
        "log_lengthscale": jnp.log(jnp.asarray(kern["lengthscale"])),
        "log_period": jnp.log(jnp.asarray(kern["period"], jnp.float64)),
        "log_amplitude": jnp.log(jnp.asarray(kern["amplitude"])),
    }
    x = jnp.asarray(np.asarray(t, np.float64) - fitted["time"]["origin"])
    if kern["method"] in ("dense", "statespace"):  # the state-space path fits the same k + nugget·I
        M = k(params, x) + kern["nugget"] * jnp.eye(x.shape[0])
    else:
        z = jnp.asarray(np.asarray(kern["inducing_times"]) - fitted["time"]["origin"])
        chol = jnp.linalg.cholesky(k(params, z) + kern["nugget"] * jnp.eye(z.shape[0]))
        G = jnp.linalg.solve(chol, k(params, z, x)).T
        M = G @ G.T
    mask = np.isfinite(Y)
    Yc = jnp.asarray(np.where(mask, Y - np.asarray(fitted["column_mean"]), 0.0))
    return Yc, M, jnp.asarray(fitted["K"]), jnp.diag(jnp.asarray(fitted["noise_variance"])), mask


def exact_matern32_loglik(Y, times, amplitude, lengthscale, K, log_var, digits=50) -> float:
    """log N(vec Y; 0, M ⊗ K + I ⊗ diag(e^s)) for a Matérn-3/2 M, in mpmath: a Kalman filter on
    the joint state (f, f'/λ) ⊗ outputs, with the transition in closed form at every gap.

    An exact reference at sizes where a dense mpmath Cholesky is too slow (O(T D³) here), for
    inputs where the float64 dense Cholesky is itself in doubt. Inputs are taken as exact floats
    (or as mpmath numbers, for derivatives by differences in the working precision).
    """
    import mpmath

    with mpmath.workdps(digits):
        mp = mpmath.mpf

        def num(x):  # an mpmath number as is (a perturbed input), a float exactly
            return x if isinstance(x, mpmath.mpf) else mp(float(x))

        T, D = np.shape(Y)
        order = np.argsort(np.asarray(times), kind="stable")
        t = [mp(float(x)) for x in np.asarray(times, np.float64)[order]]
        Y = np.asarray(Y, np.float64)[order]
        lam, var = mpmath.sqrt(3) / num(lengthscale), num(amplitude)

        def kron2(a):  # a (2, 2) mpmath ⊗ the (D, D) identity
            out = mpmath.matrix(2 * D, 2 * D)
            for i in range(2):
                for j in range(2):
                    for k in range(D):
                        out[i * D + k, j * D + k] = a[i, j]
            return out

        p_inf = mpmath.matrix(2 * D, 2 * D)  # (σ² I_2) ⊗ K
        for i in range(2):
            for k in range(D):
                for m in range(D):
                    p_inf[i * D + k, i * D + m] = var * num(K[k][m])
        H = mpmath.matrix(D, 2 * D)
        for k in range(D):
            H[k, k] = 1
        Sigma = mpmath.diag([mpmath.exp(num(x)) for x in log_var])
        m, P, ll = mpmath.matrix(2 * D, 1), p_inf.copy(), mp(0)
        for i in range(T):
            if i:
                x = lam * (t[i] - t[i - 1])
                e = mpmath.exp(-x)
                A = kron2(mpmath.matrix([[e * (1 + x), e * x], [-e * x, e * (1 - x)]]))
                m, P = A * m, A * P * A.T + (p_inf - A * p_inf * A.T)
            S = H * P * H.T + Sigma
            v = mpmath.matrix([mp(float(y)) for y in Y[i]]) - H * m
            s_inv = mpmath.inverse(S)
            gain = P * H.T * s_inv
            m, P = m + gain * v, P - gain * S * gain.T
            ll += -mpmath.log(mpmath.det(S)) / 2 - (v.T * s_inv * v)[0] / 2 - D * mpmath.log(2 * mpmath.pi) / 2
        return ll


def plain_joint_filter_loglik(Y, M, K, Sigma, mask=None):
    """log N(y_o; 0, U_oo) for a StateSpace M by a plain Kalman filter on the joint state, for autodiff.

    State X_i (J, D) with Cov(vec X) = P∞ ⊗ K (vec row-major, J·D), observed through hᵀ X_i with
    noise Σ: no pencil, no eigendecomposition, no hand-derived rule. A missing cell (``mask``
    False) gets observation row 0, residual 0 and unit noise uncoupled from the rest, which adds
    nothing to the log-density; the 2π term counts the observed cells only.
    """
    import jax

    kern = M.kernel
    T, D = Y.shape
    mask = jnp.ones((T, D), bool) if mask is None else jnp.asarray(mask)
    order = jnp.argsort(M.times)
    t, y, obs = M.times[order], jnp.where(mask, Y, 0.0)[order], mask[order]
    h = jnp.asarray(kern.observation())
    J = h.shape[0]
    big_p = jnp.kron(kern.stationary(), 0.5 * (K + K.T))
    H0 = jnp.kron(h[None, :], jnp.eye(D))
    eye = jnp.eye(D)

    def step(carry, inp):
        m, P, ll = carry
        dt, y_i, o_i = inp
        A = jnp.kron(kern.transition(dt), eye)
        m = A @ m
        P = A @ P @ A.T + (big_p - A @ big_p @ A.T)
        both = o_i[:, None] & o_i[None, :]
        H = jnp.where(o_i[:, None], H0, 0.0)
        S = H @ P @ H.T + jnp.where(both, 0.5 * (Sigma + Sigma.T), jnp.diag(jnp.where(o_i, 0.0, 1.0)))
        S = 0.5 * (S + S.T)  # the Cholesky reads one triangle: keep ∂/∂K symmetric
        v = jnp.where(o_i, y_i - H @ m, 0.0)
        c = jnp.linalg.cholesky(S)
        w = jax.scipy.linalg.solve_triangular(c, v, lower=True)
        gain = jax.scipy.linalg.cho_solve((c, True), H @ P).T
        m = m + gain @ v
        P = P - gain @ S @ gain.T
        n_obs = jnp.sum(jnp.where(o_i, 1.0, 0.0))
        ll = ll - jnp.sum(jnp.log(jnp.diagonal(c))) - 0.5 * w @ w - 0.5 * n_obs * jnp.log(2 * jnp.pi)
        return (m, P, ll), None

    # The first state is drawn from the stationary law: start from (0, P∞) with a zero first gap.
    dts = jnp.concatenate([jnp.zeros(1, t.dtype), t[1:] - t[:-1]])
    init = (jnp.zeros(J * D, Y.dtype), big_p, jnp.zeros((), Y.dtype))
    (_, _, ll), _ = jax.lax.scan(step, init, (dts, y, obs))
    return ll
