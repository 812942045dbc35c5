"""Soft tissue of the virtual anatomy: HU without mineral over the whole CT grid.

:class:`BodyModel` is the body outline (skin, subcutaneous fat, muscle envelope) slice by slice,
from height, BMI and the pelvis; :func:`soft_tissue_hu` fills the grid with air, skin, fat,
muscles with intermuscular fat planes, the abdominal contents (mesenteric fat, bowel loops,
colon with stool and gas), the pelvic contents (bladder, rectum, uterus or prostate, ischioanal
fat) and the hip joints' cartilage.
"""

from __future__ import annotations

import itertools

import numpy as np

from xbmd.synth import sdf
from xbmd.synth.anatomy_base import SIDE_SIGN, TISSUE_HU, _field_distance, _points_distance
from xbmd.synth.model import DRAW_SIDES
from xbmd.synth.pelvis_model import PelvisModel
from xbmd.synth.sdf import F32, Field, Frame, Grid


class BodyModel:
    """The body outline (skin, subcutaneous fat, muscle envelope) slice by slice, world mm.

    The torso is a superellipse per slice (rounder in front, flattened at the back where the
    patient lies on the table) whose half-axes follow z; below the perineum it gives way to two
    thighs (smooth union, so the crotch is organic). Fat is a band of ``fat_mm`` under the skin.
    """

    def __init__(self, shape: dict, pelvis: PelvisModel, femurs: dict) -> None:
        b, p, g = shape["body"], shape["pelvis"], shape["size"]
        ms, hx, ch, fl = b["muscle_scale"], pelvis.hx, p["crest_height_mm"], p["wing_flare_mm"]
        self.fat, self.visc = b["fat_mm"], b["visceral_mm"]
        self.z_lt = min(float(f.landmarks().lesser_trochanter_mm[2]) for f in femurs.values())
        self.z_crotch = self.z_lt - 30.0 * g
        zk = [ch + 60, ch, 0.5 * ch, 0.0, -50 * g, self.z_crotch, self.z_crotch - 60]
        self.knots = np.array(zk)
        self.ax = np.array([hx + fl + 2, hx + fl + 12, hx + fl + 22, hx + 78, hx + 72, hx + 50, 20])
        self.ax = (self.ax - hx) * ms + hx
        self.ay_ant = (
            np.array([92, 85, 72, 62, 66, 64, 20]) * g * ms
            + np.array([1, 1, 0.6, 0.2, 0, 0, 0]) * self.visc
        )
        self.ay_post = np.array([120, 124, 126, 124, 116, 96, 20]) * g * ms
        self.thigh_x = hx + 14 * g
        self.thigh_r = np.array([74.0, 78.0]) * g * ms

    def distances(self, x: np.ndarray, y: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
        """(outer skin, muscle envelope) signed distances (mm) on one slice at height ``z``."""
        ax, aa, ap = (
            float(np.interp(z, self.knots[::-1], a[::-1]))
            for a in (self.ax, self.ay_ant, self.ay_post)
        )
        shrink = float(np.clip((z - (self.z_crotch - 40.0)) / 70.0, 0.0, 1.0))
        taper = float(np.clip(1.0 + (z - self.z_crotch) / 900.0, 0.85, 1.0))
        out = []
        for extra in (self.fat, 0.0):
            torso = _superellipse(x, y, (ax + extra) * max(shrink, 0.05), aa + extra, ap + extra)
            torso = torso + F32(80.0 * (1.0 - shrink))  # gone below the perineum
            thighs = [
                sdf.ellipse(
                    x - F32(s * self.thigh_x), y - F32(10.0), *(taper * self.thigh_r + extra)
                )
                for s in (-1.0, 1.0)
            ]
            thighs = np.minimum(*thighs) + F32(
                40.0 * float(np.clip((z - self.z_crotch) / 80.0, 0, 1))
            )
            out.append(sdf.smin(torso, thighs, 30.0))
        return out[0], out[1]

    def extent(self) -> tuple[float, float, float]:
        """Half-width, anterior and posterior reach of the skin (mm) over all slices."""
        return (
            max(self.ax.max(), self.thigh_x + self.thigh_r[0]) + self.fat,
            self.ay_ant.max() + self.fat,
            self.ay_post.max() + self.fat,
        )


def _superellipse(x, y, ax: float, ay_ant: float, ay_post: float) -> np.ndarray:
    """Radial signed distance (mm) to a superellipse, exponent 2.3 in front, 3 at the back."""
    post = y > 0
    ay = np.where(post, F32(ay_post), F32(ay_ant))
    ex = np.where(post, F32(3.0), F32(2.3))
    r = np.sqrt(x * x + y * y)
    safe = np.maximum(r, F32(1e-3))
    cx = np.where(r < 1e-3, F32(1.0), x / safe)
    boundary = 1.0 / (np.abs(cx / F32(ax)) ** ex + np.abs(y / safe / ay) ** ex) ** (1.0 / ex)
    return r - boundary


def _body_hu(grid: Grid, body: BodyModel, shape: dict) -> tuple[np.ndarray, np.ndarray]:
    """Skin/fat/muscle HU over the grid and the depth below the muscle envelope (mm).

    The outline is computed on slices every ~3 mm and interpolated linearly in z.
    """
    b = shape["body"]
    pv = F32(grid.spacing_mm[:2].mean())
    x, y = grid.axis_mm(0)[None, :], grid.axis_mm(1)[:, None]
    zs = grid.axis_mm(2)
    step = max(1, round(3.0 / float(grid.spacing_mm[2])))
    ks = list(range(0, len(zs), step))
    if ks[-1] != len(zs) - 1:
        ks.append(len(zs) - 1)
    samples = {k: body.distances(x, y, float(zs[k])) for k in ks}
    hu = np.empty(grid.shape, F32)
    inner = np.empty(grid.shape, F32)
    for lo, hi in itertools.pairwise(ks):
        for k in range(lo, hi + 1):
            w = F32((k - lo) / (hi - lo))
            d_out = samples[lo][0] * (1 - w) + samples[hi][0] * w
            inner[k] = samples[lo][1] * (1 - w) + samples[hi][1] * w
            hu[k] = np.where(d_out > -1.5, F32(TISSUE_HU["skin"]), F32(b["fat_hu"]))
            hu[k][inner[k] <= 0] = b["muscle_hu"]
            air = np.clip(0.5 + d_out / pv, 0.0, 1.0)  # partial volume at the skin
            hu[k] += air * (F32(TISSUE_HU["air"]) - hu[k])
    return hu, inner


def _muscle_seeds(pelvis: PelvisModel, shape: dict) -> list[np.ndarray]:
    """Centre lines (world mm) of the muscle groups; fat planes run where two are equidistant."""
    g, hx, ch = shape["size"], pelvis.hx, shape["pelvis"]["crest_height_mm"]
    left = [
        [[40, 125, ch + 20], [hx, 105, 10], [hx + 35, 70, -80]],  # gluteus maximus
        [[hx + 45, 20, ch], [hx + 55, 15, 20]],  # gluteus medius / minimus
        [[30, 25, ch + 60], [55, 5, 0.6 * ch], [hx - 12, -50, 5], [hx - 5, -20, -60]],  # iliopsoas
        [[hx - 35, 10, -20], [hx - 28, 25, -50]],  # obturator internus
        [[hx + 20, -50, -60], [hx + 22, -45, -220]],  # quadriceps
        [[hx - 45, -5, -70], [hx - 30, 5, -220]],  # adductors
        [[hx, 60, -90], [hx + 10, 45, -220]],  # hamstrings
        [[hx + 45, -45, 30], [hx + 50, -30, -100]],  # tensor fasciae latae
        [[28, 110, ch + 60], [25, 110, 0.7 * ch]],  # erector spinae
        [[35, -85, ch + 60], [18, -70, 0.2 * ch]],  # rectus abdominis
        [[hx + 20, -10, ch + 30], [hx + 30, -5, 0.9 * ch]],  # obliques
    ]
    seeds = []
    for pts in left:
        pts = np.asarray(pts, float) * np.array([1.0, g, 1.0])
        for s in (1.0, -1.0):
            seeds.append(pelvis.frame.to_world(pts * np.array([s, 1.0, 1.0])))
    return seeds


def _upsample_linear(coarse: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Linear upsampling of a (K, J, I) array by an integer ``factor``, cropped to ``shape``.

    Coarse sample c sits on fine index c * factor (same origin), so grids stay aligned.
    """
    out = coarse.astype(F32, copy=False)
    if factor == 1:
        return out[: shape[0], : shape[1], : shape[2]]
    for axis, n in enumerate(shape):
        a = np.moveaxis(out, axis, 0)
        b = np.concatenate([a[1:], a[-1:]], axis=0)
        new = np.empty((a.shape[0] * factor, *a.shape[1:]), F32)
        for r in range(factor):
            w = F32(r / factor)
            new[r::factor] = a * (1 - w) + b * w if r else a
        out = np.moveaxis(new[:n], 0, axis)
    return np.ascontiguousarray(out)


def _coarse_grid(grid: Grid, target_mm: float) -> tuple[Grid, int]:
    """A grid ``factor`` times coarser with the same origin (factor 1 if already coarse)."""
    factor = max(1, round(target_mm / float(grid.spacing_mm.max())))
    shape = tuple(-(-n // factor) + 1 for n in grid.shape)
    return Grid(grid.origin_mm, grid.spacing_mm * factor, shape), factor


def _fat_planes(cgrid: Grid, pelvis: PelvisModel, shape: dict) -> np.ndarray:
    """Gap (mm) between the nearest and second-nearest muscle centre line, on ``cgrid``.

    Computed ~4 mm coarse and upsampled: the gap is a smooth field.
    """
    vgrid, factor = _coarse_grid(cgrid, 4.0)
    x, y, z = (vgrid.axis_mm(a) for a in range(3))
    u, v, w = x[None, None, :], y[None, :, None], z[:, None, None]
    d1 = np.full(vgrid.shape, 1e4, F32)
    d2 = np.full(vgrid.shape, 1e4, F32)
    for seed in _muscle_seeds(pelvis, shape):
        d = _points_distance(seed, u, v, w)
        d2 = np.minimum(d2, np.maximum(d1, d))
        d1 = np.minimum(d1, d)
    return _upsample_linear(d2 - d1, factor, cgrid.shape)


def _region(grid: Grid, frame: Frame, lo, hi):
    """Grid slices and local coordinates (float32) of the grid box around local box [lo, hi]."""
    f = Field.__new__(Field)
    f.grid, f.frame, f.margin_mm = grid, frame, 0.0
    wlo, whi = frame.world_box(np.asarray(lo, float), np.asarray(hi, float))
    f.index_lo, f.index_hi = grid.index_box(wlo, whi)
    if np.any(f.index_hi <= f.index_lo):
        return None, None
    full = tuple(
        slice(0, int(b - a)) for a, b in zip(f.index_lo[::-1], f.index_hi[::-1], strict=True)
    )
    return f.slices, f.coords(full)


def _noise_block(rng: np.random.Generator, shape, spacing_mm, period_mm: float) -> np.ndarray:
    """Smooth isotropic noise (unit variance) of features ~``period_mm``, shape (K, J, I).

    Drawn on a grid ~period/4 coarse and upsampled linearly: cheap, and smooth enough.
    """
    from scipy.ndimage import gaussian_filter

    spacing = np.asarray(spacing_mm, float)
    factor = max(1, round(period_mm / 4.0 / float(spacing.min())))
    cshape = tuple(-(-n // factor) + 1 for n in shape)
    sigma = period_mm / 4.0 / (spacing[::-1] * factor)
    coarse = gaussian_filter(rng.standard_normal(cshape).astype(F32), sigma, mode="wrap")
    coarse /= coarse.std() + 1e-9
    return _upsample_linear(coarse, factor, shape)


def _abdomen(content, inner, cgrid: Grid, factor: int, pelvis, pfield, shape: dict, rng) -> None:
    """Abdominal cavity above the brim (in place on coarse ``content``): mesenteric fat, small
    bowel loops, caecum and sigmoid colon with stool and gas, kept off the iliacus and psoas."""
    b, g, p = shape["body"], shape["size"], shape["pelvis"]
    hx, ch, fat = pelvis.hx, p["crest_height_mm"], b["fat_hu"]
    lo = np.array([-(hx + 40), -110 * g - b["visceral_mm"], 0.25 * ch])
    hi = np.array([hx + 40, 60 * g, ch + 80])
    sl, uvw = _region(cgrid, pelvis.frame, lo, hi)
    if sl is None:
        return
    u, v, w = uvw
    radii = [hx + 20, 75 * g + 0.6 * b["visceral_mm"], 0.9 * ch]
    cav = sdf.ellipsoid(u, v, w, [0, -15 * g, ch + 20], radii)
    bone_d = _field_distance(pfield, sl, factor)
    psoas = np.minimum(
        *(_points_distance(pelvis.frame.to_local(s), u, v, w) for s in _psoas_lines(pelvis, g))
    )
    inside = (cav < 0) & (bone_d > 16.0 * g) & (psoas > 22.0 * g) & (inner[sl] < -12.0)
    loops = _noise_block(rng, u.shape, cgrid.spacing_mm, 34.0)
    gasn = _noise_block(rng, u.shape, cgrid.spacing_mm, 14.0)
    hu = np.where(loops > 0.35, F32(TISSUE_HU["bowel_wall"]), F32(fat + 10.0))
    colon = _colon_distance(u, v, w, hx, ch, g)
    stool = F32(-40.0) + F32(60.0) * gasn
    hu = np.where(colon < 0, np.where(gasn > 1.3 - b["bowel_gas"], F32(-1000.0), stool), hu)
    hu = np.where((colon >= 0) & (colon < 2.5), F32(TISSUE_HU["bowel_wall"]), hu)
    hu = np.where((loops > 0.6) & (gasn > 2.0 - 0.8 * b["bowel_gas"]), F32(-1000.0), hu)
    content[sl] = np.where(inside, hu, content[sl])


def _psoas_lines(pelvis: PelvisModel, g: float) -> list[np.ndarray]:
    """World centre lines of the psoas muscles, beside the spine and over the brim."""
    ch = pelvis.p["crest_height_mm"]
    pts = np.array(
        [[38 * g, 15 * g, ch + 80], [45 * g, 5 * g, 0.6 * ch], [pelvis.hx - 20, -30, 10]]
    )
    return [pelvis.frame.to_world(pts * np.array([s, 1, 1])) for s in (1.0, -1.0)]


def _colon_distance(u, v, w, hx: float, ch: float, g: float) -> np.ndarray:
    """Distance (mm, negative in the lumen) to caecum/ascending colon and sigmoid (pelvis frame)."""
    caecum = np.array([[-(hx - 5), -35 * g, 0.45 * ch], [-(hx + 5), -20 * g, ch + 80]])
    sigmoid = sdf.bezier(
        [
            [hx, -30 * g, ch + 80],
            [hx - 10, -40 * g, 0.4 * ch],
            [0, -60 * g, 0.6 * ch],
            [-20 * g, 40 * g, 0.4 * ch],
            [0, 55 * g, 0.2 * ch],
        ],
        10,
    )
    return np.minimum(
        sdf.tube(u, v, w, caecum, [28 * g, 25 * g]), sdf.tube(u, v, w, sigmoid, [16 * g] * 10)
    )


def _pelvic_contents(content, cgrid: Grid, factor: int, pelvis, pfield, shape: dict) -> None:
    """Pelvic fat, bladder, rectum, uterus or prostate, ischioanal fat (in place, coarse)."""
    b, g, ch = shape["body"], shape["size"], pelvis.p["crest_height_mm"]
    hx, fat = pelvis.hx, F32(shape["body"]["fat_hu"])
    lo, hi = np.array([-(hx + 10), -75 * g, -100 * g]), np.array([hx + 10, 90 * g, 0.45 * ch])
    sl, uvw = _region(cgrid, pelvis.frame, lo, hi)
    if sl is None:
        return
    u, v, w = uvw
    bone_d = _field_distance(pfield, sl, factor)
    fill = b["bladder_fill"] ** (1 / 3)
    true_pelvis = sdf.ellipsoid(u, v, w, [0, 18 * g, -18 * g], [hx - 26 * g, 58 * g, 42 * g])
    region = np.where((true_pelvis < 0) & (bone_d > 9.0 * g), fat, content[sl])
    bladder = sdf.ellipsoid(
        u, v, w, [0, 0, -8 * g + 10 * (fill - 1)], np.array([40, 30, 30]) * g * fill
    )
    region = np.where(bladder < 2.5, F32(TISSUE_HU["bowel_wall"]), region)
    region = np.where(bladder < 0, F32(TISSUE_HU["urine"]), region)
    rectum = sdf.tube(
        u, v, w, np.array([[0, 62, 25], [0, 50, -10], [0, 36, -62]]) * g, [14 * g] * 3
    )
    region = np.where(rectum < 2.5, F32(TISSUE_HU["bowel_wall"]), region)
    region = np.where(rectum < 0, F32(-60.0), region)
    if shape["sex"] == "F":
        organ = sdf.ellipsoid(u, v, w, [0, 32 * g, 22 * g], np.array([28, 20, 34]) * g)
    else:
        organ = sdf.ellipsoid(u, v, w, [0, -10 * g, -48 * g], np.array([20, 15, 15]) * g)
    region = np.where(organ < 0, F32(TISSUE_HU["organ"]), region)
    for s in (1.0, -1.0):
        ischioanal = sdf.ellipsoid(
            u, v, w, [s * 40 * g, 48 * g, -66 * g], np.array([18, 30, 26]) * g
        )
        region = np.where((ischioanal < 0) & (bone_d > 3.0), fat, region)
    content[sl] = region


def soft_tissue_hu(grid: Grid, body: BodyModel, pelvis: PelvisModel, pfield: Field, shape, rng):
    """HU without mineral over the whole grid (K, J, I), float32: air, skin, fat, muscle with
    intermuscular fat planes, abdominal and pelvic contents, hip joint cartilage.

    The deep contents are built on a ~2 mm grid and upsampled linearly (soft-tissue edges blur
    by about a millimetre, as a CT's would); skin and fat are exact at the grid's spacing.
    """
    hu, inner = _body_hu(grid, body, shape)
    cgrid, factor = _coarse_grid(grid, 2.0)
    b = shape["body"]
    content = np.full(cgrid.shape, F32(b["muscle_hu"]))
    gap = _fat_planes(cgrid, pelvis, shape)
    content[gap < F32(3.0 + 0.04 * b["fat_mm"])] = b["fat_hu"]  # >= 4 mm grid: no gaps
    del gap
    inner_c = inner[::factor, ::factor, ::factor]
    inner_c = np.pad(
        inner_c, [(0, n - m) for n, m in zip(cgrid.shape, inner_c.shape, strict=True)], mode="edge"
    )
    _abdomen(content, inner_c, cgrid, factor, pelvis, pfield, shape, rng)
    _pelvic_contents(content, cgrid, factor, pelvis, pfield, shape)
    np.copyto(hu, _upsample_linear(content, factor, grid.shape), where=inner < -3.0)
    for side in DRAW_SIDES:
        c, r = np.array([SIDE_SIGN[side] * pelvis.hx, 0, 0]), pelvis.rc[side] + 1.0
        sl, uvw = _region(grid, pelvis.frame, c - r, c + r)
        if sl is not None:
            u, v, w = uvw
            inside = (u - F32(c[0])) ** 2 + v * v + w * w < F32(r * r)
            hu[sl][inside] = TISSUE_HU["cartilage"]
    return hu
