"""The TID 1500 measurement report (Comprehensive SR) of one radiograph's xbmd results.

Content tree (docs/pacs.md shows it in full)::

    Imaging Measurement Report (TID 1500), language, observer = device "xbmd" (model identity)
      Procedure reported: Plain radiography (SCT 168537006)
      Image Library: the source radiograph
      Imaging Measurements
        Measurement Group, one per hip (TID 1501)
          Tracking identifier "right hip" / "left hip", tracking UID
          Finding type: 99XBMD hip_bmd_estimate
          Method: 99XBMD xbmd_method (a plain-radiograph estimate, not DXA)
          Algorithm: xbmd, version "<xbmd version> model <model identity>"
          Finding site: Hip joint (SCT 24136001), laterality Right/Left
          Source image: the radiograph
          NUM 99XBMD bmd_g_cm2 [g/cm2], t_score [1], z_score [1], ... (codes.measurement_items)
          CODE 99XBMD confident = Yes/No, who_category = ..., ... (codes.qualitative_items)
          TEXT 99XBMD reference, warning (one each), intended_use

Flags: Completion COMPLETE, Preliminary PRELIMINARY, Verification UNVERIFIED. Series
Description says research use only.
"""

from __future__ import annotations

import warnings

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from xbmd import __version__
from xbmd.pacs import codes
from xbmd.pacs.uids import derived_uid

SR_SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "xbmd BMD estimate - RESEARCH USE ONLY"
MANUFACTURER = "xbmd"
MEASUREMENT_GROUP = ("125007", "DCM")
TRACKING_IDENTIFIER = ("112039", "DCM")


def scheme_identification() -> Dataset:
    """Coding Scheme Identification item declaring the private scheme (SOP Common module)."""
    item = Dataset()
    item.CodingSchemeDesignator = codes.SCHEME
    item.CodingSchemeName = codes.SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = codes.SCHEME_RESPONSIBLE
    return item


def _reference_text(reference: dict) -> str:
    if not reference:
        return "none"
    return (
        f"{reference.get('name')}: {reference.get('population')}, {reference.get('site')}, "
        f"mean {reference.get('mean_g_cm2')} SD {reference.get('sd_g_cm2')} g/cm2 "
        f"({reference.get('status')}; {reference.get('source')})"
    )[:1024]


def _group(source: Dataset, result: dict, model_id: str, sop_uid: str):
    import highdicom as hd

    side = result["side"]
    measurements = [
        hd.sr.Measurement(name=codes.concept(key), value=value, unit=unit)
        for key, value, unit in codes.measurement_items(result)
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(name=name, value=value)
        for name, value in codes.qualitative_items(result)
    ]
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid("xbmd-tracking", sop_uid, side, model_id),
        identifier=f"{side} hip",
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=codes.FINDING_TYPE,
        method=codes.METHOD,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name="xbmd", version=f"{result.get('xbmd_version') or __version__} model {model_id}"
        ),
        finding_sites=[hd.sr.FindingSite(codes.HIP_JOINT, laterality=codes.LATERALITY[side])],
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)
        ],
    )
    texts = [(codes.REFERENCE, _reference_text(result.get("reference") or {}))]
    texts += [(codes.WARNING, str(w)[:1024]) for w in result.get("warnings") or []]
    texts.append((codes.INTENDED_USE, codes.RESEARCH_USE_ONLY))
    for name, value in texts:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(name=name, value=value, relationship_type="CONTAINS")
        )
    return group


def build_sr(
    source: Dataset,
    results: list[dict],
    model_id: str,
    series_uid: str,
    sop_uid: str,
):
    """A ``highdicom.sr.ComprehensiveSR`` in the source's study.

    Parameters
    ----------
    source : the radiograph's header (pixel data not needed).
    results : ``HipResult.to_dict()`` of each hip of it.
    model_id : ``uids.model_identity`` of the model.
    series_uid, sop_uid : the report's (``uids.output_uids``).
    """
    import highdicom as hd

    from xbmd.pacs.capture import _NAME_WARNING

    warnings.filterwarnings("ignore", message=_NAME_WARNING, category=UserWarning)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("xbmd-device", model_id),
        name="xbmd",
        manufacturer_name=MANUFACTURER,
        model_name=model_id[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
            observer_identifying_attributes=device,
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.PLAIN_RADIOGRAPHY,
        imaging_measurements=[_group(source, r, model_id, source.SOPInstanceUID) for r in results],
        referenced_images=[source],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
    )
    sr.SoftwareVersions = __version__
    sr.CodingSchemeIdentificationSequence = DicomSequence([scheme_identification()])
    return sr


# ------------------------------------------------------------------------------------------------
# Reading back


def _code(item: Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    value = name.get("CodeValue") or name.get("LongCodeValue") or name.get("URNCodeValue")
    return str(value), str(name.CodingSchemeDesignator)


def _value_code(item: Dataset) -> tuple[str, str]:
    code = item.ConceptCodeSequence[0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue")
    return str(value), str(code.CodingSchemeDesignator)


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def read_sr(ds: Dataset) -> list[dict]:
    """Per hip, the values of an xbmd SR keyed as in ``result.json``: ``side``, every NUM of the
    private scheme (``bmd_g_cm2``, ``t_score``, ...; intervals as ``<key>_lower/_upper``), the
    yes/no items as booleans, ``who_category``, ``reference`` (text), ``warnings`` (list),
    ``units`` ({key: UCUM code}) and ``source_sop_instance_uid``."""
    who = {v.value: k for k, v in codes.WHO_CATEGORIES.items()}
    hips = []
    for group in _walk(ds.ContentSequence):
        if group.ValueType != "CONTAINER" or _code(group) != MEASUREMENT_GROUP:
            continue
        hip: dict = {"warnings": [], "units": {}}
        for item in group.ContentSequence:
            key, scheme = _code(item)
            if item.ValueType == "TEXT" and key == TRACKING_IDENTIFIER[0]:
                hip["side"] = str(item.TextValue).split()[0]
            elif item.ValueType == "IMAGE":
                hip["source_sop_instance_uid"] = str(
                    item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                )
            elif scheme != codes.SCHEME:
                continue
            elif item.ValueType == "NUM":
                measured = item.MeasuredValueSequence[0]
                hip[key] = float(measured.NumericValue)
                hip["units"][key] = str(measured.MeasurementUnitsCodeSequence[0].CodeValue)
            elif item.ValueType == "CODE":
                value, _ = _value_code(item)
                if key == codes.WHO_CATEGORY.value:
                    hip[key] = who.get(value, value)
                else:
                    hip[key] = value == codes.YES.value
            elif item.ValueType == "TEXT":
                if key == codes.WARNING.value:
                    hip["warnings"].append(str(item.TextValue))
                else:
                    hip[key] = str(item.TextValue)
        hips.append(hip)
    return hips
