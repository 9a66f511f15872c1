"""Command line: ``kronlik check`` (gradient cross-check), ``kronlik fit`` (fit a dataset) and
``kronlik mixed`` (multi-trait mixed model: heritabilities, genetic correlations, association scan).

Also ``python -m kronlik check|fit``.
"""

from __future__ import annotations

import argparse
import sys

# (plain numbers, so that --help does not import JAX; kronlik._fit_command holds the values)
_DENSE_MAX_ROWS, _DEFAULT_RANK = 1000, 200


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


def _fit(args: argparse.Namespace) -> int:
    from ._fit_command import run

    return run(args)


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
        help="fit a multi-output GP (kernel over time, output covariance K, noise) to a table",
        description="With no --data, fits the built-in US macro data. A CSV has one column per output "
        "(plus an optional --time-column of numbers or ISO dates; empty cells are missing and enter the "
        "exact likelihood of the observed cells); M is a kernel over time (--kernel, default rbf), "
        "K = LLᵀ + diag, Σ diagonal, all fitted on standardised columns and reported in data units. "
        "An .npz with Y, M, K fits only Σ, in the data's units. float32 by default, with M's "
        "eigendecompositions in float64 (mixed precision). Bad arguments or data: exit 2, nothing written.",
    )
    fitp.add_argument("--data", help="CSV (header row, one column per output) or .npz with Y, M, K")
    fitp.add_argument("--time-column", help="CSV column holding time: numbers or ISO dates (default: row index)")
    fitp.add_argument(
        "--kernel",
        help="kernel over time: rbf, matern12, matern32, matern52, periodic, combined with + and *, "
        "e.g. 'matern32 + periodic' or 'rbf * periodic(1.0)' (fixed period); default rbf",
    )
    fitp.add_argument(
        "--period",
        type=float,
        help="starting period of periodic kernels, in time units "
        "(default: 1 year for dates, a quarter of the time span otherwise)",
    )
    fitp.add_argument(
        "--method",
        choices=("auto", "dense", "lowrank"),
        default="auto",
        help="M as a T×T kernel matrix or Nyström low rank (auto: Matérn kernels take the exact O(T) state-space "
        f"path at any T, missing cells or not; otherwise dense up to {_DENSE_MAX_ROWS} rows, then low rank)",
    )
    fitp.add_argument("--rank", type=int, help=f"inducing points of the low-rank path (default {_DEFAULT_RANK})")
    fitp.add_argument("--steps", type=int, default=500, help="maximum optimizer steps (default 500)")
    fitp.add_argument("--optimizer", choices=("lbfgs", "adam"), default="lbfgs")
    fitp.add_argument("--lr", type=float, default=0.05, help="learning rate for adam")
    fitp.add_argument("--tol", type=float, default=1e-5, help="gradient tolerance (per observation)")
    fitp.add_argument("--float64", action="store_true", help="compute in float64")
    fitp.add_argument("--forecast", type=int, help="predict N steps past the last time, at the median spacing")
    fitp.add_argument("--predict-at", help="CSV whose time column (or first column) holds times to predict at")
    fitp.add_argument(
        "--predictions",
        help="where --forecast/--predict-at write mean and sds per output (default predictions.csv), with "
        "every row that has a missing cell first (gap filling; last column kind: gap or new); needs one of "
        "them or a table with missing cells",
    )
    fitp.add_argument("--out", help="write everything needed to rebuild the fitted model as JSON here")
    fitp.add_argument("--plot", help="draw data, posterior mean, latent and observation ±2 sd bands to this PNG")
    from ._mixed_command import add_parser

    add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "mixed":
        from ._mixed_command import run

        return run(args)
    return _check(args) if args.command == "check" else _fit(args)


if __name__ == "__main__":
    sys.exit(main())
