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

from benchmarks.quality import analytic, digits, report, scfg_digits, shapes
from samg.errors import SamgError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_output_args(p, quick_help="reduced sweeps and sample counts")
    p.add_argument("--only", choices=("digits", "scfg", "shapes", "analytic"), help="run one of the benchmarks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return report.resolve_out(p.parse_args(argv))


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    flags = [*(["--quick"] if a.quick else []), "--out", str(a.out)]
    quiet = ["--quiet"] if a.quiet else []
    try:
        if a.only in (None, "digits"):
            digits.main(flags + quiet)
        if a.only in (None, "scfg"):
            scfg_digits.main(["sweep", *flags])
        if a.only in (None, "shapes"):
            shapes.main(flags + quiet)
        if a.only in (None, "analytic"):
            analytic.main(flags + quiet)
    except SamgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"quality benchmarks done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
