"""The quality benchmarks: samg-digits (real model, ONNX Runtime; every rule), S-CFG on samg-digits
(its own exported graph), samg-shapes (every rule and S-CFG, scored exactly by rule), and the
analytic Gaussian mixture.

    python -m benchmarks.quality --quick     # reduced tables and plots -> out/quality-quick/ (untracked)
    python -m benchmarks.quality             # full sweeps -> benchmarks/quality/results/ (see RESULTS.md)

Full runs write benchmarks/quality/results/ (digits.{csv,md,png}, scfg_digits.{csv,md,png},
shapes.{csv,md,png}, analytic.{csv,md,png}), the committed evidence behind RESULTS.md; quick runs
write the *_quick files to out/quality-quick/ unless --out says otherwise, so they never overwrite it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.quality import analytic, digits, report, scfg_digits, shapes
from samg.errors import SamgError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced sweeps and sample counts")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: {report.RESULTS_DIR} for full runs, {report.QUICK_DIR} for --quick)")
    p.add_argument("--only", choices=("digits", "scfg", "shapes", "analytic"), help="run one of the benchmarks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    a.out = a.out if a.out is not None else report.default_out_dir(a.quick)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    try:
        if a.only in (None, "digits"):
            digits.main((["--quick"] if a.quick else []) + ["--out", str(a.out)] + (["--quiet"] if a.quiet else []))
        if a.only in (None, "scfg"):
            scfg_digits.main(["sweep", *(["--quick"] if a.quick else []), "--out", str(a.out)])
        if a.only in (None, "shapes"):
            shapes.main((["--quick"] if a.quick else []) + ["--out", str(a.out)] + (["--quiet"] if a.quiet else []))
        if a.only in (None, "analytic"):
            analytic.main((["--quick"] if a.quick else []) + ["--out", str(a.out)] + (["--quiet"] if a.quiet else []))
    except SamgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"quality benchmarks done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
