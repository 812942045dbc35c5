"""Geometry conventions: pose algebra, detector orientation, affine handling."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from xbmd.errors import GeometryError
from xbmd.geometry import (
    ParallelGeometry,
    PerspectiveGeometry,
    RigidTransform,
    body_to_room,
    femur_rotation_deg,
    pose_matrices,
)
from xbmd.volume import Volume

RNG = np.random.default_rng(7)


def random_pose() -> RigidTransform:
    return RigidTransform(RNG.uniform(-60, 60, 3), RNG.uniform(-50, 50, 3))


def test_matrix_round_trip():
    for _ in range(20):
        pose = random_pose()
        back = RigidTransform.from_matrix(pose.matrix())
        np.testing.assert_allclose(back.matrix(), pose.matrix(), atol=1e-10)
        np.testing.assert_allclose(back.as_vector(), pose.as_vector(), atol=1e-9)


def test_euler_convention_is_extrinsic_xyz():
    pose = RigidTransform((10, 20, 30), (0, 0, 0))
    rx, ry, rz = (
        Rotation.from_euler(axis, deg, degrees=True).as_matrix()
        for axis, deg in (("x", 10), ("y", 20), ("z", 30))
    )
    np.testing.assert_allclose(pose.rotation_matrix, rz @ ry @ rx, atol=1e-12)


def test_rotation_about_z_moves_left_to_posterior():
    # +90 deg about S-I turns +x (Left) into +y (Posterior): right-handed about +z.
    pose = RigidTransform((0, 0, 90), (0, 0, 0))
    np.testing.assert_allclose(pose.apply([1.0, 0, 0]), [0, 1.0, 0], atol=1e-12)


def test_compose_and_inverse():
    a, b = random_pose(), random_pose()
    p = RNG.normal(size=(5, 3)) * 30
    np.testing.assert_allclose(a.compose(b).apply(p), a.apply(b.apply(p)), atol=1e-9)
    np.testing.assert_allclose(a.inverse().apply(a.apply(p)), p, atol=1e-9)
    np.testing.assert_allclose(a.compose(a.inverse()).matrix(), np.eye(4), atol=1e-9)


def test_from_matrix_refuses_non_rigid():
    m = np.eye(4)
    m[0, 0] = 2.0
    with pytest.raises(GeometryError, match="rotation"):
        RigidTransform.from_matrix(m)
    m = np.diag([-1.0, 1.0, 1.0, 1.0])
    with pytest.raises(GeometryError):
        RigidTransform.from_matrix(m)


def test_torch_pose_matrices_match_numpy():
    poses = [random_pose() for _ in range(6)]
    params = torch.tensor(np.stack([p.as_vector() for p in poses]))
    mats = pose_matrices(params).numpy()
    for m, p in zip(mats, poses, strict=True):
        np.testing.assert_allclose(m, p.matrix(), atol=1e-10)


def test_body_to_room_rotates_about_isocentre():
    iso = np.array([10.0, -20.0, 300.0])
    m = body_to_room(torch.tensor([[0.0, 0.0, 45.0, 0.0, 0.0, 0.0]], dtype=torch.float64), iso)
    np.testing.assert_allclose(m[0].numpy() @ np.append(iso, 1), [0, 0, 0, 1], atol=1e-9)


def test_ap_detector_orientation():
    geo = PerspectiveGeometry(1000, 800, (101, 101), 1.0)
    centre = geo.project(np.zeros(3))
    left = geo.project(np.array([10.0, 0, 0]))
    superior = geo.project(np.array([0, 0, 10.0]))
    np.testing.assert_allclose(centre, [50, 50])
    assert left[1] > centre[1], "patient's left must be on the image right"
    assert superior[0] < centre[0], "superior must be towards the top row"
    # magnification: 10 mm at the isocentre -> 10 * 1000/800 mm at the detector, 1 mm pixels
    np.testing.assert_allclose(left[1] - centre[1], 12.5)


def test_ap_source_is_anterior_and_posterior_objects_magnify_less():
    geo = PerspectiveGeometry(1000, 800, (11, 11), 1.0)
    assert geo.source_mm[1] < 0  # anterior
    post = geo.project(np.array([10.0, 100.0, 0]))[1] - 5
    ant = geo.project(np.array([10.0, -100.0, 0]))[1] - 5
    assert post < ant


def test_pa_view_keeps_display_orientation():
    geo = PerspectiveGeometry(1000, 800, (11, 11), 1.0, view="pa")
    assert geo.source_mm[1] > 0
    assert geo.project(np.array([10.0, 0, 0]))[1] > 5
    assert geo.project(np.array([0, 0, 10.0]))[0] < 5


def test_projection_of_pixel_centres_round_trips():
    geo = PerspectiveGeometry(1200, 1000, (7, 9), (0.4, 0.5), principal_point_px=(2.0, 3.5))
    rc = geo.project(geo.pixel_centers_mm())
    rows, cols = np.meshgrid(np.arange(7), np.arange(9), indexing="ij")
    np.testing.assert_allclose(rc[..., 0], rows, atol=1e-9)
    np.testing.assert_allclose(rc[..., 1], cols, atol=1e-9)
    par = ParallelGeometry((5, 6), 2.0)
    rc = par.project(par.pixel_centers_mm() + np.array([0, 37.0, 0]))
    np.testing.assert_allclose(rc[..., 1], np.broadcast_to(np.arange(6), (5, 6)), atol=1e-12)


def test_bad_geometry_is_refused():
    with pytest.raises(GeometryError, match="SOD < SDD"):
        PerspectiveGeometry(800, 1000, (4, 4), 1.0)
    with pytest.raises(GeometryError, match="view must be"):
        ParallelGeometry((4, 4), 1.0, view="lateral")
    with pytest.raises(GeometryError, match="spacing"):
        ParallelGeometry((4, 4), 0.0)


def test_volume_affine_respects_direction_cosines():
    direction = Rotation.from_euler("xyz", [10, -20, 35], degrees=True).as_matrix()
    vol = Volume.from_geometry(
        np.zeros((4, 5, 6), np.float32), (0.7, 0.8, 2.5), (10, 20, 30), direction, unit="HU"
    )
    ijk = np.array([[1.0, 2.0, 3.0], [5, 4, 3]])
    world = vol.index_to_world(ijk)
    expected = (direction @ (np.diag([0.7, 0.8, 2.5]) @ ijk.T)).T + [10, 20, 30]
    np.testing.assert_allclose(world, expected, atol=1e-9)
    np.testing.assert_allclose(vol.world_to_index(world), ijk, atol=1e-9)
    np.testing.assert_allclose(vol.spacing_mm, [0.7, 0.8, 2.5])


@pytest.mark.parametrize("side", ["left", "right"])
def test_femur_motions_move_the_knee_the_anatomical_way(side):
    lateral = np.array([1.0, 0, 0]) if side == "left" else np.array([-1.0, 0, 0])
    anterior = np.array([0, -1.0, 0])
    shaft = np.array([0, 0, -1.0])  # from the hip down to the knee

    def turned(vec, **motion):
        return RigidTransform(femur_rotation_deg(side, **motion)).apply(vec)

    assert turned(shaft, flexion_deg=30) @ anterior > 0.4  # knee forward
    assert turned(shaft, abduction_deg=20) @ lateral > 0.3  # knee out
    assert turned(anterior, internal_deg=20) @ -lateral > 0.3  # front of femur turns in
    with pytest.raises(GeometryError):
        femur_rotation_deg("both")


def test_positive_rx_tilts_the_pelvis_anteriorly():
    tilted = RigidTransform((10.0, 0.0, 0.0))
    iliac_crest, sacrum = np.array([0, 0, 100.0]), np.array([0, 60.0, 0])
    assert tilted.apply(iliac_crest)[1] < 0  # the top of the pelvis moves anteriorly
    assert tilted.apply(sacrum)[2] > 0  # the sacrum rises
