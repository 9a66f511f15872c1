r"""Accuracy of the StateSpace form of M (kronlik.statespace) against exact arithmetic and dense float64.

Two tiers:

* ``tiny``: T ≤ 30, D ≤ 3, the extreme cases (near-duplicate and duplicate times, lengthscales 1e-3 and
  1e4 times the span, a log-variance of -40, K singular, Σ = cI, SHO at and near critical damping,
  sums and products). The exact answer is computed with mpmath (mp.dps = 50) from the closed-form
  kernel: M_ts = k(t_t - t_s) in mpmath, U, its Cholesky, log det, U⁻¹; Γ = wwᵀ - U⁻¹ gives
  ∂L/∂M_ts = ½ Σ_de Γ_(td)(se) K_de, ∂L/∂K, ∂L/∂Σ, ∂L/∂s, ∂L/∂Y = -W; the kernel parameters' and the
  times' gradients by the chain rule through mpmath.diff of the closed form. Hessian-vector products
  (in kernel parameters, times and Y) are central differences of the exact gradient with a 1e-20
  step at 50 digits. Each row reports kronlik's error against exact AND the dense float64 Cholesky's
  (``kronlik.reference.loglik(Y, M.dense(), K, Σ)`` and its ``jax.grad`` / ``jax.jvp``).
* ``T2000``: T = 2,000 with the dense float64 reference (no exact answer): kronlik's difference
  from dense, and an estimate of dense's own error (dense evaluated again with the rows permuted).

Pass rule (the promise): err_kronlik ≤ max(1e-10, 10 · err_dense) per quantity. Also the NaN
cases (U not PD: the result must be NaN, never finite) and the second-order / jit / vmap / float32
smoke checks.

Run: ``python -m benchmarks.statespace_accuracy [--quick] [--skip-2000]``; writes
benchmarks/results_statespace_accuracy.json and /tmp/results_statespace_accuracy.md.
``--scan=parallel`` runs the same cases with the associative-scan recursions (every form here
has ``scan="auto"``, which then reads KRONLIK_STATESPACE_SCAN=parallel) and writes
..._accuracy_parallel.json / .md instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import mpmath  # noqa: E402
import numpy as np  # noqa: E402

import kronlik  # noqa: E402
from kronlik import reference  # noqa: E402
from kronlik import statespace as ssk  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
JSON_OUT = os.path.join(HERE, "results_statespace_accuracy.json")
MD_OUT = "/tmp/results_statespace_accuracy.md"
DPS = 50
TOL = 1e-10

# ---------------------------------------------------------------------------------------------
# Kernel specs: ("m12", a, l), ("m32", a, l), ("m52", a, l), ("sho", a, w, Q), ("sum", s1, s2, ...),
# ("prod", s1, s2). Parameters are listed depth first, the order of jax.tree_util.tree_leaves.
# ---------------------------------------------------------------------------------------------


def spec_params(spec) -> list[float]:
    if spec[0] in ("sum", "prod"):
        return [p for s in spec[1:] for p in spec_params(s)]
    return [float(x) for x in spec[1:]]


def spec_names(spec, prefix="") -> list[str]:
    kind = spec[0]
    if kind in ("sum", "prod"):
        return [n for i, s in enumerate(spec[1:]) for n in spec_names(s, f"{prefix}{kind}{i}.")]
    names = {"m12": ("amp", "ell"), "m32": ("amp", "ell"), "m52": ("amp", "ell"), "sho": ("amp", "w0", "Q")}[kind]
    return [f"{prefix}{kind}.{n}" for n in names]


def build_jax(spec, params, dtype=jnp.float64):
    it = iter(params)

    def rec(s):
        kind = s[0]
        if kind == "sum":
            out = rec(s[1])
            for sub in s[2:]:
                out = out + rec(sub)
            return out
        if kind == "prod":
            return rec(s[1]) * rec(s[2])
        cls = {"m12": ssk.Matern12, "m32": ssk.Matern32, "m52": ssk.Matern52, "sho": ssk.SHO}[kind]
        return cls(*(jnp.asarray(next(it), dtype) for _ in s[1:]))

    return rec(spec)


def mp_kernel(spec, params, tau):
    """k(|tau|) in mpmath with params a list of mpf (depth-first)."""
    it = iter(params)

    def rec(s):
        kind = s[0]
        if kind == "sum":
            fs = [rec(sub) for sub in s[1:]]
            return lambda x: mpmath.fsum(f(x) for f in fs)
        if kind == "prod":
            fa, fb = rec(s[1]), rec(s[2])
            return lambda x: fa(x) * fb(x)
        if kind == "m12":
            a, l = next(it), next(it)
            return lambda x: a * mpmath.exp(-x / l)
        if kind == "m32":
            a, l = next(it), next(it)

            def m32(x):
                r = mpmath.sqrt(3) * x / l
                return a * (1 + r) * mpmath.exp(-r)

            return m32
        if kind == "m52":
            a, l = next(it), next(it)

            def m52(x):
                r = mpmath.sqrt(5) * x / l
                return a * (1 + r + r * r / 3) * mpmath.exp(-r)

            return m52
        if kind == "sho":
            a, w, q = next(it), next(it), next(it)

            def sho(x):
                f = w / (2 * q)
                d = w * w - f * f
                if d > 0:
                    eta = mpmath.sqrt(d)
                    return a * mpmath.exp(-f * x) * (mpmath.cos(eta * x) + f * mpmath.sin(eta * x) / eta)
                if d < 0:
                    eta = mpmath.sqrt(-d)
                    return a * mpmath.exp(-f * x) * (mpmath.cosh(eta * x) + f * mpmath.sinh(eta * x) / eta)
                return a * mpmath.exp(-f * x) * (1 + f * x)

            return sho
        raise ValueError(kind)

    return rec(spec)(abs(tau))


# ---------------------------------------------------------------------------------------------
# The exact answer (mpmath)
# ---------------------------------------------------------------------------------------------


class NotPD(Exception):
    pass


def exact(times, params, spec, Y, K, noise, kind, want_param_grads=True, want_time_grads=True):
    """value, W, and every gradient in mpmath; times/params/Y may be mpf lists; K, noise float64."""
    mp = mpmath.mpf
    T = len(times)
    D = len(K)
    t = [mp(x) for x in times]
    p = [mp(x) for x in params]
    Ym = [[mp(Y[i][d]) for d in range(D)] for i in range(T)]
    k = [[(mp(K[i][j]) + mp(K[j][i])) / 2 for j in range(D)] for i in range(D)]
    if kind == "full":
        s = [[(mp(noise[i][j]) + mp(noise[j][i])) / 2 for j in range(D)] for i in range(D)]
    else:
        s = [[mpmath.exp(mp(noise[i])) if i == j else mp(0) for j in range(D)] for i in range(D)]
    M = [[None] * T for _ in range(T)]
    for i in range(T):
        for j in range(i, T):
            M[i][j] = M[j][i] = mp_kernel(spec, p, t[i] - t[j])
    n = T * D
    U = mpmath.matrix(n, n)
    for a in range(T):
        for b in range(T):
            for d in range(D):
                for e in range(D):
                    U[a * D + d, b * D + e] = M[a][b] * k[d][e] + (s[d][e] if a == b else 0)
    try:
        L = mpmath.cholesky(U)
    except ValueError:
        raise NotPD from None
    v = mpmath.matrix([Ym[i][d] for i in range(T) for d in range(D)])
    logdet = 2 * mpmath.fsum(mpmath.log(L[i, i]) for i in range(n))
    w = mpmath.cholesky_solve(U, v)
    quad = mpmath.fsum(v[i] * w[i] for i in range(n))
    value = -(logdet + quad + n * mpmath.log(2 * mpmath.pi)) / 2
    Linv = mpmath.inverse(L)
    Uinv = Linv.T * Linv
    G = [[w[i] * w[j] - Uinv[i, j] for j in range(n)] for i in range(n)]
    gM = [
        [mpmath.fsum(G[a * D + d][b * D + e] * k[d][e] for d in range(D) for e in range(D)) / 2 for b in range(T)]
        for a in range(T)
    ]
    gK = [
        [mpmath.fsum(G[a * D + d][b * D + e] * M[a][b] for a in range(T) for b in range(T)) / 2 for e in range(D)]
        for d in range(D)
    ]
    gS = [[mpmath.fsum(G[a * D + d][a * D + e] for a in range(T)) / 2 for e in range(D)] for d in range(D)]
    glv = [s[d][d] * gS[d][d] for d in range(D)]
    W = [[w[i * D + d] for d in range(D)] for i in range(T)]
    out = dict(value=value, W=W, gY=[[-x for x in row] for row in W], gK=gK, gS=gS, glv=glv, gM=gM)
    if want_param_grads:
        gp = []
        for idx in range(len(p)):

            def kf(x, tau, idx=idx):
                q = list(p)
                q[idx] = x
                return mp_kernel(spec, q, tau)

            acc = []
            for i in range(T):
                for j in range(i, T):
                    wgt = gM[i][j] + (gM[j][i] if j != i else 0)
                    acc.append(wgt * mpmath.diff(lambda x, d=t[i] - t[j]: kf(x, d), p[idx]))
            gp.append(mpmath.fsum(acc))
        out["gp"] = gp
    if want_time_grads:
        gt = []
        for i in range(T):
            acc = []
            for j in range(T):
                if j == i:
                    continue
                dk = mpmath.diff(lambda x: mp_kernel(spec, p, x), t[i] - t[j])
                acc.append((gM[i][j] + gM[j][i]) * dk)
            gt.append(mpmath.fsum(acc))
        out["gt"] = gt
    return out


def to_np(x):
    if isinstance(x, list):
        return np.array([to_np(y) for y in x], dtype=np.float64)
    return float(x)


def exact_hvp(times, params, spec, Y, K, noise, kind, vt, vp, vY, vK, vN, h="1e-20"):
    """Directional derivative of the exact gradient along (vt, vp, vY, vK, vN): every argument moves."""
    mp = mpmath.mpf
    h = mpmath.mpf(h)
    T, D = len(times), len(K)

    def moved(x, v, sign):
        if isinstance(x, list):
            return [moved(a, b, sign) for a, b in zip(x, v)]
        return mp(x) + sign * h * mp(v)

    def at(sign):
        tt = [mp(times[i]) + sign * h * mp(vt[i]) for i in range(T)]
        pp = [mp(params[i]) + sign * h * mp(vp[i]) for i in range(len(params))]
        yy = [[mp(Y[i][d]) + sign * h * mp(vY[i][d]) for d in range(D)] for i in range(T)]
        return exact(tt, pp, spec, yy, moved(K, vK, sign), moved(noise, vN, sign), kind)

    plus, minus = at(1), at(-1)
    res = {}
    for key in ("gt", "gp", "gY", "gK", "gS", "glv"):
        a, b = plus[key], minus[key]
        if isinstance(a[0], list):
            res[key] = [[(a[i][j] - b[i][j]) / (2 * h) for j in range(len(a[0]))] for i in range(len(a))]
        else:
            res[key] = [(a[i] - b[i]) / (2 * h) for i in range(len(a))]
    return res


# ---------------------------------------------------------------------------------------------
# kronlik and dense float64
# ---------------------------------------------------------------------------------------------


def full_sigma(noise, kind):
    return jnp.diag(jnp.exp(noise)) if kind == "logvar" else noise


def kron_fn(kind):
    return kronlik.loglik_diag if kind == "logvar" else kronlik.loglik


def _dense_logvar(Y, M, K, noise):
    return reference.loglik(Y, M.dense(), K, jnp.diag(jnp.exp(noise)))


def _dense_full(Y, M, K, noise):
    return reference.loglik(Y, M.dense(), K, noise)


def dense_fn(kind):
    return _dense_logvar if kind == "logvar" else _dense_full


@jax.jit
def _helpers_logvar(Y, M, K, noise):
    return kronlik.solve(Y, M, K, jnp.diag(jnp.exp(noise))), kronlik.grad_log_var(Y, M, K, noise)


@jax.jit
def _helpers_full(Y, M, K, noise):
    return kronlik.solve(Y, M, K, noise), kronlik.grad_sigma(Y, M, K, noise)


_JIT_CACHE: dict = {}


def _value_and_grad_jit(fn):
    key = ("vg", fn)
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(lambda *a: (fn(*a), jax.grad(fn, argnums=(0, 1, 2, 3))(*a)))
    return _JIT_CACHE[key]


def evaluate(fn, Y, M, K, noise, kind):
    """value and all gradients of fn(Y, M, K, noise) as numpy, keyed like the exact dict (jitted: one
    compilation per kernel structure and shape)."""
    val, (gY, gM, gK, gN) = _value_and_grad_jit(fn)(Y, M, K, noise)
    val = float(val)
    out = dict(
        value=val,
        gY=np.asarray(gY),
        gt=np.asarray(gM.times),
        gp=np.array([float(x) for x in jax.tree_util.tree_leaves(gM.kernel)]),
        gK=np.asarray(gK),
    )
    if kind == "logvar":
        out["glv"] = np.asarray(gN)
    else:
        out["gS"] = np.asarray(gN)
    return out


def kron_helpers(Y, M, K, noise, kind):
    """solve (W) and the gradient helper, through the public helpers."""
    W, h = (_helpers_logvar if kind == "logvar" else _helpers_full)(Y, M, K, noise)
    return dict(W=np.asarray(W), helper=np.asarray(h))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    d = np.linalg.norm(a - b)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(d / nb) if nb > 0 else float(d)


def leafwise(a, b):
    return [rel(x, y) for x, y in zip(np.atleast_1d(a), np.atleast_1d(b))]


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def spd(rng, D, jitter=0.1):
    A = rng.standard_normal((D, D))
    return A @ A.T / D + jitter * np.eye(D)


def make_times(rng, T, mode, span=1.0):
    t = np.sort(rng.uniform(0.0, span, T))
    if mode == "neardup":  # every 3rd time gets a partner 1e-12 later
        extra = t[::3][: T // 3] + 1e-12
        t = np.concatenate([t[: T - len(extra)], extra])
    elif mode == "dup":
        extra = t[::3][: T // 3]
        t = np.concatenate([t[: T - len(extra)], extra])
    elif mode == "neardup_rel":  # gap 1e-12 relative to the span at t ~ span
        t = t + span
        extra = t[::3][: T // 3] * (1 + 1e-12)
        t = np.concatenate([t[: T - len(extra)], extra])
    return t[rng.permutation(len(t))]


def tiny_cases():
    """(name, T, D, time mode, spec, K kind, noise kind, noise spec, check times-grad, hvp)."""
    C = []

    def add(name, spec, T=20, D=2, times="random", K="spd", noise=("logvar", "random"), tgrad=True, hvp=False):
        C.append(dict(name=name, spec=spec, T=T, D=D, times=times, K=K, noise=noise, tgrad=tgrad, hvp=hvp))

    m12 = ("m12", 1.3, 0.3)
    m32 = ("m32", 1.3, 0.3)
    m52 = ("m52", 1.3, 0.3)
    sho_u = ("sho", 1.1, 12.0, 3.0)
    # baselines
    add("m32 random, full Σ", m32, D=3, noise=("full", "random"), hvp=True)
    add("m12 random", m12, hvp=True)
    add("m52 random", m52)
    add("SHO Q=3 random", sho_u, hvp=True)
    add("SHO Q=0.2 (over)", ("sho", 1.1, 12.0, 0.2), hvp=True)
    add("SHO Q=0.02 (strongly over)", ("sho", 1.1, 12.0, 0.02))
    add("SHO Q=0.5 (critical)", ("sho", 1.1, 12.0, 0.5), hvp=True)
    add("SHO Q=0.5+1e-9", ("sho", 1.1, 12.0, 0.5 + 1e-9), hvp=True)
    add("SHO Q=0.5-1e-9", ("sho", 1.1, 12.0, 0.5 - 1e-9))
    add("SHO Q=0.5+1e-3", ("sho", 1.1, 12.0, 0.5 + 1e-3))
    add("SHO Q=0.5-1e-3", ("sho", 1.1, 12.0, 0.5 - 1e-3), hvp=True)
    add("SHO Q=0.52 (z≈1e-2 switch)", ("sho", 1.1, 12.0, 0.52))
    add("SHO Q=1e4 (nearly undamped)", ("sho", 1.1, 12.0, 1e4))
    add("m32 amplitude 0 (M = 0)", ("m32", 0.0, 0.3))
    add("SHO Q=1e-5 ω0=12 (slow mode ℓ≈8e3·span)", ("sho", 1.1, 12.0, 1e-5))
    add("SHO Q=1e-6 ω0=12 (slow mode ℓ≈8e4·span)", ("sho", 1.1, 12.0, 1e-6))
    add("m32 + SHO", ("sum", m32, sho_u), hvp=True)
    add("m12 * SHO", ("prod", m12, sho_u), hvp=True)
    add("m32 * m52", ("prod", m32, ("m52", 0.7, 1.1)))
    # times
    add("m12 near-dup 1e-12", m12, times="neardup", tgrad=True, hvp=True)
    add("m32 near-dup 1e-12", m32, times="neardup", hvp=True)
    add("m52 near-dup 1e-12", m52, times="neardup")
    add("SHO Q=3 near-dup 1e-12", sho_u, times="neardup")
    add("m32 near-dup rel 1e-12 (t~1)", m32, times="neardup_rel")
    add("m12 exact dup", m12, times="dup", tgrad=False)
    add("m32 exact dup", m32, times="dup", hvp=True)
    add("m52 exact dup", m52, times="dup")
    add("SHO Q=0.2 exact dup", ("sho", 1.1, 12.0, 0.2), times="dup")
    add("m32+SHO exact dup, full Σ", ("sum", m32, sho_u), times="dup", noise=("full", "random"))
    # lengthscales
    for kname, base in (("m12", "m12"), ("m32", "m32"), ("m52", "m52")):
        add(f"{kname} ℓ=1e-3·span (M≈I)", (base, 1.3, 1e-3))
        add(f"{kname} ℓ=1e4·span (M≈rank 1)", (base, 1.3, 1e4), hvp=kname == "m32")
    add("m32 ℓ=1e4 full Σ D=3", ("m32", 1.3, 1e4), D=3, noise=("full", "random"))
    # the T = 2,000 rows marked "?" (kronlik and dense disagree, neither known), at a size mpmath reaches
    add("m52 ℓ=1e4·span, T=100", ("m52", 1.3, 1e4), T=100)
    add("SHO Q=1e-4 ω0=12, T=100", ("sho", 1.1, 12.0, 1e-4), T=100)
    add("SHO w0=1e-3/span Q=3 (≈rank 1)", ("sho", 1.1, 1e-3, 3.0))
    add("SHO w0=1e4/span Q=3 (≈I)", ("sho", 1.1, 1e4, 3.0))
    add("SHO w0=1e-3 Q=0.2", ("sho", 1.1, 1e-3, 0.2))
    # noise / K
    add("m32 one log-var -40", m32, noise=("logvar", "minus40"), hvp=True)
    add("m32 one log-var -40, D=3", m32, D=3, noise=("logvar", "minus40"))
    add("m12 one log-var -40", m12, noise=("logvar", "minus40"))
    add("m52 one log-var -40", m52, noise=("logvar", "minus40"))
    add("m32 K singular, full Σ", m32, D=3, K="rank1", noise=("full", "random"))
    add("m32 K singular, log-var", m32, D=3, K="rank1")
    add("m32 Σ=cI (ties)", m32, D=3, noise=("full", "cI"))
    add("m32 log-var all equal", m32, D=3, noise=("logvar", "equal"))
    add("m32 Σ=cI, K=I (all ties)", m32, D=2, K="eye", noise=("full", "cI"))
    add("m32 Σ=0 distinct times", m32, noise=("full", "zero"))
    add("m12 Σ=0 distinct times", m12, noise=("full", "zero"))
    # combinations
    add("m32 ℓ=1e4 + log-var -40", ("m32", 1.3, 1e4), noise=("logvar", "minus40"))
    add("m12 near-dup + log-var -40", m12, times="neardup", noise=("logvar", "minus40"))
    add("m32 near-dup + log-var -40", m32, times="neardup", noise=("logvar", "minus40"))
    add("m12 near-dup + Σ=0", m12, times="neardup", noise=("full", "zero"))
    add("m32 ℓ=1e-3 + K singular + Σ=cI", ("m32", 1.3, 1e-3), D=3, K="rank1", noise=("full", "cI"))
    add("m32*m52 ℓ=1e4 near-dup", ("prod", ("m32", 1.0, 1e4), ("m52", 1.0, 3e3)), times="neardup")
    return C


def make_inputs(case, seed):
    rng = np.random.default_rng(seed)
    T, D = case["T"], case["D"]
    times = make_times(rng, T, case["times"])
    Kk = case["K"]
    if Kk == "spd":
        K = spd(rng, D)
    elif Kk == "rank1":
        a = rng.standard_normal(D)
        K = np.outer(a, a)
    else:
        K = np.eye(D)
    kind, mode = case["noise"]
    if kind == "logvar":
        noise = {
            "random": rng.uniform(-2.0, 0.0, D),
            "minus40": np.r_[-40.0, rng.uniform(-2.0, 0.0, D - 1)],
            "equal": np.full(D, -1.0),
        }[mode]
    else:
        noise = {"random": spd(rng, D, 0.05) * 0.3, "cI": 0.2 * np.eye(D), "zero": np.zeros((D, D))}[mode]
    # Y drawn from the model itself (so W is of normal size), via the exact-ish dense M
    Mj = np.asarray(kronlik.StateSpace(jnp.asarray(times), build_jax(case["spec"], spec_params(case["spec"]))).dense())
    U = np.kron(Mj, K) + np.kron(np.eye(T), np.diag(np.exp(noise)) if kind == "logvar" else noise)
    lam, V = np.linalg.eigh(0.5 * (U + U.T))
    Y = (V @ (np.sqrt(np.maximum(lam, 0)) * rng.standard_normal(T * D))).reshape(T, D)
    Y = Y + 1e-3 * rng.standard_normal((T, D))  # keep every direction present
    return times, K, noise, kind, Y


QUANTITIES = ("value", "gY", "W", "gt", "gp", "gK", "gN", "helper")


def run_tiny_case(case, seed):
    times, K, noise, kind, Y = make_inputs(case, seed)
    spec = case["spec"]
    params = spec_params(spec)
    T, D = Y.shape
    with mpmath.workdps(DPS):
        t0 = time.time()
        try:
            ex = exact(list(times), params, spec, Y.tolist(), K.tolist(), noise.tolist(), kind, want_time_grads=True)
        except NotPD:
            return dict(case=case["name"], error="exact U not PD")
        exn = {key: to_np(v) if isinstance(v, list) else float(v) for key, v in ex.items()}
        t_exact = time.time() - t0
    exn["gN"] = exn["glv"] if kind == "logvar" else exn["gS"]
    exn["helper"] = exn["gN"]
    Mk = kronlik.StateSpace(jnp.asarray(times), build_jax(spec, params))
    Yj, Kj, Nj = jnp.asarray(Y), jnp.asarray(K), jnp.asarray(noise)
    kr = evaluate(kron_fn(kind), Yj, Mk, Kj, Nj, kind)
    kr.update(kron_helpers(Yj, Mk, Kj, Nj, kind))
    kr["gN"] = kr.pop("glv") if kind == "logvar" else kr.pop("gS")
    # dense float64 on the given row order and on two random row permutations (its own error
    # depends on the elimination order): the dense error used below is the median of the three.
    dense_runs = []
    prng = np.random.default_rng(seed + 7)
    for j in range(3):
        perm = np.arange(T) if j == 0 else prng.permutation(T)
        inv = np.argsort(perm)
        Mp = kronlik.StateSpace(jnp.asarray(times[perm]), Mk.kernel)
        de = evaluate(dense_fn(kind), Yj[perm], Mp, Kj, Nj, kind)
        de["gY"], de["gt"] = de["gY"][inv], de["gt"][inv]
        de["gN"] = de.pop("glv") if kind == "logvar" else de.pop("gS")
        de["W"] = -de["gY"]
        de["helper"] = de["gN"]
        dense_runs.append(de)
    row = dict(
        case=case["name"],
        T=T,
        D=D,
        kernel=repr(spec),
        times=case["times"],
        noise=f"{kind}:{case['noise'][1]}",
        K=case["K"],
        exact_seconds=round(t_exact, 1),
        quantities={},
    )
    for q in QUANTITIES:
        if q == "gt" and not case["tgrad"]:
            continue
        a, b = kr[q], exn[q]
        if q == "gp":  # the worst leaf: each kernel parameter's gradient is a promised scalar
            entry = dict(kronlik=max(leafwise(a, b)), kronlik_leaf=leafwise(a, b), names=spec_names(spec))
            dens = [max(leafwise(de[q], b)) for de in dense_runs]
            entry["dense_leaf"] = leafwise(dense_runs[0][q], b)
        else:
            entry = dict(kronlik=rel(a, b))
            dens = [rel(de[q], b) for de in dense_runs]
        entry["dense_orders"] = dens
        entry["dense"] = float(np.median(np.nan_to_num(dens, nan=np.inf)))
        entry["ok"] = bool(
            np.isfinite(entry["kronlik"])
            and entry["kronlik"] <= max(TOL, 10 * np.nan_to_num(entry["dense"], nan=np.inf))
        )
        row["quantities"][q] = entry
    if case["hvp"]:
        row["hvp"] = run_hvp(times, params, spec, Y, K, noise, kind, seed)
    return row


def _hvp_jit(fn):
    key = ("hvp", fn)
    if key not in _JIT_CACHE:

        def h(Y, M, K, N, vY, dM, vK, vN):
            def g(Y_, M_, K_, N_):
                return jax.grad(fn, argnums=(0, 1, 2, 3))(Y_, M_, K_, N_)

            return jax.jvp(g, (Y, M, K, N), (vY, dM, vK, vN))[1]

        _JIT_CACHE[key] = jax.jit(h)
    return _JIT_CACHE[key]


def run_hvp(times, params, spec, Y, K, noise, kind, seed):
    rng = np.random.default_rng(seed + 1000)
    T, D = Y.shape
    vt = rng.standard_normal(T) * 1e-2
    vp = rng.standard_normal(len(params)) * np.abs(params) * 0.1
    vY = rng.standard_normal((T, D))
    a = rng.standard_normal((D, D))
    vK = 0.05 * (a + a.T) * np.sqrt(np.outer(np.diag(K), np.diag(K)))
    if kind == "logvar":
        vN = 0.3 * rng.standard_normal(D)
    else:
        b = rng.standard_normal((D, D))
        vN = 0.05 * (b + b.T) * np.sqrt(np.outer(np.diag(noise), np.diag(noise)))
    with mpmath.workdps(DPS):
        ex = exact_hvp(
            list(times),
            params,
            spec,
            Y.tolist(),
            K.tolist(),
            noise.tolist(),
            kind,
            vt.tolist(),
            vp.tolist(),
            vY.tolist(),
            vK.tolist(),
            vN.tolist(),
        )
        exn = {k: to_np(v) for k, v in ex.items()}
    Yj, Kj, Nj = jnp.asarray(Y), jnp.asarray(K), jnp.asarray(noise)
    out = {}
    for label, fn in (("kronlik", kron_fn(kind)), ("dense", dense_fn(kind))):
        M = kronlik.StateSpace(jnp.asarray(times), build_jax(spec, params))
        dM = kronlik.StateSpace(jnp.asarray(vt), build_jax(spec, vp))
        hy, hm, hk, hn = _hvp_jit(fn)(Yj, M, Kj, Nj, jnp.asarray(vY), dM, jnp.asarray(vK), jnp.asarray(vN))
        out[label] = dict(
            gY=np.asarray(hy),
            gt=np.asarray(hm.times),
            gp=np.array([float(x) for x in jax.tree_util.tree_leaves(hm.kernel)]),
            gK=np.asarray(hk),
            gN=np.asarray(hn),
        )
    exn["gN"] = exn["glv"] if kind == "logvar" else exn["gS"]
    res = {}
    for q in ("gY", "gt", "gp", "gK", "gN"):
        kr, de = rel(out["kronlik"][q], exn[q]), rel(out["dense"][q], exn[q])
        res[q] = dict(kronlik=kr, dense=de, ok=bool(np.isfinite(kr) and kr <= max(TOL, 10 * de)))
    return res


# ---------------------------------------------------------------------------------------------
# T = 2000 against dense float64
# ---------------------------------------------------------------------------------------------


def big_cases():
    C = []

    def add(name, spec, D=2, times="random", K="spd", noise=("logvar", "random")):
        C.append(dict(name=name, spec=spec, T=2000, D=D, times=times, K=K, noise=noise))

    span = 10.0
    add("m12 random", ("m12", 1.3, 0.3))
    add("m32 random, full Σ D=3", ("m32", 1.3, 0.3), D=3, noise=("full", "random"))
    add("m52 random", ("m52", 1.3, 0.3))
    add("SHO Q=3", ("sho", 1.1, 12.0, 3.0))
    add("SHO Q=0.2", ("sho", 1.1, 12.0, 0.2))
    add("SHO Q=0.5", ("sho", 1.1, 12.0, 0.5))
    add("SHO Q=0.5+1e-9", ("sho", 1.1, 12.0, 0.5 + 1e-9))
    add("m32 + SHO", ("sum", ("m32", 1.3, 0.3), ("sho", 1.1, 12.0, 3.0)))
    add("m12 * SHO", ("prod", ("m12", 1.3, 0.3), ("sho", 1.1, 12.0, 3.0)))
    add("m32 exact dup (unsorted)", ("m32", 1.3, 0.3), times="dup")
    add("m52 near-dup 1e-12 (unsorted)", ("m52", 1.3, 0.3), times="neardup")
    add("SHO Q=3 near-dup 1e-12, full Σ", ("sho", 1.1, 12.0, 3.0), times="neardup", noise=("full", "random"))
    add("m32 ℓ=1e-3·span", ("m32", 1.3, 1e-3 * span))
    add("m12 ℓ=1e4·span", ("m12", 1.3, 1e4 * span))
    add("m32 ℓ=1e4·span", ("m32", 1.3, 1e4 * span))
    add("m52 ℓ=1e4·span", ("m52", 1.3, 1e4 * span))
    add("m52 ℓ=1e-3·span", ("m52", 1.3, 1e-3 * span))
    add("SHO w0=1e-3/span Q=3", ("sho", 1.1, 1e-3 / span, 3.0))
    add("SHO w0=1e4/span Q=0.2", ("sho", 1.1, 1e4 / span, 0.2))
    add("SHO Q=0.5-1e-3", ("sho", 1.1, 12.0, 0.5 - 1e-3))
    add("SHO Q=1e-4 (strongly over)", ("sho", 1.1, 12.0, 1e-4))
    add("m32 K singular, full Σ", ("m32", 1.3, 0.3), D=3, K="rank1", noise=("full", "random"))
    add("m32 Σ=cI", ("m32", 1.3, 0.3), noise=("full", "cI"))
    add("m32 one log-var -40", ("m32", 1.3, 0.3), noise=("logvar", "minus40"))
    return C, span


def run_big_case(case, seed, span):
    rng = np.random.default_rng(seed)
    T, D = case["T"], case["D"]
    times = make_times(rng, T, case["times"], span)
    K = spd(rng, D) if case["K"] == "spd" else np.outer(*(2 * [rng.standard_normal(D)]))
    kind, mode = case["noise"]
    if kind == "logvar":
        noise = {"random": rng.uniform(-2.0, 0.0, D), "minus40": np.r_[-40.0, rng.uniform(-2.0, 0.0, D - 1)]}[mode]
    else:
        noise = {"random": spd(rng, D, 0.05) * 0.3, "cI": 0.2 * np.eye(D)}[mode]
    spec = case["spec"]
    params = spec_params(spec)
    Yj, Kj, Nj = jnp.asarray(rng.standard_normal((T, D))), jnp.asarray(K), jnp.asarray(noise)
    M = kronlik.StateSpace(jnp.asarray(times), build_jax(spec, params))
    t0 = time.time()
    kr = evaluate(kron_fn(kind), Yj, M, Kj, Nj, kind)
    t_k = time.time() - t0
    t0 = time.time()
    de = evaluate(dense_fn(kind), Yj, M, Kj, Nj, kind)
    t_d = time.time() - t0
    perm = rng.permutation(T)
    Mp = kronlik.StateSpace(jnp.asarray(times[perm]), M.kernel)
    dp = evaluate(dense_fn(kind), Yj[perm], Mp, Kj, Nj, kind)
    inv = np.argsort(perm)
    dp["gY"], dp["gt"] = dp["gY"][inv], dp["gt"][inv]
    row = dict(
        case=case["name"],
        T=T,
        D=D,
        kernel=repr(spec),
        seconds_kronlik=round(t_k, 1),
        seconds_dense=round(t_d, 1),
        quantities={},
    )
    key_n = "glv" if kind == "logvar" else "gS"
    for q in ("value", "gY", "gt", "gp", "gK", key_n):
        if q == "gp":
            kd = max(leafwise(kr[q], de[q]))
            dd = max(leafwise(dp[q], de[q]))
        else:
            kd, dd = rel(kr[q], de[q]), rel(dp[q], de[q])
        name = "gN" if q == key_n else q
        row["quantities"][name] = dict(
            kronlik_vs_dense=kd, dense_perm_vs_dense=dd, ok=bool(np.isfinite(kd) and kd <= max(TOL, 10 * dd))
        )
    return row


# ---------------------------------------------------------------------------------------------
# NaN cases (U not PD), second-order refusal, jit / vmap, float32
# ---------------------------------------------------------------------------------------------


def nan_cases():
    rng = np.random.default_rng(7)
    T, D = 12, 2
    t = np.sort(rng.uniform(0, 1, T))
    Y = rng.standard_normal((T, D))
    Kp = spd(rng, D)
    lv = np.array([-1.0, -0.5])
    spd(rng, D, 0.05)  # keep the random stream of the recorded run
    tdup = t.copy()
    tdup[3] = tdup[2]
    out = []

    def check(name, times, spec, params, K, noise, kind, U_pd_note):
        M = kronlik.StateSpace(jnp.asarray(times), build_jax(spec, params))
        f = kron_fn(kind)
        args = (jnp.asarray(Y), M, jnp.asarray(K), jnp.asarray(noise))
        res = {}
        try:
            val, g = _value_and_grad_jit(f)(*args)
            res["value"] = float(val)
            res["grad_all_nan"] = bool(all(np.all(np.isnan(np.asarray(x))) for x in jax.tree_util.tree_leaves(g)))
            res["grad_any_finite"] = bool(any(np.any(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(g)))
            W, hlp = (_helpers_logvar if kind == "logvar" else _helpers_full)(*args)
            res["solve_any_finite"] = bool(np.any(np.isfinite(np.asarray(W))) or np.any(np.isfinite(np.asarray(hlp))))
        except Exception as e:  # noqa: BLE001
            res["raised"] = f"{type(e).__name__}: {str(e)[:120]}"
        # exact PD-ness of U
        with mpmath.workdps(DPS):
            try:
                exact(
                    list(times),
                    params,
                    spec,
                    Y.tolist(),
                    np.asarray(K).tolist(),
                    np.asarray(noise).tolist(),
                    kind,
                    want_param_grads=False,
                    want_time_grads=False,
                )
                pd = True
            except Exception:  # noqa: BLE001  (NotPD, or NaN inputs)
                pd = False
        res.update(case=name, U_pd_exact=pd, note=U_pd_note)
        res["ok"] = (
            pd
            or ("raised" in res)
            or (np.isnan(res["value"]) and not res["grad_any_finite"] and not res["solve_any_finite"])
        )
        out.append(res)

    m32 = ("m32", 1.3, 0.3)
    Kind = np.array([[1.0, 0.0], [0.0, -0.5]])
    check("K indefinite", t, m32, [1.3, 0.3], Kind, lv, "logvar", "")
    check(
        "K indefinite (-1e-3), Σ large",
        t,
        m32,
        [1.3, 0.3],
        np.diag([1.0, -1e-3]),
        np.array([2.0, 2.0]),
        "logvar",
        "U is PD here: NaN is conservative, not a violation",
    )
    check("Σ indefinite", t, m32, [1.3, 0.3], Kp, np.array([[0.3, 0.0], [0.0, -0.2]]), "full", "")
    check("Σ indefinite, tiny (-1e-13)", tdup, m32, [1.3, 0.3], Kp, np.diag([0.3, -1e-13]), "full", "dup times")
    check("amplitude 0", t, m32, [0.0, 0.3], Kp, lv, "logvar", "U = I⊗Σ is PD")
    check("amplitude -1", t, m32, [-1.0, 0.3], Kp, lv, "logvar", "")
    check("amplitude -1e-3", t, m32, [-1e-3, 0.3], Kp, np.array([2.0, 2.0]), "logvar", "U PD (noise dominates)")
    check("amplitude 0, Σ=0", t, m32, [0.0, 0.3], Kp, np.zeros((D, D)), "full", "U = 0")
    check("times with NaN", np.r_[t[:-1], np.nan], m32, [1.3, 0.3], Kp, lv, "logvar", "undefined")
    check("lengthscale 0", t, m32, [1.3, 0.0], Kp, lv, "logvar", "")
    check("lengthscale -0.3", t, m32, [1.3, -0.3], Kp, lv, "logvar", "")
    check("m12 lengthscale -0.3", t, ("m12", 1.3, 0.3), [1.3, -0.3], Kp, lv, "logvar", "")
    check("SHO Q -3", t, ("sho", 1.0, 12.0, 3.0), [1.0, 12.0, -3.0], Kp, lv, "logvar", "")
    check("SHO w0 -12", t, ("sho", 1.0, 12.0, 3.0), [1.0, -12.0, 3.0], Kp, lv, "logvar", "")
    check("SHO Q 0", t, ("sho", 1.0, 12.0, 3.0), [1.0, 12.0, 0.0], Kp, lv, "logvar", "")
    check("dup times, Σ=0", tdup, m32, [1.3, 0.3], Kp, np.zeros((D, D)), "full", "")
    check("dup times, m12, Σ=0", tdup, ("m12", 1.3, 0.3), [1.3, 0.3], Kp, np.zeros((D, D)), "full", "")
    check("dup times, m52, Σ=0", tdup, ("m52", 1.3, 0.3), [1.3, 0.3], Kp, np.zeros((D, D)), "full", "")
    check("dup times, SHO, Σ=0", tdup, ("sho", 1.0, 12.0, 3.0), [1.0, 12.0, 3.0], Kp, np.zeros((D, D)), "full", "")
    check(
        "dup times, m32*SHO, Σ=0",
        tdup,
        ("prod", m32, ("sho", 1.0, 12.0, 3.0)),
        [1.3, 0.3, 1.0, 12.0, 3.0],
        Kp,
        np.zeros((D, D)),
        "full",
        "",
    )
    check(
        "dup times, m32+m52, Σ=0",
        tdup,
        ("sum", m32, ("m52", 1.0, 0.7)),
        [1.3, 0.3, 1.0, 0.7],
        Kp,
        np.zeros((D, D)),
        "full",
        "",
    )
    check(
        "dup times, Σ singular along K's",
        tdup,
        m32,
        [1.3, 0.3],
        Kp,
        np.diag([0.3, 0.0]),
        "full",
        "Σ zero on output 2, K PD: M⊗K singular on the dup pair in that output",
    )
    check(
        "K singular and Σ singular, same direction",
        t,
        m32,
        [1.3, 0.3],
        np.diag([1.0, 0.0]),
        np.diag([0.3, 0.0]),
        "full",
        "",
    )
    check("Σ=0, m32, distinct times (U PD)", t, m32, [1.3, 0.3], Kp, np.zeros((D, D)), "full", "U PD: finite expected")
    return out


def second_order_refusals():
    """Full Hessians in K, in the log-variances and the mixed blocks against the dense autodiff,
    and the third-order refusal (the pencil is never differentiated)."""
    rng = np.random.default_rng(3)
    T, D = 10, 2
    t = jnp.asarray(np.sort(rng.uniform(0, 1, T)))
    Y, K, lv = jnp.asarray(rng.standard_normal((T, D))), jnp.asarray(spd(rng, D)), jnp.asarray([-1.0, -0.5])
    M = kronlik.StateSpace(t, ssk.Matern32(jnp.asarray(1.3), jnp.asarray(0.3)))

    def dense(y, m, k, s):
        return reference.loglik(y, m.dense(), k, jnp.diag(jnp.exp(s)))

    out = {}
    for name, argnums in (("hessian K", 2), ("hessian log_var", 3), ("hessian (θ, K, log_var)", (1, 2, 3))):
        got = jax.hessian(kronlik.loglik_diag, argnums=argnums)(Y, M, K, lv)
        want = jax.hessian(dense, argnums=argnums)(Y, M, K, lv)
        pairs = zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True)
        out[f"{name} vs dense (rel, worst block)"] = max(rel(a, b) for a, b in pairs)
    try:
        jax.jacfwd(jax.hessian(kronlik.loglik_diag, argnums=3), argnums=3)(Y, M, K, lv)
        out["third derivative in log_var"] = "returned"
    except TypeError as e:
        out["third derivative in log_var"] = f"TypeError: {str(e)[:80]}"
    return out


def jit_vmap_float32():
    rng = np.random.default_rng(11)
    T, D, B = 50, 2, 4
    t = np.sort(rng.uniform(0, 3, T))
    Y = rng.standard_normal((T, D))
    K = spd(rng, D)
    lv = np.array([-1.0, -0.5])
    out = {}
    spec = ("sum", ("m32", 1.3, 0.3), ("sho", 1.1, 12.0, 3.0))
    params = spec_params(spec)

    def L(times, p, Y_):
        M = kronlik.StateSpace(times, build_jax(spec, p))
        return kronlik.loglik_diag(Y_, M, jnp.asarray(K), jnp.asarray(lv))

    def Ld(times, p, Y_):
        M = kronlik.StateSpace(times, build_jax(spec, p))
        return reference.loglik(Y_, M.dense(), jnp.asarray(K), jnp.diag(jnp.exp(jnp.asarray(lv))))

    base = float(L(jnp.asarray(t), params, jnp.asarray(Y)))
    out["jit value rel"] = abs(float(jax.jit(L)(jnp.asarray(t), params, jnp.asarray(Y))) - base) / abs(base)
    gj = jax.jit(jax.grad(L, argnums=(0, 1)))(jnp.asarray(t), params, jnp.asarray(Y))
    gd = jax.grad(Ld, argnums=(0, 1))(jnp.asarray(t), params, jnp.asarray(Y))
    out["jit grad rel vs dense"] = max(rel(gj[0], gd[0]), max(leafwise(gj[1], gd[1])))
    # vmap over times (different sort orders), params and Y
    tb = np.stack([rng.permutation(t) + 0.01 * i for i in range(B)])
    pb = [np.asarray(params) * (1 + 0.1 * i) for i in range(B)]
    pb = [jnp.asarray([p[j] for p in pb]) for j in range(len(params))]
    Yb = np.stack([Y * (1 + 0.1 * i) for i in range(B)])
    vals = jax.vmap(L)(jnp.asarray(tb), pb, jnp.asarray(Yb))
    grads = jax.vmap(jax.grad(L, argnums=(0, 1)))(jnp.asarray(tb), pb, jnp.asarray(Yb))
    errs, gerrs = [], []
    for i in range(B):
        pi = [float(pb[j][i]) for j in range(len(params))]
        ref = float(Ld(jnp.asarray(tb[i]), pi, jnp.asarray(Yb[i])))
        errs.append(abs(float(vals[i]) - ref) / abs(ref))
        gr = jax.grad(Ld, argnums=(0, 1))(jnp.asarray(tb[i]), pi, jnp.asarray(Yb[i]))
        gerrs.append(
            max(rel(grads[0][i], gr[0]), max(leafwise([float(grads[1][j][i]) for j in range(len(params))], gr[1])))
        )
    out["vmap value rel vs dense (max)"] = max(errs)
    out["vmap grad rel vs dense (max)"] = max(gerrs)
    # float32
    p32 = [jnp.asarray(p, jnp.float32) for p in params]
    M32 = kronlik.StateSpace(jnp.asarray(t, jnp.float32), build_jax(spec, params, jnp.float32))
    args32 = (jnp.asarray(Y, jnp.float32), M32, jnp.asarray(K, jnp.float32), jnp.asarray(lv, jnp.float32))
    v32 = kronlik.loglik_diag(*args32)
    g32 = jax.grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3))(*args32)
    ref = Ld(jnp.asarray(t), params, jnp.asarray(Y))
    gr = jax.grad(lambda y, m, k, s: reference.loglik(y, m.dense(), k, jnp.diag(jnp.exp(s))), argnums=(0, 1, 2, 3))(
        jnp.asarray(Y), kronlik.StateSpace(jnp.asarray(t), build_jax(spec, params)), jnp.asarray(K), jnp.asarray(lv)
    )
    out["float32 dtype"] = str(v32.dtype)
    out["float32 value rel vs f64 dense"] = abs(float(v32) - float(ref)) / abs(float(ref))
    out["float32 grad rel (worst leaf-array) vs f64 dense"] = max(
        rel(np.asarray(a, np.float64), np.asarray(b))
        for a, b in zip(jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(gr))
    )
    del p32
    return out


# ---------------------------------------------------------------------------------------------
# Extra checks that need no mpmath: (1) the amplitude gradient at T = 2000 against the exact identity
# ∂L/∂σ² = <∂L/∂K, K>/σ² (σ² and K enter U only through σ²K); (2) the strongly overdamped SHO's
# time gradient against a dense float64 Cholesky whose kernel derivative is cancellation-free.
# ---------------------------------------------------------------------------------------------


def amplitude_identity(T=2000, span=10.0):
    rows = []
    for base in ("m12", "m32", "m52"):
        for ellf in (1.0, 1e2, 1e4):
            rng = np.random.default_rng(1)
            D = 2
            t = rng.uniform(0, span, T)
            K = spd(rng, D)
            lv = rng.uniform(-2, 0, D)
            Y = rng.standard_normal((T, D))
            spec = (base, 1.3, ellf * span)
            M = kronlik.StateSpace(jnp.asarray(t), build_jax(spec, spec_params(spec)))
            a = (jnp.asarray(Y), M, jnp.asarray(K), jnp.asarray(lv))
            _, GK = _value_and_grad_jit(kron_fn("logvar"))(*a)
            _, GD = _value_and_grad_jit(dense_fn("logvar"))(*a)
            ident = float(jnp.sum(GD[2] * jnp.asarray(K))) / 1.3
            ak, ad = float(GK[1].kernel.amplitude), float(GD[1].kernel.amplitude)
            kk = float(jnp.linalg.norm(GK[2] - GD[2]) / jnp.linalg.norm(GD[2]))
            rows.append(
                dict(
                    case=f"{base} ℓ={ellf:.0e}·span",
                    T=T,
                    kronlik=abs(ak - ident) / abs(ident),
                    dense=abs(ad - ident) / abs(ident),
                    gK_kronlik_vs_dense=kk,
                    ok=bool(abs(ak - ident) / abs(ident) <= max(TOL, 10 * abs(ad - ident) / abs(ident))),
                )
            )
            print(f"[identity] {rows[-1]}", flush=True)
    return rows


def sho_stable_dense(seeds=8, T=16):
    """Strongly overdamped SHO: kronlik's ∂L/∂t and the dense (M.dense()) one against a dense float64
    Cholesky with k(τ), k'(τ) in cancellation-free form: k = σ²/(2q)[(f+q)e^{-r₁τ} - (f-q)e^{-r₂τ}],
    k' = -σ²ω²/(2q)(e^{-r₁τ} - e^{-r₂τ}), r₁ = ω²/(f+q), r₂ = f+q; and both against exact."""
    rows = []
    D = 2
    for Q in (1e-4, 1e-5, 1e-6):
        errs = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            t = rng.uniform(0, 1, T)
            K = spd(rng, D)
            Y = rng.standard_normal((T, D))
            lv = np.array([-2.0, -1.0])
            a_, w = 1.1, 12.0
            spec = ("sho", a_, w, Q)
            M = kronlik.StateSpace(jnp.asarray(t), build_jax(spec, spec_params(spec)))
            args = (jnp.asarray(Y), M, jnp.asarray(K), jnp.asarray(lv))
            _, GK = _value_and_grad_jit(kron_fn("logvar"))(*args)
            _, GD = _value_and_grad_jit(dense_fn("logvar"))(*args)
            f = w / (2 * Q)
            q = np.sqrt((f - w) * (f + w))
            r1, r2 = w * w / (f + q), f + q
            tau = t[:, None] - t[None, :]
            x = np.abs(tau)
            Md = a_ / (2 * q) * ((f + q) * np.exp(-r1 * x) - (f - q) * np.exp(-r2 * x))
            dk = -a_ * w * w / (2 * q) * (np.exp(-r1 * x) - np.exp(-r2 * x)) * np.sign(tau)
            G = np.asarray(
                jax.grad(
                    lambda m, Y=Y, K=K, lv=lv: reference.loglik(
                        jnp.asarray(Y), m, jnp.asarray(K), jnp.diag(jnp.exp(jnp.asarray(lv)))
                    )
                )(jnp.asarray(Md))
            )
            gs = np.sum((G + G.T) * dk, axis=1)
            with mpmath.workdps(DPS):
                ex = exact(
                    list(t),
                    spec_params(spec),
                    spec,
                    Y.tolist(),
                    K.tolist(),
                    lv.tolist(),
                    "logvar",
                    want_param_grads=False,
                )
            et = to_np(ex["gt"])
            errs.append((rel(GK[1].times, et), rel(GD[1].times, et), rel(gs, et)))
        e = np.array(errs)
        rows.append(
            dict(
                case=f"SHO Q={Q:g} ω0=12 (1/(ω0Q) = {1 / (12 * Q):.0f}·span)",
                T=T,
                seeds=seeds,
                kronlik_median=float(np.median(e[:, 0])),
                kronlik_max=float(e[:, 0].max()),
                dense_Mdense_median=float(np.median(e[:, 1])),
                dense_Mdense_max=float(e[:, 1].max()),
                dense_stable_median=float(np.median(e[:, 2])),
                dense_stable_max=float(e[:, 2].max()),
            )
        )
        print(f"[sho] {rows[-1]}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------


def fmt(x):
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NaN"
    return f"{x:.1e}"


def markdown(results) -> str:
    lines = [
        "# StateSpace accuracy (float64)",
        "",
        "Errors are relative (Frobenius for arrays; worst leaf for kernel parameters). "
        "`k` = kronlik vs exact, `d` = dense float64 Cholesky vs exact (median over the given row order and "
        "two random row permutations; `inf` = dense NaN in all three). Pass: k ≤ max(1e-10, 10·d). "
        "✗ marks a failure; ◦ marks kronlik NaN where U is PD in exact arithmetic but numerically "
        "singular in float64 (dense Cholesky NaN too).",
        "",
        "## Tiny problems vs exact (mpmath, 50 digits)",
        "",
        "| case | T×D | value k / d | ∂Y k / d | W (solve) k / d | ∂t k / d | ∂θ k / d | ∂K k / d "
        "| ∂noise k / d | helper k / d |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["tiny"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['error']} |")
            continue
        cells = []
        for q in QUANTITIES:
            e = r["quantities"].get(q)
            if e is None:
                cells.append("—")
            else:
                both = not e["ok"] and not np.isfinite(e["kronlik"]) and not np.isfinite(e["dense"])
                mark = "" if e["ok"] else (" ◦" if both else " ✗")
                cells.append(f"{fmt(e['kronlik'])} / {fmt(e['dense'])}{mark}")
        lines.append(f"| {r['case']} | {r['T']}×{r['D']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Hessian-vector products vs exact (one direction moving Y, times, θ, K and the noise together)",
        "",
        "| case | H·v in Y k / d | in t k / d | in θ k / d | in K k / d | in noise k / d |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["tiny"]:
        if "hvp" in r:
            h = r["hvp"]
            lines.append(
                f"| {r['case']} | "
                + " | ".join(
                    f"{fmt(h[q]['kronlik'])} / {fmt(h[q]['dense'])}{'' if h[q]['ok'] else ' ✗'}" if q in h else "—"
                    for q in ("gY", "gt", "gp", "gK", "gN")
                )
                + " |"
            )
    if results.get("T2000"):
        lines += [
            "",
            "## T = 2,000 vs dense float64",
            "",
            "`k` = kronlik vs dense; `d` = dense on permuted rows vs dense (an estimate of dense's own error).",
            "",
            "| case | T×D | value k / d | ∂Y k / d | ∂t k / d | ∂θ k / d | ∂K k / d | ∂noise k / d |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results["T2000"]:
            cells = []
            for q in ("value", "gY", "gt", "gp", "gK", "gN"):
                e = r["quantities"][q]
                cells.append(f"{fmt(e['kronlik_vs_dense'])} / {fmt(e['dense_perm_vs_dense'])}{'' if e['ok'] else ' ?'}")
            lines.append(f"| {r['case']} | {r['T']}×{r['D']} | " + " | ".join(cells) + " |")
    if results.get("amplitude_identity"):
        lines += [
            "",
            "## Amplitude gradient at T = 2,000 vs the exact identity ∂L/∂σ² = ⟨∂L/∂K, K⟩/σ²",
            "",
            "Identity evaluated with dense float64's ∂L/∂K. `k` = kronlik's ∂L/∂σ², `d` = dense's ∂L/∂σ² "
            "(both relative to the identity); also kronlik's ∂L/∂K vs dense's.",
            "",
            "| case | ∂σ² k / d | ∂K kronlik vs dense |",
            "|---|---|---|",
        ]
        for r in results["amplitude_identity"]:
            lines.append(
                f"| {r['case']} | {fmt(r['kronlik'])} / {fmt(r['dense'])}{'' if r['ok'] else ' ✗'} | "
                f"{fmt(r['gK_kronlik_vs_dense'])} |"
            )
    if results.get("sho_stable"):
        lines += [
            "",
            "## Strongly overdamped SHO: ∂L/∂t vs exact (T = 16, D = 2, 8 seeds; median / max)",
            "",
            "`dense M.dense()` differentiates kronlik's own SHO.covariance; `dense stable` is a float64 "
            "Cholesky with a cancellation-free k'(τ).",
            "",
            "| case | kronlik | dense M.dense() | dense stable |",
            "|---|---|---|---|",
        ]
        for r in results["sho_stable"]:
            lines.append(
                f"| {r['case']} | {fmt(r['kronlik_median'])} / {fmt(r['kronlik_max'])} | "
                f"{fmt(r['dense_Mdense_median'])} / {fmt(r['dense_Mdense_max'])} | "
                f"{fmt(r['dense_stable_median'])} / {fmt(r['dense_stable_max'])} |"
            )
    lines += [
        "",
        "## U not positive definite: NaN expected",
        "",
        "| case | U PD (exact) | value | all grads NaN | solve finite | ok |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["nan"]:
        lines.append(
            f"| {r['case']} | {r['U_pd_exact']} | {r.get('value', r.get('raised'))} | {r.get('grad_all_nan')} | "
            f"{r.get('solve_any_finite')} | {'ok' if r['ok'] else '✗'} |"
        )
    lines += ["", "## Second order: full Hessians against the dense autodiff, third order refused", ""]
    for k, v in results["second_order"].items():
        lines.append(f"- {k}: {v if isinstance(v, str) else fmt(v)}")
    lines += ["", "## jit / vmap / float32", ""]
    for k, v in results["misc"].items():
        lines.append(f"- {k}: {v if isinstance(v, str) else fmt(v)}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Stages: --stages=tiny,big,extra,nan,misc (default all); --only=SUBSTR (tiny cases); --quick (T ≤ 12).

    Each stage's results are merged into the JSON as it finishes, and the markdown is rebuilt from it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    scan = next((a.split("=", 1)[1] for a in argv if a.startswith("--scan=")), "sequential")
    if scan != "sequential":
        global JSON_OUT, MD_OUT
        JSON_OUT = JSON_OUT.replace(".json", f"_{scan}.json")
        MD_OUT = MD_OUT.replace(".md", f"_{scan}.md")
    # every form here has scan="auto", which reads this when traced
    os.environ["KRONLIK_STATESPACE_SCAN"] = scan
    return _main(argv)


def _main(argv):
    quick = "--quick" in argv
    only = [a.split("=", 1)[1] for a in argv if a.startswith("--only=")]
    stages = next(
        (a.split("=", 1)[1].split(",") for a in argv if a.startswith("--stages=")),
        ["tiny", "big", "extra", "nan", "misc"],
    )
    results = {
        "tiny": [],
        "T2000": [],
        "nan": [],
        "second_order": {},
        "misc": {},
        "sho_stable": [],
        "amplitude_identity": [],
    }
    if os.path.exists(JSON_OUT):
        with open(JSON_OUT) as fh:
            results.update(json.load(fh))

    def save():
        with open(JSON_OUT, "w") as fh:
            json.dump(results, fh, indent=1, default=float)
        with open(MD_OUT, "w") as fh:
            fh.write(markdown(results))

    if "tiny" in stages:
        cases = tiny_cases()
        if only:
            cases = [c for c in cases if any(o in c["name"] for o in only)]
        if "--hvp-only" in argv:
            cases = [c for c in cases if c["hvp"]]
        if quick:
            for c in cases:
                c["T"] = min(c["T"], 12)
        done = {r["case"]: k for k, r in enumerate(results["tiny"])}
        for i, c in enumerate(tiny_cases()):
            if c["name"] not in {x["name"] for x in cases}:
                continue
            c = next(x for x in cases if x["name"] == c["name"])
            t0 = time.time()
            r = run_tiny_case(c, seed=100 + i)
            if c["name"] in done:
                results["tiny"][done[c["name"]]] = r
            else:
                results["tiny"].append(r)
            print(f"[tiny] {c['name']}: {time.time() - t0:.1f}s", flush=True)
            save()
    if "big" in stages:
        bcases, span = big_cases()
        done = {r["case"]: k for k, r in enumerate(results["T2000"])}
        for i, c in enumerate(bcases):
            if only and not any(o in c["name"] for o in only):
                continue
            t0 = time.time()
            r = run_big_case(c, 500 + i, span)
            if c["name"] in done:
                results["T2000"][done[c["name"]]] = r
            else:
                results["T2000"].append(r)
            print(f"[T2000] {c['name']}: {time.time() - t0:.1f}s", flush=True)
            save()
    if "nan" in stages:
        results["nan"] = nan_cases()
        save()
    if "extra" in stages:
        results["sho_stable"] = sho_stable_dense()
        save()
        results["amplitude_identity"] = amplitude_identity()
        save()
    if "misc" in stages:
        results["second_order"] = second_order_refusals()
        results["misc"] = jit_vmap_float32()
        save()
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
