"""Inference latency of `xbmd estimate` on 2 CPU cores: per hip warm, per image, cold start.

- model only: ``ModelBundle.predict`` on one hip crop (batch of one), model loaded;
- per image, model loaded, no disk I/O: ``Estimator.estimate_xray`` (localiser, both hip crops,
  prediction, plausibility checks, virtual X-ray mapped back onto the radiograph), divided by the
  hips found for the per-hip figure;
- writing the outputs of one image (result.json, .npy, PNGs, overview);
- cold start: ``xbmd estimate IMAGE`` in a new process (interpreter, imports, model load, one
  image, outputs written), median of 3.

Accuracy, reproducibility and robustness are measured by ``xbmd evaluate`` (docs/validation/).

Usage::

    python benchmarks/bench_estimate.py [--model M] [--image samples/hip_vq0002.dcm] \
        [--pixel-spacing MM] [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xbmd.estimation.estimator import Estimator
from xbmd.estimation.output import write_results
from xbmd.io.xray import read_xray

ROOT = Path(__file__).resolve().parents[1]


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times)), 1000 * float(np.percentile(times, 90))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model bundle (default: the bundled one)")
    parser.add_argument("--image", type=Path, default=ROOT / "samples" / "hip_vq0002.dcm")
    parser.add_argument("--pixel-spacing", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    estimator = Estimator(args.model)
    load_s = time.perf_counter() - t0
    xray = read_xray(args.image, pixel_spacing_mm=args.pixel_spacing)
    results = estimator.estimate_xray(xray)
    hips = len(results)
    print(
        f"image {args.image.name}: {xray.pixels.shape[1]} x {xray.pixels.shape[0]} px, {hips} hips"
    )
    print(f"threads {torch.get_num_threads()}, model load {load_s:.2f} s")

    bundle = estimator.bundle
    crop = np.random.default_rng(0).normal(1000, 100, (1, 256, 256)).astype(np.float32)
    valid = np.ones_like(crop, dtype=bool)
    med, p90 = _median_ms(lambda: bundle.predict(crop, valid), args.repeats)
    print(f"model only, one hip:              median {med:7.1f} ms  p90 {p90:7.1f} ms")
    med, p90 = _median_ms(lambda: estimator.estimate_xray(xray), args.repeats)
    print(f"estimate one image (no I/O):      median {med:7.1f} ms  p90 {p90:7.1f} ms")
    print(f"  per hip:                        median {med / max(hips, 1):7.1f} ms  (target 500)")
    with tempfile.TemporaryDirectory() as tmp:
        med, p90 = _median_ms(
            lambda: write_results(estimator.estimate_xray(xray), tmp, "bench"),
            max(3, args.repeats // 4),
        )
        print(f"estimate + write outputs, image:  median {med:7.1f} ms  p90 {p90:7.1f} ms")
        command = [
            str(Path(sys.executable).parent / "xbmd"),
            "estimate",
            str(args.image),
            "--out",
            tmp,
        ]
        command += ["--no-progress"]
        if args.model:
            command += ["--model", str(args.model)]
        if args.pixel_spacing:
            command += ["--pixel-spacing", str(args.pixel_spacing)]
        cold = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            cold.append(time.perf_counter() - t0)
        print(f"cold start `xbmd estimate` one image: median {np.median(cold):.2f} s (of 3)")


if __name__ == "__main__":
    main()
