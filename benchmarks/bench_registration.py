"""2D-3D registration on virtual-cohort radiographs with known poses.

For each radiograph of the cohort (``xbmd synth``), every body (pelvis, both femurs) starts from its
true pose perturbed by up to 10 degrees about each axis, 20 mm in the detector plane and 50 mm
along the beam (uniform), and is registered with ``xbmd.registration.optimise.register``.
Reported per body:

- rotation error (degrees, angle of R_est R_true^T);
- mean projected distance (mPD, mm at the detector) of its anatomical landmarks (femur: head centre,
  neck centre, head-neck junction, both trochanters; pelvis: acetabular centres, iliac-crest tops,
  ischial bottoms); success = rotation error <= 1 degree and mPD <= 1 mm;
- for the femurs, the BMD that matters: the mean proximal-femur DRR (g/cm2) inside its projected
  region, from the registered pose versus from the true pose (relative difference);
- time per body on this machine (``--threads``), similarity, quality flag.

Two definitions of success are reported: the strict one (rotation error <= 1 degree and mPD
<= 1 mm), and the one that matters for the training labels (``--bmd-limit``): mPD <= 1 mm and,
for a femur, the PF-DRR BMD within 0.5 % of the true pose's. For each, how many misses the
quality flag caught. The femurs' rotation errors are split by room axis (x: flexion, about the
detector's horizontal axis; y: about the beam; z: about the detector's vertical axis).

The strategies ``cma+gradient`` (default), ``gradient`` (gradient descent only) and ``cma`` (CMA-ES
only) run on the same radiographs and the same perturbations (``--compare N``: the first N
radiographs), so their accuracy and time compare directly. ``--default-init`` adds a run from the
default AP pose (no pose given: what ``xbmd register`` does) on the same radiographs.

``--workers N`` registers N cases at once (processes; each gets ``--threads`` // N PyTorch
threads); the numbers do not depend on it, the times do.

Usage::

    python benchmarks/bench_registration.py --cohort bench_out/reg20 --compare 10
    python benchmarks/bench_registration.py --cohort bench_out/reg20 --compare 0 --workers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from xbmd.ct.calibration import Calibration
from xbmd.ct.femur import SILHOUETTE_CHORD_MM, proximal_femur_mask
from xbmd.ct.landmarks import read_landmarks
from xbmd.drr import prepare_volume, render, volume_values
from xbmd.geometry import SIDES, BodyPose, PerspectiveGeometry, RigidTransform
from xbmd.io.ct import read_ct, read_labels
from xbmd.io.xray import read_xray, xray_geometry
from xbmd.registration.optimise import RegistrationSettings, register
from xbmd.registration.result import projected_distance_mm, rotation_error_deg
from xbmd.registration.scene import build_scene


def draw_perturbation(rng: np.random.Generator) -> np.ndarray:
    """Up to 10 degrees about each axis, 20 mm in-plane (x, z), 50 mm along the beam (y)."""
    d = np.zeros(6)
    d[:3] = rng.uniform(-10.0, 10.0, 3)
    d[[3, 5]] = rng.uniform(-20.0, 20.0, 2)
    d[4] = rng.uniform(-50.0, 50.0)
    return d


def perturb(pose: BodyPose, delta: np.ndarray) -> BodyPose:
    """The pose with ``delta`` added to its parameters (about its own centre)."""
    v = pose.vector + delta
    return BodyPose(pose.label_ids, pose.isocenter_mm, RigidTransform.from_vector(v))


class Case:
    """A virtual case read from its files, with what the metrics need."""

    def __init__(self, case_dir: Path):
        self.dir = case_dir
        self.truth = json.loads((case_dir / "truth.json").read_text())
        ct = read_ct(case_dir / self.truth["ct"]["file"])
        self.labels = read_labels(case_dir / self.truth["ct"]["labels"], ct)
        # poses do not depend on the density scale: the scanner's true line is used here
        tc = self.truth["ct"]["true_calibration"]
        cal = Calibration.given(tc["slope_mg_cm3_per_hu"], tc["intercept_mg_cm3"])
        self.density = ct.with_data(volume_values(ct, "density", cal), unit="mg/cm3")
        self.landmarks = read_landmarks(case_dir / self.truth["landmarks"])
        self.label_map = self.truth["ct"]["label_map"]
        self.scene = build_scene(ct, self.labels, self.label_map, self.landmarks)
        self.pf = {}
        for side in SIDES:
            lid = self.label_map[f"femur_{side}"]
            mask = proximal_femur_mask(self.labels, lid, self.landmarks[side])
            centre = self.scene.centre(f"femur_{side}")
            pf = self.density.with_data(np.where(mask, self.density.data, 0).astype(np.float32))
            ones = self.density.with_data(mask.astype(np.float32))
            self.pf[side] = (
                prepare_volume(pf, "density", isocenter_mm=centre),
                prepare_volume(ones, "density", isocenter_mm=centre),
            )

    def true_poses(self, xray: dict) -> dict[str, BodyPose]:
        return {
            n: BodyPose.from_dict(d).about(self.scene.centre(n)) for n, d in xray["poses"].items()
        }

    def pf_bmd(self, side: str, pose: BodyPose, geometry: PerspectiveGeometry) -> float:
        """Mean PF DRR (g/cm2) inside the PF region's projection, for this femur pose."""
        pf, ones = self.pf[side]
        vec = torch.as_tensor(pose.vector)
        with torch.no_grad():
            drr = render(pf, vec, geometry)[0].numpy()
            chord = render(ones, vec, geometry)[0].numpy() * 1e4
        region = chord > SILHOUETTE_CHORD_MM
        return float(drr[region].mean())


def run_one(
    case: Case, xray: dict, strategy: str, init, seed: int, levels: tuple | None = None
) -> list[dict]:
    image = read_xray(case.dir / xray["dicom"])
    geometry, _ = xray_geometry(image)
    truth = case.true_poses(xray)
    settings = RegistrationSettings(strategy=strategy, seed=seed)
    if levels:
        settings = replace(settings, level_pixels_mm=tuple(levels))
    t0 = time.perf_counter()
    reg = register(case.scene, image.pixels, geometry, settings=settings, init=init)
    total = time.perf_counter() - t0
    rows = []
    for name, body in reg.bodies.items():
        mpd = projected_distance_mm(case.scene.landmarks_mm[name], body.pose, truth[name], geometry)
        row = {
            "case": case.dir.name,
            "xray": xray["name"],
            "strategy": strategy,
            "init": "perturbed" if init else "default",
            "body": name,
            "rotation_error_deg": rotation_error_deg(body.pose, truth[name]),
            "rotation_error_axes_deg": _rotvec_deg(body.pose, truth[name]),
            "mpd_mm": float(mpd.mean()),
            "similarity": body.similarity,
            "flagged": body.flagged,
            "reasons": body.reasons,
            "time_s": body.time_s,
            "xray_time_s": total,
            "evaluations": body.evaluations,
        }
        if name.startswith("femur"):
            side = name.removeprefix("femur_")
            b_reg = case.pf_bmd(side, body.pose, geometry)
            b_true = case.pf_bmd(side, truth[name], geometry)
            row["pf_bmd_true_g_cm2"] = b_true
            row["pf_bmd_diff_percent"] = 100.0 * (b_reg / b_true - 1.0)
        rows.append(row)
    return rows


def _rotvec_deg(a: BodyPose, b: BodyPose) -> list[float]:
    """Rotation from b to a as a rotation vector about the room axes (x, y, z), degrees."""
    from scipy.spatial.transform import Rotation

    r = a.transform.rotation_matrix @ b.transform.rotation_matrix.T
    return [float(v) for v in np.degrees(Rotation.from_matrix(r).as_rotvec())]


#: Second definition of success: projected landmarks within this (mm) ...
MPD_LIMIT_MM = 1.0
#: ... and a femur's PF-DRR BMD within this (%) of the true pose's.
BMD_LIMIT_PERCENT = 0.5


def label_success(row: dict, bmd_limit: float = BMD_LIMIT_PERCENT) -> bool:
    """mPD <= 1 mm and, for a femur, |PF-DRR BMD difference| <= ``bmd_limit`` %."""
    ok = row["mpd_mm"] <= MPD_LIMIT_MM
    if "pf_bmd_diff_percent" in row:
        ok = ok and abs(row["pf_bmd_diff_percent"]) <= bmd_limit
    return bool(ok)


def summarise(rows: list[dict], label: str, bmd_limit: float = BMD_LIMIT_PERCENT) -> dict:
    out = {"label": label, "registrations": len(rows)}
    if not rows:
        return out
    rot = np.array([r["rotation_error_deg"] for r in rows])
    mpd = np.array([r["mpd_mm"] for r in rows])
    ok = (rot <= 1.0) & (mpd <= 1.0)
    ok_labels = np.array([label_success(r, bmd_limit) for r in rows])
    flagged = np.array([r["flagged"] for r in rows])
    out |= {
        "success_percent": 100.0 * ok.mean(),
        "rotation_error_deg": _dist(rot),
        "mpd_mm": _dist(mpd),
        "time_s": _dist(np.array([r["time_s"] for r in rows])),
        "flagged_percent": 100.0 * flagged.mean(),
        "failed_not_flagged": int((~ok & ~flagged).sum()),
        "flagged_but_fine": int((ok & flagged).sum()),
        "label_success_percent": 100.0 * ok_labels.mean(),
        "label_misses": int((~ok_labels).sum()),
        "label_misses_flagged": int((~ok_labels & flagged).sum()),
        "label_misses_not_flagged": int((~ok_labels & ~flagged).sum()),
        "label_fine_but_flagged": int((ok_labels & flagged).sum()),
    }
    pf = [abs(r["pf_bmd_diff_percent"]) for r in rows if "pf_bmd_diff_percent" in r]
    if pf:
        out["pf_bmd_abs_diff_percent"] = _dist(np.array(pf))
    axes = np.abs(np.array([r["rotation_error_axes_deg"] for r in rows]))
    out["rotation_error_by_axis_deg"] = {
        name: _dist(axes[:, i]) for i, name in enumerate(("x_flexion", "y_beam", "z_vertical"))
    }
    return out


def _dist(x: np.ndarray) -> dict:
    return {
        "median": float(np.median(x)),
        "p90": float(np.percentile(x, 90)),
        "p95": float(np.percentile(x, 95)),
        "max": float(x.max()),
        "mean": float(x.mean()),
    }


def print_table(summaries: list[dict]) -> None:
    head = (
        f"{'run':34s} {'n':>4s} {'ok%':>6s} {'rot med/p95/max (deg)':>24s} "
        f"{'mPD med/p95/max (mm)':>22s} {'|dBMD| med/p95 %':>17s} {'time med/p90 s':>15s} "
        f"{'flag%':>6s} {'bad!flag':>8s} {'label ok%':>9s} {'miss/flagged':>12s}"
    )
    print(head)
    for s in summaries:
        if s["registrations"] == 0:
            continue
        r, m, t = s["rotation_error_deg"], s["mpd_mm"], s["time_s"]
        pf = s.get("pf_bmd_abs_diff_percent")
        pf_txt = f"{pf['median']:.3f}/{pf['p95']:.3f}" if pf else "-"
        print(
            f"{s['label']:34s} {s['registrations']:4d} {s['success_percent']:6.1f} "
            f"{r['median']:7.2f}/{r['p95']:6.2f}/{r['max']:7.2f}   "
            f"{m['median']:6.2f}/{m['p95']:5.2f}/{m['max']:7.2f}  {pf_txt:>17s} "
            f"{t['median']:7.1f}/{t['p90']:5.1f}  {s['flagged_percent']:6.1f} "
            f"{s['failed_not_flagged']:8d} {s['label_success_percent']:9.1f} "
            f"{s['label_misses']:5d}/{s['label_misses_flagged']:<6d}"
        )
    for s in summaries:
        if s["registrations"] and s["label"].endswith("perturbed femur"):
            axes = s["rotation_error_by_axis_deg"]
            print(
                f"{s['label']}: |rotation error| by room axis, median / p95 / max (deg): "
                + "; ".join(
                    f"{k} {v['median']:.2f} / {v['p95']:.2f} / {v['max']:.2f}"
                    for k, v in axes.items()
                )
            )


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r["strategy"] == "cma+gradient" and r["init"] == "perturbed"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colours = {"pelvis": "tab:blue", "femur_right": "tab:orange", "femur_left": "tab:green"}
    for body, c in colours.items():
        sel = [r for r in main if r["body"] == body]
        axes[0].scatter(
            [r["rotation_error_deg"] for r in sel],
            [r["mpd_mm"] for r in sel],
            s=12,
            c=c,
            label=body,
        )
    axes[0].axvline(1.0, c="k", lw=0.7, ls="--")
    axes[0].axhline(1.0, c="k", lw=0.7, ls="--")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("rotation error (deg)")
    axes[0].set_ylabel("mean projected landmark distance (mm)")
    axes[0].set_title("accuracy from perturbed starts")
    axes[0].legend(fontsize=8)
    pf = [r["pf_bmd_diff_percent"] for r in main if "pf_bmd_diff_percent" in r]
    axes[1].hist(pf, bins=30, color="tab:purple")
    axes[1].axvline(-0.5, c="k", lw=0.7, ls="--")
    axes[1].axvline(0.5, c="k", lw=0.7, ls="--")
    axes[1].set_xlabel("PF-DRR ROI BMD, registered vs true pose (%)")
    axes[1].set_title("the BMD that matters")
    strategies = sorted({r["strategy"] for r in rows if r["init"] == "perturbed"})
    compared = {(r["case"], r["xray"]) for r in rows if r["strategy"] != "cma+gradient"}
    for i, s in enumerate(strategies):
        sel = [
            r
            for r in rows
            if r["strategy"] == s
            and r["init"] == "perturbed"
            and (r["case"], r["xray"]) in compared
        ]
        if not sel:
            continue
        t = [r["time_s"] for r in sel]
        ok = [r["rotation_error_deg"] <= 1 and r["mpd_mm"] <= 1 for r in sel]
        axes[2].scatter(
            np.full(len(t), i) + np.random.default_rng(0).uniform(-0.15, 0.15, len(t)),
            t,
            s=10,
            c=["tab:green" if o else "tab:red" for o in ok],
        )
    axes[2].set_xticks(range(len(strategies)), strategies)
    axes[2].set_ylabel("time per body (s)")
    axes[2].set_title("strategies (green: within 1 deg and 1 mm)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def run_case(
    case_dir: Path, jobs: list[tuple], threads: int, levels: tuple | None = None
) -> list[dict]:
    """Every registration of one case: jobs are (xray index, strategy, perturbation of each
    body's true pose or None for the default start, seed). In a worker process with ``threads``
    PyTorch threads."""
    torch.set_num_threads(threads)
    case = Case(case_dir)
    rows = []
    for i, strategy, deltas, seed in jobs:
        xray = case.truth["xrays"][i]
        truth = case.true_poses(xray)
        start = None if deltas is None else {n: perturb(truth[n], d) for n, d in deltas.items()}
        new = run_one(case, xray, strategy, start, seed, levels)
        rows += new
        print(
            f"{case_dir.name} {xray['name']} {strategy:13s} "
            f"{'perturbed' if start else 'default':9s} "
            + "  ".join(
                f"{r['body']}: {r['rotation_error_deg']:.2f}deg {r['mpd_mm']:.2f}mm "
                f"{r['time_s']:.1f}s{' FLAG' if r['flagged'] else ''}"
                for r in new
            ),
            flush=True,
        )
    return rows


def plan(case_dirs: list[Path], args) -> list[tuple[Path, list[tuple]]]:
    """The registrations to run per case, with their perturbed starts drawn in one stream (so
    they do not depend on --workers)."""
    rng = np.random.default_rng(args.seed)
    out, n_xray = [], 0
    for case_dir in case_dirs:
        truth = json.loads((case_dir / "truth.json").read_text())
        jobs = []
        for i, xray in enumerate(truth["xrays"][: args.xrays]):
            init = {n: draw_perturbation(rng) for n in xray["poses"]}
            runs = [("cma+gradient", init)]
            if n_xray < args.compare:
                runs += [("gradient", init), ("cma", init)]
            if n_xray < args.default_init:
                runs += [("cma+gradient", None)]
            jobs += [(i, strategy, start, args.seed + n_xray) for strategy, start in runs]
            n_xray += 1
        out.append((case_dir, jobs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cohort", type=Path, default=Path("bench_out/reg20"))
    ap.add_argument("--cases", type=int, default=None, help="first N cases (default all)")
    ap.add_argument("--only", default=None, help="comma list of case folder names to run")
    ap.add_argument("--xrays", type=int, default=None, help="first N radiographs per case")
    ap.add_argument("--compare", type=int, default=8, help="radiographs for the other strategies")
    ap.add_argument("--default-init", type=int, default=0, help="radiographs from the default pose")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="cases registered at once")
    ap.add_argument("--bmd-limit", type=float, default=BMD_LIMIT_PERCENT)
    ap.add_argument(
        "--levels",
        default=None,
        help="pyramid pixel sizes (mm), e.g. 2.4,1.2,0.6,0.3 (default: the registration's); "
        "the pelvis uses the first two, the femurs all",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_out/registration.json"))
    ap.add_argument("--figure", type=Path, default=Path("bench_out/registration.png"))
    args = ap.parse_args()
    case_dirs = sorted(p for p in (args.cohort / "cases").iterdir() if p.is_dir())[: args.cases]
    todo = plan(case_dirs, args)  # drawn over all cases, then filtered: same starts as a full run
    if args.only:
        wanted = set(args.only.split(","))
        todo = [(d, jobs) for d, jobs in todo if d.name in wanted]
    levels = tuple(float(v) for v in args.levels.split(",")) if args.levels else None
    t_start = time.perf_counter()
    rows = []
    if args.workers <= 1:
        for case_dir, jobs in todo:
            rows += run_case(case_dir, jobs, args.threads, levels)
    else:
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, args.threads // args.workers)
        with ProcessPoolExecutor(args.workers) as pool:
            futures = [pool.submit(run_case, d, jobs, threads, levels) for d, jobs in todo]
            for future in futures:
                rows += future.result()
    wall = time.perf_counter() - t_start
    summaries = []
    for strategy, init in [
        ("cma+gradient", "perturbed"),
        ("gradient", "perturbed"),
        ("cma", "perturbed"),
        ("cma+gradient", "default"),
    ]:
        sel = [r for r in rows if r["strategy"] == strategy and r["init"] == init]
        compared = {(r["case"], r["xray"]) for r in rows if r["strategy"] == "gradient"}
        for body in ("all", "pelvis", "femur"):
            part = [r for r in sel if body == "all" or r["body"].startswith(body)]
            summaries.append(summarise(part, f"{strategy} {init} {body}", args.bmd_limit))
        if strategy == "cma+gradient" and init == "perturbed":
            same = [r for r in sel if (r["case"], r["xray"]) in compared]
            summaries.append(summarise(same, "cma+gradient perturbed (compared)", args.bmd_limit))
    print()
    print_table(summaries)
    misses = [r for r in rows if not label_success(r, args.bmd_limit)]
    print(f"\nmisses by projected landmarks (> {MPD_LIMIT_MM:g} mm) or PF-DRR BMD (> "
          f"{args.bmd_limit:g} %):")  # fmt: skip
    for r in misses:
        print(
            f"  {r['case']} {r['xray']} {r['strategy']} {r['init']} {r['body']}: "
            f"{r['rotation_error_deg']:.2f} deg, {r['mpd_mm']:.2f} mm, dBMD "
            f"{r.get('pf_bmd_diff_percent', float('nan')):+.3f} %, "
            + ("FLAGGED: " + "; ".join(r["reasons"]) if r["flagged"] else "NOT FLAGGED")
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"summaries": summaries, "rows": rows, "wall_s": wall}, indent=1)
    )
    figure(rows, args.figure)
    print(
        f"\nrows: {args.out}   figure: {args.figure}   "
        f"median time per radiograph: {statistics.median(r['xray_time_s'] for r in rows):.1f} s; "
        f"wall clock {wall / 60:.1f} min with {args.workers} worker(s)"
    )


if __name__ == "__main__":
    main()
