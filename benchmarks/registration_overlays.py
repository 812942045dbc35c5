"""The registration overlays of the docs: `xbmd register` on virtual-cohort radiographs from the
default start (no pose given), each overlay whole and with a zoom on the right hip.

Usage::

    python benchmarks/registration_overlays.py --cohort bench_out/reg20 \
        --xrays case_VQ0003/xray_02 case_VQ0007/xray_01 --out docs/images/registration_overlays.png
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cohort", type=Path, default=Path("bench_out/reg20"))
    ap.add_argument("--xrays", nargs="+", default=["case_VQ0003/xray_02", "case_VQ0007/xray_01"])
    ap.add_argument("--work", type=Path, default=Path("bench_out/overlays"))
    ap.add_argument("--out", type=Path, default=Path("docs/images/registration_overlays.png"))
    args = ap.parse_args()
    xbmd = str(Path(sys.executable).with_name("xbmd"))
    panels = []
    for item in args.xrays:
        case, xray = item.split("/")
        d = args.cohort / "cases" / case
        out = args.work / f"{case}_{xray}.json"
        cmd = [
            xbmd, "register", str(d / "ct.nii.gz"), str(d / f"{xray}.dcm"),
            "--labels", str(d / "labels.nii.gz"), "--landmarks", str(d / "landmarks.json"),
            "--out", str(out),
        ]  # fmt: skip
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)
        img = Image.open(out.with_suffix(".png")).convert("RGB")
        whole = img.resize((img.width * 720 // img.width, img.height * 720 // img.width))
        # a 3x zoom on the right hip (image left, a little below the middle)
        w, h = img.size
        zoom = img.crop((int(0.12 * w), int(0.35 * h), int(0.12 * w) + 220, int(0.35 * h) + 220))
        zoom = zoom.resize((whole.height, whole.height), Image.NEAREST)
        panel = Image.new("RGB", (whole.width + zoom.width + 8, whole.height), "white")
        panel.paste(whole, (0, 0))
        panel.paste(zoom, (whole.width + 8, 0))
        panels.append(panel)
    sheet = Image.new(
        "RGB", (max(p.width for p in panels), sum(p.height + 8 for p in panels)), "white"
    )
    y = 0
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height + 8
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # a palette keeps the figure small in git; grey plus three outline colours need few
    sheet.quantize(colors=96).save(args.out, optimize=True)
    kb = args.out.stat().st_size / 1e3
    print(f"{args.out}: {sheet.size[0]} x {sheet.size[1]} px, {kb:.0f} kB")


if __name__ == "__main__":
    main()
