"""python -m benchmarks.serving [--quick]: continuous batching vs one at a time vs Triton's dynamic
batching on samg-digits, in one tritonserver (benchmarks/serving/bench.py)."""

from __future__ import annotations

import sys

from benchmarks.serving.bench import main
from samg.errors import SamgError

if __name__ == "__main__":
    try:
        sys.exit(main())
    except SamgError as exc:
        print(f"benchmarks.serving: error: {exc}", file=sys.stderr)
        sys.exit(2)
