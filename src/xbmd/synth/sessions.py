"""A virtual patient's radiographs, visit by visit (``xbmd synth --sessions S``).

A **session** is one visit: one radiography system (an :class:`~xbmd.synth.device.XrayDevice`:
kVp, detector, grid, exposure control and processing chain, all its drawn settings) and
``poses`` radiographs that differ only in the patient's positioning (the first a
well-positioned standard AP), as in the published multi-pose protocol; sessions differ in
device (a new draw). The radiographs of a session share a DICOM StudyInstanceUID, Study Date,
Study ID and Accession Number; each has its own SeriesInstanceUID and SOP Instance UID, and
Series Number = its pose in the session.

``sessions = 0`` (the default) keeps the layout of cohorts made before sessions existed: every
radiograph has its own device, drawn from the patient's main random stream in the same order as
then, so such cohorts are byte-identical to earlier ones (each radiograph is then a session of
one, with its own study). With ``sessions >= 1`` every draw has its own child stream of the
patient's seed: a session's device ``[seed, DEVICE_STREAM, session]``, a radiograph's geometry,
pose, collimation, marker and noise ``[seed, XRAY_STREAM, session, pose]``; so a cohort with
more sessions or poses holds the same first ones, and an implant (whose metal changes how many
draws the quantum noise takes) changes nothing else.

Which families a device may come from (``device_families``) and whether its processing is the
family's or a randomised graph (``processing``: 'fixed', 'random', 'mixed') are cohort settings
(``xbmd.synth.cohort.SynthSettings``); the graphs come from their own child stream. Study dates
come from another child stream: the first visit in 2021-2023, later ones 4 weeks to 18 months
apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from xbmd.io.xray_write import write_xray_dicom, write_xray_png
from xbmd.synth.device import XrayDevice, sample_device
from xbmd.synth.metal import MetalBodies
from xbmd.synth.model import Anatomy, Patient
from xbmd.synth.physics import attenuation_at, collimation_mask
from xbmd.synth.processing_graph import randomise_device
from xbmd.synth.radiograph import expose
from xbmd.synth.xray_scene import SceneBodies, body_poses, projected_landmarks, sample_geometry
from xbmd.synth.xray_scene import sample_motions as sample_xray_motions

#: Child streams of the patient seed (``np.random.default_rng([seed, stream, ...])``).
DATE_STREAM, DEVICE_STREAM, GRAPH_STREAM, XRAY_STREAM = 7301, 7302, 7303, 7305
PROCESSING_MODES = ("fixed", "random", "mixed")
#: Share of devices with a randomised processing graph in the 'mixed' mode.
MIXED_RANDOM_SHARE = 0.5
#: Metal line integral above which a pixel is left out of the processing's histogram analysis.
METAL_EXCLUDE_LI = 0.5


@dataclass(frozen=True)
class Session:
    """One visit: its number (from 1), start time, study UID and accession number."""

    number: int
    start: datetime
    study_uid: str
    accession: str


def plan_sessions(patient: Patient, count: int) -> list[Session]:
    """``count`` visits of ``patient``, dates from the patient's date stream."""
    rng = np.random.default_rng([patient.seed, DATE_STREAM])
    start = datetime(2021, 1, 4, 8, 0) + timedelta(days=int(rng.integers(0, 3 * 365)))
    out = []
    for number in range(1, count + 1):
        when = start + timedelta(minutes=int(rng.integers(0, 9 * 60)))
        out.append(Session(number, when, generate_uid(), f"{patient.patient_id}V{number:02d}"))
        start = start.replace(hour=8, minute=0) + timedelta(days=int(rng.integers(28, 540)))
    return out


def draw_device(rng: np.random.Generator, settings, seed: int, key: int) -> XrayDevice:
    """A device from ``settings.device_families`` (all when None), its processing replaced by a
    randomised graph (child stream ``[seed, GRAPH_STREAM, key]``) as ``settings.processing``
    says. With the default settings this is exactly ``sample_device(rng)``."""
    device = sample_device(rng, families=settings.device_families)
    if settings.processing == "fixed":
        return device
    graph_rng = np.random.default_rng([seed, GRAPH_STREAM, key])
    if settings.processing == "mixed" and graph_rng.random() >= MIXED_RANDOM_SHARE:
        return device
    return randomise_device(device, graph_rng)


def _dicom_times(session: Session, pose: int) -> dict:
    """Study, series, content and acquisition dates and times of a session's ``pose``-th
    radiograph (two minutes apart)."""
    taken = session.start + timedelta(minutes=2 * (pose - 1), seconds=7 * pose)
    day, study_time, time = (
        session.start.strftime("%Y%m%d"),
        session.start.strftime("%H%M%S"),
        taken.strftime("%H%M%S"),
    )
    return {
        "StudyDate": day,
        "StudyTime": study_time,
        "SeriesDate": taken.strftime("%Y%m%d"),
        "SeriesTime": time,
        "ContentDate": taken.strftime("%Y%m%d"),
        "ContentTime": time,
        "AcquisitionDateTime": taken.strftime("%Y%m%d%H%M%S"),
    }


def _dicom_extra(device: XrayDevice, session: Session, pose: int, legacy: bool) -> dict:
    """The DICOM attributes of a radiograph from its device and session."""
    extra = {
        "Manufacturer": device.manufacturer,
        "ManufacturerModelName": device.model,
        "KVP": device.kvp,
        "StudyInstanceUID": session.study_uid,
        **_dicom_times(session, pose),
    }
    if not legacy:  # (cohorts without sessions keep the empty Study ID and Accession Number)
        extra |= {"StudyID": str(session.number), "AccessionNumber": session.accession}
        extra["SeriesNumber"] = pose
    return extra


def write_radiographs(
    anatomy: Anatomy, patient: Patient, settings, rng: np.random.Generator, case_dir: Path
) -> tuple[list[dict], list[dict] | None]:
    """Render, expose and write the patient's radiographs; returns their truth records and,
    with ``settings.sessions >= 1``, the sessions' records (else None). ``rng`` is the patient's
    main stream, used (and advanced) only without sessions."""
    legacy = settings.sessions == 0
    if legacy:  # each radiograph its own session, its device from the main stream
        schedule = [(n + 1, 1) for n in range(settings.poses)]
    else:
        numbers = range(1, settings.sessions + 1)
        schedule = [(s, k) for s in numbers for k in range(1, settings.poses + 1)]
    sessions = plan_sessions(patient, schedule[-1][0])
    bodies, reference, metal, device = None, None, None, None
    out = []
    for n, (number, pose) in enumerate(schedule):
        session = sessions[number - 1]
        if legacy:
            draws = rng
            device = draw_device(rng, settings, patient.seed, n)
        else:
            draws = np.random.default_rng([patient.seed, XRAY_STREAM, number, pose])
            if pose == 1:
                device_rng = np.random.default_rng([patient.seed, DEVICE_STREAM, number])
                device = draw_device(device_rng, settings, patient.seed, 1000 + number)
        att = attenuation_at(device.effective_energy_kev)
        if bodies is None:
            bodies = SceneBodies(anatomy, att.mu_water_per_cm, att.bone_excess_cm2_g)
            reference = att
            if anatomy.metal is not None:
                metal = MetalBodies(anatomy.metal, anatomy.affine, anatomy.labels.shape)
        geometry = sample_geometry(draws, anatomy, settings.xray_spacing_mm, device.sdd_mm)
        motions = sample_xray_motions(draws, standard=(n == 0) if legacy else (pose == 1))
        poses = body_poses(anatomy, motions)
        line = bodies.line_integral(
            poses,
            geometry,
            soft_scale=att.mu_water_per_cm / reference.mu_water_per_cm,
            bone_scale=att.bone_excess_cm2_g / reference.bone_excess_cm2_g,
        )
        exclude = None
        if metal is not None:
            metal_li = metal.line_integral(poses, geometry, device.effective_energy_kev)
            line = line + metal_li
            exclude = metal_li > METAL_EXCLUDE_LI
        field = collimation_mask(geometry.size_px, geometry.pixel_spacing_mm, draws)
        marker = str(draws.choice(["R", "L"]))
        pixels, exposure = expose(
            line,
            pixel_spacing_mm=geometry.pixel_spacing_mm,
            device=device,
            rng=draws,
            field_mask=field,
            marker=marker,
            geometry=geometry,
            exclude_mask=exclude,
        )
        name = f"xray_{n + 1:02d}"
        write_xray_dicom(
            pixels,
            case_dir / f"{name}.dcm",
            pixel_spacing_mm=geometry.pixel_spacing_mm,
            photometric=device.photometric,
            sdd_mm=geometry.sdd_mm,
            sod_mm=geometry.sod_mm,
            patient_age_years=patient.age_years,
            patient_sex=patient.sex,
            patient_id=patient.patient_id,
            bits_stored=device.bits_stored,
            extra=_dicom_extra(device, session, pose, legacy),
        )
        write_xray_png(pixels, case_dir / f"{name}.png", bits=16)
        record = {
            "name": name,
            "dicom": f"{name}.dcm",
            "png": f"{name}.png",
            "geometry": geometry.to_dict(),
            "poses": {name_: p.to_dict() for name_, p in poses.items()},
            "motions": motions,
            "projected_landmarks": projected_landmarks(anatomy, poses, geometry),
            "marker": marker,
            "device": device.to_dict(),
            "exposure": exposure,
        }
        if not legacy:  # (cohorts without sessions keep their truth.json as it was)
            record |= {
                "session": number,
                "pose_in_session": pose,
                "study_instance_uid": session.study_uid,
                "study_date": session.start.strftime("%Y-%m-%d"),
            }
        out.append(record)
    if legacy:
        return out, None
    records = [
        {
            "session": s.number,
            "study_instance_uid": s.study_uid,
            "study_date": s.start.strftime("%Y-%m-%d"),
            "accession_number": s.accession,
            "xrays": [r["name"] for r in out if r["session"] == s.number],
            "device": next(r["device"]["name"] for r in out if r["session"] == s.number),
            "family": next(r["device"]["family"] for r in out if r["session"] == s.number),
        }
        for s in sessions
    ]
    return out, records
