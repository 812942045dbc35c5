"""Bone mineral density of each hip of a plain AP pelvis or hip radiograph (``xbmd estimate``).

Per radiograph: read it (``xbmd.io.xray.read_xray``), find each femoral head with the model's
localiser (``xbmd.model.localiser.locate_heads``), crop each hip as ``xbmd prepare`` does
(``xbmd.dataset.hip.hip_crop``: 256 x 256 pixels of 0.75 detector mm, left hips mirrored),
predict both hips in one call of the model bundle (``xbmd.model.bundle``) and map the virtual
X-ray back onto the radiograph (``xbmd.estimation.result.model_to_image``). :class:`Estimator`
is the Python API; ``estimate_xray`` does everything in memory (for benchmarks), and
``xbmd.estimation.output.write_results`` puts the files of the results on disk.

Which image is a whole pelvis, which a crop of one hip
------------------------------------------------------
- An image smaller than ``WHOLE_PELVIS_MIN_MM`` in both directions (at the detector) is a crop
  of one hip: only the localiser's most confident head is used (``unilateral_crop``, a warning).
- A larger image in which the localiser finds one head only is flagged the same way.
- ``unilateral='right'|'left'`` (``--unilateral``) says the image is a crop of that hip. Then,
  and only then, when the localiser finds no head, the head is *assumed* where ``xbmd prepare``
  puts it in its crops (``HEAD_POSITION``: 40 % of the height, the middle of the width); such a
  result is never ``confident`` since nothing saw a hip.

Not a hip (a chest, a hand): no confident BMD
----------------------------------------------
Refused (an ``InputError``, no result):

- the localiser finds no femoral head above its own confidence threshold (``locate_heads``
  reports only those), without ``unilateral``: "no femoral head found (is this a hip or pelvis
  X-ray?)";
- no pixel spacing (BMD in g/cm2 needs the physical scale): give ``pixel_spacing_mm``.

Estimated, but ``confident: false`` with a warning saying why:

- the predicted proximal-femur region's area at the detector is outside ``PF_AREA_RANGE_MM2``
  (the training samples of the virtual cohort, their ``pf_area_px``, span
  5,200-11,800 mm2; the range allows half the smallest and 1.5 x the largest) or is empty;
- less than ``xbmd.dataset.hip.MIN_VALID_PF_FRACTION`` of the region lies inside the
  radiograph's field (``xbmd prepare`` refuses such training samples);
- a regression output beyond ``TARGET_SD_LIMIT`` standard deviations of the training targets
  (``bundle.target_stats``), or an aBMD that is not a positive number (no T-score then);
- DICOM Body Part Examined names another region (``OTHER_BODY_PARTS``: chest, hand, ...);
- the head was assumed, not found (above).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xbmd.dataset.hip import (
    FIELD_MARGIN_PX,
    HEAD_POSITION,
    MIN_VALID_PF_FRACTION,
    HipCrop,
    hip_crop,
)
from xbmd.errors import InputError, XbmdError
from xbmd.estimation.result import HipResult, region_area_mm2
from xbmd.geometry import SIDES
from xbmd.io.xray import DICOM_ID_KEYS, XRay, read_xray, xray_geometry
from xbmd.model.localiser import locate_heads
from xbmd.similarity import field_mask
from xbmd.tscore import (
    DEFAULT_REFERENCE,
    MIN_AGE_YEARS,
    REFERENCES,
    reference_info,
    t_score,
    who_category,
    z_score,
)

#: An image smaller than this (detector mm) in both directions is a crop of one hip.
WHOLE_PELVIS_MIN_MM = 250.0
#: Plausible area of the predicted proximal-femur region at the detector, mm2 (module docstring).
PF_AREA_RANGE_MM2 = (2500.0, 18000.0)
#: A regression output further than this many training SDs from the training mean is implausible.
TARGET_SD_LIMIT = 4.0
#: The stage-3 target reported as ``bmd_g_cm2`` (DXA-like total hip aBMD).
BMD_TARGET = "ct_abmd_g_cm2"
#: DICOM Body Part Examined values that are certainly not a hip.
OTHER_BODY_PARTS = frozenset(
    {"CHEST", "HAND", "SKULL", "HEAD", "KNEE", "ANKLE", "FOOT", "ELBOW", "WRIST", "SHOULDER",
     "CSPINE", "TSPINE", "LSPINE", "ABDOMEN", "ARM", "BREAST", "NECK", "FINGER", "TOE"}
)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The estimator


@dataclass(frozen=True)
class _Head:
    side: str
    row: float
    col: float
    confidence: float | None  # None: assumed, not found


class Estimator:
    """Estimates hip BMD on radiographs with one loaded model bundle.

    Parameters
    ----------
    model : path of a model bundle (``xbmd train``'s ``model.pt``), a loaded
        ``xbmd.model.bundle.ModelBundle``, or None for the bundled default.
    reference : T-score reference, one of ``xbmd.tscore.REFERENCES``.

    Examples
    --------
    >>> estimator = Estimator("model.pt")  # doctest: +SKIP
    >>> results = estimator.estimate("pelvis.dcm")  # doctest: +SKIP
    >>> [(r.side, round(r.bmd_g_cm2, 3), r.who_category) for r in results]  # doctest: +SKIP
    [('right', 0.861, 'osteopenia'), ('left', 0.874, 'osteopenia')]
    >>> write_results(results, "out")  # doctest: +SKIP
    """

    def __init__(self, model=None, reference: str = DEFAULT_REFERENCE) -> None:
        from xbmd.model.bundle import ModelBundle, load_bundle

        if reference not in REFERENCES:
            raise InputError(f"reference must be one of {', '.join(REFERENCES)}, not {reference!r}")
        self.bundle = model if isinstance(model, ModelBundle) else load_bundle(model)
        if BMD_TARGET not in self.bundle.targets:
            raise InputError(
                f"{self.bundle.source}: the model predicts {', '.join(self.bundle.targets)}, "
                f"not {BMD_TARGET} (the total hip aBMD that T-scores need)"
            )
        self.reference = reference
        self.model_info = {
            "path": str(self.bundle.source),
            "xbmd_version": self.bundle.xbmd_version,
            "created": self.bundle.created,
            "image_size": self.bundle.image_size,
            "targets": list(self.bundle.targets),
            "localiser": self.bundle.localiser is not None,
        }

    # ---- in memory

    def estimate(
        self,
        path: str | Path,
        pixel_spacing_mm: float | tuple[float, float] | None = None,
        unilateral: str | None = None,
    ) -> list[HipResult]:
        """Read a radiograph and estimate each hip on it; see :meth:`estimate_xray`.

        Raises InputError (message starting with the file) for unusable input and refusals.
        """
        path = Path(path)
        try:
            return self.estimate_xray(read_xray(path, pixel_spacing_mm), unilateral)
        except XbmdError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise type(exc)(f"{path}: {exc}") from None

    def estimate_xray(self, xray: XRay, unilateral: str | None = None) -> list[HipResult]:
        """Estimate each hip of a radiograph in memory (no files): one HipResult per hip found.

        ``unilateral`` ('right' or 'left') says the image is a crop of that hip (module
        docstring). Timing this is the per-image latency without disk I/O.
        """
        start = time.perf_counter()
        if unilateral not in (None, *SIDES):
            raise InputError(f"unilateral must be 'right', 'left' or None, not {unilateral!r}")
        if xray.pixel_spacing_mm is None:
            raise InputError(
                "no pixel spacing in the file; BMD in g/cm2 needs the physical scale: "
                "give the detector pixel spacing with --pixel-spacing MM"
            )
        geometry, geometry_warnings = xray_geometry(xray)
        heads, unilateral_crop, head_warnings = self.find_heads(xray, unilateral)
        in_field = field_mask(xray.pixels, FIELD_MARGIN_PX)  # as HipCrop.resample
        crops = [hip_crop(geometry, (h.row, h.col), h.side) for h in heads]
        sampled = [c.resample(xray.pixels, in_field) for c in crops]
        prediction = self.bundle.predict(
            np.stack([s[0] for s in sampled]), np.stack([s[1] for s in sampled])
        )
        not_a_hip = _body_part_warnings(xray)
        common = list(xray.warnings) + geometry_warnings + head_warnings + not_a_hip
        results = []
        for k, (head, crop) in enumerate(zip(heads, crops, strict=True)):
            r = self._result(xray, head, crop, sampled[k][1], prediction, k, unilateral_crop)
            r.warnings[:0] = common
            r.confident = r.confident and not not_a_hip
            results.append(r)
        seconds = (time.perf_counter() - start) / max(len(results), 1)
        for r in results:
            r.seconds = seconds
        return results

    def find_heads(
        self, xray: XRay, unilateral: str | None = None
    ) -> tuple[list[_Head], bool, list[str]]:
        """The femoral heads to crop around, whether the image is a unilateral crop, warnings.

        Refuses (InputError) an image with no head found, unless ``unilateral`` is given
        (the rules are in the module docstring).
        """
        rows, cols = xray.pixels.shape
        height_mm, width_mm = rows * xray.pixel_spacing_mm[0], cols * xray.pixel_spacing_mm[1]
        small = max(height_mm, width_mm) < WHOLE_PELVIS_MIN_MM
        localiser = self.bundle.localiser
        found = [] if localiser is None else list(locate_heads(localiser, xray.pixels))
        found.sort(key=lambda d: -d.confidence)
        heads = [_Head(d.side, float(d.row), float(d.col), float(d.confidence)) for d in found]
        size = f"{height_mm:.0f} x {width_mm:.0f} mm"
        if unilateral is not None:
            heads, warnings = self._unilateral_head(heads, unilateral, rows, cols)
            return heads, True, warnings
        if not heads:
            if localiser is None:
                raise InputError(
                    f"the model {self.bundle.source} has no hip localiser; for an image of one "
                    "hip, say which with --unilateral right|left"
                )
            hint = (
                f"; the image is {size}: if it is a crop of one hip, say which with "
                "--unilateral right|left"
                if small
                else ""
            )
            raise InputError(f"no femoral head found (is this a hip or pelvis X-ray?){hint}")
        warnings = []
        if small:
            warnings.append(
                f"the image is {size}, smaller than a pelvis ({WHOLE_PELVIS_MIN_MM:.0f} mm): "
                f"taken as a crop of one hip, the {heads[0].side}"
            )
            if len(heads) > 1:
                warnings.append(
                    f"a second head ({heads[1].side}, confidence {heads[1].confidence:.2f}) was "
                    "ignored in an image this small; check the pixel spacing"
                )
            heads = heads[:1]
        elif len(heads) == 1:
            warnings.append(
                f"only the {heads[0].side} femoral head was found: taken as a unilateral image"
            )
        heads.sort(key=lambda h: SIDES.index(h.side))
        return heads, small or len(heads) == 1, warnings

    @staticmethod
    def _unilateral_head(
        heads: list[_Head], side: str, rows: int, cols: int
    ) -> tuple[list[_Head], list[str]]:
        """The head of an image said to be a crop of one hip (``side``), and warnings."""
        warnings = [f"taken as a crop of the {side} hip (--unilateral)"]
        same = [h for h in heads if h.side == side]
        if same:
            return same[:1], warnings
        if heads:  # the user's side, the localiser's position
            h = heads[0]
            warnings.append(
                f"the localiser took this head for the {h.side} one; used as the {side} "
                "(--unilateral)"
            )
            return [_Head(side, h.row, h.col, h.confidence)], warnings
        assumed = (HEAD_POSITION[0] * rows, HEAD_POSITION[1] * cols)
        return [_Head(side, assumed[0], assumed[1], None)], warnings

    def _result(
        self,
        xray: XRay,
        head: _Head,
        crop: HipCrop,
        valid: np.ndarray,
        prediction,
        k: int,
        unilateral_crop: bool,
    ) -> HipResult:
        region = np.asarray(prediction.pf_region[k], dtype=bool)
        targets = {t: float(v[k]) for t, v in prediction.targets.items()}
        doubts = implausibilities(region, valid, targets, self.bundle.target_stats)
        if head.confidence is None:
            doubts.insert(
                0,
                "the localiser found no femoral head: assumed where xbmd prepare puts it "
                f"({HEAD_POSITION[0]:.0%} of the height, {HEAD_POSITION[1]:.0%} of the width)",
            )
        patient = _patient(xray)
        scores, score_warnings = self._scores(targets[BMD_TARGET], patient)
        bmd_drr = float(prediction.bmd_drr_g_cm2[k])
        return HipResult(
            image=str(xray.source),
            side=head.side,
            xray=xray,
            crop=crop,
            head_px=(head.row, head.col),
            localiser_confidence=head.confidence,
            virtual_xray_g_cm2=np.asarray(prediction.pf_drr_g_cm2[k], dtype=np.float32),
            pf_region=region,
            bmd_g_cm2=targets[BMD_TARGET],
            bmd_drr_g_cm2=bmd_drr if math.isfinite(bmd_drr) else None,
            targets=targets,
            patient=patient,
            pf_area_mm2=region_area_mm2(region),
            unilateral_crop=unilateral_crop,
            confident=not doubts and scores["t_score"] is not None,
            warnings=doubts + score_warnings,
            model=self.model_info,
            pixel_spacing_mm=tuple(xray.pixel_spacing_mm),
            spacing_source=xray.spacing_source,
            dicom_ids={key: xray.meta.get(key) for key in DICOM_ID_KEYS},
            **scores,
        )

    def _scores(self, bmd_g_cm2: float, patient: dict) -> tuple[dict, list[str]]:
        """T-score, WHO category, Z-score and the reference cited, with warnings."""
        sex, age = patient["sex"], patient["age_years"]
        warnings = []
        ref_sex = sex if sex in ("F", "M") else "F"
        if self.reference == "nhanes3_sex_matched" and sex not in ("F", "M"):
            warnings.append("patient sex unknown: the female reference was used")
        scores = {
            "t_score": None,
            "who_category": None,
            "z_score": None,
            "reference": reference_info("total_hip", ref_sex, self.reference),
        }
        if not (math.isfinite(bmd_g_cm2) and bmd_g_cm2 > 0):
            warnings.append(f"predicted aBMD {bmd_g_cm2:.4g} g/cm2 is not positive: no T-score")
            return scores, warnings
        t = t_score(bmd_g_cm2, "total_hip", ref_sex, self.reference)
        scores["t_score"], scores["who_category"] = t, who_category(t)
        if sex in ("F", "M") and age is not None and age >= MIN_AGE_YEARS:
            scores["z_score"] = z_score(bmd_g_cm2, "total_hip", sex, age)
        return scores, warnings

    # ---- on disk


def implausibilities(
    region: np.ndarray, valid: np.ndarray, targets: dict[str, float], target_stats: dict
) -> list[str]:
    """Why a prediction is not to be trusted (empty: no reason found); the rules of the module
    docstring.

    Parameters
    ----------
    region : (S, S) bool, the predicted proximal-femur region (model resolution).
    valid : (256, 256) bool, the crop's valid mask (``HipCrop.resample``).
    targets : {name: value} the regression outputs; target_stats : {name: [mean, sd]}.
    """
    from xbmd.model.inputs import VALID_SHARE, downsample_map

    area_mm2 = region_area_mm2(region)
    doubts = []
    lo, hi = PF_AREA_RANGE_MM2
    if not lo <= area_mm2 <= hi:
        doubts.append(
            f"predicted proximal-femur area {area_mm2:.0f} mm2 is outside the plausible "
            f"{lo:.0f}-{hi:.0f} mm2: is there a hip in the crop?"
        )
    if region.any():
        valid_model = downsample_map(valid.astype(np.float32), region.shape[-1]) >= VALID_SHARE
        share = float(valid_model[region].mean())
        if share < MIN_VALID_PF_FRACTION:
            doubts.append(
                f"only {share:.0%} of the predicted proximal femur lies inside the image's "
                "field (cut by its edge or collimation)"
            )
    for name, value in targets.items():
        mean, sd = target_stats[name]
        if not math.isfinite(value) or abs(value - mean) > TARGET_SD_LIMIT * sd:
            doubts.append(
                f"{name} = {value:.4g} is beyond {TARGET_SD_LIMIT:g} SD of the training values "
                f"({mean:.4g} +- {sd:.3g})"
            )
    return doubts


def _patient(xray: XRay) -> dict:
    sex = xray.meta.get("patient_sex")
    age = xray.meta.get("patient_age_years")
    return {
        "age_years": float(age) if age is not None else None,
        "sex": sex if sex in ("F", "M", "O") else None,
    }


def _body_part_warnings(xray: XRay) -> list[str]:
    part = str(xray.meta.get("body_part") or "").upper().replace(" ", "")
    if part in OTHER_BODY_PARTS:
        return [f"the DICOM says Body Part Examined {part}: not a hip"]
    return []


# ------------------------------------------------------------------------------------------------
# Figures (8-bit happens only here)
