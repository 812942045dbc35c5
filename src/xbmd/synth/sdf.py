"""Signed-distance functions (SDFs) and their block-wise evaluation on a voxel grid.

Distances are float32 mm, negative inside. A primitive is a function of local coordinates
``(u, v, w)`` (broadcastable float32 arrays, mm, in the frame of the body it belongs to) that
returns distances of the broadcast shape. A :class:`Field` accumulates the SDF of one bone over
the grid box that holds it, and evaluates each primitive only inside the primitive's own box:
outside that box the primitive is assumed farther than ``margin_mm``, so it cannot change the
union there. This keeps a 1 mm hip at a few seconds on one core.

Smooth unions use the polynomial smooth minimum (Quilez, "smooth minimum", 2013), whose blend
radius ``k`` is in mm: shapes closer than ``k`` fuse with an organic fillet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

F32 = np.float32
#: Distance written where no primitive is near, mm (only its sign and size > band matter).
FAR_MM = 50.0


def smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum (union) of two distances with blend radius ``k`` mm (``k <= 0``: min)."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth maximum (intersection, or subtraction with ``-b``), blend radius ``k`` mm."""
    return -smin(-a, -b, k)


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at ``e0`` to 1 at ``e1`` (either order)."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def ellipsoid(u, v, w, centre, radii) -> np.ndarray:
    """Approximate SDF of an axis-aligned ellipsoid (exact on the surface and for spheres)."""
    p = [(c - o) / r for c, o, r in zip((u, v, w), centre, radii, strict=True)]
    k0 = np.sqrt(p[0] ** 2 + p[1] ** 2 + p[2] ** 2)
    k1 = np.sqrt(sum((q / r) ** 2 for q, r in zip(p, radii, strict=True)))
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def tube(u, v, w, points, radii, squash=None) -> np.ndarray:
    """SDF of a chain of tapered capsules through ``points`` (n, 3) with ``radii`` (n,), mm.

    ``squash`` = (unit vector, factor): space is stretched by ``1/factor`` along the vector before
    measuring, so the tube's cross-section is flattened to ``factor`` of its radius there (a
    flattened ramus); the distance is scaled back by ``factor`` (conservative).
    """
    points = np.asarray(points, float)
    radii = np.asarray(radii, float)
    coords = [u, v, w]
    scale = 1.0
    if squash is not None:
        axis, factor = np.asarray(squash[0], float), float(squash[1])
        along = u * F32(axis[0]) + v * F32(axis[1]) + w * F32(axis[2])
        extra = along * F32(1.0 / factor - 1.0)
        coords = [c + extra * F32(a) for c, a in zip(coords, axis, strict=True)]
        points = points + np.outer(points @ axis, axis) * (1.0 / factor - 1.0)
        scale = factor
    d = None
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:], strict=True):
        ab = b - a
        ab2 = float(ab @ ab)
        pa = [c - F32(x) for c, x in zip(coords, a, strict=True)]
        t = np.clip((pa[0] * ab[0] + pa[1] * ab[1] + pa[2] * ab[2]) / F32(ab2), 0.0, 1.0)
        q2 = sum((p - t * F32(x)) ** 2 for p, x in zip(pa, ab, strict=True))
        seg = np.sqrt(q2) - (F32(ra) + t * F32(rb - ra))
        d = seg if d is None else np.minimum(d, seg)
    return d * F32(scale)


def bezier(control: np.ndarray, n: int) -> np.ndarray:
    """``n`` points (n, dim) along the Bezier curve with ``control`` points (m, dim)."""
    control = np.asarray(control, float)
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = control.copy()
    out = []
    for ti in t:
        p = pts.copy()
        while len(p) > 1:
            p = (1 - ti) * p[:-1] + ti * p[1:]
        out.append(p[0])
    return np.array(out)


def closed_spline(control: np.ndarray, per_segment: int = 12) -> np.ndarray:
    """Closed centripetal-free (uniform) Catmull-Rom curve through ``control`` (m, 2), sampled."""
    c = np.asarray(control, float)
    m = len(c)
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(m):
        p0, p1, p2, p3 = c[i - 1], c[i], c[(i + 1) % m], c[(i + 2) % m]
        out.append(
            0.5
            * (
                2 * p1
                + (-p0 + p2) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
            )
        )
    return np.concatenate(out)


def polygon_sdf(pu: np.ndarray, pv: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Exact 2D signed distance to a closed polygon (n, 2) at points ``pu``, ``pv`` (mm)."""
    pu, pv = np.broadcast_arrays(pu, pv)
    d2 = np.full(pu.shape, np.inf, dtype=np.float64)
    inside = np.zeros(pu.shape, dtype=bool)
    for a, b in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        e = b - a
        wu, wv = pu - a[0], pv - a[1]
        t = np.clip((wu * e[0] + wv * e[1]) / (e @ e), 0.0, 1.0)
        d2 = np.minimum(d2, (wu - e[0] * t) ** 2 + (wv - e[1] * t) ** 2)
        crosses = (pv >= a[1]) != (pv >= b[1])
        left = e[0] * wv - e[1] * wu
        inside ^= crosses & ((left > 0) == (b[1] > a[1]))
    return np.where(inside, -1.0, 1.0) * np.sqrt(d2)


@dataclass
class Table2D:
    """A 2D function tabulated on a regular (u, v) grid, looked up bilinearly (clamped)."""

    values: np.ndarray  # (nu, nv) float32
    origin: tuple[float, float]
    step_mm: float

    @classmethod
    def of_polygon(cls, poly: np.ndarray, step_mm: float, pad_mm: float = 20.0) -> Table2D:
        lo, hi = poly.min(axis=0) - pad_mm, poly.max(axis=0) + pad_mm
        gu = np.arange(lo[0], hi[0] + step_mm, step_mm)
        gv = np.arange(lo[1], hi[1] + step_mm, step_mm)
        vals = polygon_sdf(gu[:, None], gv[None, :], poly).astype(F32)
        return cls(vals, (float(lo[0]), float(lo[1])), step_mm)

    def __call__(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        iu = (u - F32(self.origin[0])) / F32(self.step_mm)
        iv = (v - F32(self.origin[1])) / F32(self.step_mm)
        iu, iv = np.broadcast_arrays(iu, iv)
        return map_coordinates(self.values, [iu, iv], order=1, mode="nearest").astype(F32)


def extrude(d2: np.ndarray, e: np.ndarray) -> np.ndarray:
    """SDF of a 2D shape (distance ``d2``) extruded to a slab (distance ``e`` from its faces)."""
    out = np.sqrt(np.maximum(d2, 0.0) ** 2 + np.maximum(e, 0.0) ** 2)
    return out + np.minimum(np.maximum(d2, e), 0.0)


@dataclass(frozen=True)
class Frame:
    """A local frame: ``axes`` rows are the local unit axes in world (LPS) coordinates.

    ``local = axes @ (world - origin)``. The axes may form a reflection (the right femur is the
    mirror image of the left one), which is fine for distances.
    """

    origin: np.ndarray  # (3,) mm
    axes: np.ndarray  # (3, 3)

    def to_local(self, p) -> np.ndarray:
        return (np.asarray(p, float) - self.origin) @ self.axes.T

    def to_world(self, q) -> np.ndarray:
        return np.asarray(q, float) @ self.axes + self.origin

    def world_box(self, lo, hi) -> tuple[np.ndarray, np.ndarray]:
        """World-axis-aligned box (lo, hi) holding the local box [lo, hi]."""
        corners = np.array(
            [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])],
            float,
        )
        w = self.to_world(corners)
        return w.min(axis=0), w.max(axis=0)


@dataclass(frozen=True)
class Grid:
    """An axis-aligned voxel grid: voxel (i, j, k) centre at ``origin_mm + (i, j, k) * spacing``.

    ``shape`` is (K, J, I); ``origin_mm`` and ``spacing_mm`` are in (x, y, z) order.
    """

    origin_mm: np.ndarray
    spacing_mm: np.ndarray
    shape: tuple[int, int, int]

    def axis_mm(self, axis: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """World coordinates (float32, mm) of voxel centres along x (0), y (1) or z (2)."""
        n = self.shape[2 - axis]
        idx = np.arange(lo, n if hi is None else hi)
        return (self.origin_mm[axis] + idx * self.spacing_mm[axis]).astype(F32)

    def index_box(self, lo_mm, hi_mm) -> tuple[np.ndarray, np.ndarray]:
        """Half-open (x, y, z) index ranges of the voxels inside [lo_mm, hi_mm], clipped."""
        n = np.array(self.shape[::-1])
        lo = np.ceil((np.asarray(lo_mm) - self.origin_mm) / self.spacing_mm).astype(int)
        hi = np.floor((np.asarray(hi_mm) - self.origin_mm) / self.spacing_mm).astype(int) + 1
        return np.clip(lo, 0, n), np.clip(hi, 0, n)


class Field:
    """The SDF of one body, accumulated over the grid box around its local box ``[lo, hi]``.

    ``d`` has shape (K, J, I) of the box, float32 mm; ``index_lo`` is the box's (x, y, z) offset
    in the grid. Primitives outside their own box are taken as farther than ``margin_mm``, so
    ``d`` is exact only where it is below ``margin_mm`` (and clipped to ``FAR_MM`` elsewhere).
    """

    def __init__(self, grid: Grid, frame: Frame, lo, hi, margin_mm: float) -> None:
        self.grid, self.frame, self.margin_mm = grid, frame, float(margin_mm)
        wlo, whi = frame.world_box(np.asarray(lo) - margin_mm, np.asarray(hi) + margin_mm)
        self.index_lo, self.index_hi = grid.index_box(wlo, whi)
        size = np.maximum(self.index_hi - self.index_lo, 0)
        self.d = np.full(tuple(size[::-1]), FAR_MM, F32)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """(K, J, I) slices of the grid covered by the field."""
        return tuple(
            slice(a, b) for a, b in zip(self.index_lo[::-1], self.index_hi[::-1], strict=True)
        )

    def block(self, lo, hi, extra_mm: float = 0.0) -> tuple[slice, slice, slice] | None:
        """Field-array slices around the local box [lo, hi] (plus margin), or None if empty."""
        pad = self.margin_mm + extra_mm
        wlo, whi = self.frame.world_box(np.asarray(lo) - pad, np.asarray(hi) + pad)
        a, b = self.grid.index_box(wlo, whi)
        a = np.maximum(a, self.index_lo) - self.index_lo
        b = np.minimum(b, self.index_hi) - self.index_lo
        if np.any(b <= a):
            return None
        return tuple(slice(int(p), int(q)) for p, q in zip(a[::-1], b[::-1], strict=True))

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, ...]:
        """Local coordinates (u, v, w) of the voxels of field block ``sl``, float32 (K, J, I)."""
        axes = [
            self.grid.axis_mm(ax, self.index_lo[ax] + s.start, self.index_lo[ax] + s.stop)
            - F32(self.frame.origin[ax])
            for ax, s in zip((0, 1, 2), sl[::-1], strict=True)
        ]
        x, y, z = axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None]
        r = self.frame.axes.astype(F32)
        return tuple(r[c, 0] * x + r[c, 1] * y + r[c, 2] * z for c in range(3))

    def apply(self, fn, lo, hi, op: str = "union", k: float = 0.0, gap: float = 0.0) -> None:
        """Combine primitive ``fn(u, v, w)`` (local box [lo, hi]) into ``d`` by ``op``.

        op : 'union' (smooth union, blend ``k`` mm), 'subtract' (smooth subtraction) or 'joint'
            (carve a space of ``gap`` mm around the primitive, then add it: a joint).
        A :class:`Parts` primitive is evaluated part by part, each in its own box.
        """
        sl = self.block(lo, hi, extra_mm=k + gap)
        if sl is None:
            return
        if isinstance(fn, Parts):
            d = np.full(tuple(s.stop - s.start for s in sl), FAR_MM, F32)
            for part, plo, phi in fn.parts:
                sub = self.block(plo, phi, extra_mm=k + gap)
                if sub is None:
                    continue
                sub = tuple(
                    slice(max(a.start, b.start), min(a.stop, b.stop))
                    for a, b in zip(sub, sl, strict=True)
                )
                if any(x.stop <= x.start for x in sub):
                    continue
                rel = tuple(
                    slice(a.start - b.start, a.stop - b.start) for a, b in zip(sub, sl, strict=True)
                )
                d[rel] = np.minimum(d[rel], part(*self.coords(sub)))
        elif getattr(fn, "sparse", False):
            d = self._sparse(fn, sl, k + gap)
        else:
            d = fn(*self.coords(sl)).astype(F32, copy=False)
        if op == "union":
            self.d[sl] = smin(self.d[sl], d, k)
        elif op == "subtract":
            self.d[sl] = smax(self.d[sl], -d, k)
        elif op == "joint":
            self.d[sl] = np.minimum(np.maximum(self.d[sl], F32(gap) - d), d)
        else:
            raise ValueError(f"op must be 'union', 'subtract' or 'joint', not {op!r}")

    def _sparse(self, fn, sl, blend_mm: float, block: int = 12) -> np.ndarray:
        """Evaluate a thin primitive block by block, skipping blocks its centre rules out.

        The SDF is about 1-Lipschitz, so a block whose centre is farther than its half-diagonal
        (plus margin, blend and 4 mm of slack) cannot hold a surface: it is left FAR_MM, or, deep
        inside, set to the centre's distance (only depths beyond any cortex matter there).
        """
        size = [s.stop - s.start for s in sl]
        d = np.full(size, FAR_MM, F32)
        starts = [np.arange(0, n, block) for n in size]
        ck, cj, ci = np.meshgrid(*starts, indexing="ij")
        cidx = np.stack([ci, cj, ck], axis=-1).reshape(-1, 3).astype(float)
        off = np.array([s.start for s in sl[::-1]]) + self.index_lo
        sizes = np.minimum(block, np.array(size[::-1]) - cidx)
        world = self.grid.origin_mm + (off + cidx + (sizes - 1) / 2) * self.grid.spacing_mm
        local = self.frame.to_local(world).astype(F32)
        dc = fn(local[:, 0], local[:, 1], local[:, 2])
        half = 0.5 * np.linalg.norm(sizes * self.grid.spacing_mm, axis=1)
        reach = half + self.margin_mm + blend_mm + 4.0
        for n in np.flatnonzero(np.abs(dc) < reach):
            i0, j0, k0 = cidx[n].astype(int)
            i1, j1, k1 = (cidx[n] + sizes[n]).astype(int)
            rel = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
            sub = tuple(
                slice(s.start + r.start, s.start + r.stop) for s, r in zip(sl, rel, strict=True)
            )
            d[rel] = fn(*self.coords(sub))
        deep = np.flatnonzero(dc <= -reach)
        for n in deep:
            i0, j0, k0 = cidx[n].astype(int)
            i1, j1, k1 = (cidx[n] + sizes[n]).astype(int)
            d[k0:k1, j0:j1, i0:i1] = dc[n]
        return d


class Parts:
    """A primitive that is the hard union of parts ``(fn, lo, hi)``, each evaluated in its box."""

    def __init__(self, parts: list[tuple]) -> None:
        self.parts = parts

    def __call__(self, u, v, w) -> np.ndarray:
        return np.minimum.reduce([fn(u, v, w) for fn, _, _ in self.parts])

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.min([np.asarray(lo) for _, lo, _ in self.parts], axis=0),
            np.max([np.asarray(hi) for _, _, hi in self.parts], axis=0),
        )


def tube_parts(points, radii) -> Parts:
    """A chain of tapered capsules as :class:`Parts`, one per segment (fast for long chains)."""
    points, radii = np.asarray(points, float), np.asarray(radii, float)
    parts = []
    for i in range(len(points) - 1):
        p, r = points[i : i + 2], radii[i : i + 2]
        lo, hi = tube_box(p, r)
        parts.append((lambda u, v, w, p=p, r=r: tube(u, v, w, p, r), lo, hi))
    return Parts(parts)


def ellipse(v1, v2, a, b) -> np.ndarray:
    """Approximate 2D SDF of an ellipse with semi-axes ``a``, ``b`` (arrays allowed), mm."""
    k0 = np.sqrt((v1 / a) ** 2 + (v2 / b) ** 2)
    k1 = np.sqrt((v1 / (a * a)) ** 2 + (v2 / (b * b)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def tube_box(points, radii) -> tuple[np.ndarray, np.ndarray]:
    """Local box (lo, hi) of :func:`tube`."""
    p, r = np.asarray(points, float), float(np.max(radii))
    return p.min(axis=0) - r, p.max(axis=0) + r


def oriented_noise(
    rng: np.random.Generator,
    spacing_mm: float,
    orientation,
    period_mm: float = 2.6,
    elongation: float = 3.0,
    tile_mm: float = 64.0,
) -> np.ndarray:
    """A periodic tile (n, n, n) of band-pass noise, unit variance at fine spacing, float32.

    The spectrum is a ring at ``1/period_mm`` across ``orientation`` and narrow along it, so the
    texture is made of plates and rods ``elongation`` times longer along ``orientation``: the
    look of trabecular bone in a clinical CT. Index the tile with coordinates / ``spacing_mm``
    modulo n. On a coarse grid the unresolved part of the spectrum is dropped, so the texture
    fades as a partial-volume average would.
    """
    n = int(np.clip(round(tile_mm / spacing_mm), 8, 96))
    f = np.fft.fftfreq(n, d=spacing_mm).astype(F32)
    fr = np.fft.rfftfreq(n, d=spacing_mm).astype(F32)
    kx, ky, kz = f[:, None, None], f[None, :, None], fr[None, None, :]
    o = unit(orientation).astype(F32)
    par = kx * o[0] + ky * o[1] + kz * o[2]
    perp = np.sqrt(np.maximum(kx**2 + ky**2 + kz**2 - par**2, 0.0))
    f0 = 1.0 / period_mm
    filt = np.exp(-0.5 * ((perp - f0) / (0.45 * f0)) ** 2) * np.exp(
        -0.5 * (par / (f0 / elongation)) ** 2
    )
    white = rng.standard_normal((n, n, n)).astype(F32)
    tile = np.fft.irfftn(np.fft.rfftn(white) * filt, s=(n, n, n), axes=(0, 1, 2)).astype(F32)
    # unit variance for a fully resolved spectrum: scale by the resolved fraction of the power
    resolved = float(np.clip(2.0 * spacing_mm * f0 * 0.8, 1.0, None))
    return tile / (tile.std() + 1e-12) / np.float32(resolved**1.5)


def tile_lookup(tile: np.ndarray, spacing_mm: float, u, v, w) -> np.ndarray:
    """Nearest-neighbour lookup of a periodic ``tile`` at coordinates (u, v, w) mm."""
    n = tile.shape[0]
    iu = np.floor(u / spacing_mm).astype(np.int64) % n
    iv = np.floor(v / spacing_mm).astype(np.int64) % n
    iw = np.floor(w / spacing_mm).astype(np.int64) % n
    return tile.ravel()[(iu * n + iv) * n + iw]


class Plate:
    """A curved plate of varying thickness with a free 2D outline: iliac wings, the sacrum.

    The plate's mid-surface is ``w = f(u, v)`` in a frame (u, v in-plane, w normal); ``outline``
    (n, 2) is its boundary in (u, v); ``thickness(u, v, d2)`` (mm) may depend on the 2D
    distance ``d2`` to the outline (a thick rim); ``holes`` (centre_u, centre_v, radius) are
    cylinders through the plate (foramina). Edges are rounded by 40 % of the thickness.
    """

    sparse = True  # thin: evaluate block by block (Field._sparse)

    def __init__(self, frame: Frame, outline, surface, thickness, holes=(), step_mm=1.0):
        self.frame, self.surface, self.thickness = frame, surface, thickness
        self.table = Table2D.of_polygon(np.asarray(outline, float), step_mm)
        self.outline, self.holes = np.asarray(outline, float), list(holes)

    def __call__(self, x, y, z) -> np.ndarray:
        r = self.frame.axes.astype(F32)
        o = self.frame.origin.astype(F32)
        x, y, z = x - o[0], y - o[1], z - o[2]
        u = r[0, 0] * x + r[0, 1] * y + r[0, 2] * z
        v = r[1, 0] * x + r[1, 1] * y + r[1, 2] * z
        w = r[2, 0] * x + r[2, 1] * y + r[2, 2] * z
        d2 = self.table(u, v)
        for cu, cv, rad in self.holes:
            d2 = np.maximum(d2, F32(rad) - np.sqrt((u - F32(cu)) ** 2 + (v - F32(cv)) ** 2))
        th = self.thickness(u, v, d2)
        rnd = F32(0.4) * th
        e = np.abs(w - self.surface(u, v)) - 0.5 * th
        return extrude(d2 + rnd, e + rnd) - rnd

    def box(self, max_offset_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """Box in the parent frame, given the largest |w| the plate reaches (surface + half)."""
        lo, hi = self.outline.min(axis=0), self.outline.max(axis=0)
        corners = np.array(
            [
                [a, b, c]
                for a in (lo[0], hi[0])
                for b in (lo[1], hi[1])
                for c in (-max_offset_mm, max_offset_mm)
            ]
        )
        world = self.frame.to_world(corners)
        return world.min(axis=0), world.max(axis=0)
