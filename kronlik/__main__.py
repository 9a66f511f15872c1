"""Command line: ``python -m kronlik check`` (or ``kronlik check``)."""

from __future__ import annotations

import argparse
import sys


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
    args = parser.parse_args(argv)
    return _check(args)


if __name__ == "__main__":
    sys.exit(main())
