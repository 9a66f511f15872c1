"""Command line: ``kronlik check`` (gradient cross-check) and ``kronlik fit`` (fit a dataset).

Also ``python -m kronlik check|fit``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _check(args: argparse.Namespace) -> int:
    import jax

    # This process is a program, not a library import: it may choose its own
    # precision. float64 needs x64 on before any array exists; importing kronlik
    # never changes this setting.
    if "float64" in args.dtype:
        jax.config.update("jax_enable_x64", True)

    from .gradcheck import check_gradients, demo_problems

    ok = True
    for dtype in args.dtype:
        for name, problem in demo_problems(dtype).items():
            report = check_gradients(*problem, seed=args.seed)
            print(f"[{name}] {report}\n")
            ok &= report.passed
    print("all gradient checks passed" if ok else "SOME GRADIENT CHECKS FAILED")
    return 0 if ok else 1


def _load(args: argparse.Namespace):
    """(time or None, Y, output names, M or None, K or None) from --data, or the built-in set."""
    import numpy as np

    from .datasets import DataError, load_macrodata, read_csv

    if args.data is None:
        t, Y, names = load_macrodata()
        return t, Y, names, None, None
    if args.data.endswith(".npz"):
        try:
            with np.load(args.data) as z:
                arrays = {k: np.asarray(z[k], np.float64) for k in z.files}
        except FileNotFoundError:
            raise DataError(f"no such file: {args.data}") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{args.data}: cannot read as .npz ({e})") from None
        if not {"Y", "M", "K"} <= set(arrays):
            raise DataError(f"{args.data}: an .npz needs arrays Y, M and K; it has {sorted(arrays)}")
        Y, M, K = arrays["Y"], arrays["M"], arrays["K"]
        if Y.ndim != 2 or M.shape != (Y.shape[0],) * 2 or K.shape != (Y.shape[1],) * 2:
            raise DataError(
                f"{args.data}: need Y (T, D), M (T, T), K (D, D); got Y {Y.shape}, M {M.shape}, K {K.shape}"
            )
        return None, Y, [f"y{j}" for j in range(Y.shape[1])], M, K
    header, table = read_csv(args.data)
    t = None
    if args.time_column is not None:
        if args.time_column not in header:
            raise DataError(f"{args.data}: no column {args.time_column!r} (columns: {', '.join(header)})")
        i = header.index(args.time_column)
        t, table, header = table[:, i], np.delete(table, i, axis=1), header[:i] + header[i + 1 :]
    return t, table, header, None, None


def _fit(args: argparse.Namespace) -> int:
    import jax

    # This process's choice, as in `check`: x64 on, so that float64 is available for the
    # --float64 fit and for the float32 fit's eigendecompositions (mixed precision).
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import optax

    from . import fisher_information, fit, fit_log_var, loglik_diag, predict, validate
    from .datasets import DataError
    from .fitting import _std_errors

    try:
        t, Y, names, M_given, K_given = _load(args)
        T, D = Y.shape
        if T < 2:
            raise DataError(f"need at least 2 rows to fit; got {T}")
        if D < 1:
            raise DataError("need at least one output column")
        scale = Y.std(axis=0)
        if np.any(scale == 0):
            raise DataError(f"constant output columns: {[n for n, s in zip(names, scale) if s == 0]}")
        mean = Y.mean(axis=0)
        if M_given is not None:
            validate(Y, M_given, K_given, log_var=np.zeros(D))
    except (DataError, ValueError) as e:
        print(f"kronlik fit: error: {e}", file=sys.stderr)
        return 2

    dtype = jnp.float64 if args.float64 else jnp.float32
    eigh_dtype = "float64"  # float32 data, float64 eigendecompositions: see kronlik.loglik
    Ys = jnp.asarray((Y - mean) / scale, dtype)
    optimizer = optax.lbfgs() if args.optimizer == "lbfgs" else optax.adam(args.lr)
    source = args.data or "built-in US macro data (statsmodels macrodata, public domain)"
    print(f"fitting {source}: T={T} rows, D={D} outputs, {dtype.__name__}", file=sys.stderr)
    start = time.perf_counter()
    if M_given is not None:
        M, K = jnp.asarray(M_given, dtype), jnp.asarray(K_given, dtype)
        r = fit_log_var(
            Ys, M, K, jnp.zeros(D, dtype), optimizer, num_steps=args.steps, progress=True, eigh_dtype=eigh_dtype
        )
        log_var, L, lengthscale = r.params, float(r.value), None
    else:
        tt = np.arange(T, dtype=float) if t is None else np.asarray(t, float)
        span = float(tt.max() - tt.min()) or 1.0
        x = jnp.asarray((tt - tt.min()) / span, dtype)

        def kernel(log_ell, x=x):  # RBF plus a nugget of 1e-6: M stays positive definite
            d = x[:, None] - x[None, :]
            return jnp.exp(-0.5 * d * d * jnp.exp(-2.0 * log_ell)) + 1e-6 * jnp.eye(T, dtype=x.dtype)

        def k_of(p):
            return p["L"] @ p["L"].T + jnp.diag(jnp.exp(p["log_kappa"]))

        def loss(p):  # per observation, so the tolerance does not depend on T·D
            return -loglik_diag(Ys, kernel(p["log_ell"]), k_of(p), p["log_var"], eigh_dtype=eigh_dtype) / (T * D)

        p0 = {
            "log_ell": jnp.asarray(np.log(0.1), dtype),
            "L": 0.7 * jnp.eye(D, dtype=dtype),
            "log_kappa": jnp.full(D, np.log(0.1), dtype),
            "log_var": jnp.full(D, np.log(0.5), dtype),
        }
        r = fit(
            loss,
            p0,
            optimizer,
            num_steps=args.steps,
            tol=args.tol,
            progress=True,
            log_scale_keys=("log_var", "log_kappa"),
        )
        log_var, L = r.params["log_var"], -float(r.value) * T * D
        M, K = kernel(r.params["log_ell"]), k_of(r.params)
        lengthscale = float(jnp.exp(r.params["log_ell"])) * span
    seconds = time.perf_counter() - start
    if not np.isfinite(L):
        print("kronlik fit: error: the likelihood is NaN at the fitted point", file=sys.stderr)
        return 2

    try:
        accuracy = validate(Ys, M, K, log_var=log_var, eigh_dtype=eigh_dtype, warn=False)
    except ValueError as e:
        print(f"kronlik fit: error: the likelihood is not defined at the fitted point: {e}", file=sys.stderr)
        return 2

    # Standard errors from the expected (Fisher) information at the fit, in float64, over the
    # identifiable parameters: log ℓ, the entries K_ij (i ≤ j) and the log noise variances.
    upper = np.triu_indices(D)
    theta = {"K": jnp.asarray(np.asarray(K, np.float64)[upper]), "log_var": jnp.asarray(log_var, jnp.float64)}
    if lengthscale is None:
        m64 = jnp.asarray(M_given, jnp.float64)
    else:
        theta["log_ell"] = jnp.asarray(r.params["log_ell"], jnp.float64)
        x64 = x.astype(jnp.float64)

    def cov_fn(q):
        k_upper = jnp.zeros((D, D), jnp.float64).at[upper].set(q["K"])
        k = k_upper + k_upper.T - jnp.diag(jnp.diagonal(k_upper))
        m = m64 if lengthscale is None else kernel(q["log_ell"], x64)
        return m, k, jnp.diag(jnp.exp(q["log_var"]))

    se = _std_errors(fisher_information(cov_fn, theta), theta)
    var = np.exp(np.asarray(log_var, np.float64))
    var_data, var_data_se = var * scale**2, var * scale**2 * np.asarray(se["log_var"])
    k_data = np.asarray(K, np.float64) * np.outer(scale, scale)
    k_data_se = np.zeros((D, D))
    k_data_se[upper] = np.asarray(se["K"])
    k_data_se = (k_data_se + k_data_se.T - np.diag(np.diag(k_data_se))) * np.outer(scale, scale)
    print("\nstandard errors (±) from the Fisher information at the fit; data units")
    print(f"{'output':<16} {'noise variance':>26} {'K diagonal':>26}")
    for j, n in enumerate(names):
        print(
            f"{n:<16} {var_data[j]:>12.4g} ± {var_data_se[j]:<11.3g} {k_data[j, j]:>12.4g} ± {k_data_se[j, j]:<11.3g}"
        )
    for i, j in zip(*upper):
        if i < j:
            print(f"K[{names[i]}, {names[j]}] = {k_data[i, j]:.4g} ± {k_data_se[i, j]:.3g}")
    lengthscale_se = None
    if lengthscale is not None:
        lengthscale_se = lengthscale * float(se["log_ell"])
        units = "(time units)" if t is not None else "(rows)"
        print(f"RBF lengthscale over rows: {lengthscale:.4g} ± {lengthscale_se:.3g} {units}")
    print(f"log-likelihood (standardised data): {L:.6f}")
    print(f"steps: {int(r.num_steps)}, converged: {bool(r.converged)}, time: {seconds:.2f} s")
    print(f"accuracy at the fit: {accuracy}")
    if accuracy.error_bound > 1e-3:
        print(
            "kronlik fit: warning: L and its gradient may be inaccurate here (a nearly singular covariance); "
            + ("" if args.float64 else "try --float64"),
            file=sys.stderr,
        )

    if args.out:
        out = {
            "source": source,
            "outputs": names,
            "noise_variance_standardised": var.tolist(),
            "noise_variance": var_data.tolist(),
            "noise_variance_se": var_data_se.tolist(),
            "K": k_data.tolist(),
            "K_se": k_data_se.tolist(),
            "lengthscale_se": lengthscale_se,
            "log_var": np.asarray(log_var, np.float64).tolist(),
            "K_standardised": np.asarray(K, np.float64).tolist(),
            "lengthscale": lengthscale,
            # the fitted parameters as the optimiser saw them (standardised data, time scaled to [0, 1])
            "params": jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64).tolist(), r.params),
            "loglik": L,
            "column_mean": mean.tolist(),
            "column_std": scale.tolist(),
            "steps": int(r.num_steps),
            "converged": bool(r.converged),
            "error_bound": accuracy.error_bound,
            "seconds": seconds,
        }
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=2)
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("kronlik fit: error: --plot needs matplotlib (pip install 'kronlik[plot]')", file=sys.stderr)
            return 2
        Sigma = jnp.diag(jnp.exp(log_var))
        mu, v = predict(Ys, M, K, Sigma, M, jnp.diagonal(M), eigh_dtype=eigh_dtype)
        mu = np.asarray(mu) * scale + mean
        sd = np.sqrt(np.maximum(np.asarray(v), 0.0)) * scale
        xs = np.arange(T) if t is None else t
        fig, axes = plt.subplots(D, 1, figsize=(8, 1.8 * D + 0.5), sharex=True, squeeze=False)
        for j, ax in enumerate(axes[:, 0]):
            ax.plot(xs, Y[:, j], ".", ms=3, color="0.4", label="data")
            ax.plot(xs, mu[:, j], color="C0", label="posterior mean")
            ax.fill_between(xs, mu[:, j] - 2 * sd[:, j], mu[:, j] + 2 * sd[:, j], color="C0", alpha=0.25)
            ax.set_ylabel(names[j])
        axes[0, 0].legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kronlik", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check",
        help="compare hand-derived gradients with autodiff and finite differences on built-in problems",
    )
    check.add_argument(
        "--dtype",
        nargs="+",
        choices=("float64", "float32"),
        default=["float64", "float32"],
        help="dtypes of the structured computation (default: both; references in float64)",
    )
    check.add_argument("--seed", type=int, default=0, help="seed of the finite-difference directions")
    fitp = sub.add_parser(
        "fit",
        help="fit noise variances (and an RBF kernel over rows and a free K) to a dataset",
        description="With no --data, fits the built-in US macro data. A CSV has one column per output "
        "(plus an optional --time-column); M is an RBF kernel over time (plus 1e-6 I), K = LLᵀ + diag, Σ "
        "diagonal, all fitted. An .npz with Y, M, K fits only Σ. float32 by default, with M's "
        "eigendecompositions in float64 (mixed precision).",
    )
    fitp.add_argument("--data", help="CSV (header row, one column per output) or .npz with Y, M, K")
    fitp.add_argument("--time-column", help="CSV column holding time (default: the row index)")
    fitp.add_argument("--steps", type=int, default=500, help="maximum optimizer steps (default 500)")
    fitp.add_argument("--optimizer", choices=("lbfgs", "adam"), default="lbfgs")
    fitp.add_argument("--lr", type=float, default=0.05, help="learning rate for adam")
    fitp.add_argument("--tol", type=float, default=1e-5, help="gradient tolerance (per observation)")
    fitp.add_argument("--float64", action="store_true", help="compute in float64")
    fitp.add_argument("--out", help="write the fitted parameters as JSON here")
    fitp.add_argument("--plot", help="draw data, posterior mean and ±2 sd band per output to this PNG")
    args = parser.parse_args(argv)
    return _check(args) if args.command == "check" else _fit(args)


if __name__ == "__main__":
    sys.exit(main())
