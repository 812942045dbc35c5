"""Plain X-ray I/O: the DICOM grayscale pipeline, spacing provenance, formats, refusals, DX writer.

Reader tests build their DICOM files by hand (not with ``write_xray_dicom``) so that a mistake
shared by the reader and the writer cannot cancel out.

The DX writer is checked against the DICOM standard by ``dx_conformance_problems`` below, not by
the ``dicom-validator`` package: that package downloads the standard's DocBook files from the
DICOM website at run time and has no bundled copy, and this project's machines reach no website.
The check instead reads the machine-readable PS3.3 tables (IOD -> modules -> attributes with their
types) shipped inside the ``highdicom`` package, and adds the conditions (1C/2C) and enumerated
values of the DX modules by hand.
"""

from __future__ import annotations

import functools
import io
import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from xbmd.display import to_display_uint8
from xbmd.errors import InputError
from xbmd.io.xray import (
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    WARN_FOR_PRESENTATION,
    WARN_LOSSY,
    WARN_NO_SPACING,
    XRay,
    parse_patient_age,
    read_xray,
)
from xbmd.io.xray_write import format_patient_age, write_xray_dicom, write_xray_png

ROWS, COLS = 64, 80
MAX12 = 2**12 - 1


def phantom(max_value: int = MAX12) -> np.ndarray:
    """A 64 x 80 bone-bright image: a soft-tissue gradient with a dense 'bone' block."""
    rows, cols = np.mgrid[0:ROWS, 0:COLS]
    img = 0.15 * max_value + 0.35 * max_value * cols / (COLS - 1) + 0.05 * max_value * rows / ROWS
    img[20:44, 30:50] += 0.4 * max_value
    return np.rint(np.clip(img, 0, max_value)).astype(np.uint16)


BONE = (slice(20, 44), slice(30, 50))
BACKGROUND = (slice(0, 10), slice(30, 50))


def save_dicom(
    path: Path, stored: np.ndarray, *, modality: str = "DX", bits_stored: int = 12, **attrs
) -> Path:
    """A minimal single-frame grayscale DICOM file, attributes given by keyword."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_FOR_PRESENTATION if modality == "DX" else "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def lut_sequence(table: np.ndarray) -> Sequence:
    """A one-item LUT sequence mapping stored values 0.. to ``table`` (16-bit entries)."""
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(table), 0, 16])
    item.add_new("LUTData", "US", [int(v) for v in table])
    return Sequence([item])


def linear_window(x: np.ndarray, center: float, width: float, y_min: float, y_max: float):
    """PS3.3 C.11.2.1.2.1, written out independently of pydicom."""
    x = np.asarray(x, dtype=np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * (y_max - y_min) + y_min
    y = np.where(x <= center - 0.5 - (width - 1) / 2, y_min, y)
    return np.where(x > center - 0.5 + (width - 1) / 2, y_max, y)


# ---- the grayscale pipeline


@pytest.mark.parametrize("window", [None, (1800.0, 2400.0)])
def test_monochrome1_is_inverted_exactly_once(tmp_path, window):
    bright = phantom()
    mono2_attrs, mono1_attrs = {}, {"PresentationLUTShape": "INVERSE"}
    if window is not None:
        center, width = window
        mono2_attrs.update(WindowCenter=center, WindowWidth=width)
        # the same window mirrored onto the inverted stored values
        mono1_attrs.update(WindowCenter=MAX12 - center + 1, WindowWidth=width)
    m2 = save_dicom(tmp_path / "m2.dcm", bright, **mono2_attrs)
    m1 = save_dicom(
        tmp_path / "m1.dcm", MAX12 - bright, PhotometricInterpretation="MONOCHROME1", **mono1_attrs
    )
    x2, x1 = read_xray(m2), read_xray(m1)
    assert x1.pixels.dtype == np.float32
    np.testing.assert_array_equal(x1.pixels, x2.pixels)
    assert x1.pixels[BONE].mean() > x1.pixels[BACKGROUND].mean() + 500  # bone stays bright
    assert x1.meta["inverted"] and not x2.meta["inverted"]
    if window is None:
        np.testing.assert_array_equal(x2.pixels, bright)


def test_unused_high_bits_are_masked(tmp_path):
    stored = phantom()
    garbage = stored | np.uint16(0xF000)  # overlay-style junk above BitsStored=12
    xray = read_xray(save_dicom(tmp_path / "junk.dcm", garbage, bits_stored=12))
    np.testing.assert_array_equal(xray.pixels, stored)
    assert xray.meta["bits_stored"] == 12


def test_rescale_slope_and_intercept_applied(tmp_path):
    stored = phantom()
    path = save_dicom(
        tmp_path / "cr.dcm", stored, modality="CR", RescaleSlope="0.5", RescaleIntercept="-100"
    )
    xray = read_xray(path)
    np.testing.assert_allclose(xray.pixels, 0.5 * stored.astype(np.float64) - 100, atol=1e-4)
    assert xray.meta["rescale"] == (0.5, -100.0)
    assert xray.meta["modality"] == "CR"


def test_modality_lut_sequence_applied(tmp_path):
    stored = phantom()
    table = (np.arange(MAX12 + 1) ** 2 // (MAX12 + 1)).astype(np.uint16)
    path = save_dicom(tmp_path / "lut.dcm", stored, ModalityLUTSequence=lut_sequence(table))
    xray = read_xray(path)
    np.testing.assert_array_equal(xray.pixels, table[stored])
    assert xray.meta["modality_lut"] == "lut"


def test_voi_window_applied_without_8bit_quantisation(tmp_path):
    stored = phantom()
    path = save_dicom(tmp_path / "w.dcm", stored, WindowCenter="1500", WindowWidth="1200")
    xray = read_xray(path)
    expected = linear_window(stored, 1500, 1200, 0, MAX12)
    np.testing.assert_allclose(xray.pixels, expected, rtol=1e-6, atol=1e-3)
    inside = (stored > 1000) & (stored < 2000)
    assert len(np.unique(xray.pixels[inside])) > 256  # an 8-bit pipeline would have <= 256
    assert xray.meta["voi"] == "window" and xray.meta["window"] == (1500.0, 1200.0)
    raw = read_xray(path, apply_voi=False)
    np.testing.assert_array_equal(raw.pixels, stored)


def test_voi_lut_sequence_applied(tmp_path):
    stored = phantom()
    table = (np.sqrt(np.arange(MAX12 + 1) / MAX12) * 65535).astype(np.uint16)
    path = save_dicom(tmp_path / "voi.dcm", stored, VOILUTSequence=lut_sequence(table))
    xray = read_xray(path)
    np.testing.assert_array_equal(xray.pixels, table[stored].astype(np.float32))
    assert xray.meta["voi"] == "lut"


# ---- spacing provenance


@pytest.mark.parametrize(
    ("attrs", "source", "spacing"),
    [
        ({"ImagerPixelSpacing": [0.15, 0.16]}, "ImagerPixelSpacing", (0.15, 0.16)),
        ({"PixelSpacing": [0.12, 0.13]}, "PixelSpacing", (0.12, 0.13)),
        (
            {"ImagerPixelSpacing": [0.15, 0.15], "PixelSpacing": [0.12, 0.12]},
            "ImagerPixelSpacing",
            (0.15, 0.15),
        ),
        ({}, "none", None),
    ],
)
def test_spacing_source_recorded(tmp_path, attrs, source, spacing):
    xray = read_xray(save_dicom(tmp_path / "s.dcm", phantom(), **attrs))
    assert xray.spacing_source == source
    assert xray.pixel_spacing_mm == spacing
    assert (WARN_NO_SPACING in xray.warnings) == (spacing is None)


@pytest.mark.parametrize(("user", "expected"), [(0.2, (0.2, 0.2)), ((0.1, 0.3), (0.1, 0.3))])
def test_user_spacing_overrides_file(tmp_path, user, expected):
    path = save_dicom(tmp_path / "s.dcm", phantom(), ImagerPixelSpacing=[0.15, 0.15])
    xray = read_xray(path, pixel_spacing_mm=user)
    assert xray.spacing_source == "user"
    assert xray.pixel_spacing_mm == expected
    assert xray.meta["file_spacing_mm"] == (0.15, 0.15)
    assert WARN_NO_SPACING not in xray.warnings


@pytest.mark.parametrize("bad", [0, -0.1, (0.1,), (0.1, float("nan")), "wide"])
def test_invalid_user_spacing_refused(tmp_path, bad):
    path = save_dicom(tmp_path / "s.dcm", phantom())
    with pytest.raises(InputError, match="pixel_spacing_mm"):
        read_xray(path, pixel_spacing_mm=bad)


def test_png_user_spacing_and_missing_spacing_warning(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(phantom(65535)).save(path)
    assert WARN_NO_SPACING in read_xray(path).warnings
    xray = read_xray(path, pixel_spacing_mm=0.2)
    assert xray.pixel_spacing_mm == (0.2, 0.2) and xray.spacing_source == "user"


# ---- compressed transfer syntaxes (decoded by the pylibjpeg / pyjpegls plugins)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_lossless_compressed_round_trip(tmp_path, syntax):
    plain = tmp_path / "plain.dcm"
    write_xray_dicom(phantom(), plain, pixel_spacing_mm=0.2, bits_stored=12)
    ds = pydicom.dcmread(plain)
    ds.compress(syntax)
    packed = tmp_path / "packed.dcm"
    ds.save_as(packed, enforce_file_format=True)
    xray = read_xray(packed)
    assert xray.meta["transfer_syntax"] == syntax
    np.testing.assert_array_equal(xray.pixels, phantom())
    assert WARN_LOSSY not in xray.warnings


def test_jpeg_baseline_dicom_decodes(tmp_path):
    img8 = (phantom() >> 4).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(img8).save(buffer, format="JPEG", quality=90)
    path = save_dicom(tmp_path / "j.dcm", img8.astype(np.uint16), bits_stored=8)
    ds = pydicom.dcmread(path)
    ds.BitsAllocated = 8
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    xray = read_xray(path)
    pillow_decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32)
    assert np.abs(xray.pixels - pillow_decoded).max() <= 2  # IDCTs may differ by a unit
    assert np.abs(xray.pixels - img8).mean() < 2
    assert WARN_LOSSY in xray.warnings


# ---- raster formats


def test_png_16bit_and_8bit_read_to_float32(tmp_path):
    img16 = phantom(65535)
    Image.fromarray(img16).save(tmp_path / "a.png")
    Image.fromarray((img16 >> 8).astype(np.uint8)).save(tmp_path / "b.png")
    x16, x8 = read_xray(tmp_path / "a.png"), read_xray(tmp_path / "b.png")
    assert x16.pixels.dtype == np.float32 and x8.pixels.dtype == np.float32
    np.testing.assert_array_equal(x16.pixels, img16)
    np.testing.assert_array_equal(x8.pixels, img16 >> 8)
    assert x16.meta["format"] == "png" and x16.spacing_source == "none"


def test_png_gray_rgb_accepted_colour_refused(tmp_path):
    gray = (phantom(255)).astype(np.uint8)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(read_xray(tmp_path / "grey_rgb.png").pixels, gray)
    colour = np.stack([gray, gray // 2, gray], axis=-1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(InputError, match="colour"):
        read_xray(tmp_path / "colour.png")


def test_tiff_uint16_float32_and_miniswhite(tmp_path):
    img = phantom(65535)
    tifffile.imwrite(tmp_path / "a.tif", img)
    tifffile.imwrite(tmp_path / "f.tiff", img.astype(np.float32) / 1000)
    tifffile.imwrite(tmp_path / "w.tif", 65535 - img, photometric="miniswhite")
    np.testing.assert_array_equal(read_xray(tmp_path / "a.tif").pixels, img)
    np.testing.assert_allclose(read_xray(tmp_path / "f.tiff").pixels, img / 1000, rtol=1e-6)
    white = read_xray(tmp_path / "w.tif")
    np.testing.assert_array_equal(white.pixels, img)  # MINISWHITE inverted, like MONOCHROME1


def test_jpeg_reads_to_float32(tmp_path):
    img8 = phantom(255).astype(np.uint8)
    Image.fromarray(img8).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(img8).convert("RGB").save(tmp_path / "rgb.jpg", quality=95)
    for name in ("a.jpg", "rgb.jpg"):
        xray = read_xray(tmp_path / name)
        assert xray.pixels.dtype == np.float32 and xray.pixels.shape == (ROWS, COLS)
        assert np.abs(xray.pixels - img8).mean() < 2
        assert WARN_LOSSY in xray.warnings


# ---- refusals


def test_ct_refused_naming_modality(tmp_path):
    path = save_dicom(tmp_path / "ct.dcm", phantom(), modality="CT")
    with pytest.raises(InputError, match=r"ct\.dcm.*modality 'CT'.*accepted: DX, CR"):
        read_xray(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.3])
def test_truncated_dicom_refused_naming_file(tmp_path, keep):
    whole = save_dicom(tmp_path / "whole.dcm", phantom())
    data = whole.read_bytes()
    cut = tmp_path / "cut_file.dcm"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match=r"cut_file\.dcm"):
        read_xray(cut)


def test_multiframe_and_colour_dicom_refused(tmp_path):
    two = np.concatenate([phantom(), phantom()])
    path = save_dicom(tmp_path / "mf.dcm", two, NumberOfFrames=2)
    ds = pydicom.dcmread(path)
    ds.Rows = ROWS
    ds.save_as(path)
    with pytest.raises(InputError, match="multi-frame"):
        read_xray(path)
    rgb = save_dicom(tmp_path / "rgb.dcm", phantom(), PhotometricInterpretation="RGB")
    with pytest.raises(InputError, match="colour DICOM"):
        read_xray(rgb)


def test_missing_and_unknown_files_refused(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_xray(tmp_path / "absent.dcm")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="unrecognised image format"):
        read_xray(tmp_path / "notes.txt")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(InputError, match=r"junk\.png"):
        read_xray(tmp_path / "junk.png")


# ---- metadata


@pytest.mark.parametrize(
    ("text", "years"),
    [("067Y", 67.0), ("006M", 0.5), ("052W", 52 * 7 / 365.25), ("010D", 10 / 365.25), ("67", 67)],
)
def test_patient_age_parsed(text, years):
    assert parse_patient_age(text) == pytest.approx(years)


@pytest.mark.parametrize("text", [None, "", "Y067", "sixty"])
def test_malformed_patient_age_is_none(text):
    assert parse_patient_age(text) is None


def test_patient_age_format_round_trip():
    assert format_patient_age(67.9) == "067Y"
    assert format_patient_age(0.5) == "006M"
    assert parse_patient_age(format_patient_age(80.2)) == 80


def test_xray_rejects_inconsistent_spacing():
    with pytest.raises(ValueError, match="spacing_source"):
        XRay(np.zeros((4, 4)), None, "bogus")
    with pytest.raises(ValueError, match="exactly when"):
        XRay(np.zeros((4, 4)), (0.1, 0.1), "none")


# ---- the DX writer


@functools.cache
def _standard_tables() -> tuple[list, dict]:
    """PS3.3 IOD and module tables as shipped in highdicom (generated from the standard)."""
    folder = files("highdicom") / "_standard"
    sop_to_iod = json.loads((folder / "sop_class_iod_map.json").read_text())
    iod_modules = json.loads((folder / "iod_module_map.json").read_text())
    module_attributes = json.loads((folder / "module_attribute_map.json").read_text())
    iod = sop_to_iod[DX_FOR_PRESENTATION]
    assert iod == sop_to_iod[DX_FOR_PROCESSING] == "digital-x-ray-image"
    return iod_modules[iod], module_attributes


KNOWN_KEYWORDS = frozenset(pydicom.datadict.keyword_dict)


def _items_at(ds: Dataset, path: list[str]) -> list[Dataset]:
    """The datasets an attribute at ``path`` (sequence keywords) must live in."""
    items = [ds]
    for keyword in path:
        items = [child for item in items for child in item.get(keyword, None) or []]
    return items


def _is_empty(value) -> bool:
    return value is None or (hasattr(value, "__len__") and len(value) == 0)


def _required_attribute_problems(ds: Dataset) -> list[str]:
    """Type 1 and 2 attributes of every mandatory (and every present optional) DX module."""
    modules, module_attributes = _standard_tables()
    problems = []
    for module in modules:
        attributes = module_attributes[module["key"]]
        top_level = {a["keyword"] for a in attributes if not a["path"]} & KNOWN_KEYWORDS
        if module["usage"] != "M" and not any(k in ds for k in top_level):
            continue  # optional / conditional module not present; conditions checked by hand
        for attribute in attributes:
            if attribute["type"] not in ("1", "2"):
                continue
            keyword = attribute["keyword"]
            if keyword not in KNOWN_KEYWORDS:  # repeating groups (overlays, curves): not used
                continue
            for item in _items_at(ds, attribute["path"]):
                where = ">".join([*attribute["path"], keyword])
                if keyword not in item:
                    problems.append(f"{module['key']}: Type {attribute['type']} {where} missing")
                elif attribute["type"] == "1" and _is_empty(item[keyword].value):
                    problems.append(f"{module['key']}: Type 1 {where} empty")
    return problems


def _dx_condition_and_value_problems(ds: Dataset) -> list[str]:
    """1C/2C conditions and enumerated values of the DX modules (PS3.3 C.8.11), by hand."""
    problems = []

    def expect(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    intent = {DX_FOR_PRESENTATION: "FOR PRESENTATION", DX_FOR_PROCESSING: "FOR PROCESSING"}
    expect(ds.SOPClassUID in intent, f"SOP Class {ds.SOPClassUID} is not DX")
    expect(ds.get("PresentationIntentType") == intent.get(ds.SOPClassUID), "intent/SOP class")
    expect(ds.Modality == "DX", "Modality must be DX")
    expect(ds.SamplesPerPixel == 1, "SamplesPerPixel must be 1")
    photometric = ds.PhotometricInterpretation
    expect(photometric in ("MONOCHROME1", "MONOCHROME2"), "PhotometricInterpretation")
    expect(ds.BitsAllocated in (8, 16), "BitsAllocated must be 8 or 16")
    expect(6 <= ds.BitsStored <= 16, "BitsStored must be 6 to 16")
    expect(ds.HighBit == ds.BitsStored - 1, "HighBit must be BitsStored - 1")
    expect(ds.PixelRepresentation == 0, "PixelRepresentation must be 0")
    expect(ds.PixelIntensityRelationship in ("LIN", "LOG"), "PixelIntensityRelationship")
    expect(ds.PixelIntensityRelationshipSign in (1, -1), "PixelIntensityRelationshipSign")
    expect(float(ds.RescaleIntercept) == 0, "RescaleIntercept must be 0 in DX")
    expect(float(ds.RescaleSlope) == 1, "RescaleSlope must be 1 in DX")
    expect(ds.RescaleType == "US", "RescaleType must be US")
    shape = {"MONOCHROME1": "INVERSE", "MONOCHROME2": "IDENTITY"}.get(photometric)
    expect(ds.PresentationLUTShape == shape, "PresentationLUTShape must match photometric")
    image_type = [*ds.ImageType, "", ""]
    expect(image_type[0] in ("ORIGINAL", "DERIVED"), "ImageType value 1")
    expect(image_type[1] in ("PRIMARY", "SECONDARY"), "ImageType value 2")
    expect(ds.LossyImageCompression in ("00", "01"), "LossyImageCompression")
    expect(ds.LossyImageCompression == "00" or "LossyImageCompressionRatio" in ds, "ratio 1C")
    expect(ds.BurnedInAnnotation in ("YES", "NO"), "BurnedInAnnotation")
    expect(ds.ImageLaterality in ("R", "L", "U", "B"), "ImageLaterality")
    expect(ds.PatientSex in ("M", "F", "O", ""), "PatientSex")
    expect("PatientOrientation" in ds and len(ds.PatientOrientation) == 2, "PatientOrientation")
    if ds.PresentationIntentType == "FOR PRESENTATION" and "VOILUTSequence" not in ds:
        expect("WindowCenter" in ds and "WindowWidth" in ds, "window 1C for presentation")
    if "WindowCenter" in ds:
        expect(float(ds.WindowWidth) >= 1, "WindowWidth must be >= 1")
    expect(len(ds.get("ImagerPixelSpacing") or []) == 2, "ImagerPixelSpacing VM 2")
    expect(len(ds.PixelData) == ds.Rows * ds.Columns * ds.BitsAllocated // 8, "PixelData size")
    meta = ds.file_meta
    expect(meta.MediaStorageSOPClassUID == ds.SOPClassUID, "meta SOP class")
    expect(meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID, "meta SOP instance")
    for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
        expect(uid.is_valid, f"invalid UID {uid}")
    return problems


def dx_conformance_problems(path: Path) -> list[str]:
    """Everything wrong with a DX file that this check can see; [] when it conforms."""
    with pydicom.config.strict_reading():  # every value must fit its VR
        ds = pydicom.dcmread(path)
        [element.value for element in ds.iterall()]
    return _required_attribute_problems(ds) + _dx_condition_and_value_problems(ds)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("for_presentation", [True, False])
@pytest.mark.parametrize("bits_stored", [12, 16])
def test_dx_writer_conforms_and_rereads_identically(
    tmp_path, photometric, for_presentation, bits_stored
):
    img = phantom(2**bits_stored - 1)
    path = tmp_path / "dx.dcm"
    write_xray_dicom(
        img,
        path,
        pixel_spacing_mm=(0.143, 0.15),
        photometric=photometric,
        sdd_mm=1150,
        sod_mm=950,
        patient_age_years=71.6,
        patient_sex="F",
        laterality="R",
        body_part="HIP",
        for_presentation=for_presentation,
        bits_stored=bits_stored,
    )
    assert dx_conformance_problems(path) == []
    xray = read_xray(path)
    np.testing.assert_array_equal(xray.pixels, img)
    assert xray.pixel_spacing_mm == (0.143, 0.15)
    assert xray.spacing_source == "ImagerPixelSpacing"
    meta = xray.meta
    assert (meta["sdd_mm"], meta["sod_mm"]) == (1150.0, 950.0)
    assert meta["magnification_factor"] == pytest.approx(1150 / 950, rel=1e-5)
    assert (meta["patient_age_years"], meta["patient_sex"]) == (71.0, "F")
    assert (meta["view_position"], meta["laterality"]) == ("AP", "R")
    assert meta["bits_stored"] == bits_stored and meta["photometric"] == photometric
    assert (WARN_FOR_PRESENTATION in xray.warnings) == for_presentation
    expected_class = DX_FOR_PRESENTATION if for_presentation else DX_FOR_PROCESSING
    assert meta["sop_class_uid"] == expected_class


def test_dx_writer_window_is_applied_by_the_reader(tmp_path):
    img = phantom()
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        path = tmp_path / f"{photometric}.dcm"
        write_xray_dicom(
            img, path, pixel_spacing_mm=0.2, bits_stored=12, photometric=photometric,
            window=(1500, 1200),
        )  # fmt: skip
        assert dx_conformance_problems(path) == []
        expected = linear_window(img, 1500, 1200, 0, MAX12)
        np.testing.assert_allclose(read_xray(path).pixels, expected, atol=1e-3)


def test_conformance_check_catches_broken_files(tmp_path):
    path = tmp_path / "dx.dcm"
    write_xray_dicom(phantom(), path, pixel_spacing_mm=0.2, bits_stored=12)
    ds = pydicom.dcmread(path)
    del ds.ImagerPixelSpacing  # Type 1, DX Detector
    del ds.PatientID  # Type 2, Patient
    ds.RescaleIntercept = "5"  # DX enumerates 0
    del ds.WindowCenter  # 1C for presentation
    ds.save_as(path)
    problems = "\n".join(dx_conformance_problems(path))
    for expected in ("ImagerPixelSpacing", "PatientID", "RescaleIntercept", "window 1C"):
        assert expected in problems


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits_stored": 12, "image": phantom(65535)}, r"\[0, 4095\]"),
        ({"photometric": "RGB"}, "photometric"),
        ({"laterality": "X"}, "laterality"),
        ({"pixel_spacing_mm": -1}, "pixel_spacing_mm"),
        ({"sdd_mm": 900, "sod_mm": 1000}, "sod_mm"),
        ({"extra": {"NotAKeyword": 1}}, "NotAKeyword"),
        ({"image": phantom().astype(np.float32) + 0.5}, "integers"),
    ],
)
def test_dx_writer_refuses_bad_arguments(tmp_path, kwargs, match):
    image = kwargs.pop("image", phantom())
    kwargs.setdefault("pixel_spacing_mm", 0.2)
    with pytest.raises(InputError, match=match):
        write_xray_dicom(image, tmp_path / "x.dcm", **kwargs)


def test_dx_writer_extra_attributes(tmp_path):
    study = generate_uid()
    path = tmp_path / "x.dcm"
    write_xray_dicom(phantom(), path, pixel_spacing_mm=0.2, extra={"StudyInstanceUID": study})
    assert pydicom.dcmread(path).StudyInstanceUID == study


# ---- PNG writer and previews


def test_write_png_integer_unchanged_float_rescaled(tmp_path):
    img = phantom(65535)
    assert write_xray_png(img, tmp_path / "a.png") == (0.0, 65535.0)
    np.testing.assert_array_equal(read_xray(tmp_path / "a.png").pixels, img)
    values = img.astype(np.float32) / 100 - 50
    low, high = write_xray_png(values, tmp_path / "f.png", bits=16)
    back = low + read_xray(tmp_path / "f.png").pixels / 65535 * (high - low)
    np.testing.assert_allclose(back, values, atol=(high - low) / 65535)
    write_xray_png(values, tmp_path / "b.png", bits=8)
    assert np.asarray(Image.open(tmp_path / "b.png")).dtype == np.uint8


def test_to_display_uint8():
    values = np.linspace(-1000, 3000, ROWS * COLS).reshape(ROWS, COLS)
    values[0, 0] = np.nan
    preview = to_display_uint8(values)
    assert preview.dtype == np.uint8 and preview.shape == values.shape
    assert preview[0, 0] == 0 and preview.min() == 0 and preview.max() == 255
    assert np.all(np.diff(preview.ravel()[1:].astype(int)) >= 0)  # monotone in the values
    assert not to_display_uint8(np.full((4, 4), 7.0)).any()
