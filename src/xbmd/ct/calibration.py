"""CT intensity calibration: Hounsfield units -> bone mineral density (mg/cm3 hydroxyapatite).

One scan's calibration is a line ``density_mg_cm3 = slope * HU + intercept`` found in one of
three ways (``Calibration.method``):

- ``'phantom'``: hydroxyapatite rods of known density scanned with the patient
  (:func:`phantom_calibration`); the reference method.
- ``'phantomless'``: reference tissues of the patient (air, fat, muscle, optionally blood) whose
  hydroxyapatite-equivalent densities are tabulated by tube voltage
  (:func:`phantomless_calibration`); less exact, see docs/calibration.md for the measured error.
- ``'given'``: a line known from elsewhere (:meth:`Calibration.given`).

Every region value is a median of voxels, so noise and a few outlier voxels do not move it. The
method, the reference values and their derivation are in docs/calibration.md.

Why one module of about 800 lines: the calibration file format (:class:`Calibration`), the
phantom description and both fits share the plausibility checks (slope range, units of the rod
densities, the line's sign) that every way of making a calibration must pass; split, the checks
would be imported back and forth or duplicated.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import ndimage

from xbmd import __version__
from xbmd.errors import CalibrationError, InputError
from xbmd.units import HU, LABEL, MG_CM3
from xbmd.volume import Volume

METHODS = ("phantom", "phantomless", "given")
#: The only phantom material: every density xbmd handles is hydroxyapatite-equivalent.
MATERIAL = "hydroxyapatite"
#: A fit with a smaller Pearson r (HU vs density) is refused.
MIN_R = 0.99
#: Fewest reference points (rods or tissues) a fit accepts.
MIN_POINTS = 3
#: A region whose one-voxel erosion keeps fewer voxels is measured un-eroded (and a note says so).
MIN_ERODED_VOXELS = 8
#: Fewest voxels a reference tissue found automatically must have.
MIN_TISSUE_VOXELS = 50

#: Hydroxyapatite-equivalent density (mg/cm3) that an ideal phantom calibration of a scan at the
#: given tube voltage (kVp) assigns to each reference tissue. Derived in docs/calibration.md from
#: NIST/Elam attenuation data (``benchmarks/bench_calibration.py --table`` prints them):
#: air -> -1000 HU by definition, fat = ICRU-46 adipose tissue 3, muscle = ICRU-44 skeletal muscle,
#: blood = ICRU-44 whole blood, rods = hydroxyapatite in water, effective energies 54/62/70/77 keV.
REFERENCE_TISSUES_MG_CM3: dict[int, dict[str, float]] = {
    80: {"air": -503.9, "fat": -63.5, "muscle": 23.1, "blood": 31.1},
    100: {"air": -635.0, "fat": -69.4, "muscle": 28.0, "blood": 37.1},
    120: {"air": -764.2, "fat": -75.3, "muscle": 32.9, "blood": 42.9},
    140: {"air": -870.6, "fat": -80.1, "muscle": 36.9, "blood": 47.8},
}
TISSUES = ("air", "fat", "muscle", "blood")
#: Tube voltage assumed when neither the caller nor the CT's metadata gives one.
DEFAULT_KVP = 120.0
#: Median HU outside these ranges means the region is not that tissue (mislabelled, wrong scan).
PLAUSIBLE_HU: dict[str, tuple[float, float]] = {
    "air": (-1100.0, -850.0),
    "fat": (-200.0, -40.0),
    "muscle": (-10.0, 110.0),
    "blood": (0.0, 120.0),
}
#: Measured by benchmarks/bench_calibration.py (docs/calibration.md); recorded in every result.
PHANTOMLESS_ERROR_NOTE = (
    "phantom-less: expect about 8 % RMS error at 150 mg/cm3 and 7 % at 800 mg/cm3 with the kVp "
    "known (simulation, docs/calibration.md), about twice that with the kVp unknown"
)
#: A calibration line's slope (mg/cm3 per HU) outside this range is refused. Hydroxyapatite lines
#: are 0.50 (80 kVp) to 0.87 (140 kVp) by the table above and 0.7-1.0 for real phantoms
#: (docs/calibration.md); the range leaves a factor 2.5 on either side, and catches what a wrong
#: unit gives: rod densities in g/cm3 instead of mg/cm3 make the slope 1000 times too small.
PLAUSIBLE_SLOPE_MG_CM3_PER_HU = (0.2, 2.5)
#: The densest rod a phantom may have (mg/cm3): hydroxyapatite itself is 3160 mg/cm3. The densest
#: rod, when not 0, must be above MIN_TOP_ROD_MG_CM3: phantoms span tens to hundreds of mg/cm3.
MAX_ROD_MG_CM3 = 3160.0
MIN_TOP_ROD_MG_CM3 = 5.0
#: Automatic tissue search: the body is the largest connected region above this HU.
BODY_THRESHOLD_HU = -500.0
#: Air is sampled this many voxels (in-plane) away from the body: no partial volume of the skin.
AIR_MARGIN_VOXELS = 3
#: Half-width (HU) of the window around a histogram mode whose voxels are counted for a tissue.
MODE_HALF_WIDTH_HU = 20.0


@dataclass(frozen=True)
class Rod:
    """One insert of a calibration phantom: its value in the label map and its nominal density."""

    label: int
    density_mg_cm3: float
    name: str = ""


@dataclass(frozen=True)
class Phantom:
    """A calibration phantom description (see ``xbmd/data/phantoms/*.json`` for the format)."""

    name: str
    rods: tuple[Rod, ...]
    material: str = MATERIAL
    #: Physical layout for automatic rod detection (``xbmd.ct.rods.PhantomLayout``), if known.
    layout: object = None

    @classmethod
    def from_dict(cls, d: object, source: str = "phantom") -> Phantom:
        """Validate a parsed phantom JSON; raise InputError naming the first bad field."""
        if not isinstance(d, dict):
            raise InputError(f"{source}: a phantom description must be a JSON object")
        name, material, rods = d.get("name"), d.get("material"), d.get("rods")
        if not isinstance(name, str) or not name:
            raise InputError(f"{source}: 'name' must be a non-empty string")
        if material != MATERIAL:
            raise InputError(
                f"{source}: 'material' must be {MATERIAL!r}, not {material!r} "
                "(xbmd densities are hydroxyapatite-equivalent)"
            )
        if not isinstance(rods, list) or not rods:
            raise InputError(f"{source}: 'rods' must be a non-empty list")
        parsed = tuple(_parse_rod(rod, f"{source}: rods[{i}]") for i, rod in enumerate(rods))
        labels = [rod.label for rod in parsed]
        if len(set(labels)) != len(labels):
            raise InputError(f"{source}: rod labels must be unique, got {labels}")
        _check_rod_densities(parsed, source)
        layout = None
        if d.get("layout") is not None:
            from xbmd.ct.rods import PhantomLayout

            layout = PhantomLayout.from_dict(d["layout"], [r.label for r in parsed], source)
        return cls(name=name, rods=parsed, material=material, layout=layout)


def _check_rod_densities(rods: tuple[Rod, ...], source: str) -> None:
    """Refuse densities in the wrong unit: g/cm3 (0.2 for 200 mg/cm3) or ug/cm3."""
    densities = [rod.density_mg_cm3 for rod in rods]
    top = max(densities)
    if 0 < top < MIN_TOP_ROD_MG_CM3:
        raise InputError(
            f"{source}: rod densities {_range_text(densities)} mg/cm3 are implausibly small "
            f"(the densest rod is below {MIN_TOP_ROD_MG_CM3:g} mg/cm3): they look like g/cm3; "
            "give density_mg_cm3 in mg/cm3 (e.g. 200, not 0.2)"
        )
    if top > MAX_ROD_MG_CM3:
        raise InputError(
            f"{source}: rod density {top:g} mg/cm3 exceeds hydroxyapatite's own "
            f"({MAX_ROD_MG_CM3:g} mg/cm3): wrong unit (ug/cm3?); give density_mg_cm3 in mg/cm3"
        )


def _range_text(values: Sequence[float]) -> str:
    return f"{min(values):g}..{max(values):g}"


def _parse_rod(d: object, where: str) -> Rod:
    if not isinstance(d, dict):
        raise InputError(f"{where} must be an object with 'label' and 'density_mg_cm3'")
    label, density = d.get("label"), d.get("density_mg_cm3")
    if not isinstance(label, int) or isinstance(label, bool):
        raise InputError(f"{where}.label must be an integer, not {label!r}")
    if not _is_number(density):
        raise InputError(f"{where}.density_mg_cm3 must be a number, not {density!r}")
    return Rod(label=label, density_mg_cm3=float(density), name=str(d.get("name", "")))


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def bundled_phantoms() -> list[str]:
    """Names of the phantom descriptions shipped with xbmd (usable as ``load_phantom(name)``)."""
    folder = resources.files("xbmd") / "data" / "phantoms"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_phantom(spec: str | Path) -> Phantom:
    """Read a phantom description from a JSON file, or by name from the bundled ones.

    Example: ``load_phantom("bmas200")`` or ``load_phantom("my_phantom.json")``.
    """
    path = Path(spec)
    if path.is_file():
        text, source = path.read_text(encoding="utf-8"), str(path)
    elif str(spec) in bundled_phantoms():
        resource = resources.files("xbmd") / "data" / "phantoms" / f"{spec}.json"
        text, source = resource.read_text(encoding="utf-8"), f"bundled phantom {spec!r}"
    else:
        raise InputError(
            f"phantom {str(spec)!r} is neither a file nor a bundled phantom "
            f"(bundled: {', '.join(bundled_phantoms())})"
        )
    return Phantom.from_dict(_parse_json(text, source), source)


def _parse_json(text: str, source: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{source}: not valid JSON ({exc.msg}, line {exc.lineno} col {exc.colno})"
        ) from None


@dataclass(frozen=True)
class CalibrationPoint:
    """One reference region of a fit: a phantom rod or a reference tissue.

    ``residual_mg_cm3`` is the fitted density minus the nominal one. ``n_voxels`` counts the region
    (for an automatically found tissue: the voxels within +-20 HU of its histogram mode),
    ``n_used`` the voxels its median was taken over (after erosion).
    """

    name: str
    hu: float
    density_mg_cm3: float
    residual_mg_cm3: float
    n_voxels: int
    n_used: int
    label: int | None = None


@dataclass(frozen=True)
class Calibration:
    """A per-scan line HU -> mg/cm3 hydroxyapatite, with how it was made.

    Example::

        cal = phantom_calibration(ct, rod_labels, load_phantom("bmas200"))
        cal.to_json("cal.json")
        density = Calibration.from_json("cal.json").apply(ct)  # Volume in mg/cm3
    """

    method: str
    slope_mg_cm3_per_hu: float
    intercept_mg_cm3: float
    r: float | None = None
    points: tuple[CalibrationPoint, ...] = ()
    phantom: str | None = None
    ct_source: str | None = None
    kvp: float | None = None
    notes: tuple[str, ...] = ()
    xbmd_version: str = __version__

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        _check_line(self.slope_mg_cm3_per_hu, self.intercept_mg_cm3)

    @classmethod
    def given(
        cls, slope_mg_cm3_per_hu: float, intercept_mg_cm3: float, note: str = ""
    ) -> Calibration:
        """A calibration for a line known from elsewhere (e.g. the scanner's QCT software)."""
        return cls(
            method="given",
            slope_mg_cm3_per_hu=float(slope_mg_cm3_per_hu),
            intercept_mg_cm3=float(intercept_mg_cm3),
            notes=(note,) if note else (),
        )

    @property
    def residuals_mg_cm3(self) -> dict[str, float]:
        """Fitted minus nominal density of each reference point, by name."""
        return {p.name: p.residual_mg_cm3 for p in self.points}

    def density_mg_cm3(self, hu: float | np.ndarray) -> float | np.ndarray:
        """Density (mg/cm3 hydroxyapatite) of a HU value or array."""
        return self.slope_mg_cm3_per_hu * hu + self.intercept_mg_cm3

    def apply(self, ct: Volume) -> Volume:
        """Convert a CT in HU to a density volume in mg/cm3 (float32, same grid)."""
        if ct.unit != HU:
            raise InputError(
                f"a calibration applies to a CT in {HU}, not to a volume in {ct.unit!r}"
                + (f" ({ct.source})" if ct.source else "")
            )
        density = ct.data.astype(np.float32, copy=True)
        density *= np.float32(self.slope_mg_cm3_per_hu)
        density += np.float32(self.intercept_mg_cm3)
        out = ct.with_data(density, unit=MG_CM3)
        out.meta["calibration"] = {
            "method": self.method,
            "slope_mg_cm3_per_hu": self.slope_mg_cm3_per_hu,
            "intercept_mg_cm3": self.intercept_mg_cm3,
        }
        return out

    def to_json(self, path: str | Path) -> None:
        """Write the calibration (line, reference points, provenance) as JSON."""
        d = {"format": "xbmd-calibration", "format_version": 1, **asdict(self)}
        d["unit_in"], d["unit_out"], d["material"] = HU, MG_CM3, MATERIAL
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(d, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> Calibration:
        """Read a file written by :meth:`to_json`; InputError says what is wrong with a bad one."""
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path}: is a folder, not a calibration JSON")
        if not path.is_file():
            raise InputError(f"calibration file not found: {path}")
        d = _parse_json(path.read_text(encoding="utf-8"), str(path))
        if not isinstance(d, dict) or d.get("format") != "xbmd-calibration":
            raise InputError(
                f"{path}: not an xbmd calibration file (no 'format': 'xbmd-calibration')"
            )
        try:
            return cls(
                method=_field(d, "method", str),
                slope_mg_cm3_per_hu=_field(d, "slope_mg_cm3_per_hu", float),
                intercept_mg_cm3=_field(d, "intercept_mg_cm3", float),
                r=_field(d, "r", float, optional=True),
                points=tuple(_point(p) for p in _field(d, "points", list, optional=True) or ()),
                phantom=_field(d, "phantom", str, optional=True),
                ct_source=_field(d, "ct_source", str, optional=True),
                kvp=_field(d, "kvp", float, optional=True),
                notes=tuple(str(n) for n in _field(d, "notes", list, optional=True) or ()),
                xbmd_version=_field(d, "xbmd_version", str),
            )
        except CalibrationError as exc:
            raise InputError(f"{path}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: malformed calibration file: {exc}") from None

    def summary(self) -> str:
        """A few human-readable lines: the line, r, and each reference point's residual."""
        what = {
            "phantom": f"phantom calibration ({self.phantom})",
            "phantomless": "phantom-less calibration",
        }
        lines = [what.get(self.method, "given calibration line") + _kvp_text(self.kvp)]
        r_text = "" if self.r is None else f"   r = {self.r:.5f}"
        lines.append(
            f"  density_mg_cm3 = {self.slope_mg_cm3_per_hu:.5f} * HU "
            f"{'+' if self.intercept_mg_cm3 >= 0 else '-'} {abs(self.intercept_mg_cm3):.2f}{r_text}"
        )
        if self.points:
            lines.append(f"  {'point':<16}{'HU':>9}{'nominal':>10}{'residual':>10}{'voxels':>9}")
            for p in self.points:
                lines.append(
                    f"  {p.name:<16}{p.hu:9.1f}{p.density_mg_cm3:10.1f}"
                    f"{p.residual_mg_cm3:+10.2f}{p.n_used:9d}"
                )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _kvp_text(kvp: float | None) -> str:
    return "" if kvp is None else f" at {kvp:g} kVp"


_TYPES = {str: ((str,), "string"), float: ((int, float), "number"), list: ((list,), "list")}


def _field(d: dict, key: str, kind: type, optional: bool = False):
    if key not in d or (d[key] is None and optional):
        if optional:
            return None
        raise ValueError(f"missing {key!r}")
    value = d[key]
    types, name = _TYPES[kind]
    if not isinstance(value, types) or isinstance(value, bool):
        raise ValueError(f"{key!r} must be a {name}, not {value!r}")
    return float(value) if kind is float else value


def _point(d: object) -> CalibrationPoint:
    if not isinstance(d, dict):
        raise ValueError(f"each of 'points' must be an object, not {d!r}")
    label = _field(d, "label", float, optional=True)
    return CalibrationPoint(
        name=_field(d, "name", str),
        hu=_field(d, "hu", float),
        density_mg_cm3=_field(d, "density_mg_cm3", float),
        residual_mg_cm3=_field(d, "residual_mg_cm3", float),
        n_voxels=int(_field(d, "n_voxels", float)),
        n_used=int(_field(d, "n_used", float)),
        label=None if label is None else int(label),
    )


def _check_line(slope: float, intercept: float) -> None:
    if not (_is_number(slope) and _is_number(intercept)):
        raise CalibrationError(
            f"calibration line must be finite, got slope {slope}, intercept {intercept}"
        )
    if slope <= 0:
        raise CalibrationError(
            f"calibration slope must be positive (density rises with HU), "
            f"got {slope:.5g} mg/cm3 per HU"
        )
    _check_slope_plausible(slope)


def _check_slope_plausible(slope: float, table: str = "") -> None:
    """CalibrationError for a slope no CT can have, with the likely cause (a unit 1000x off)."""
    lo, hi = PLAUSIBLE_SLOPE_MG_CM3_PER_HU
    if lo <= slope <= hi:
        return
    points = f" ({table})" if table else ""
    if slope < lo and lo <= slope * 1000 <= hi:
        cause = (
            "about 1000 times too small: densities given in g/cm3 instead of mg/cm3? "
            "(a 200 mg/cm3 rod is 200, not 0.2)"
        )
    elif slope > hi and lo <= slope / 1000 <= hi:
        cause = "about 1000 times too large: densities given in ug/cm3 instead of mg/cm3?"
    else:
        cause = "no CT calibration line is that far off (wrong unit, or not HU?)"
    raise CalibrationError(
        f"calibration slope {slope:.4g} mg/cm3 per HU is outside the plausible {lo:g}-{hi:g} "
        f"(hydroxyapatite lines are 0.5-1.0): {cause}{points}"
    )


# ------------------------------------------------------------------------------------------------
# Fitting


def fit_line(
    names: Sequence[str], hu: Sequence[float], density_mg_cm3: Sequence[float], min_r: float = MIN_R
) -> tuple[float, float, float]:
    """Least-squares line density = slope * HU + intercept through reference points.

    Returns ``(slope_mg_cm3_per_hu, intercept_mg_cm3, r)``; raises CalibrationError (with the
    numbers) for fewer than 3 points, a non-positive slope or Pearson r below ``min_r``.
    """
    hu_arr, rho = np.asarray(hu, dtype=np.float64), np.asarray(density_mg_cm3, dtype=np.float64)
    table = ", ".join(
        f"{n}: {h:.1f} HU -> {d:g}" for n, h, d in zip(names, hu_arr, rho, strict=True)
    )
    if len(hu_arr) < MIN_POINTS:
        raise CalibrationError(
            f"need at least {MIN_POINTS} reference points to fit a line, "
            f"got {len(hu_arr)} ({table})"
        )
    if np.ptp(hu_arr) == 0 or np.ptp(rho) == 0:
        raise CalibrationError(f"reference points must differ in HU and in density ({table})")
    slope, intercept = np.polyfit(hu_arr, rho, 1)
    r = float(np.corrcoef(hu_arr, rho)[0, 1])
    if slope <= 0:
        raise CalibrationError(
            f"calibration slope is {slope:.4g} mg/cm3 per HU (must be positive): density "
            f"falls as HU rises - are the labels or densities swapped? ({table})"
        )
    if r < min_r:
        raise CalibrationError(f"calibration fit is poor: r = {r:.4f} < {min_r} ({table})")
    _check_slope_plausible(float(slope), table)
    return float(slope), float(intercept), r


def _points(
    names: Sequence[str],
    hu: Sequence[float],
    density: Sequence[float],
    counts: Sequence[tuple[int, int]],
    labels: Sequence[int | None],
    slope: float,
    intercept: float,
) -> tuple[CalibrationPoint, ...]:
    return tuple(
        CalibrationPoint(
            name=n,
            hu=float(h),
            density_mg_cm3=float(d),
            residual_mg_cm3=float(slope * h + intercept - d),
            n_voxels=c[0],
            n_used=c[1],
            label=lab,
        )
        for n, h, d, c, lab in zip(names, hu, density, counts, labels, strict=True)
    )


# ------------------------------------------------------------------------------------------------
# Regions


def region_median_hu(
    hu: np.ndarray, labels: np.ndarray, label: int, erode: bool = True
) -> tuple[float, int, int]:
    """Median HU of the voxels labelled ``label``: ``(median_hu, n_voxels, n_used)``.

    With ``erode`` the region is first eroded by one voxel in every direction (3x3x3), dropping
    the partial-volume rim; a region too small to survive that is used whole. An empty region
    gives ``(nan, 0, 0)``.
    """
    mask = labels == label
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box:
        return math.nan, 0, 0
    sub = mask[box[0]]
    used = sub
    if erode:
        core = ndimage.binary_erosion(sub, structure=np.ones((3, 3, 3), dtype=bool))
        if core.sum() >= MIN_ERODED_VOXELS:
            used = core
    return float(np.median(hu[box[0]][used])), int(sub.sum()), int(used.sum())


def _check_grid(ct: Volume, labels: Volume) -> None:
    if ct.unit != HU:
        raise InputError(f"calibration needs a CT in {HU}, got a volume in {ct.unit!r}")
    if labels.unit != LABEL:
        raise InputError(f"the label map must have unit {LABEL!r}, not {labels.unit!r}")
    if not ct.same_grid(labels):
        raise InputError(
            f"label map grid {labels.shape} does not match the CT grid {ct.shape} "
            "(same shape and affine required)"
        )


# ------------------------------------------------------------------------------------------------
# Phantom calibration


def phantom_calibration(
    ct: Volume, labels: Volume, phantom: Phantom, erode: bool = True, min_r: float = MIN_R
) -> Calibration:
    """Fit HU -> mg/cm3 to the rods of a phantom scanned with the patient.

    Parameters
    ----------
    ct : Volume
        The CT, unit 'HU'.
    labels : Volume
        Label map on the CT grid (unit 'label'); each rod's voxels carry its ``Rod.label``.
    phantom : Phantom
        Rod labels and nominal densities (mg/cm3 hydroxyapatite), e.g. ``load_phantom("bmas200")``.
    erode : bool
        Take each rod's median after a one-voxel erosion (default) to skip its partial-volume rim.
    min_r : float
        Refuse fits whose Pearson r (rod HU vs density) is below this.

    Raises CalibrationError when a rod label is absent from the map, fewer than 3 rods remain,
    the slope is not positive or r < ``min_r``.
    """
    _check_grid(ct, labels)
    measured = {
        rod.label: region_median_hu(ct.data, labels.data, rod.label, erode) for rod in phantom.rods
    }
    missing = [rod for rod in phantom.rods if measured[rod.label][1] == 0]
    if missing:
        present = sorted(int(v) for v in np.unique(labels.data) if v != 0)
        raise CalibrationError(
            "rod label(s) missing from the label map: "
            + ", ".join(
                f"{rod.label} ({_rod_name(rod)}, {rod.density_mg_cm3:g} mg/cm3)" for rod in missing
            )
            + f"; labels present: {present[:20]}"
        )
    names = [_rod_name(rod) for rod in phantom.rods]
    hu = [measured[rod.label][0] for rod in phantom.rods]
    density = [rod.density_mg_cm3 for rod in phantom.rods]
    slope, intercept, r = fit_line(names, hu, density, min_r)
    counts = [measured[rod.label][1:] for rod in phantom.rods]
    notes = [f"rod HU = median of each rod's voxels{' after a one-voxel erosion' if erode else ''}"]
    notes += [
        f"{n}: too small to erode, used whole"
        for n, c in zip(names, counts, strict=True)
        if erode and c[0] == c[1]
    ]
    return Calibration(
        method="phantom",
        slope_mg_cm3_per_hu=slope,
        intercept_mg_cm3=intercept,
        r=r,
        points=_points(
            names, hu, density, counts, [rod.label for rod in phantom.rods], slope, intercept
        ),
        phantom=phantom.name,
        ct_source=ct.source,
        kvp=_kvp_of(ct),
        notes=tuple(notes),
    )


def _rod_name(rod: Rod) -> str:
    return rod.name or f"rod {rod.label}"


def _kvp_of(ct: Volume) -> float | None:
    kvp = ct.meta.get("kvp")
    return float(kvp) if _is_number(kvp) else None


# ------------------------------------------------------------------------------------------------
# Phantom-less (internal) calibration


def reference_tissue_densities(kvp: float) -> dict[str, float]:
    """HA-equivalent density (mg/cm3) of each reference tissue at tube voltage ``kvp``.

    Linear interpolation in :data:`REFERENCE_TISSUES_MG_CM3`; InputError outside 80-140 kVp.
    """
    grid = sorted(REFERENCE_TISSUES_MG_CM3)
    if not (_is_number(kvp) and grid[0] <= kvp <= grid[-1]):
        raise InputError(f"tube voltage must be within {grid[0]}-{grid[-1]} kVp, not {kvp}")
    return {
        t: float(np.interp(kvp, grid, [REFERENCE_TISSUES_MG_CM3[k][t] for k in grid]))
        for t in TISSUES
    }


def parse_tissue_labels(spec: str) -> dict[str, int]:
    """Read ``"air=1,fat=2,muscle=3"`` as ``{"air": 1, "fat": 2, "muscle": 3}`` or InputError."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        name = name.strip().lower()
        if name not in TISSUES or not value.strip().lstrip("-").isdigit():
            raise InputError(
                f"tissue labels must look like air=1,fat=2,muscle=3 with tissues from "
                f"{', '.join(TISSUES)}; cannot read {item!r}"
            )
        out[name] = int(value)
    return out


def phantomless_calibration(
    ct: Volume,
    tissue_map: Volume | None = None,
    tissue_labels: Mapping[str, int] | None = None,
    kvp: float | None = None,
    erode: bool = True,
    min_r: float = MIN_R,
    measured: Mapping[str, tuple[float, int, int]] | None = None,
    extra_notes: Sequence[str] = (),
) -> Calibration:
    """Calibrate a CT scanned without a phantom from its reference tissues.

    Each tissue's median HU is paired with its tabulated hydroxyapatite-equivalent density at the
    scan's tube voltage (:func:`reference_tissue_densities`) and a line is fitted through them.

    Parameters
    ----------
    ct : Volume
        The CT, unit 'HU'.
    tissue_map, tissue_labels : Volume and {tissue: label}, optional
        Regions drawn by the user, e.g. ``{"air": 1, "fat": 2, "muscle": 3}``; tissues from
        ``TISSUES``, at least 3. Without them air, fat and muscle are found automatically
        (:func:`find_reference_tissues`).
    kvp : float, optional
        Tube voltage; default ``ct.meta['kvp']``, else 120 kVp (and a note says so).
    measured : {tissue: (median HU, n_voxels, n_used)}, optional
        Tissues measured elsewhere (e.g. labelled muscle, ``xbmd.ct.contrast``) that replace the
        automatically found ones; only without ``tissue_map``. ``extra_notes`` go to the notes.

    Expected error (simulated scanners, docs/calibration.md): RMS 8 % (95 % of scans within
    18 %) at 150 mg/cm3, 7 % (14 %) at 800 mg/cm3 with the kVp known, mostly from the scan's
    unknown effective energy; about twice that when the kVp is unknown. A phantom does 10x better.
    """
    notes = [PHANTOMLESS_ERROR_NOTE]
    if kvp is None:
        kvp = _kvp_of(ct)
    if kvp is None:
        kvp = DEFAULT_KVP
        notes.append(f"tube voltage unknown, assumed {DEFAULT_KVP:g} kVp")
    reference = reference_tissue_densities(kvp)
    if tissue_map is None:
        if tissue_labels:
            raise InputError("tissue labels were given without a tissue label map")
        found = find_reference_tissues(ct)
        auto = [t for t in found if t not in (measured or {})]
        found.update(measured or {})
        labels: list[int | None] = [None] * len(found)
        notes.append(
            "tissues found automatically: air outside the body, fat and muscle histogram modes"
            if not measured
            else f"found automatically: {', '.join(auto)}"
        )
    else:
        found, labels = _labelled_tissues(ct, tissue_map, tissue_labels or {}, erode)
    notes.extend(extra_notes)
    _check_plausible(found)
    names = list(found)
    hu = [found[t][0] for t in names]
    density = [reference[t] for t in names]
    slope, intercept, r = fit_line(names, hu, density, min_r)
    counts = [found[t][1:] for t in names]
    return Calibration(
        method="phantomless",
        slope_mg_cm3_per_hu=slope,
        intercept_mg_cm3=intercept,
        r=r,
        points=_points(names, hu, density, counts, labels, slope, intercept),
        ct_source=ct.source,
        kvp=float(kvp),
        notes=tuple(notes),
    )


def _labelled_tissues(
    ct: Volume, tissue_map: Volume, tissue_labels: Mapping[str, int], erode: bool
) -> tuple[dict[str, tuple[float, int, int]], list[int | None]]:
    _check_grid(ct, tissue_map)
    unknown = [t for t in tissue_labels if t not in TISSUES]
    if unknown:
        raise InputError(f"unknown tissue(s) {unknown}; valid: {', '.join(TISSUES)}")
    if len(tissue_labels) < MIN_POINTS:
        raise CalibrationError(
            f"need at least {MIN_POINTS} reference tissues (e.g. air=1,fat=2,muscle=3), "
            f"got {dict(tissue_labels)}"
        )
    found = {
        t: region_median_hu(ct.data, tissue_map.data, lab, erode)
        for t, lab in tissue_labels.items()
    }
    missing = [f"{t} (label {tissue_labels[t]})" for t, m in found.items() if m[1] == 0]
    if missing:
        raise CalibrationError(f"tissue label(s) missing from the label map: {', '.join(missing)}")
    return found, list(tissue_labels.values())


def _check_plausible(found: Mapping[str, tuple[float, int, int]]) -> None:
    for tissue, (hu, _, _) in found.items():
        lo, hi = PLAUSIBLE_HU[tissue]
        if not lo <= hu <= hi:
            raise CalibrationError(
                f"{tissue} region has median {hu:.1f} HU, outside the plausible {lo:g} to {hi:g} "
                "HU for that tissue: wrong region or not a CT in HU"
            )


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: largest connected region above -500 HU, holes filled in each axial plane.

    ``hu`` has shape (K, J, I) with K the axial planes. Returns a bool array of the same shape.
    """
    labelled, n = ndimage.label(hu > BODY_THRESHOLD_HU)
    if n == 0:
        raise CalibrationError(f"no body found: no voxel above {BODY_THRESHOLD_HU:g} HU")
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    body = labelled == int(sizes.argmax())
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body


def find_reference_tissues(ct: Volume) -> dict[str, tuple[float, int, int]]:
    """Find air, fat and muscle in a CT without labels: ``{tissue: (hu, n_voxels, n_used)}``.

    - air: median of voxels between -1100 and -900 HU at least 3 voxels (in-plane) outside the
      body, ignoring the volume's minimum value when it is <= -1024 (padding or clipping);
    - fat, muscle: the mode of the histogram (1 HU bins, smoothed 5 HU) of body voxels within
      -200 to -40 HU and -10 to 110 HU; a mode at the window's edge is no peak and is refused.
    """
    hu = ct.data
    body = body_mask(hu)
    near_body = np.stack([ndimage.binary_dilation(b, iterations=AIR_MARGIN_VOXELS) for b in body])
    air = hu[~near_body]
    air = air[(air > -1100) & (air < -900)]
    floor = float(hu.min())
    if floor <= -1024:
        air = air[air != floor]
    if air.size < MIN_TISSUE_VOXELS:
        raise CalibrationError(
            f"too little air around the body ({air.size} voxels between -1100 and -900 HU): "
            "a CT cropped to the body needs tissue labels (--labels with --tissue-labels)"
        )
    found = {"air": (float(np.median(air)), int(air.size), int(air.size))}
    inside = hu[body]
    for tissue, window in (("fat", (-200.0, -40.0)), ("muscle", (-10.0, 110.0))):
        found[tissue] = _histogram_mode(inside, window, tissue)
    return found


def _histogram_mode(
    values: np.ndarray, window: tuple[float, float], tissue: str
) -> tuple[float, int, int]:
    lo, hi = window
    counts, _ = np.histogram(values, bins=int(hi - lo), range=(lo, hi))
    smooth = ndimage.gaussian_filter1d(counts.astype(np.float64), 5.0, mode="constant")
    i = int(smooth.argmax())
    if smooth[i] == 0 or i < 5 or i > len(smooth) - 6:
        raise CalibrationError(
            f"no {tissue} peak between {lo:g} and {hi:g} HU inside the body: "
            "give tissue labels (--labels with --tissue-labels) instead"
        )
    # Parabola through the peak bin and its neighbours for a sub-HU position.
    a, b, c = smooth[i - 1 : i + 2]
    offset = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c != 0 else 0.0
    mode_hu = lo + i + 0.5 + offset
    n = int(np.count_nonzero(np.abs(values - mode_hu) <= MODE_HALF_WIDTH_HU))
    if n < MIN_TISSUE_VOXELS:
        raise CalibrationError(f"too few {tissue} voxels near its peak at {mode_hu:.0f} HU ({n})")
    return float(mode_hu), n, n
