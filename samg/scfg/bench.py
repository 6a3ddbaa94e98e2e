"""Latency of an S-CFG export's denoiser vs a fused (GuidanceCombine) export of the same model, ORT CPU.

    python -m samg.scfg.bench FUSED_DIR SCFG_DIR [--sizes 8 16 32] [--repeat 20]

Both folders must come from the same model (e.g. `samg export --model sd15 --tiny` with
`--guidance fused` and `--guidance scfg`). Runs are interleaved so that machine load affects both alike;
the median per call is reported, and the S-CFG/fused ratio per repeat with its interquartile range and
whether that spread resolves it from parity.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from samg.bench import ratio_spread, resolution_note


def _feeds(export, batch: int, h: int, w: int, rng):
    """Random feeds for the denoiser graph of `export` (samg.contract.Export) at latent size h x w."""
    import numpy as np

    from samg.guidance import DEFAULT_GUIDANCE_SCALE

    feeds = {}
    for name, info in export.denoiser.inputs.items():
        dims = {"B": batch, "2B": 2 * batch, "H": h, "W": w}
        shape = [dims.get(d, d) for d in info.shape]
        feeds[name] = rng.standard_normal(shape).astype(np.float32)
    feeds["timestep"] = np.full((batch,), 500.0, np.float32)
    feeds["guidance_scales"] = np.full((batch, 2), DEFAULT_GUIDANCE_SCALE, np.float32)
    return feeds


def measure(fused_dir: str, scfg_dir: str, sizes=(8, 16, 32), repeat: int = 20, batch: int = 1) -> list[dict]:
    import numpy as np

    from samg.contract import read_export
    from samg.runners import open_runner

    sessions, exports = {}, {}
    for label, folder in (("fused", fused_dir), ("scfg", scfg_dir)):
        exports[label] = read_export(folder)
        # the CPU is shared: one thread each, comparable numbers
        sessions[label] = open_runner(Path(folder) / exports[label].denoiser.file, "onnxruntime", "cpu", threads=1)
    rows = []
    rng = np.random.default_rng(0)
    for size in sizes:
        feeds = {k: _feeds(e, batch, size, size, rng) for k, e in exports.items()}
        times = {k: [] for k in sessions}
        for k, s in sessions.items():  # warm-up
            s.run(feeds[k])
        for _ in range(repeat):
            for k, s in sessions.items():
                start = time.perf_counter()
                s.run(feeds[k])
                times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        spread = ratio_spread(times["scfg"], times["fused"])  # per interleaved repeat, then summarized
        rows.append({"latent": size, "fused_ms": med["fused"], "scfg_ms": med["scfg"], **spread})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fused_dir")
    p.add_argument("scfg_dir")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    for row in measure(args.fused_dir, args.scfg_dir, args.sizes, args.repeat):
        print(f"latent {row['latent']:>3}x{row['latent']:<3} fused {row['fused_ms']:8.2f} ms  "
              f"scfg {row['scfg_ms']:8.2f} ms  ratio {row['ratio']:.2f} [IQR {row['q1']:.2f}–{row['q3']:.2f}]  "
              f"{resolution_note(row)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
