"""``xbmd estimate`` on a batch: every radiograph of the inputs, each result on disk as it comes.

- The output folder is checked first (a file, or not writable: one clear error). Summary files
  a previous run left there (``results.csv``, ``failures.csv``, ``skipped.csv``) are replaced,
  never appended to; each image's folder is overwritten by its new results.
- ``results.csv`` and ``failures.csv`` get their rows as each image is done (flushed), so an
  interrupted batch (Ctrl-C, a killed job) keeps everything finished before it.
- A file given twice, or the same DICOM image (SOP Instance UID) in two files, is estimated once;
  the repeats are listed in ``skipped.csv`` with the reason, like the non-hip files of a folder.
- Output folders are named from the image's file name, made safe (``xbmd.stages.safe_name``):
  nothing is written outside the output folder.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xbmd.errors import XbmdError
from xbmd.estimation.estimator import Estimator
from xbmd.estimation.output import csv_row, write_results
from xbmd.estimation.result import CSV_COLUMNS, HipResult
from xbmd.io.inputs import InputFilter, gather_inputs, write_skipped
from xbmd.stages import check_output_folder, safe_name

SUMMARY_FILES = ("results.csv", "failures.csv", "skipped.csv")
FAILURE_COLUMNS = ("image", "error")


@dataclass
class Batch:
    """What a batch did: the hips estimated (``result.json`` dicts), failures (image, error),
    skipped inputs (file, reason) and the output folder."""

    out: Path
    results: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_done(self) -> int:
        return len({r["image"] for r in self.results})


class _Rows:
    """A CSV file written row by row, flushed after each."""

    def __init__(self, path: Path, columns) -> None:
        self._fh = path.open("w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._fh, list(columns))
        self._writer.writeheader()
        self._fh.flush()

    def add(self, row: dict) -> None:
        self._writer.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def folder_names(images: list[Path]) -> list[str]:
    """One output folder per image: its stem made safe, numbered when two images share one."""
    seen: dict[str, int] = {}
    names = []
    for path in images:
        stem = safe_name(Path(path).stem)
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def estimate_batch(
    inputs: list[Path],
    out: Path,
    estimator: Estimator,
    *,
    pixel_spacing_mm: float | None = None,
    unilateral: str | None = None,
    age_years: float | None = None,
    sex: str | None = None,
    figures: bool = True,
    dicom_writer: Callable[[list[HipResult], Path, str], None] | None = None,
    filters: InputFilter | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
    on_hip: Callable[[HipResult], None] | None = None,
    on_failure: Callable[[str, str], None] | None = None,
) -> Batch:
    """Estimate every radiograph of ``inputs`` (files, folders, DICOMDIRs) into ``out``.

    ``on_hip`` and ``on_failure`` are told of each result and failure as they come (the
    command prints them); ``progress`` wraps the loop over images (a progress bar).
    ``dicom_writer(results, path, name)``, when given, writes a radiograph's DICOM results
    (``xbmd.pacs.outputs.dicom_writer``: estimation does not depend on the PACS package).
    """
    out = check_output_folder(Path(out))
    for name in SUMMARY_FILES:
        (out / name).unlink(missing_ok=True)
    gathered = gather_inputs(inputs, filters)
    batch = Batch(out, skipped=list(gathered.skipped))
    images = gathered.images
    names = folder_names(images)
    results_csv = _Rows(out / "results.csv", CSV_COLUMNS)
    failures_csv = None
    seen_uids: dict[str, str] = {}
    try:
        for path, name in zip(progress(images) if progress else images, names, strict=True):
            try:
                found = estimator.estimate(path, pixel_spacing_mm, unilateral, age_years, sex)
                uid = found[0].dicom_ids.get("sop_instance_uid") if found else None
                if uid and uid in seen_uids:
                    batch.skipped.append(
                        (str(path), f"the same DICOM image (SOP Instance UID) as {seen_uids[uid]}")
                    )
                    continue
                if uid:
                    seen_uids[uid] = str(path)
                if dicom_writer is not None:
                    dicom_writer(found, path, name)
                write_results(found, out, name, figures=figures)
            except XbmdError as exc:
                failure = {"image": str(path), "error": str(exc)}
                batch.failures.append(failure)
                if failures_csv is None:
                    failures_csv = _Rows(out / "failures.csv", FAILURE_COLUMNS)
                failures_csv.add(failure)
                if on_failure:
                    on_failure(str(path), str(exc))
                continue
            for r in found:
                results_csv.add(csv_row(r))
                batch.results.append(r.to_dict())
                if on_hip:
                    on_hip(r)
                r.xray = None  # the radiograph's pixels are not needed any more
    finally:
        results_csv.close()
        if failures_csv is not None:
            failures_csv.close()
        if batch.skipped:
            write_skipped(batch.skipped, out / "skipped.csv")
    return batch
