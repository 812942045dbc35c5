"""Inference latency of `xbmd estimate` on 2 CPU cores: per hip warm, per image, cold start.

- model only: ``ModelBundle.predict`` on one hip crop (batch of one), model loaded;
- per image, model loaded, no disk I/O: ``Estimator.estimate_xray`` (localiser, both hip crops,
  prediction, plausibility checks, virtual X-ray mapped back onto the radiograph), divided by the
  hips found for the per-hip figure;
- writing the outputs of one image (result.json, .npy, PNGs, overview);
- cold start: ``xbmd estimate IMAGE`` in a new process (interpreter, imports, model load, one
  image, outputs written), median of 3; with ``--baseline-src DIR`` (the ``src`` folder of
  another xbmd checkout, e.g. an older commit) the same command of that version is timed in the
  same run, alternating, and the heavy packages each one imports are listed.

Accuracy, reproducibility and robustness are measured by ``xbmd evaluate`` (docs/validation/).

Usage::

    python benchmarks/bench_estimate.py [--model M] [--image samples/hip_vq0002.dcm] \
        [--pixel-spacing MM] [--threads 2] [--repeats 20] [--baseline-src OLD/src]
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument(
        "--baseline-src", type=Path, default=None, help="src/ of another xbmd to compare with"
    )
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
        cold_start(args, Path(tmp))


#: Packages whose import time matters for a cold start.
HEAVY = ("torch", "monai", "lightning", "tensorboardX", "ignite", "matplotlib", "SimpleITK",
         "skimage", "scipy", "pydicom", "highdicom", "fastapi")  # fmt: skip

_IMPORTED = (
    "import json, runpy, sys; sys.argv = ['xbmd', *sys.argv[1:]];\n"
    "try:\n    runpy.run_module('xbmd.cli', run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    "print('IMPORTED ' + json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
)


def cold_start(args, tmp: Path) -> None:
    """Time ``xbmd estimate IMAGE`` in new processes, this version and ``--baseline-src``."""
    cli = ["estimate", str(args.image), "--out", str(tmp), "--no-progress"]
    if args.model:
        cli += ["--model", str(args.model)]
    if args.pixel_spacing:
        cli += ["--pixel-spacing", str(args.pixel_spacing)]
    versions = {"this": ROOT / "src"}
    if args.baseline_src:
        versions["baseline"] = args.baseline_src.resolve()
    times = {name: [] for name in versions}
    modules = {}
    for _ in range(3):  # alternate, so that a busy moment hits both
        for name, src in versions.items():
            env = dict(os.environ, PYTHONPATH=str(src))
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "xbmd.cli", *cli], env=env, check=True,
                           capture_output=True)  # fmt: skip
            times[name].append(time.perf_counter() - t0)
            if name not in modules:
                out = subprocess.run([sys.executable, "-c", _IMPORTED, *cli], env=env,
                                     check=True, capture_output=True, text=True)  # fmt: skip
                line = next(x for x in out.stdout.splitlines() if x.startswith("IMPORTED "))
                modules[name] = set(json.loads(line.removeprefix("IMPORTED ")))
    for name, src in versions.items():
        heavy = [m for m in HEAVY if m in modules[name]]
        print(
            f"cold start `xbmd estimate` one image ({name}, {src}): median "
            f"{np.median(times[name]):.2f} s (of 3); heavy packages: {', '.join(heavy)}"
        )
    if "baseline" in versions:
        gone = sorted(m for m in HEAVY if m in modules["baseline"] - modules["this"])
        print(f"no longer imported by this version: {', '.join(gone) or 'none'}")


if __name__ == "__main__":
    main()
