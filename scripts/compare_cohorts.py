"""Compare two virtual cohorts (``xbmd synth`` folders) file by file: are they the same?

Checks, for every case of either cohort: CT and label map (voxels, dtype and affine; the
gzip bytes too), PNG radiographs (bytes), DICOM radiographs (pixel data bytes and every
attribute except UIDs, dates and times, which are made at write time), truth.json (all but
``timing_s``), and the cohort files manifest.csv, dxa.csv (bytes) and cohort.json (all but
the timings). Prints one line per difference and a summary; exit status 1 when they differ.

Usage::

    python scripts/compare_cohorts.py COHORT_A COHORT_B
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

#: DICOM value representations that hold when, not what: dates, times, date-times.
TIME_VRS = {"DA", "TM", "DT"}


def _volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _dicom_attributes(ds) -> dict:
    out = {}
    for elem in ds.iterall():
        if elem.keyword == "PixelData" or elem.VR in TIME_VRS or elem.VR == "UI":
            continue
        if elem.VR == "SQ":
            continue  # its items are visited by iterall
        out[(elem.tag, elem.keyword)] = str(elem.value)
    return out


def compare_case(a: Path, b: Path, report: list[str]) -> int:
    """Compare one case folder; append differences to ``report``; returns files compared."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    count = 0
    for name in names:
        pa, pb = a / name, b / name
        if not (pa.exists() and pb.exists()):
            report.append(f"{a.name}/{name}: only in {'first' if pa.exists() else 'second'}")
            continue
        count += 1
        if name.endswith(".nii.gz"):
            (va, aa), (vb, ab) = _volume(pa), _volume(pb)
            if va.dtype != vb.dtype or va.shape != vb.shape or not np.array_equal(va, vb):
                differ = int(np.sum(va != vb)) if va.shape == vb.shape else -1
                report.append(f"{a.name}/{name}: voxels differ ({differ} voxels)")
            if not np.array_equal(aa, ab):
                report.append(f"{a.name}/{name}: affines differ")
            if pa.read_bytes() != pb.read_bytes():
                report.append(f"{a.name}/{name}: voxels equal, file bytes differ (gzip header)")
        elif name.endswith(".png") or (name.endswith(".json") and name != "truth.json"):
            if pa.read_bytes() != pb.read_bytes():
                report.append(f"{a.name}/{name}: bytes differ")
        elif name.endswith(".dcm"):
            da, db = pydicom.dcmread(pa), pydicom.dcmread(pb)
            if da.PixelData != db.PixelData:
                report.append(f"{a.name}/{name}: pixel data differ")
            ta, tb = _dicom_attributes(da), _dicom_attributes(db)
            for key in sorted(set(ta) | set(tb), key=lambda k: k[0]):
                if ta.get(key) != tb.get(key):
                    report.append(
                        f"{a.name}/{name}: {key[1] or key[0]} {ta.get(key)!r} != {tb.get(key)!r}"
                    )
        elif name == "truth.json":
            ja, jb = (json.loads(p.read_text()) for p in (pa, pb))
            ja.pop("timing_s", None)
            jb.pop("timing_s", None)
            if ja != jb:
                keys = [k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k)]
                report.append(f"{a.name}/truth.json: differs in {sorted(keys)}")
        elif pa.read_bytes() != pb.read_bytes():
            report.append(f"{a.name}/{name}: bytes differ")
    return count


def compare(a: Path, b: Path) -> list[str]:
    report: list[str] = []
    cases = sorted(
        {p.name for p in (a / "cases").iterdir()} | {p.name for p in (b / "cases").iterdir()}
    )
    files = 0
    for case in cases:
        ca, cb = a / "cases" / case, b / "cases" / case
        if not (ca.is_dir() and cb.is_dir()):
            report.append(f"{case}: only in {'first' if ca.is_dir() else 'second'}")
            continue
        files += compare_case(ca, cb, report)
    for name in ("manifest.csv", "dxa.csv"):
        files += 1
        if (a / name).read_bytes() != (b / name).read_bytes():
            report.append(f"{name}: bytes differ")
    ja, jb = (json.loads((p / "cohort.json").read_text()) for p in (a, b))
    for j in (ja, jb):
        j.pop("seconds_per_case", None)
    files += 1
    if ja != jb:
        keys = [k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k)]
        report.append(f"cohort.json: differs in {sorted(keys)} (timings aside)")
    print(f"compared {len(cases)} cases, {files} files")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    report = compare(args.first, args.second)
    for line in report:
        print(line)
    print(
        "identical (UIDs, dates, times and timings aside)"
        if not report
        else f"{len(report)} differences"
    )
    sys.exit(1 if report else 0)


if __name__ == "__main__":
    main()
