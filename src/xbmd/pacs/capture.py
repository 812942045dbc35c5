"""The Secondary Capture of xbmd's overlay: an RGB image in the source's study (highdicom).

The pixels are ``render.render_overlay``: the radiograph, the virtual X-ray over each hip, the
numbers and the burned-in banner "RESEARCH USE ONLY - NOT FOR DIAGNOSIS" (Burned In Annotation
YES). Derived, secondary; the series description and image comments say research use only.
"""

from __future__ import annotations

import warnings

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from xbmd import __version__
from xbmd.pacs.codes import RESEARCH_USE_ONLY

SC_SERIES_NUMBER = 9902
#: highdicom's warning about single-component patient names ("Anonymous"): the source's, not ours
_NAME_WARNING = ".*unlikely to represent the intended person name.*"
SERIES_DESCRIPTION = "xbmd BMD overlay - RESEARCH USE ONLY"
IMAGE_COMMENTS = (
    "xbmd estimate of hip BMD from a plain radiograph (not DXA). Preliminary, unverified. "
    + RESEARCH_USE_ONLY
    + "."
)


def build_sc(source: Dataset, rgb: np.ndarray, series_uid: str, sop_uid: str):
    """A ``highdicom.sc.SCImage`` (RGB, 8 bit) of ``rgb`` in the source's study."""
    import highdicom as hd

    warnings.filterwarnings("ignore", message=_NAME_WARNING, category=UserWarning)
    orientation = source.get("PatientOrientation")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="xbmd",
        patient_orientation=tuple(orientation) if orientation and len(orientation) == 2 else None,
        series_description=SERIES_DESCRIPTION,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.ImageType = ["DERIVED", "SECONDARY"]
    # General Series Laterality is R or L only and type 2C: empty, the overlay shows both hips
    sc.Laterality = ""
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = IMAGE_COMMENTS
    sc.SoftwareVersions = __version__
    sc.DerivationDescription = "xbmd overlay of the estimated virtual X-ray on the radiograph"
    return sc
