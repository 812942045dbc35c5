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

Refusals, the quality gate and the clinical statements
------------------------------------------------------
What is refused outright and what makes an estimate not confident is in
``xbmd.estimation.gate`` (image checks, spacing, compression, the heads' layout, laterality)
and below (:func:`implausibilities`: the region, the field, the regression's range); a
radiograph stored turned is turned upright first (``xbmd.estimation.orientation``, or its
orientation tag, ``xbmd.io.orientation``) and never confident, since its sides are uncertain.
The localiser finding no femoral head, without ``unilateral``, is a refusal: "no femoral head
found (is this a hip or pelvis X-ray?)".

With a calibrated model (``xbmd calibrate-model``) each estimate is the mean over test-time
views, with a 95 % prediction interval and an out-of-distribution score
(``xbmd.model.uncertainty``); an image scoring above the model's threshold is not confident.
T-score, WHO category or Z-score follow ``xbmd.estimation.clinical``.
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
from xbmd.estimation import gate
from xbmd.estimation.clinical import clinical_scores
from xbmd.estimation.orientation import describe_turns, upright_turns
from xbmd.estimation.result import HipResult, region_area_mm2
from xbmd.geometry import SIDES
from xbmd.io.orientation import patient_orientation_ops
from xbmd.io.xray import (
    DICOM_ID_KEYS,
    WARN_NO_SPACING,
    XRay,
    parse_spacing_mm,
    read_xray,
    xray_geometry,
)
from xbmd.model.localiser import locate_heads
from xbmd.model.uncertainty import from_state
from xbmd.similarity import field_mask
from xbmd.tscore import DEFAULT_REFERENCE, REFERENCES

#: An image smaller than this (detector mm) in both directions is a crop of one hip.
WHOLE_PELVIS_MIN_MM = 250.0
#: Plausible area of the predicted proximal-femur region at the detector, mm2 (module docstring).
PF_AREA_RANGE_MM2 = (2500.0, 18000.0)
#: A regression output further than this many training SDs from the training mean is implausible.
TARGET_SD_LIMIT = 4.0
#: The stage-3 target reported as ``bmd_g_cm2`` (DXA-like total hip aBMD).
BMD_TARGET = "ct_abmd_g_cm2"


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
    tta : test-time augmentation (``xbmd.model.uncertainty``); default: when the model carries
        a calibrated interval.
    site_calibration : a site-calibration file (``xbmd evaluate`` writes it from a site's DXA;
        ``xbmd.estimation.site``) or a loaded ``SiteCalibration``: the BMD and its interval are
        mapped onto the site's DXA scale before the T-score; None: none.

    Examples
    --------
    >>> estimator = Estimator("model.pt")  # doctest: +SKIP
    >>> results = estimator.estimate("pelvis.dcm")  # doctest: +SKIP
    >>> [(r.side, round(r.bmd_g_cm2, 3), r.who_category) for r in results]  # doctest: +SKIP
    [('right', 0.861, 'osteopenia'), ('left', 0.874, 'osteopenia')]
    >>> write_results(results, "out")  # doctest: +SKIP
    """

    def __init__(
        self,
        model=None,
        reference: str = DEFAULT_REFERENCE,
        tta: bool | None = None,
        site_calibration=None,
    ) -> None:
        from xbmd.estimation.site import SiteCalibration, load_site_calibration
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
        self.site = (
            site_calibration
            if site_calibration is None or isinstance(site_calibration, SiteCalibration)
            else load_site_calibration(site_calibration)
        )
        self.uncertainty = from_state(self.bundle.uncertainty)
        #: Test-time augmentation: by default when the model is calibrated (its interval is).
        self.tta = self.uncertainty is not None if tta is None else bool(tta)
        self.model_info = {
            "path": str(self.bundle.source),
            "xbmd_version": self.bundle.xbmd_version,
            "created": self.bundle.created,
            "image_size": self.bundle.image_size,
            "targets": list(self.bundle.targets),
            "localiser": self.bundle.localiser is not None,
            "interval": None if self.uncertainty is None else self.bundle.uncertainty["method"],
            "bmd_offset_g_cm2": None if self.uncertainty is None else self.uncertainty[0].offset,
        }

    # ---- in memory

    def estimate(
        self,
        path: str | Path,
        pixel_spacing_mm: float | tuple[float, float] | None = None,
        unilateral: str | None = None,
        age_years: float | None = None,
        sex: str | None = None,
    ) -> list[HipResult]:
        """Read a radiograph and estimate each hip on it; see :meth:`estimate_xray`.

        ``pixel_spacing_mm``, ``age_years`` and ``sex`` ('F' or 'M') stand in for a file that
        records none (PNG, JPEG, an anonymised DICOM); a file's own values are used when it has
        them (a warning says when they differ from those given).
        Raises InputError (message starting with the file) for unusable input and refusals.
        """
        path = Path(path)
        try:
            xray = read_xray(path)
            _fill_spacing(xray, pixel_spacing_mm)
            _fill_patient(xray, age_years, sex)
            return self.estimate_xray(xray, unilateral)
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
        gate.check_image(xray)
        image_gate = gate.image_gate(xray)
        xray, found, turned = self._upright(xray, unilateral)
        image_gate += turned
        geometry, geometry_warnings = xray_geometry(xray)
        heads, unilateral_crop, head_warnings = self.find_heads(xray, unilateral, found)
        image_gate += gate.head_separation_gate(heads, xray.pixel_spacing_mm)
        image_gate += gate.laterality_gate(xray, [h.side for h in heads], unilateral_crop)
        in_field = field_mask(xray.pixels, FIELD_MARGIN_PX)  # as HipCrop.resample
        crops = [hip_crop(geometry, (h.row, h.col), h.side) for h in heads]
        sampled = [c.resample(xray.pixels, in_field) for c in crops]
        prediction = self.bundle.predict(
            np.stack([s[0] for s in sampled]),
            np.stack([s[1] for s in sampled]),
            tta=self.tta,
            kvp=xray.meta.get("kvp"),
        )
        common = list(xray.warnings) + geometry_warnings + head_warnings
        results = []
        for k, (head, crop) in enumerate(zip(heads, crops, strict=True)):
            results.append(
                self._result(
                    xray,
                    head,
                    crop,
                    sampled[k][1],
                    prediction,
                    k,
                    unilateral_crop,
                    common,
                    image_gate,
                )
            )
        seconds = (time.perf_counter() - start) / max(len(results), 1)
        for r in results:
            r.seconds = seconds
        return results

    def _upright(self, xray: XRay, unilateral: str | None) -> tuple[XRay, list | None, list]:
        """The radiograph upright (``xbmd.estimation.orientation``), the localiser's heads in it
        (None: not looked for yet), and the gate's reason when it had to be turned. Skipped for
        one-hip crops and for files whose orientation tag already put them upright."""
        localiser = self.bundle.localiser
        tagged = patient_orientation_ops(xray.meta.get("patient_orientation")) is not None
        if localiser is None or unilateral is not None or tagged:
            return xray, None, []
        turns, found, _ = upright_turns(localiser, xray.pixels)
        if not turns:
            return xray, found, []
        spacing = xray.pixel_spacing_mm
        turned = XRay(
            np.ascontiguousarray(np.rot90(xray.pixels, turns)),
            spacing if turns == 2 else (spacing[1], spacing[0]),
            xray.spacing_source,
            xray.source,
            {**xray.meta, "reoriented": f"turned {describe_turns(turns)} by the anatomy"},
            list(xray.warnings),
        )
        reason = (
            f"the radiograph was stored turned: turned {describe_turns(turns)} to be upright "
            "(the femoral heads were found surely only so); whether it was turned or flipped "
            "cannot be told, so the sides are not certain"
        )
        return turned, found, [reason]

    def find_heads(
        self, xray: XRay, unilateral: str | None = None, found: list | None = None
    ) -> tuple[list[_Head], bool, list[str]]:
        """The femoral heads to crop around, whether the image is a unilateral crop, warnings.

        Refuses (InputError) an image with no head found, unless ``unilateral`` is given
        (the rules are in the module docstring).
        """
        rows, cols = xray.pixels.shape
        height_mm, width_mm = rows * xray.pixel_spacing_mm[0], cols * xray.pixel_spacing_mm[1]
        small = max(height_mm, width_mm) < WHOLE_PELVIS_MIN_MM
        localiser = self.bundle.localiser
        if found is None:
            found = [] if localiser is None else list(locate_heads(localiser, xray.pixels))
        found = list(found)
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
        common: list[str],
        image_gate: list[str],
    ) -> HipResult:
        region = np.asarray(prediction.pf_region[k], dtype=bool)
        targets = {t: float(v[k]) for t, v in prediction.targets.items()}
        reasons = list(image_gate) + implausibilities(
            region, valid, targets, self.bundle.target_stats
        )
        if head.confidence is None:
            reasons.insert(
                0,
                "the localiser found no femoral head: assumed where xbmd prepare puts it "
                f"({HEAD_POSITION[0]:.0%} of the height, {HEAD_POSITION[1]:.0%} of the width)",
            )
        bmd = targets[BMD_TARGET]
        interval, ood, spread, features = None, None, None, None
        if prediction.targets_sd is not None:
            spread = float(prediction.targets_sd[BMD_TARGET][k])
            features = prediction.features[k]
        if self.uncertainty is not None:
            bmd = self.uncertainty[0].correct(bmd)
            interval = self.uncertainty[0].bounds(bmd, spread)
            ood = float(self.uncertainty[1].score(features[None])[0])
            if ood > self.uncertainty[1].threshold:
                reasons.append(
                    f"the image is unlike the images the model was checked on (score {ood:.2f}, "
                    f"threshold {self.uncertainty[1].threshold:.2f}): an unfamiliar device or "
                    "processing, an implant, or not a hip radiograph"
                )
        site = None
        if self.site is not None:
            site = self.site.apply(bmd, interval, self.model_info)
            bmd, interval = site.bmd_g_cm2, site.interval_g_cm2
            common = [*common, *site.warnings]
        patient = _patient(xray)
        scores, score_warnings = clinical_scores(
            bmd, interval, patient["sex"], patient["age_years"], self.reference, not reasons
        )
        if scores["t_score"] is None:
            reasons += score_warnings
            score_warnings = []
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
            bmd_g_cm2=bmd,
            bmd_drr_g_cm2=bmd_drr if math.isfinite(bmd_drr) else None,
            targets=targets,
            patient=patient,
            pf_area_mm2=region_area_mm2(region),
            unilateral_crop=unilateral_crop,
            confident=not reasons,
            warnings=[*common, *reasons, *score_warnings],
            gate=reasons,
            model=self.model_info,
            pixel_spacing_mm=tuple(xray.pixel_spacing_mm),
            spacing_source=xray.spacing_source,
            dicom_ids={key: xray.meta.get(key) for key in DICOM_ID_KEYS},
            bmd_interval_g_cm2=interval,
            ood_score=ood,
            ood_threshold=self.uncertainty[1].threshold if self.uncertainty else None,
            site_calibration=None if site is None else site.record,
            tta_sd_g_cm2=spread,
            features=features,
            **scores,
        )


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


def _fill_spacing(xray: XRay, given) -> None:
    """The pixel spacing given by the user, where the file has none (a warning where the file's
    own differs from it by more than 1 %)."""
    if given is None:
        return
    given = parse_spacing_mm(given)
    if xray.pixel_spacing_mm is None:
        xray.pixel_spacing_mm, xray.spacing_source = given, "user"
        xray.warnings = [w for w in xray.warnings if w != WARN_NO_SPACING]
        xray.warnings.append(
            f"pixel spacing {xray.pixel_spacing_mm[0]:g} mm given by the user, not checked"
        )
        return
    if not np.allclose(xray.pixel_spacing_mm, given, rtol=0.01):
        xray.warnings.append(
            f"the file's pixel spacing {xray.pixel_spacing_mm[0]:g} mm ({xray.spacing_source}) "
            f"was used, not the {given[0]:g} mm given"
        )


def _fill_patient(xray: XRay, age_years: float | None, sex: str | None) -> None:
    """Age and sex given by the user, where the file has none (a warning where it differs)."""
    for key, given in (("patient_age_years", age_years), ("patient_sex", sex)):
        if given is None:
            continue
        found = xray.meta.get(key)
        if found in (None, ""):
            xray.meta[key] = given
            xray.warnings.append(f"{key.removeprefix('patient_')} {given} given by the user")
        elif found != given:
            xray.warnings.append(
                f"the file records {key.removeprefix('patient_')} {found}; used instead of the "
                f"{given} given"
            )


def _patient(xray: XRay) -> dict:
    sex = xray.meta.get("patient_sex")
    age = xray.meta.get("patient_age_years")
    return {
        "age_years": float(age) if age is not None else None,
        "sex": sex if sex in ("F", "M", "O") else None,
    }


# ------------------------------------------------------------------------------------------------
# Figures (8-bit happens only here)
