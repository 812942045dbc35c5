"""Radiograph devices, physics and vendor processing (xbmd.synth.device, .physics,
.processing, .radiograph): small images, known answers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

from xbmd.errors import InputError
from xbmd.geometry import PerspectiveGeometry
from xbmd.io.xray import read_xray
from xbmd.io.xray_write import write_xray_dicom
from xbmd.synth import device as dv
from xbmd.synth import physics as ph
from xbmd.synth import radiograph as rg

SHAPE = (96, 128)
SPACING_MM = 0.5


def _scene() -> np.ndarray:
    """Soft tissue of 21 cm water at 55 keV thinning to the sides, plus a bone patch."""
    cols = np.linspace(-1, 1, SHAPE[1])
    li = np.broadcast_to(4.5 * np.sqrt(1 - 0.8 * cols**2), SHAPE).astype(np.float32).copy()
    li[40:60, 50:80] += 0.4  # about 1.2 g/cm2 of mineral
    return li


def _quiet(device: dv.XrayDevice) -> dv.XrayDevice:
    """The same device, nearly noise-free and with identity multi-scale processing."""
    return dataclasses.replace(
        device,
        aec_quanta_per_mm2=1e10,
        photons_per_mm2=1e12,
        electronic_noise_quanta=0.0,
        band_gains=(1.0,) * len(device.band_gains),
        band_power=1.0,
        latitude_compression=0.0,
        noise_reduction=0.0,
    )


# ---- attenuation


def test_attenuation_matches_nist_xcom():
    water = ph.attenuation_at(60.0)
    assert water.mu_water_per_cm == pytest.approx(0.2059, rel=0.01)  # XCOM 0.2059 cm2/g
    assert ph.attenuation_at(40.0).mu_water_per_cm == pytest.approx(0.2683, rel=0.01)
    assert ph.attenuation_at(100.0).mu_water_per_cm == pytest.approx(0.1707, rel=0.01)
    assert water.mu_adipose_per_cm < water.mu_water_per_cm < water.mu_muscle_per_cm
    assert water.mu_lead_per_cm > 50  # 1 mm of lead stops > 99 % at 60 keV


def test_bone_excess_positive_and_decreasing():
    energies = np.arange(30.0, 100.1, 5.0)
    excess = np.array([ph.attenuation_at(e).bone_excess_cm2_g for e in energies])
    assert np.all(excess > 0)
    assert np.all(np.diff(excess) < 0)
    a = ph.attenuation_at(55.0)
    assert a.bone_excess_cm2_g == pytest.approx(a.ha_mass_cm2_g - a.mu_water_per_cm / 3.16)


@pytest.mark.parametrize("energy", [10.0, 150.0, float("nan")])
def test_attenuation_refuses_energy_outside_table(energy):
    with pytest.raises(InputError, match="energy_kev"):
        ph.attenuation_at(energy)


# ---- devices


def test_every_family_samples_a_valid_json_device():
    rng = np.random.default_rng(0)
    devices = [dv.sample_device(rng, family) for family in sorted(dv.DEVICE_FAMILIES)]
    for device in devices:
        again = json.loads(json.dumps(device.to_dict()))
        assert again["family"] == device.family
        assert 45 <= device.effective_energy_kev <= 62
    assert {d.photometric for d in devices} == set(dv.PHOTOMETRICS)
    assert {d.outside_field for d in devices} == set(dv.OUTSIDE_FIELD)
    assert any(not d.grid and d.scatter_to_primary > 1 for d in devices)
    assert all(d.scatter_to_primary < 0.8 for d in devices if d.grid)


def test_unknown_family_is_refused():
    with pytest.raises(InputError, match="family must be one of"):
        dv.sample_device(np.random.default_rng(0), "film")


# ---- physics steps


def test_poisson_variance_equals_mean_on_raw_quanta():
    rng = np.random.default_rng(1)
    for mean in (50.0, 400.0, 3000.0):
        quanta = ph.quantum_noise(np.full((200, 200), mean, np.float32), rng)
        assert quanta.mean() == pytest.approx(mean, rel=0.01)
        assert quanta.var() / mean == pytest.approx(1.0, abs=0.05)


def test_detector_blur_lowers_pixel_variance_and_adds_electronic_noise():
    rng = np.random.default_rng(2)
    quanta = ph.quantum_noise(np.full((200, 200), 1000.0, np.float32), rng)
    kwargs = {"pixel_spacing_mm": 0.3, "tail_fraction": 0.05, "tail_mm": 1.0}
    blurred = ph.detector_response(quanta, rng, blur_mm=0.15, electronic_noise=0.0, **kwargs)
    assert blurred.var() < 0.8 * quanta.var()
    assert blurred.mean() == pytest.approx(quanta.mean(), rel=1e-3)
    noisy = ph.detector_response(quanta, rng, blur_mm=0.15, electronic_noise=20.0, **kwargs)
    assert noisy.var() - blurred.var() == pytest.approx(400.0, rel=0.1)


def test_heel_effect_darker_towards_the_anode_and_one_on_the_central_ray():
    profile = ph.heel_profile(
        301, 1.2, sdd_mm=1100.0, anode_angle_deg=12.0, heel_strength=0.03, anode_top=True
    )
    assert profile[150] == pytest.approx(1.0)
    assert profile[0] < 0.9 < 1.0 < profile[-1] < 1.1


def test_relative_fluence_uses_the_geometry_principal_point():
    device = dataclasses.replace(dv.sample_device(np.random.default_rng(0)), heel_strength=0.0)
    geo = PerspectiveGeometry(1000.0, 900.0, SHAPE, SPACING_MM, principal_point_px=(20.0, 30.0))
    fluence = ph.relative_fluence(SHAPE, (SPACING_MM, SPACING_MM), device, geo)
    assert np.unravel_index(np.argmax(fluence), SHAPE) == (20, 30)
    corner = np.hypot(75 * SPACING_MM, 97 * SPACING_MM) / 1000.0
    assert fluence[-1, -1] == pytest.approx((1 + corner**2) ** -1.5, rel=1e-4)


def test_scatter_matches_the_requested_spr_behind_the_patient():
    li = _scene()
    primary = np.exp(-li)
    field = np.ones(SHAPE, bool)
    reference = ph.behind_patient(li, field)
    scatter = ph.scatter_field(
        primary,
        li,
        scatter_to_primary=0.5,
        kernel_sigma_mm=20.0,
        pixel_spacing_mm=SPACING_MM,
        reference=reference,
    )
    assert np.median(scatter[reference] / primary[reference]) == pytest.approx(0.5, rel=1e-3)
    # scatter is smooth: it lowers the bone's contrast without copying the bone's edge
    assert abs(scatter[50, 49] - scatter[50, 50]) < 0.02 * scatter[50, 50]


def test_aec_gives_the_same_quanta_behind_thin_and_thick_patients():
    device = dataclasses.replace(dv.sample_device(np.random.default_rng(3), "balanced-dr"))
    field = np.ones(SHAPE, bool)
    quanta = []
    for scale in (0.8, 1.3):
        detected = np.exp(-scale * _scene())
        n0 = ph.incident_quanta_per_pixel(device, detected, field, SPACING_MM)
        quanta.append(np.median((n0 * detected)[ph.aec_region(field)]))
    assert quanta[0] == pytest.approx(quanta[1], rel=1e-6)
    assert quanta[0] == pytest.approx(device.aec_quanta_per_mm2 * SPACING_MM**2, rel=1e-6)


def test_wide_gaussian_on_a_coarse_grid_matches_the_direct_filter():
    image = np.random.default_rng(4).random((160, 200)).astype(np.float32)
    image[40:90, 60:150] += 3.0
    fast = ph.gaussian_px(image, 12.0)
    direct = ndimage.gaussian_filter(image, 12.0, mode="nearest", truncate=3.0)
    assert np.abs(fast - direct)[20:-20, 20:-20].max() < 0.03 * np.ptp(direct)


# ---- collimation and marker


def test_collimation_mask_is_a_large_central_field():
    for seed in range(20):
        mask = ph.collimation_mask((300, 360), 0.3, np.random.default_rng(seed))
        assert mask.dtype == bool
        assert 0.6 <= mask.mean() <= 1.0
        assert mask[150, 180]


@pytest.mark.parametrize(("letter", "left_side"), [("R", True), ("L", False)])
def test_marker_is_on_the_patient_side_upper_corner(letter, left_side):
    li, info = ph.marker_attenuation(
        SHAPE, SPACING_MM, letter, rng=np.random.default_rng(5), energy_kev=55.0, height_mm=10.0
    )
    rows, cols = np.nonzero(li > 1.0)  # lead
    assert rows.size > 20
    assert rows.mean() < SHAPE[0] / 2
    assert (cols.mean() < SHAPE[1] / 2) == left_side
    assert info["letter"] == letter


def test_marker_shows_bright_on_the_correct_side_of_the_image():
    rng = np.random.default_rng(6)
    device = dataclasses.replace(dv.sample_device(rng, "balanced-dr"))
    li = np.full((160, 200), 3.5, np.float32)
    pixels, info = expose(li, device, rng, marker="R")
    row, col = info["marker"]["center_px"]
    assert col < 100 and row < 80
    mirror = pixels[int(row) - 5 : int(row) + 5, 200 - int(col) - 5 : 200 - int(col) + 5]
    assert pixels.max() > mirror.max()
    bright = np.argwhere(pixels >= np.percentile(pixels, 99.5))
    assert bright[:, 1].mean() < 100


def expose(li, device, rng, **kwargs):
    return rg.expose(li, pixel_spacing_mm=SPACING_MM, device=device, rng=rng, **kwargs)


def test_outside_the_field_follows_the_vendor_shutter():
    rng = np.random.default_rng(7)
    field = np.zeros(SHAPE, bool)
    field[10:-10, 12:-12] = True
    base = dv.sample_device(rng, "balanced-dr")
    full = 2**base.bits_stored - 1
    for shutter, value in (("black", 0), ("white", full)):
        device = dataclasses.replace(base, outside_field=shutter)
        pixels, _ = expose(_scene(), device, rng, field_mask=field)
        assert np.all(pixels[~field] == value)
    natural = dataclasses.replace(base, outside_field="natural")
    pixels, _ = expose(_scene(), natural, rng, field_mask=field)
    # unexposed: brighter than the soft tissue in the field (bone bright = little signal)
    assert np.median(pixels[~field]) > np.median(pixels[field])


# ---- the whole chain


def test_expose_is_deterministic_with_a_seed():
    def run(seed):
        rng = np.random.default_rng(seed)
        device = dv.sample_device(rng)
        field = ph.collimation_mask(SHAPE, SPACING_MM, rng)
        return expose(_scene(), device, rng, field_mask=field, marker="L")

    (a, info_a), (b, info_b) = run(8), run(8)
    assert np.array_equal(a, b)
    assert json.dumps(info_a) == json.dumps(info_b)
    assert not np.array_equal(a, run(9)[0])


@pytest.mark.parametrize("family", sorted(dv.DEVICE_FAMILIES))
def test_more_attenuation_is_brighter(family):
    rng = np.random.default_rng(10)
    device = _quiet(dv.sample_device(rng, family))
    ramp = np.broadcast_to(np.linspace(2.0, 6.0, SHAPE[1], dtype=np.float32), SHAPE)
    pixels, _ = expose(ramp, device, rng)
    profile = pixels[30:70].astype(float).mean(axis=0)
    assert np.all(np.diff(profile[5:-5]) >= 0)
    assert profile[-10] > profile[10]


@pytest.mark.parametrize("family", sorted(dv.DEVICE_FAMILIES))
def test_bone_is_bright_with_realistic_noise(family):
    rng = np.random.default_rng(11)
    device = dv.sample_device(rng, family)
    pixels, info = expose(_scene(), device, rng)
    assert pixels[45:55, 55:75].mean() > pixels[45:55, 85:105].mean()
    # a radiograph, not a noise field: a few hundred to a few thousand quanta behind the patient
    per_03mm_pixel = info["median_quanta_behind_patient"] / SPACING_MM**2 * 0.09
    assert 100 < per_03mm_pixel < 1e4


def _pelvis_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A body filling most of the detector, as a real AP pelvis does: 22 cm of water-like
    tissue in the middle, thinning to the flanks, air beyond 160 mm; two femoral heads
    (spheres of 24 mm radius, up to 0.5 of bone excess line integral). Pixels 1.2 mm.
    Returns the line integral and the column / row offsets from the centre (mm)."""
    rows, cols, spacing = 240, 320, 1.2
    y = (np.arange(rows) - rows / 2)[:, None] * spacing
    x = (np.arange(cols) - cols / 2)[None, :] * spacing
    thick_cm = 22.0 * np.sqrt(np.clip(1 - (x / 160.0) ** 2, 0, None)) * (1 + 0.1 * (y < 0))
    li = 0.21 * np.broadcast_to(thick_cm, (rows, cols))
    for cx in (-85.0, 85.0):
        r = np.hypot(x - cx, y - 10.0)
        li = li + 0.5 * np.sqrt(np.clip(1 - (r / 24.0) ** 2, 0, None))
    return li.astype(np.float32), x, y


@pytest.mark.parametrize("family", sorted(dv.DEVICE_FAMILIES))
def test_pelvis_looks_processed_bone_white_soft_tissue_grey_air_black(family):
    li, x, y = _pelvis_scene()
    r = np.hypot(x + 85.0, y - 10.0)
    head, beside = r < 12, (r > 32) & (r < 42)
    body = np.broadcast_to(np.abs(x) < 140, li.shape)
    air = np.broadcast_to(np.abs(x) > 165, li.shape)
    rng = np.random.default_rng(15)
    device = dv.sample_device(rng, family)
    pixels, _ = rg.expose(li, pixel_spacing_mm=1.2, device=device, rng=rng)
    value = pixels / (2**device.bits_stored - 1)
    # the femoral head clearly brighter than the soft tissue next to it: bone contrast is not
    # flattened by the equalisation of the body's thickness
    assert value[head].mean() - value[beside].mean() > 0.1
    # soft tissue mid-to-dark grey (not washed out), air in the field near black
    assert 0.2 < np.median(value[body]) < 0.52
    assert value[air].mean() < 0.1
    assert value[air].mean() < np.median(value[body]) - 0.15


@pytest.mark.parametrize("bits", [10, 12, 14, 16])
def test_output_dtype_and_range_follow_bits_stored(bits):
    rng = np.random.default_rng(12)
    device = dataclasses.replace(dv.sample_device(rng), bits_stored=bits, outside_field="white")
    field = np.zeros(SHAPE, bool)
    field[5:-5, 5:-5] = True
    pixels, info = expose(_scene(), device, rng, field_mask=field, marker="R")
    assert pixels.dtype == np.uint16
    assert pixels.max() == 2**bits - 1  # the white shutter
    assert json.loads(json.dumps(info))["device"]["bits_stored"] == bits


@pytest.mark.parametrize("photometric", dv.PHOTOMETRICS)
def test_dicom_round_trip_keeps_bone_bright(tmp_path, photometric):
    rng = np.random.default_rng(13)
    device = dataclasses.replace(dv.sample_device(rng, "equalised-dr"), photometric=photometric)
    pixels, _ = expose(_scene(), device, rng)
    path = tmp_path / "xray.dcm"
    write_xray_dicom(
        pixels,
        path,
        pixel_spacing_mm=SPACING_MM,
        photometric=device.photometric,
        bits_stored=device.bits_stored,
    )
    xray = read_xray(path)
    assert xray.meta["photometric"] == photometric
    assert np.array_equal(xray.pixels, pixels.astype(np.float32))
    assert xray.pixels[45:55, 55:75].mean() > xray.pixels[45:55, 85:105].mean()


def test_expose_refuses_bad_inputs():
    rng = np.random.default_rng(14)
    device = dv.sample_device(rng)
    with pytest.raises(InputError, match="non-negative"):
        expose(np.full(SHAPE, -1.0), device, rng)
    with pytest.raises(InputError, match="field_mask"):
        expose(_scene(), device, rng, field_mask=np.ones((3, 3), bool))
    with pytest.raises(InputError, match="letter must be one of"):
        expose(_scene(), device, rng, marker="X")
