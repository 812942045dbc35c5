"""Bone mineral density of each hip of a plain AP pelvis or hip radiograph (``xbmd estimate``).

Per radiograph: read it (``xbmd.io.xray.read_xray``), find each femoral head with the model's
localiser (``xbmd.learn.localiser.locate_heads``), crop each hip as ``xbmd prepare`` does
(``xbmd.hip.hip_crop``: 256 x 256 pixels of 0.75 detector mm, left hips mirrored), predict both
hips in one call of the model bundle (``xbmd.learn.bundle``) and map the virtual X-ray back onto
the radiograph (:func:`model_to_image`). :class:`Estimator` is the Python API; ``write`` puts the
files of the results on disk, ``estimate_xray`` does everything in memory (for benchmarks).

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
- less than ``xbmd.hip.MIN_VALID_PF_FRACTION`` of the region lies inside the radiograph's field
  (``xbmd prepare`` refuses such training samples);
- a regression output beyond ``TARGET_SD_LIMIT`` standard deviations of the training targets
  (``bundle.target_stats``), or an aBMD that is not a positive number (no T-score then);
- DICOM Body Part Examined names another region (``OTHER_BODY_PARTS``: chest, hand, ...);
- the head was assumed, not found (above).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from xbmd import __version__
from xbmd.errors import InputError, XbmdError
from xbmd.geometry import rounded
from xbmd.hip import (
    CROP_PIXEL_MM,
    CROP_SIZE_PX,
    FIELD_MARGIN_PX,
    HEAD_POSITION,
    MIN_VALID_PF_FRACTION,
    SIDES,
    HipCrop,
    hip_crop,
)
from xbmd.io.xray import DICOM_ID_KEYS, XRay, read_xray
from xbmd.learn.localiser import locate_heads
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
#: Colour scale of the virtual X-ray figures, g/cm2 (the training DRRs peak at about 3.3).
DISPLAY_MAX_G_CM2 = 3.5
#: Longest side of the overview and overlay images, pixels.
OVERVIEW_MAX_PX = 700
OVERLAY_MAX_PX = 420
#: Figures larger than this as true-colour PNG are written with 256 colours.
MAX_PNG_BYTES = 150_000
#: Colour map of the virtual X-ray.
COLOUR_MAP = "inferno"
#: results.csv columns.
CSV_COLUMNS = (
    "image",
    "side",
    "bmd_g_cm2",
    "t_score",
    "who_category",
    "z_score",
    "bmd_drr_g_cm2",
    "qct_vbmd_mg_cm3",
    "confident",
    "unilateral_crop",
    "localiser_confidence",
    "n_warnings",
    "warnings",
    "result_json",
    *DICOM_ID_KEYS,
)


@dataclass
class HipResult:
    """The estimate of one hip of one radiograph.

    ``virtual_xray_g_cm2`` (S, S) float32 and ``pf_region`` (S, S) bool are at model resolution,
    canonical (right-hip) orientation; a model pixel is ``virtual_xray_pixel_mm`` detector mm.
    ``xray`` is the radiograph, for the figures (None once they are written). ``files`` is filled by
    :meth:`Estimator.write`. :meth:`to_dict` is the content of ``result.json``.
    """

    image: str
    side: str
    xray: XRay | None
    crop: HipCrop
    head_px: tuple[float, float]
    localiser_confidence: float | None
    virtual_xray_g_cm2: np.ndarray
    pf_region: np.ndarray
    bmd_g_cm2: float | None
    bmd_drr_g_cm2: float | None
    targets: dict[str, float]
    t_score: float | None
    who_category: str | None
    z_score: float | None
    reference: dict
    patient: dict
    pf_area_mm2: float
    unilateral_crop: bool
    confident: bool
    warnings: list[str]
    model: dict
    pixel_spacing_mm: tuple[float, float]
    spacing_source: str
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    #: The source's DICOM identifiers (``xbmd.io.xray.DICOM_ID_KEYS``; None when not DICOM).
    dicom_ids: dict[str, str | None] = field(default_factory=dict)

    @property
    def virtual_xray_pixel_mm(self) -> float:
        return CROP_SIZE_PX * CROP_PIXEL_MM / self.virtual_xray_g_cm2.shape[-1]

    @property
    def model_to_image(self) -> np.ndarray:
        return model_to_image(self.crop, self.virtual_xray_g_cm2.shape[-1])

    def to_dict(self) -> dict:
        out = {
            "image": self.image,
            **{key: self.dicom_ids.get(key) for key in DICOM_ID_KEYS},
            "side": self.side,
            "bmd_g_cm2": _num(self.bmd_g_cm2),
            "bmd_drr_g_cm2": _num(self.bmd_drr_g_cm2),
        }
        if "qct_vbmd_mg_cm3" in self.targets:
            out["qct_vbmd_mg_cm3"] = _num(self.targets["qct_vbmd_mg_cm3"])
        out.update(
            {
                "t_score": _num(self.t_score, 3),
                "who_category": self.who_category,
                "z_score": _num(self.z_score, 3),
                "reference": self.reference,
                "confident": self.confident,
                "unilateral_crop": self.unilateral_crop,
                "warnings": list(self.warnings),
                "targets": {k: _num(v) for k, v in self.targets.items()},
                "patient": self.patient,
                "head_px": rounded(self.head_px, 3),
                "localiser_confidence": _num(self.localiser_confidence, 4),
                "mirrored": self.crop.mirrored,
                "crop_to_image": [rounded(r, 6) for r in self.crop.crop_to_image],
                "crop_pixel_mm": CROP_PIXEL_MM,
                "model_to_image": [rounded(r, 6) for r in self.model_to_image],
                "virtual_xray_pixel_mm": self.virtual_xray_pixel_mm,
                "virtual_xray_unit": "g/cm2",
                "pf_area_mm2": round(float(self.pf_area_mm2), 1),
                "pixel_spacing_mm": list(self.pixel_spacing_mm),
                "spacing_source": self.spacing_source,
                "model": self.model,
                "xbmd_version": __version__,
                "seconds": round(self.seconds, 3),
            }
        )
        out.update(self.files)
        return out


def _num(value: float | None, digits: int = 4) -> float | None:
    """A JSON number, or None for missing or non-finite values."""
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), digits)


# ------------------------------------------------------------------------------------------------
# Geometry: crops and the model's grid on the radiograph


def model_to_image(crop: HipCrop, size: int) -> np.ndarray:
    """(2, 3) affine: model pixel (row, col, 1) of an S x S output -> radiograph (row, col).

    Model pixel (i, j) is the mean of crop pixels [i f, (i + 1) f) with f = 256 / S, so its
    centre is crop pixel i f + (f - 1) / 2; the mirror of a left hip is in ``crop_to_image``.
    """
    f = CROP_SIZE_PX / size
    linear = crop.crop_to_image[:, :2]
    shift = crop.crop_to_image[:, 2] + linear @ np.full(2, (f - 1) / 2)
    return np.column_stack([linear * f, shift])


def warp_to_image(
    model_map: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, int],
    origin_rc: tuple[float, float] = (0.0, 0.0),
    step: float = 1.0,
) -> np.ndarray:
    """A model-resolution map sampled on a grid of radiograph points (bilinear, 0 outside).

    Output pixel (u, v) is radiograph point ``origin_rc + step * (u, v)``; ``affine`` is
    :func:`model_to_image`. Returns float32 of ``shape``.
    """
    inverse = np.linalg.inv(affine[:, :2])
    offset = inverse @ (np.asarray(origin_rc, dtype=float) - affine[:, 2])
    return ndimage.affine_transform(
        np.asarray(model_map, dtype=np.float32),
        inverse * step,
        offset=offset,
        output_shape=tuple(shape),
        order=1,
        mode="constant",
        cval=0.0,
    )


def crop_box_px(crop: HipCrop) -> np.ndarray:
    """(4, 2) radiograph (row, col) of the crop's outer corners, in drawing order."""
    edge = CROP_SIZE_PX - 0.5
    return crop.to_image(np.array([[-0.5, -0.5], [-0.5, edge], [edge, edge], [edge, -0.5]]))


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
        ``xbmd.learn.bundle.ModelBundle``, or None for the bundled default.
    reference : T-score reference, one of ``xbmd.tscore.REFERENCES``.

    Examples
    --------
    >>> estimator = Estimator("model.pt")  # doctest: +SKIP
    >>> results = estimator.estimate("pelvis.dcm")  # doctest: +SKIP
    >>> [(r.side, round(r.bmd_g_cm2, 3), r.who_category) for r in results]  # doctest: +SKIP
    [('right', 0.861, 'osteopenia'), ('left', 0.874, 'osteopenia')]
    >>> estimator.write(results, "out")  # doctest: +SKIP
    """

    def __init__(self, model=None, reference: str = DEFAULT_REFERENCE) -> None:
        from xbmd.learn.bundle import ModelBundle, load_bundle

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
        from xbmd.registration import xray_geometry

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

    def write(
        self,
        results: list[HipResult],
        out_dir: str | Path,
        name: str | None = None,
        figures: bool = True,
    ) -> Path:
        """Write the results of one radiograph into ``out_dir/<name>/`` (name: the image's stem).

        Per hip, ``<side>/``: result.json, virtual_xray.npy (float32 g/cm2, S x S, canonical),
        pf_region.npy (bool), and with ``figures`` virtual_xray.png, overlay.png; per image:
        overview.png. Adds to ``result.files`` (entries already there, e.g. DICOM outputs, are
        kept). Returns the image's folder.
        """
        if not results:
            raise InputError("no results to write")
        folder = Path(out_dir) / (name or Path(results[0].image).stem)
        for r in results:
            hip = folder / r.side
            hip.mkdir(parents=True, exist_ok=True)
            np.save(hip / "virtual_xray.npy", r.virtual_xray_g_cm2.astype(np.float32))
            np.save(hip / "pf_region.npy", r.pf_region.astype(bool))
            r.files = {
                **r.files,
                "virtual_xray_npy": str(hip / "virtual_xray.npy"),
                "pf_region_npy": str(hip / "pf_region.npy"),
            }
            if figures:
                r.files["virtual_xray_png"] = str(
                    write_virtual_xray_png(r, hip / "virtual_xray.png")
                )
                r.files["overlay_png"] = str(write_overlay_png(r, hip / "overlay.png"))
                r.files["overview_png"] = str(folder / "overview.png")
            r.files["result_json"] = str(hip / "result.json")
            (hip / "result.json").write_text(json.dumps(r.to_dict(), indent=2) + "\n")
        if figures:
            write_overview_png(results, folder / "overview.png")
        return folder


def region_area_mm2(region: np.ndarray) -> float:
    """Area at the detector (mm2) of a (S, S) region of the model's grid over a hip crop."""
    return float(np.sum(region)) * (CROP_SIZE_PX * CROP_PIXEL_MM / region.shape[-1]) ** 2


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
    from xbmd.learn.data import VALID_SHARE, downsample_map

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


def summary_line(r: HipResult) -> str:
    """One line per hip for people: image, side, BMD, T-score, WHO category, BMD_drr, warnings."""
    bmd = f"{r.bmd_g_cm2:.3f}" if r.bmd_g_cm2 is not None else "-"
    t = f"{r.t_score:+.1f}" if r.t_score is not None else "-"
    drr = f"{r.bmd_drr_g_cm2:.3f}" if r.bmd_drr_g_cm2 is not None else "-"
    state = "" if r.confident else "  NOT CONFIDENT (see warnings)"
    return (
        f"{Path(r.image).name}  {r.side:5s}  BMD {bmd} g/cm2  T {t}  "
        f"{r.who_category or '-'}  BMD_drr {drr} g/cm2  {len(r.warnings)} warnings{state}"
    )


def write_csv(rows: list[HipResult], path: str | Path) -> Path:
    """``results.csv``: one row per hip (``CSV_COLUMNS``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            d = r.to_dict()
            writer.writerow(
                {
                    **{c: d.get(c) for c in CSV_COLUMNS},
                    "n_warnings": len(r.warnings),
                    "warnings": " | ".join(r.warnings),
                    "result_json": r.files.get("result_json", ""),
                }
            )
    return path


# ------------------------------------------------------------------------------------------------
# Figures (8-bit happens only here)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Save a figure as PNG at 100 dpi; as 256 colours when true colour exceeds
    ``MAX_PNG_BYTES`` (noisy radiographs compress badly)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    if path.stat().st_size > MAX_PNG_BYTES:
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, format="PNG", optimize=True)
    return path


def _title(r: HipResult) -> str:
    bmd = f"{r.bmd_g_cm2:.3f} g/cm2" if r.bmd_g_cm2 is not None else "-"
    t = f"T {r.t_score:+.1f} ({r.who_category})" if r.t_score is not None else "no T-score"
    flag = "" if r.confident else ", NOT CONFIDENT"
    return f"{r.side} hip: BMD {bmd}, {t}{flag}"


def write_virtual_xray_png(r: HipResult, path: str | Path) -> Path:
    """The virtual X-ray (canonical orientation) colour-mapped, region outlined, colour bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    shown = ax.imshow(r.virtual_xray_g_cm2, cmap=COLOUR_MAP, vmin=0, vmax=DISPLAY_MAX_G_CM2)
    if r.pf_region.any():
        ax.contour(r.pf_region.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_axis_off()
    mirrored = "\n(left hip mirrored: shown as a right hip)" if r.crop.mirrored else ""
    ax.set_title(_title(r) + mirrored, fontsize=8)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="virtual X-ray, g/cm2")
    return _save(fig, Path(path))


def _display_grid(box_rc: np.ndarray, shape: tuple[int, int], max_px: int, margin: float = 0.1):
    """A display grid over a box of the radiograph: (origin_rc (int), step, (rows, cols))."""
    lo, hi = box_rc.min(axis=0), box_rc.max(axis=0)
    pad = margin * (hi - lo)
    lo = np.maximum(np.floor(lo - pad), 0).astype(int)
    hi = np.minimum(hi + pad, np.asarray(shape) - 1)
    step = max(1, int(np.ceil((hi - lo).max() / max_px)))
    size = tuple(int(n) for n in np.maximum(np.floor((hi - lo) / step) + 1, 1))
    return lo, step, size


def _grey(pixels: np.ndarray, origin_rc, step: int, size) -> np.ndarray:
    """The radiograph on a display grid (area mean over step x step), 8-bit."""
    from xbmd.io.xray import to_display_uint8

    r0, c0 = (int(v) for v in origin_rc)
    block = pixels[r0 : r0 + size[0] * step, c0 : c0 + size[1] * step].astype(np.float32)
    h, w = block.shape[0] // step, block.shape[1] // step
    block = block[: h * step, : w * step].reshape(h, step, w, step).mean(axis=(1, 3))
    return to_display_uint8(block)


def write_overlay_png(r: HipResult, path: str | Path) -> Path:
    """The radiograph around the hip in grey, the virtual X-ray warped back onto it in colour
    where the predicted region is, the head marked, a colour bar in g/cm2."""
    plt = _pyplot()
    from matplotlib.colors import Normalize

    pixels = r.xray.pixels
    origin, step, size = _display_grid(crop_box_px(r.crop), pixels.shape, OVERLAY_MAX_PX)
    r0, c0 = (int(v) for v in origin)
    grey = _grey(pixels, (r0, c0), step, size)
    centre = (r0 + (step - 1) / 2, c0 + (step - 1) / 2)
    affine = r.model_to_image
    drr = warp_to_image(r.virtual_xray_g_cm2, affine, grey.shape, centre, step)
    region = warp_to_image(r.pf_region.astype(np.float32), affine, grey.shape, centre, step)
    norm = Normalize(0, DISPLAY_MAX_G_CM2)
    colour = plt.get_cmap(COLOUR_MAP)(norm(drr))
    colour[..., 3] = 0.65 * np.clip(region, 0, 1)
    fig, ax = plt.subplots(figsize=(5.0, 4.4))
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    ax.imshow(colour)
    to_display = lambda rc: (np.asarray(rc) - centre) / step  # noqa: E731
    box = to_display(np.vstack([crop_box_px(r.crop), crop_box_px(r.crop)[:1]]))
    ax.plot(box[:, 1], box[:, 0], color="yellow", lw=0.6, ls="--")
    head = to_display(r.head_px)
    ax.plot(head[1], head[0], "+", color="cyan", ms=12, mew=1.5)
    ax.set_axis_off()
    ax.set_title(f"{Path(r.image).name}\n{_title(r)}", fontsize=8)
    mappable = plt.cm.ScalarMappable(norm=norm, cmap=COLOUR_MAP)
    fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02, label="virtual X-ray, g/cm2")
    return _save(fig, Path(path))


def write_overview_png(results: list[HipResult], path: str | Path) -> Path:
    """The whole radiograph with each hip's crop box and its BMD / T-score."""
    plt = _pyplot()
    pixels = results[0].xray.pixels
    full = np.array([[0, 0], [pixels.shape[0] - 1, pixels.shape[1] - 1]], dtype=float)
    origin, step, size = _display_grid(full, pixels.shape, OVERVIEW_MAX_PX, margin=0.0)
    grey = _grey(pixels, origin, step, size)
    centre = np.array([(step - 1) / 2, (step - 1) / 2])
    fig, ax = plt.subplots(figsize=(6.5, 6.5 * grey.shape[0] / grey.shape[1] + 0.4))
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    for r in results:
        colour = "lime" if r.confident else "orange"
        box = (np.vstack([crop_box_px(r.crop), crop_box_px(r.crop)[:1]]) - centre) / step
        ax.plot(box[:, 1], box[:, 0], color=colour, lw=1.0)
        head = (np.asarray(r.head_px) - centre) / step
        ax.plot(head[1], head[0], "+", color=colour, ms=10)
        bmd = f"{r.bmd_g_cm2:.3f} g/cm2" if r.bmd_g_cm2 is not None else "-"
        t = f"T {r.t_score:+.1f}" if r.t_score is not None else "no T"
        ax.text(
            box[:, 1].min() + 3,
            box[:, 0].min() + 3,
            f"{r.side}\n{bmd}\n{t}" + ("" if r.confident else "\nnot confident"),
            color=colour,
            fontsize=8,
            va="top",
            bbox={"facecolor": "black", "alpha": 0.5, "pad": 2, "lw": 0},
        )
    ax.text(0.01, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=11, va="center")
    ax.text(0.97, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=11, va="center")
    ax.set_axis_off()
    ax.set_title(Path(results[0].image).name, fontsize=9)
    return _save(fig, Path(path))
