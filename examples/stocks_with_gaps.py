"""A real multi-output series with gaps and dates: monthly prices of five stocks, 2000-2010,
from the ``vega_datasets`` package (Vega's ``stocks.csv``; GOOG starts in August 2004, so 55 of its
123 months are missing). Writes a wide CSV (ISO dates, log prices) and fits it with the CLI:

    pip install vega_datasets
    python examples/stocks_with_gaps.py stocks.csv
    kronlik fit --data stocks.csv --time-column date --kernel "matern32 + rbf" --forecast 12 \
        --plot stocks.png --out stocks.json --predictions stocks_forecast.csv
"""

import csv
import importlib.util
import math
import sys
from datetime import datetime
from pathlib import Path


def stocks_table() -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    spec = importlib.util.find_spec("vega_datasets")
    if spec is None:
        sys.exit("needs the vega_datasets package: pip install vega_datasets")
    path = Path(spec.submodule_search_locations[0]) / "_data" / "stocks.csv"
    prices = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            date = datetime.strptime(row["date"], "%b %d %Y").date().isoformat()
            prices[(row["symbol"], date)] = float(row["price"])
    symbols = sorted({s for s, _ in prices})
    dates = sorted({d for _, d in prices})
    return symbols, dates, prices


def main(out: str) -> None:
    symbols, dates, prices = stocks_table()
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["date"] + [f"log_{s}" for s in symbols])
        for d in dates:
            writer.writerow([d] + [f"{math.log(prices[s, d]):.6f}" if (s, d) in prices else "" for s in symbols])
    missing = sum((s, d) not in prices for s in symbols for d in dates)
    print(f"wrote {out}: {len(dates)} months × {len(symbols)} stocks, {missing} missing cells")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "stocks.csv")
