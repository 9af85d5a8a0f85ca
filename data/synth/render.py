"""Procedural sealant beads on machined parts: the built-in dataset, so the pipeline runs with no data.

A bead is a tube laid along a robot path. Each image is rendered from a distance field: the path
is a polyline, every pixel near it gets its distance to the path and the path parameter of the
nearest point, and the bead is a height map (a flattened half-cylinder whose radius is a function
of that parameter), shaded from its surface normals. Defects are edits of that one model: the
radius along a stretch (gap, thin, thick), the path (offset), extra material (spill, the second
strand of a start/stop overlap) or voids carved out of the height (bubbles).

The scene (part, path, lighting, dust, sensor noise) and the defect come from separate random
streams of the seed, so the same seed rendered with ``defect=None`` is the same part and bead
without the defect: the two images differ only where the defect is, which is what the YOLO boxes
mark (and what the tests check).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from data.config import DEFECT_TYPES, SyntheticConfig

__all__ = ["VIEWS", "Bead", "render", "render_sample"]

VIEWS: tuple[str, ...] = ("segment", "part")
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


@dataclass(frozen=True)
class Bead:
    """One rendered image, what is wrong with it, and where (YOLO boxes, normalised)."""

    image: np.ndarray  # (size, size, 3) uint8 RGB
    defect: str | None  # one of DEFECT_TYPES, or None for a normal bead
    severity: float  # 0..1 as used (0.0 for a normal bead)
    boxes: list[tuple[int, float, float, float, float]]  # (class id in DEFECT_TYPES, cx, cy, w, h)


def _stream(seed: int, key: int) -> np.random.Generator:
    """Independent stream ``key`` of a seed: 0 the scene, 1 the defect, 2 which defect."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class _Geometry:
    """The bead as laid: centreline vertices with their path parameter, and a fine radius profile."""

    pts: np.ndarray  # (N, 2) centreline, pixels
    tv: np.ndarray  # (N,) path parameter (arc length of the nominal path) at each vertex
    rt: np.ndarray  # (M,) fine grid of the path parameter, 1 px apart
    rad: np.ndarray  # (M,) bead half-width at rt
    strands: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...] = ()  # extra beads (pts, tv, rad at tv)
    domes: tuple[tuple[float, float, float], ...] = ()  # extra material (x, y, radius)
    pits: tuple[tuple[float, float, float, float], ...] = ()  # voids (x, y, radius, depth)

    def at(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points and unit normals of this centreline at path parameters ``t``."""
        p = np.stack([np.interp(t, self.tv, self.pts[:, i]) for i in (0, 1)], axis=-1)
        tan = np.gradient(self.pts, axis=0)
        tan = np.stack([np.interp(t, self.tv, tan[:, i]) for i in (0, 1)], axis=-1)
        tan /= np.maximum(np.linalg.norm(tan, axis=-1, keepdims=True), 1e-6)
        return p, np.stack([-tan[:, 1], tan[:, 0]], axis=-1)


def _resample(poly: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``step`` apart along a polyline, and their arc length."""
    seg = np.hypot(*np.diff(poly, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, cum[-1], max(2, int(np.ceil(cum[-1] / step)) + 1))
    return np.stack([np.interp(t, cum, poly[:, 0]), np.interp(t, cum, poly[:, 1])], axis=-1), t


def _segment_path(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """A stretch through the frame centre, as a camera riding with the nozzle sees it: the bead
    leaves the nozzle in about the same direction in every frame (down the image, give or take
    17 degrees), with gentle curvature and sometimes a rounded corner of the robot path ahead or
    behind. Returns a polyline and the arc length at the centre."""
    half, step = 0.9 * size, size / 24
    t = np.arange(-half, half + step / 2, step)
    heading = t * rng.uniform(-1, 1) / (1.3 * size)
    if rng.random() < 0.3:
        width = rng.uniform(0.15, 0.3) * size
        x = np.clip((t - rng.choice([-1, 1]) * rng.uniform(0.15, 0.4) * size) / width + 0.5, 0, 1)
        heading = heading + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0) * x * x * (3 - 2 * x)
    centre = np.argmin(np.abs(t))
    heading = heading - heading[centre] + np.pi / 2 + rng.uniform(-0.3, 0.3)
    pts = np.cumsum(step * np.stack([np.cos(heading), np.sin(heading)], axis=-1), axis=0)
    pts = pts - pts[centre] + size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    return pts, float(half)


def _superellipse(c: np.ndarray, a: float, b: float, n: float, rot: float, start: float) -> np.ndarray:
    th = start + np.linspace(0, 2 * np.pi, 361)
    cs, sn = np.cos(th), np.sin(th)
    x, y = a * np.sign(cs) * np.abs(cs) ** (2 / n), b * np.sign(sn) * np.abs(sn) ** (2 / n)
    return c + np.stack([x * np.cos(rot) - y * np.sin(rot), x * np.sin(rot) + y * np.cos(rot)], axis=-1)


def _part_outline(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float, float, float, float]:
    """The part: a rounded rectangle or oval (centre, semi-axes, exponent, rotation)."""
    centre = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    a, b = rng.uniform(0.36, 0.46, 2) * size
    return centre, float(a), float(b), float(rng.uniform(2.5, 8)), float(rng.uniform(-0.3, 0.3))


def _part_path(rng: np.random.Generator, size: int, outline: tuple) -> np.ndarray:
    """The whole bead path on the part: a closed loop inset from its edge, or an open stretch of it."""
    centre, a, b, n, rot = outline
    inset = rng.uniform(0.07, 0.11) * size
    poly = _superellipse(centre, a - inset, b - inset, n, rot, rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.35:  # an open path: part of the loop
        poly = poly[: int(len(poly) * rng.uniform(0.5, 0.8))]
    return poly


# ----------------------------------------------------------------------------- the scene
@dataclass(frozen=True)
class _Scene:
    """Everything the scene stream draws; none of it depends on the defect."""

    size: int
    geo: _Geometry
    t_centre: float  # path parameter at the frame centre (segment view)
    r0: float  # nominal bead half-width
    surface: np.ndarray  # (3, S, S) float32: the part without the bead
    groove: tuple[float, float]  # half-width and centre offset of the channel the bead sits in
    colour: np.ndarray  # bead RGB
    light: tuple[np.ndarray, float, float, float]  # direction, ambient, specular strength, shininess
    illumination: np.ndarray  # (S, S) gradient and vignette, multiplicative
    glare: np.ndarray | None  # (S, S) additive, or no glare
    dust: list[tuple[float, float, float, float]]  # x, y, radius, grey
    blur: float
    noise: np.ndarray  # (S, S) float32, grey; blurred a little with the image, as demosaicing does


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def _material(rng: np.random.Generator, size: int, avoid: float) -> np.ndarray:
    """Machined metal (grinding streaks) or moulded plastic (mottled), at least 50 grey levels
    away from ``avoid`` (the bead) so that the bead shows on every part."""
    metal = rng.random() < 0.5
    below, above = max(0.0, avoid - 95), max(0.0, 165 - avoid)  # room in [45, 215] outside avoid +- 50
    u = rng.uniform(0, below + above)
    level = 45 + u if u < below else avoid + 50 + (u - below)
    base = np.clip(level + rng.uniform(-8, 8, 3) * (1 if metal else 3), 10, 245).astype(np.float32)
    grain = _smooth_noise(rng, size, 5) * rng.uniform(4, 10)
    if metal:
        ang, c = rng.uniform(0, np.pi), np.arange(size, dtype=np.float32) * (96 / size)
        u = c[None, :] * np.cos(ang) + c[:, None] * np.sin(ang)
        lines = rng.standard_normal(3 * 96 + 2).astype(np.float32) * rng.uniform(3, 8)
        grain = grain + lines[(u - u.min()).astype(int)]
    else:
        grain = grain + _smooth_noise(rng, size, 16) * rng.uniform(2, 5)
    return base[:, None, None] + grain  # channels first: broadcasting a plane over 3 channels is cheap


def _part_on_fixture(rng: np.random.Generator, size: int, surface: np.ndarray, outline: tuple) -> np.ndarray:
    """The whole part (a rounded rectangle or oval with a bevelled edge) on a darker fixture."""
    centre, a, b, n, rot = outline
    m = (size + 3) // 4  # the distance to the edge is smooth: compute it on a coarse grid, upsample
    c = (np.arange(m, dtype=np.float32) + 0.5) * (size / m)
    x, y = c[None, :] - centre[0], c[:, None] - centre[1]
    xr, yr = x * np.cos(rot) + y * np.sin(rot), -x * np.sin(rot) + y * np.cos(rot)
    coarse = (1 - (np.abs(xr / a) ** n + np.abs(yr / b) ** n) ** (1 / n)) * min(a, b)
    coarse = Image.fromarray(coarse.astype(np.float32), mode="F")
    inward = np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR))
    inside = np.clip(inward + 0.5, 0, 1)
    bevel = np.clip(1 - np.abs(inward - 1.5) / 1.5, 0, 1)
    fixture = rng.uniform(0.25, 0.55) * float(surface[:, ::4, ::4].mean()) + 6 * _smooth_noise(rng, size, 6)
    return surface * inside + (fixture * (1 - inside) + 40 * bevel)


def _lighting(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A brightness gradient with vignetting, and (half the time) a glare spot from a lamp."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ang, grad, vig = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.35), rng.uniform(0, 0.3)
    x, y = c[None, :], c[:, None]
    illum = 1 + grad * (x * np.cos(ang) + y * np.sin(ang)) - vig * (x * x + y * y)
    (gx, gy), sig = rng.uniform(-0.45, 0.45, 2), rng.uniform(0.08, 0.25)
    amp = rng.uniform(20, 70) * (rng.random() < 0.5)
    glare = amp * np.exp(-((y - gy) ** 2) / (2 * sig**2)) * np.exp(-((x - gx) ** 2) / (2 * sig**2))
    return illum.astype(np.float32), glare.astype(np.float32) if amp > 0 else None


def _draw_scene(seed: int, size: int, view: str) -> _Scene:
    """Everything but the defect, from the scene stream of ``seed`` (its draws never depend on the defect)."""
    rng = _stream(seed, 0)
    outline = _part_outline(rng, size)
    if view == "segment":
        poly, t_centre, r0 = *_segment_path(rng, size), size * rng.uniform(0.095, 0.11)
    else:
        poly, t_centre, r0 = _part_path(rng, size, outline), 0.0, size * rng.uniform(0.022, 0.028)
    pts, tv = _resample(poly, size / 16 if view == "segment" else size / 24)
    rt = np.arange(0.0, tv[-1] + 1.0)
    wobble = (rng.uniform(0, 0.05) * np.sin(2 * np.pi * rt / (rng.uniform(0.3, 0.8) * size) + rng.uniform(0, 7))
              + 0.03 * np.interp(rt, np.linspace(0, rt[-1], 12), rng.standard_normal(12)))
    grey = float(rng.choice([30.0, 75.0, 150.0, 220.0]))
    amber = np.array([40, 5, -50]) * (rng.random() < 0.2)
    colour = np.clip(grey + rng.uniform(-12, 12, 3) + amber, 5, 250).astype(np.float32)
    surface = _material(rng, size, avoid=grey)
    if view == "part":
        surface = _part_on_fixture(rng, size, surface, outline)
    azimuth, elevation = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.15)
    direction = np.array([np.cos(azimuth) * np.cos(elevation), np.sin(azimuth) * np.cos(elevation), np.sin(elevation)])
    illumination, glare = _lighting(rng, size)
    dust = [(*map(float, rng.uniform(0, size, 2)), rng.uniform(0.4, 1.3) * size / 96,
             float(rng.choice([35.0, 225.0]))) for _ in range(rng.poisson(3))]
    groove = (r0 * rng.uniform(1.08, 1.2), r0 * rng.uniform(-0.06, 0.06))
    light = (direction.astype(np.float32), rng.uniform(0.4, 0.6), rng.uniform(0.1, 0.5) * 255, rng.uniform(8, 40))
    blur = rng.uniform(0.2, 0.7) * size / 96
    # Uniform noise from random bytes: a quarter of the cost of Gaussian, and no one can tell after the blur.
    noise = rng.integers(0, 256, (size, size), dtype=np.uint8) * np.float32(rng.uniform(2, 7) / 74)
    noise -= noise.mean()
    return _Scene(size, _Geometry(pts, tv, rt, r0 * (1 + wobble)), t_centre, r0, surface.astype(np.float32, copy=False),
                  groove, colour, light, illumination, glare, dust, blur, noise)


# ----------------------------------------------------------------------------- the distance field
def _field(pts: np.ndarray, tv: np.ndarray, size: int, reach: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance of every pixel to the polyline and the path parameter of its nearest point.
    Segment ``i`` only visits pixels within ``reach[i]`` of it (farther ones stay at +inf), which
    keeps a 224 px frame to a few milliseconds."""
    sd = np.full((size, size), np.inf, np.float32)
    t = np.zeros((size, size), np.float32)
    c = np.arange(size, dtype=np.float32) + 0.5
    lo = np.floor(np.minimum(pts[:-1], pts[1:]) - reach[:, None]).astype(int).clip(0, size).tolist()
    hi = np.ceil(np.maximum(pts[:-1], pts[1:]) + reach[:, None]).astype(int).clip(0, size).tolist()
    ax, ay = pts[:-1, 0].tolist(), pts[:-1, 1].tolist()
    dx, dy = np.diff(pts[:, 0]).tolist(), np.diff(pts[:, 1]).tolist()
    t0, dt = tv[:-1].tolist(), np.diff(tv).tolist()
    for i in range(len(dx)):
        (x0, y0), (x1, y1) = lo[i], hi[i]
        if x0 >= x1 or y0 >= y1:
            continue
        px, py = c[x0:x1] - ax[i], c[y0:y1, None] - ay[i]
        inv = 1 / max(dx[i] * dx[i] + dy[i] * dy[i], 1e-9)
        u = (px * (dx[i] * inv)) + (py * (dy[i] * inv))  # where along the segment, 0..1 after clipping
        np.minimum(np.maximum(u, 0, out=u), 1, out=u)
        dist = np.hypot(px - u * dx[i], py - u * dy[i])
        win_sd, win_t = sd[y0:y1, x0:x1], t[y0:y1, x0:x1]
        better = dist < np.abs(win_sd)
        np.copyto(win_sd, np.copysign(dist, (py * dx[i]) - (px * dy[i])), where=better)  # + left of the path
        np.copyto(win_t, u * dt[i] + t0[i], where=better)
    return sd, t


def _reach(tv: np.ndarray, rt: np.ndarray, rad: np.ndarray, floor: float) -> np.ndarray:
    """Per segment: the widest the bead gets along it (and at least ``floor``), plus 2 px."""
    start = np.searchsorted(rt, tv[:-1]).clip(0, len(rt) - 1)
    widest = np.maximum(np.maximum.reduceat(rad, start), np.interp(tv[1:], rt, rad))
    return np.maximum(widest, floor) + 2


def _tube(sd: np.ndarray, t: np.ndarray, rt: np.ndarray, rad: np.ndarray) -> np.ndarray:
    """Height of a bead of radius ``rad(t)``: a flattened half-cylinder across the path."""
    r = np.interp(t, rt, rad).astype(np.float32)
    q = 1 - np.square(sd / np.maximum(r, 1e-3))
    return 0.7 * r * np.sqrt(np.clip(q, 0, None))


def _disc(size: int, x: float, y: float, radius: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """The window around a disc and ``1 - (d / radius)^2`` in it (positive inside the disc)."""
    x0, x1 = int(np.clip(x - radius - 1, 0, size)), int(np.clip(x + radius + 2, 0, size))
    y0, y1 = int(np.clip(y - radius - 1, 0, size)), int(np.clip(y + radius + 2, 0, size))
    c = np.arange(size, dtype=np.float32) + 0.5
    q = 1 - ((c[x0:x1][None, :] - x) ** 2 + (c[y0:y1][:, None] - y) ** 2) / np.float32(radius**2)
    return (slice(y0, y1), slice(x0, x1)), q


def _dome(h: np.ndarray, x: float, y: float, radius: float, height: float) -> None:
    """Add a dome of material (``height`` > 0) or carve a spherical void (< 0) into ``h``, in place."""
    win, q = _disc(h.shape[0], x, y, radius)
    cap = abs(height) * np.sqrt(np.clip(q, 0, None))
    h[win] = np.maximum(h[win], cap) if height > 0 else np.maximum(h[win] - cap, 0)


# ----------------------------------------------------------------------------- defects
def _window(t: np.ndarray, t0: float, length: float, taper: float) -> np.ndarray:
    """1 on a stretch of ``length`` centred at ``t0``, easing to 0 over ``taper`` at each end."""
    x = np.clip((length / 2 - np.abs(t - t0)) / max(taper, 1e-6), 0, 1)
    return x * x * (3 - 2 * x)


def _box(p: np.ndarray, r: np.ndarray | float) -> Box:
    r = np.broadcast_to(np.asarray(r, dtype=float), (len(p),))
    lo, hi = (p - r[:, None]).min(axis=0), (p + r[:, None]).max(axis=0)
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _union(a: Box, b: Box) -> Box:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _changed(delta: np.ndarray) -> np.ndarray:
    """Where a change along the path is visible: half a pixel, or half its peak if smaller."""
    return np.abs(delta) >= min(0.5, 0.5 * float(np.abs(delta).max()))


def _resize(sc: _Scene, factor: np.ndarray) -> tuple[_Geometry, list[Box]]:
    """Gap, thin and thick: the bead's radius times ``factor`` along the path."""
    geo = sc.geo
    rad = geo.rad * factor
    sel = _changed(rad - geo.rad)
    p, _ = geo.at(geo.rt[sel])
    return dataclasses.replace(geo, rad=rad), [_box(p, np.maximum(rad, geo.rad)[sel])]


def _gap(sc: _Scene, s: float, rng: np.random.Generator, t0: float) -> tuple[_Geometry, list[Box]]:
    return _resize(sc, 1 - _window(sc.geo.rt, t0, sc.r0 * (0.8 + 4.2 * s), 0.35 * sc.r0))


def _thin(sc: _Scene, s: float, rng: np.random.Generator, t0: float) -> tuple[_Geometry, list[Box]]:
    length = sc.r0 * (1.5 + 4.5 * s)
    return _resize(sc, 1 - (0.3 + 0.55 * s) * _window(sc.geo.rt, t0, length, 0.25 * length))


def _thick(sc: _Scene, s: float, rng: np.random.Generator, t0: float) -> tuple[_Geometry, list[Box]]:
    length = sc.r0 * (1.2 + 3.6 * s)
    return _resize(sc, 1 + (0.3 + 1.2 * s) * _window(sc.geo.rt, t0, length, 0.35 * length))


def _offset(sc: _Scene, s: float, rng: np.random.Generator, t0: float) -> tuple[_Geometry, list[Box]]:
    """The bead leaves its groove for a stretch: the groove shows on one side."""
    geo, length = sc.geo, sc.r0 * (1.5 + 4.5 * s)
    shift = rng.choice([-1, 1]) * sc.r0 * (0.5 + 1.5 * s)
    _, n = geo.at(geo.tv)
    pts = geo.pts + (shift * _window(geo.tv, t0, length, 0.3 * length))[:, None] * n
    w = shift * _window(geo.rt, t0, length, 0.3 * length)
    sel = _changed(w)
    p, n = geo.at(geo.rt[sel])
    box = _union(_box(p, sc.groove[0] + abs(sc.groove[1]) + 1), _box(p + w[sel, None] * n, geo.rad[sel]))
    return dataclasses.replace(geo, pts=pts), [box]


def _bubble(sc: _Scene, s: float, rng: np.random.Generator, t0: float) -> tuple[_Geometry, list[Box]]:
    """A porous stretch: voids opened in the bead, deep enough at high severity to show the part."""
    geo, length = sc.geo, sc.r0 * (1.5 + 4.5 * s)
    k = int(rng.integers(2, 3 + round(3 * s)))
    radius = sc.r0 * (0.35 + 0.4 * s) * rng.uniform(0.8, 1.2, k)
    along = t0 + (np.linspace(-0.5, 0.5, k) + rng.uniform(-0.15, 0.15, k)) * (length - 2 * radius.max())
    p, n = geo.at(along)
    centres = p + (rng.uniform(-0.6, 0.6, k) * (sc.r0 - radius))[:, None] * n
    depth = 0.7 * sc.r0 * (0.8 + 0.6 * s)
    pits = tuple((float(x), float(y), float(r), depth) for (x, y), r in zip(centres, radius))
    return dataclasses.replace(geo, pits=pits), [_box(centres, radius)]


def _spill(sc: _Scene, s: float, rng: np.random.Generator, t0: float) -> tuple[_Geometry, list[Box]]:
    """A splash of sealant beside the bead: a flat puddle and a few satellites."""
    radius = sc.r0 * (0.45 + 1.1 * s)
    p, n = sc.geo.at(np.array([t0]))
    centre = p[0] + rng.choice([-1, 1]) * (sc.r0 * rng.uniform(1.0, 1.4) + 0.8 * radius) * n[0]
    k = int(rng.integers(2, 5))
    centres = np.vstack([centre, centre + rng.uniform(-1.1, 1.1, (k, 2)) * radius])
    radii = np.concatenate([[radius], radius * rng.uniform(0.35, 0.7, k)])
    domes = tuple((float(x), float(y), float(r)) for (x, y), r in zip(centres, radii))
    return dataclasses.replace(sc.geo, domes=domes), [_box(centres, radii)]


def _overlap(sc: _Scene, s: float, rng: np.random.Generator, t0: float) -> tuple[_Geometry, list[Box]]:
    """Start/stop overlap: the end of the bead laid beside and over its start, tapering off."""
    geo, length = sc.geo, sc.r0 * (2 + 5 * s)
    ts = t0 + np.linspace(-length / 2, length / 2, max(4, int(np.ceil(length / (sc.size / 24))) + 1))
    p, n = geo.at(ts)
    strand = p + rng.choice([-1, 1]) * sc.r0 * (0.7 + 0.6 * s) * n
    x = np.clip((ts - ts[0]) / (0.2 * length), 0, 1) * np.clip((ts[-1] - ts) / (0.45 * length), 0, 1)
    rad = 0.95 * np.interp(ts, geo.rt, geo.rad) * np.sqrt(x)
    sel = rad >= min(0.5, 0.5 * rad.max())
    # The strand tapers to its tips between samples (size / 24 apart): the box reaches the next sample.
    reach = np.convolve(sel, [1, 1, 1], mode="same") > 0
    box = _union(_box(strand[reach], rad[reach]), _box(p[sel], np.interp(ts[sel], geo.rt, geo.rad)))
    return dataclasses.replace(geo, strands=((strand, ts, rad),)), [box]


_DEFECTS = {"gap": _gap, "bubble": _bubble, "thin": _thin, "thick": _thick,
            "offset": _offset, "spill": _spill, "overlap": _overlap}


# ----------------------------------------------------------------------------- rendering
def _height(sc: _Scene, geo: _Geometry, sd: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The bead's height map: the tube, a second strand stacked on it, domes added, voids carved.
    ``sd, t`` is the field of the nominal path, reused unless the defect moved the path."""
    if geo.pts is not sc.geo.pts:
        sd, t = _field(geo.pts, geo.tv, sc.size, _reach(geo.tv, geo.rt, geo.rad, 0.0))
    h = _tube(sd, t, geo.rt, geo.rad)
    for pts, tv, rad in geo.strands:
        hs = _tube(*_field(pts, tv, sc.size, _reach(tv, tv, rad, 0.0)), tv, rad)
        h = np.maximum(h, hs) + 0.6 * np.minimum(h, hs)
    for x, y, r in geo.domes:  # spilt sealant spreads flatter than a laid bead
        _dome(h, x, y, r, 0.25 * r)
    for x, y, r, depth in geo.pits:
        _dome(h, x, y, r, -depth)
    return h


def _shade(sc: _Scene, hx: np.ndarray, hy: np.ndarray) -> np.ndarray:
    """Lambert plus Blinn-Phong shading (Schlick's cheap power) from the height map's slopes."""
    norm = 1 / np.sqrt(1 + hx * hx + hy * hy)
    light, ambient, spec, shininess = sc.light
    half = light + np.array([0, 0, 1], np.float32)
    half /= np.linalg.norm(half)
    diffuse = np.clip((light[2] - hx * light[0] - hy * light[1]) * norm, 0, 1) / light[2]
    x = np.clip((half[2] - hx * half[0] - hy * half[1]) * norm, 0, 1)
    gloss = x / (shininess - shininess * x + x)
    return sc.colour[:, None] * (ambient + (1 - ambient) * diffuse) + spec * gloss


def _compose(sc: _Scene, geo: _Geometry) -> np.ndarray:
    """The image: part and groove, the shaded bead over them, light, noise, dust, blur."""
    nominal = sc.geo
    sd, t = _field(nominal.pts, nominal.tv, sc.size, _reach(nominal.tv, nominal.rt, geo.rad, sc.groove[0]))
    h = _height(sc, geo, sd, t)
    # The part, darker in the groove and along its edges.
    a = np.abs(sd - sc.groove[1])
    shade = 1 - 0.3 * np.clip(sc.groove[0] - a + 0.5, 0, 1) - 0.25 * np.clip(1 - np.abs(a - sc.groove[0]), 0, 1)
    img = sc.surface * (shade * sc.illumination)
    hy, hx = np.gradient(h)
    on = np.flatnonzero(h > 0)  # flat indices: gathering 3 channels by them is cheaper than a mask
    alpha = np.minimum(1.5 * h.take(on), 1)
    flat = img.reshape(3, -1)
    bead = _shade(sc, hx.take(on), hy.take(on)) * (alpha * sc.illumination.take(on))
    flat[:, on] = flat.take(on, axis=1) * (1 - alpha) + bead
    img += sc.noise if sc.glare is None else sc.noise + sc.glare
    for x, y, r, grey in sc.dust:
        (rows, cols), q = _disc(sc.size, x, y, r)
        cover = 0.8 * np.clip(r * q / 2 + 0.5, 0, 1)  # ~ r - d + 0.5: an anti-aliased edge
        img[:, rows, cols] = img[:, rows, cols] * (1 - cover) + grey * cover
    rgb = Image.merge("RGB", [Image.fromarray(plane) for plane in np.clip(img, 0, 255).astype(np.uint8)])
    return np.array(rgb.filter(ImageFilter.BoxBlur(sc.blur)))


def _at_least_a_pixel(lo: float, hi: float, size: int) -> tuple[float, float]:
    if hi - lo >= 1:
        return lo, hi
    lo = min(max((lo + hi - 1) / 2, 0.0), size - 1.0)
    return lo, lo + 1


def _yolo(boxes: list[Box], cls: int, size: int) -> list[tuple[int, float, float, float, float]]:
    """Pixel boxes clipped to the frame as normalised YOLO tuples, at least a pixel wide and tall
    (a defect on a tiny image is still a defect); boxes wholly outside the frame are dropped."""
    out = []
    for bx0, by0, bx1, by1 in boxes:
        if bx1 <= 0 or by1 <= 0 or bx0 >= size or by0 >= size:
            continue
        x0, x1 = _at_least_a_pixel(max(bx0, 0.0), min(bx1, size), size)
        y0, y1 = _at_least_a_pixel(max(by0, 0.0), min(by1, size), size)
        out.append((cls, (x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size))
    return out


def render(seed: int, *, size: int = 96, view: str = "segment", defect: str | None = None,
           severity: float = 1.0) -> Bead:
    """One bead image, ``size`` pixels square: in the ``segment`` view a stretch of bead as the
    camera on the nozzle sees it, in the ``part`` view the whole part. ``severity`` 1 is an obvious
    defect, 0 the subtlest. The same ``seed`` gives the same part, path, lighting and noise whatever
    the defect, so the image differs from the normal one only inside the returned boxes."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if defect is not None and defect not in _DEFECTS:
        raise ValueError(f"defect must be None or one of {DEFECT_TYPES}, got {defect!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    sc = _draw_scene(seed, size, view)
    if defect is None:
        return Bead(_compose(sc, sc.geo), None, 0.0, [])
    s = float(np.clip(severity, 0.0, 1.0))
    rng = _stream(seed, 1)
    if view == "segment":
        t0 = sc.t_centre + rng.uniform(-0.08, 0.08) * size
    else:  # anywhere on the path, clear of its ends; a start/stop overlap where the path starts
        margin = 4 * sc.r0  # half the longest defect
        t0 = margin if defect == "overlap" else rng.uniform(margin, sc.geo.tv[-1] - margin)
    geo, boxes = _DEFECTS[defect](sc, s, rng, t0)
    return Bead(_compose(sc, geo), defect, s, _yolo(boxes, DEFECT_TYPES.index(defect), size))


def render_sample(seed: int, label: int, cfg: SyntheticConfig) -> Bead:
    """The dataset's image for a seed and a label (0 normal, 1 defect): the defect type and its
    severity are drawn from the seed, within ``cfg.defect_types`` and ``cfg.severity``."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (normal) or 1 (defect), got {label}")
    if label == 0:
        return render(seed, size=cfg.image_size, view=cfg.view)
    rng = _stream(seed, 2)
    defect = cfg.defect_types[int(rng.integers(len(cfg.defect_types)))]
    return render(seed, size=cfg.image_size, view=cfg.view, defect=defect, severity=rng.uniform(*cfg.severity))
