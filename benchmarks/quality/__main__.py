"""The quality benchmarks: samg-digits (real model, ONNX Runtime; every rule), S-CFG on samg-digits
(its own exported graph), and the analytic Gaussian mixture.

    python -m benchmarks.quality --quick     # reduced tables and plots, < 10 min on 2 cores
    python -m benchmarks.quality             # full sweeps (see benchmarks/quality/RESULTS.md)

Outputs go to benchmarks/quality/results/ (digits*.{csv,md,png}, scfg_digits*.{csv,md,png},
analytic[_quick].{csv,md}, analytic[_quick]_*.png).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.quality import analytic, digits, scfg_digits
from samg.errors import SamgError

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced sweeps and sample counts")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    p.add_argument("--only", choices=("digits", "scfg", "analytic"), help="run one of the benchmarks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if a.only in (None, "digits"):
            digits.main((["--quick"] if a.quick else []) + ["--out", str(a.out)] + (["--quiet"] if a.quiet else []))
        if a.only in (None, "scfg"):
            scfg_digits.main(["sweep", *(["--quick"] if a.quick else []), "--out", str(a.out)])
        if a.only in (None, "analytic"):
            analytic.main((["--quick"] if a.quick else []) + ["--out", str(a.out)] + (["--quiet"] if a.quiet else []))
    except SamgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"quality benchmarks done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
