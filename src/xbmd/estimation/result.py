"""The estimate of one hip (:class:`HipResult`, the content of ``result.json``) and the geometry
that maps the model's grid back onto the radiograph."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from xbmd import __version__
from xbmd.dataset.hip import CROP_PIXEL_MM, CROP_SIZE_PX, HEAD_POSITION, HipCrop
from xbmd.geometry import rounded
from xbmd.io.xray import DICOM_ID_KEYS, XRay

#: results.csv columns.
CSV_COLUMNS = (
    "image",
    "side",
    "bmd_g_cm2",
    "bmd_low_g_cm2",
    "bmd_high_g_cm2",
    "t_score",
    "who_category",
    "z_score",
    "category_statement",
    "bmd_drr_g_cm2",
    "qct_vbmd_mg_cm3",
    "confident",
    "gate",
    "ood_score",
    "unilateral_crop",
    "localiser_confidence",
    "n_warnings",
    "warnings",
    "result_json",
    *DICOM_ID_KEYS,
)


#: Carried by every result file and figure: nothing here is validated on patients.
RESEARCH_USE = "research use only, not for diagnosis"


@dataclass
class HipResult:
    """The estimate of one hip of one radiograph.

    ``virtual_xray_g_cm2`` (S, S) float32 and ``pf_region`` (S, S) bool are at model resolution,
    canonical (right-hip) orientation; a model pixel is ``virtual_xray_pixel_mm`` detector mm.
    ``xray`` is the radiograph, for the figures (None once they are written). ``files`` is filled by
    ``xbmd.estimation.output.write_results``. :meth:`to_dict` is the content of ``result.json``.
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
    #: 95 % prediction interval of ``bmd_g_cm2`` (g/cm2) and of the T-score; None when the
    #: model carries no calibrated interval (``xbmd calibrate-model``) or no estimate was made.
    bmd_interval_g_cm2: tuple[float, float] | None = None
    t_score_interval: tuple[float, float] | None = None
    #: What a clinician reads: the WHO category with what its interval spans, or the Z-score
    #: statement (age < 50), or why neither is given.
    category_statement: str | None = None
    #: Out-of-distribution score (how unlike the calibration images this image is, in the
    #: model's feature space; None without a calibrated model) and the threshold above which the
    #: image is refused as unfamiliar.
    ood_score: float | None = None
    ood_threshold: float | None = None
    #: The site calibration applied (``xbmd.estimation.site``): the line, its file and the
    #: uncalibrated estimate; None when none was given.
    site_calibration: dict | None = None
    #: The reasons this estimate is not confident (a subset of ``warnings``; empty: confident).
    gate: list[str] = field(default_factory=list)
    #: With test-time augmentation: the SD of the BMD over the views (g/cm2) and the image's
    #: pooled features (for calibration; not written to result.json).
    tta_sd_g_cm2: float | None = None
    features: np.ndarray | None = field(default=None, repr=False)

    @property
    def virtual_xray_pixel_mm(self) -> float:
        return CROP_SIZE_PX * CROP_PIXEL_MM / self.virtual_xray_g_cm2.shape[-1]

    @property
    def model_to_image(self) -> np.ndarray:
        return model_to_image(self.crop, self.virtual_xray_g_cm2.shape[-1])

    @property
    def head_region(self) -> np.ndarray:
        """(S, S) bool, canonical orientation: the femoral head, approximately
        (:func:`head_disc`)."""
        return head_disc(self.pf_region)

    @property
    def total_hip_region(self) -> np.ndarray:
        """(S, S) bool, canonical orientation: the proximal femur without its head, the region
        the total hip BMD describes (approximately: its distal end is the crop's)."""
        return self.pf_region & ~self.head_region

    def to_dict(self) -> dict:
        out = {
            "research_use_only": RESEARCH_USE,
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
                "bmd_interval_g_cm2": _pair(self.bmd_interval_g_cm2),
                "t_score": _num(self.t_score, 3),
                "t_score_interval": _pair(self.t_score_interval, 3),
                "who_category": self.who_category,
                "z_score": _num(self.z_score, 3),
                "category_statement": self.category_statement,
                "reference": self.reference,
                "confident": self.confident,
                "gate": list(self.gate),
                "ood_score": _num(self.ood_score),
                "tta_sd_g_cm2": _num(self.tta_sd_g_cm2, 5),
                "ood_threshold": _num(self.ood_threshold),
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
                "site_calibration": self.site_calibration,
                "xbmd_version": __version__,
                "seconds": round(self.seconds, 3),
            }
        )
        out.update(self.files)
        return out


#: Femoral head radius assumed when the predicted region does not contain the head centre, mm.
TYPICAL_HEAD_RADIUS_MM = 24.0
#: Model pixels added to the inscribed circle to take in the head's rim (the head is not round
#: in projection, and the region's edge is blurred).
HEAD_RIM_PX = 2.0


def head_disc(pf_region: np.ndarray) -> np.ndarray:
    """(S, S) bool: the femoral head of a hip crop's proximal-femur region, approximated by the
    disc around the crop's head centre (``HEAD_POSITION``) that fits inside the region (the
    largest inscribed circle there). The total hip region of the BMD leaves the head out."""
    size = pf_region.shape[-1]
    f = CROP_SIZE_PX / size
    centre = (np.asarray(HEAD_POSITION) * CROP_SIZE_PX - (f - 1) / 2) / f
    rows, cols = np.mgrid[0:size, 0:size]
    ci = tuple(np.clip(np.rint(centre).astype(int), 0, size - 1))
    radius = TYPICAL_HEAD_RADIUS_MM / (CROP_PIXEL_MM * f)
    if pf_region[ci]:  # the inscribed circle, grown by the head's rim the circle leaves out
        radius = float(ndimage.distance_transform_edt(pf_region)[ci]) + HEAD_RIM_PX
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def _pair(pair: tuple[float, float] | None, digits: int = 4) -> list[float | None] | None:
    return None if pair is None else [_num(pair[0], digits), _num(pair[1], digits)]


def _num(value: float | None, digits: int = 4) -> float | None:
    """A JSON number, or None for missing or non-finite values."""
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), digits)


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


def region_area_mm2(region: np.ndarray) -> float:
    """Area at the detector (mm2) of a (S, S) region of the model's grid over a hip crop."""
    return float(np.sum(region)) * (CROP_SIZE_PX * CROP_PIXEL_MM / region.shape[-1]) ** 2
