"""samg::GuidanceCombine on onnxruntime CPU: native custom op vs the inlined ONNX function body.

    python benchmarks/native/bench_combine.py [--repeats 20] [--threads 0] [--smooth 0]

Builds the custom-op library if needed (scripts/build_native.sh). For each shape, both sessions run
interleaved (A, B, A, B, ...) so that machine noise hits both alike; prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SHAPES = [  # (label, shape, channel_axis)
    ("SDXL 1x4x128x128", (1, 4, 128, 128), 1),
    ("SDXL 2x4x128x128", (2, 4, 128, 128), 1),
    ("SDXL 4x4x128x128", (4, 4, 128, 128), 1),
    ("SD3 1x16x128x128", (1, 16, 128, 128), 1),
    ("CogVideoX 1x13x16x60x90", (1, 13, 16, 60, 90), 2),
    ("video 1x4x16x64x64", (1, 4, 16, 64, 64), 1),
]


def main() -> None:
    import onnxruntime as ort

    import samg.native
    from samg.op import make_standalone_model, strip_function

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: default)")
    parser.add_argument("--smooth", type=int, default=0, choices=(0, 3))
    args = parser.parse_args()

    library = samg.native.ort_custom_op_library(build_if_missing=True)

    def session(model, with_library: bool):
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        if with_library:
            options.register_custom_ops_library(library)
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    print(f"onnxruntime {ort.__version__} CPU, smooth={args.smooth}, {args.repeats} interleaved repeats, median ms")
    print(f"{'shape':28s} {'function body':>14s} {'custom op':>10s} {'speedup':>8s} {'max |diff|':>11s}")
    rng = np.random.default_rng(0)
    for label, shape, channel_axis in SHAPES:
        model = make_standalone_model(rank=len(shape), smooth=args.smooth, channel_axis=channel_axis)
        body = session(model, False)
        strip_function(model)
        fused = session(model, True)
        u = rng.standard_normal(shape).astype(np.float32)
        feeds = {"pred_uncond": u, "pred_cond": u + rng.standard_normal(shape).astype(np.float32),
                 "scales": np.tile(np.array([[4.0, 7.5]], np.float32), (shape[0], 1))}
        times = {"body": [], "fused": []}
        outputs = {}
        for name, s in (("body", body), ("fused", fused)):  # warm-up
            outputs[name] = s.run(None, feeds)[0]
        for _ in range(args.repeats):
            for name, s in (("body", body), ("fused", fused)):
                start = time.perf_counter()
                s.run(None, feeds)
                times[name].append((time.perf_counter() - start) * 1e3)
        t_body, t_fused = statistics.median(times["body"]), statistics.median(times["fused"])
        diff = float(np.abs(outputs["body"] - outputs["fused"]).max())
        print(f"{label:28s} {t_body:14.2f} {t_fused:10.2f} {t_body / t_fused:7.2f}x {diff:11.2e}")


if __name__ == "__main__":
    main()
