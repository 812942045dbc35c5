"""DRR renderer benchmark: accuracy and speed against plastimatch (C++ Siddon), same run.

Usage (after ``make bench`` has installed the ``bench`` extra, which brings plastimatch):

    .venv/bin/python benchmarks/bench_drr.py [--threads 2] [--repeats 7] [--out bench_out]

Prints the figures reported in docs/benchmarks.md. plastimatch is used here only, never at run time.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from xbmd.ct.phantoms import hip_test_ct
from xbmd.drr import prepare_volume, render, volume_values
from xbmd.geometry import PerspectiveGeometry
from xbmd.io.ct import volume_to_sitk
from xbmd.volume import Volume

SDD_MM, SOD_MM = 1100.0, 950.0
DETECTOR_MM = 430.0


def plastimatch_exe() -> str:
    """The C++ binary inside the PyPI package (its console script is a Python wrapper)."""
    try:
        import plastimatch
    except ImportError:
        sys.exit("plastimatch not found: run `make bench` (installs the 'bench' extra)")
    exe = Path(plastimatch.__file__).parent / "bin" / "plastimatch"
    if not exe.exists():
        sys.exit(f"plastimatch binary not found at {exe}")
    return str(exe)


def peak_rss_mib(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd``; return its result and peak resident memory (MiB) read from /proc VmHWM.

    (getrusage's ru_maxrss of a child would include this big parent's pages copied at fork.)
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_kib = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            hwm = re.search(r"VmHWM:\s*(\d+)", status.read_text())
            peak_kib = max(peak_kib, int(hwm.group(1))) if hwm else peak_kib
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out, err)
    return subprocess.CompletedProcess(cmd, 0, out, err), peak_kib / 1024


def run_plastimatch(
    exe: str, mha: Path, out_prefix: Path, size: int, algorithm: str, memory: bool = False
):
    """Render with plastimatch in xbmd's AP geometry; returns (image, reported s, wall s, peak MiB).

    With ``memory`` the run is watched for its peak memory and its times are not representative
    (reading /proc/PID/status contends with the process's page faults).
    """
    spacing = DETECTOR_MM / size
    cmd = [
        exe, "drr", "-t", "raw", "-P", "none", "-i", algorithm,
        "-r", f"{size} {size}", "-z", f"{size * spacing} {size * spacing}",
        "--sad", str(SOD_MM), "--sid", str(SDD_MM),
        "-n", "0 -1 0", "--vup", "0 0 1", "-o", "0 0 0",
        "-O", str(out_prefix), str(mha),
    ]  # fmt: skip
    t0 = time.perf_counter()
    if memory:
        res, peak_mib = peak_rss_mib(cmd)
    else:
        res, peak_mib = subprocess.run(cmd, check=True, capture_output=True, text=True), 0.0
    wall = time.perf_counter() - t0
    reported = float(re.search(r"Total time:\s*([0-9.]+)", res.stdout + res.stderr).group(1))
    img = np.fromfile(f"{out_prefix}0000.raw", np.float32).reshape(size, size)
    return img, reported, wall, peak_mib


def memory_probe(mha: Path, size: int) -> None:
    """Child-process mode: load the volume, render once, print VmHWM before and after (MiB)."""
    from xbmd.io.ct import read_volume

    def hwm() -> float:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s*(\d+)", text).group(1)) / 1024

    body = prepare_volume(read_volume(mha, unit="1/cm"), "attenuation")
    before = hwm()
    geo = PerspectiveGeometry(SDD_MM, SOD_MM, (size, size), DETECTOR_MM / size)
    with torch.no_grad():
        render(body, torch.zeros(6), geo)
    print(f"{before:.0f} {hwm():.0f}")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def sampling_throughput() -> tuple[float, float]:
    """Bilinear (2D) vs trilinear (3D) grid_sample throughput on CPU, million samples/s."""
    vol = torch.randn(256, 133, 512)
    grid2 = torch.rand(32, 256, 256, 2) * 2 - 1
    t2 = timed(lambda: F.grid_sample(vol[:32, None], grid2, align_corners=True), 3)
    grid3 = torch.rand(1, 1, 256, 256 * 8, 3) * 2 - 1
    t3 = timed(lambda: F.grid_sample(vol[None, None], grid3, align_corners=True), 1)
    n2, n3 = grid2.numel() / 2, grid3.numel() / 3
    return n2 / t2 / 1e6, n3 / t3 / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="keep images here")
    parser.add_argument("--memory-probe", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args.memory_probe, 256)
        return
    exe = plastimatch_exe()
    work = Path(tempfile.mkdtemp(prefix="xbmd-bench-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; plastimatch: {exe}")

    test = hip_test_ct()
    k, j, i = test.ct.shape
    spacing = " x ".join(f"{v:g}" for v in test.ct.spacing_mm)
    print(f"CT {i} x {j} x {k} voxels, spacing {spacing} mm (hip test CT)")
    mu = Volume(volume_values(test.ct, "attenuation"), test.ct.affine, "1/cm", "mu")
    mha = work / "mu.mha"
    sitk.WriteImage(volume_to_sitk(mu), str(mha))

    size = 256
    geo = PerspectiveGeometry(SDD_MM, SOD_MM, (size, size), DETECTOR_MM / size)
    t0 = time.perf_counter()
    body = prepare_volume(mu, "attenuation")
    t_prep = time.perf_counter() - t0
    body_full = prepare_volume(mu, "attenuation", crop=False)
    print(f"prepare_volume (convert, crop to non-zero box): {t_prep:.2f} s once per volume; "
          f"cropped grid {tuple(body.data.shape)}")  # fmt: skip
    pose = torch.zeros(6)

    # --- accuracy against plastimatch inside the body
    ref, _, _, _ = run_plastimatch(exe, mha, work / "pm_exact", size, "exact")
    uni, _, _, _ = run_plastimatch(exe, mha, work / "pm_uniform", size, "uniform")
    inside = ref > 0.1 * ref.max()
    print(f"\naccuracy, {inside.sum()} pixels inside the body, |relative difference|:")
    images = {}
    for oversample in (1, 2):
        with torch.no_grad():
            images[oversample] = render(body, pose, geo, oversample=oversample)[0].numpy()
    pairs = [
        (f"xbmd oversample={n} vs plastimatch {name}", images[n], other)
        for name, other in (("exact (Siddon)", ref), ("uniform (interpolating)", uni))
        for n in (1, 2)
    ]
    pairs.append(("plastimatch uniform vs plastimatch exact", uni, ref))
    for label, img, other in pairs:
        rel = np.abs(img - other)[inside] / other[inside]
        p50, p99 = np.median(rel) * 100, np.percentile(rel, 99) * 100
        print(f"  {label}: median {p50:.3f} %, 99th pct {p99:.3f} %, max {rel.max() * 100:.2f} %")

    # --- speed, same run
    print(f"\nspeed, {size} x {size} perspective DRR, median of {args.repeats}:")
    pm = [run_plastimatch(exe, mha, work / "pm_t", size, "exact") for _ in range(args.repeats)]
    pm_render = float(np.median([p[1] for p in pm]))
    pm_wall = float(np.median([p[2] for p in pm]))
    pm_peak = run_plastimatch(exe, mha, work / "pm_m", size, "exact", memory=True)[3]
    print(f"  plastimatch exact: render {pm_render * 1000:.1f} ms (its own 'Total time'), "
          f"whole command {pm_wall * 1000:.0f} ms, peak RSS {pm_peak:.0f} MiB")  # fmt: skip
    rows = []
    for label, b, oversample in (
        ("cropped, oversample=1", body, 1),
        ("cropped, oversample=2", body, 2),
        ("uncropped, oversample=1", body_full, 1),
    ):
        with torch.no_grad():
            t = timed(lambda b=b, o=oversample: render(b, pose, geo, oversample=o), args.repeats)
        rows.append((label, t))
        print(f"  xbmd {label}: {t * 1000:.1f} ms, ratio xbmd/plastimatch {t / pm_render:.2f}")
    probe = [sys.executable, __file__, "--threads", str(args.threads), "--memory-probe", str(mha)]
    res, _ = peak_rss_mib(probe)
    before, after = (float(v) for v in res.stdout.split()[-2:])
    print(f"  peak RSS: xbmd process (load + prepare + render) {after:.0f} MiB, rendering "
          f"raised it by {after - before:.0f} MiB; plastimatch {pm_peak:.0f} MiB; "
          f"CT as float32 {test.ct.data.nbytes / 2**20:.0f} MiB")  # fmt: skip

    # --- batch of 16 poses, 128 x 128
    small = PerspectiveGeometry(SDD_MM, SOD_MM, (128, 128), DETECTOR_MM / 128)
    poses = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    poses *= torch.tensor([3.0, 3.0, 3.0, 5.0, 5.0, 5.0])
    with torch.no_grad():
        t16 = timed(lambda: render(body, poses, small), args.repeats)
    print(f"\nbatch of 16 poses at 128 x 128: {t16:.3f} s (target < 1 s)")
    grad_pose = poses[:1].clone().requires_grad_(True)

    def fwd_bwd():
        render(body, grad_pose, small).sum().backward()

    print(f"one 128 x 128 DRR forward + backward (pose gradient): {timed(fwd_bwd, 3):.3f} s")

    s2, s3 = sampling_throughput()
    print(f"\ngrid_sample throughput: bilinear 2D {s2:.0f} M samples/s, "
          f"trilinear 3D {s3:.1f} M samples/s")  # fmt: skip

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        np.save(args.out / "xbmd_drr.npy", images[1])
        np.save(args.out / "plastimatch_drr.npy", ref)
        _figure(images[1], ref, inside, args.out / "drr_vs_plastimatch.png")
        print(f"images in {args.out}")
    shutil.rmtree(work, ignore_errors=True)


def _figure(ours: np.ndarray, ref: np.ndarray, inside: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff = np.where(inside, (ours - ref) / np.maximum(ref, 1e-6) * 100, np.nan)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, img, title in ((axes[0], ours, "xbmd"), (axes[1], ref, "plastimatch (exact)")):
        shown = ax.imshow(img, cmap="gray")
        ax.set_title(f"{title}: attenuation line integral")
        fig.colorbar(shown, ax=ax, fraction=0.046)
    shown = axes[2].imshow(diff, cmap="coolwarm", vmin=-1, vmax=1)
    axes[2].set_title("relative difference inside the body (%)")
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
