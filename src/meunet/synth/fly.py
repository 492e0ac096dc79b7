"""The fly phantom: an insect body with a looping gut (class 1) and a crop (class 2).

The fly is designed in a body frame (u: anterior, v: left, w: dorsal; body length about 1), then placed in
the volume by a random rotation (long axis near the volume's longest axis, tilted, any roll), scale and shift.
Every part is an analytic shape in voxel coordinates, so :meth:`Fly.render` can draw any z-range on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import CubicSpline, PchipInterpolator
from scipy.spatial import cKDTree

from meunet.synth.shapes import Ellipsoid, Tube, box_coords, box_in_slab, smooth_union, value_noise

CLASSES = ("background", "gut", "crop")

# Intensities before acquisition (0 = black, 1 = white), jittered per fly.
LEVELS = {
    "air": 0.08,
    "tissue": 0.38,
    "muscle": 0.46,
    "fat": 0.5,
    "cuticle": 0.85,
    "gut_wall": 0.56,
    "lumen": 0.24,
    "crop": 0.3,
    "crop_wall": 0.6,
    "brain": 0.5,
    "eye": 0.62,
    "organ": 0.47,
    "trachea": 0.12,
}


@dataclass
class Fly:
    """A fly placed in a volume of ``shape`` (z, y, x); see :func:`design_fly`. Lengths are in voxels."""

    shape: tuple[int, int, int]
    seed: int
    levels: dict[str, float]
    body: tuple[Ellipsoid, Ellipsoid, Ellipsoid]  # head, thorax, abdomen
    blend: float
    cuticle: float
    brain: Ellipsoid
    eyes: tuple[Ellipsoid, ...]
    organs: tuple[Ellipsoid, ...]
    wings: tuple[Ellipsoid, ...]
    legs: Tube
    tracheae: Tube
    gut: Tube
    lumen_fraction: float
    crop: tuple[Ellipsoid, ...]
    duct: Tube
    length: float
    frame: np.ndarray  # (3, 3): columns are u, v, w in (z, y, x)

    classes = CLASSES

    @property
    def reference_levels(self) -> tuple[float, float]:
        """(background, tissue) intensities: the contrast the acquisition's SNR refers to."""
        return self.levels["air"], self.levels["tissue"]

    def render(self, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw slices [z0, z1).

        Returns:
            (intensity, labels): float32 and uint8 arrays of shape (z1 - z0, Y, X); intensities before
            acquisition (air about 0.08, cuticle about 0.8), labels 0 background, 1 gut, 2 crop.
        """
        shape_yx = self.shape[1:]
        lv = {k: np.float32(v) for k, v in self.levels.items()}
        img = np.full((z1 - z0, *shape_yx), lv["air"], dtype=np.float32)
        labels = np.zeros(img.shape, dtype=np.uint8)
        inside = np.zeros(img.shape, dtype=bool)
        lows, highs = zip(*(e.bbox(self.blend) for e in self.body), strict=True)
        box = box_in_slab(np.min(lows, axis=0), np.max(highs, axis=0), z0, z1, shape_yx)
        if box is not None:
            inside[box] = self._draw_body(img, box, z0)
        self._draw_gut(img, labels, inside, z0, z1)
        self._draw_appendages(img, inside, z0, z1)
        return img, labels

    def _noise(self, box, z0: int, cell: float, tag: int) -> np.ndarray:
        """Value noise (std about 0.38) on a slab box: three octaves from ``cell`` down, so that its level
        sets are irregular blobs."""
        zs, ys, xs = box
        ranges = (zs.start + z0, zs.stop + z0, (ys.start, ys.stop), (xs.start, xs.stop), self.shape[1:])
        out = None
        for octave, (size, amp) in enumerate(((1.0, 1.0), (0.5, 0.5), (0.25, 0.25))):
            part = value_noise(*ranges, max(cell * size, 1.2), (self.seed, tag, octave))
            part *= np.float32(amp)
            out = part if out is None else out + part
        return out

    def _grain(self, box, z0: int, tag: int) -> np.ndarray:
        """Voxel-scale texture (std 1/3) on a slab box, from one seeded white-noise slice per z."""
        zs, ys, xs = box
        slices = [
            np.random.default_rng((self.seed, tag, z)).standard_normal(self.shape[1:], np.float32)[ys, xs]
            for z in range(zs.start + z0, zs.stop + z0)
        ]
        return np.stack(slices) / np.float32(3.0)

    @staticmethod
    def _within(box, part: Ellipsoid, z0: int, depth: int, shape_yx, margin: float = 1.0):
        """(box of ``part`` grown by ``margin``, in slab coordinates and relative to ``box``), or None."""
        own = box_in_slab(*part.bbox(margin), z0, z0 + depth, shape_yx)
        if own is None:
            return None
        both = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(box, own, strict=True))
        if any(s.start >= s.stop for s in both):
            return None
        return both, tuple(slice(s.start - a.start, s.stop - a.start) for s, a in zip(both, box, strict=True))

    def _draw_body(self, img: np.ndarray, box, z0: int) -> np.ndarray:
        """Tissue, organs and cuticle inside the body box; returns the body mask on the box."""
        lv, length = self.levels, self.length
        named = (*self.organs, self.brain, *self.eyes)
        parts = {id(e): self._within(box, e, z0, img.shape[0], self.shape[1:]) for e in named}
        # The body's parts are needed as far out as their smooth joins reach (2 blend).
        grow = 2.0 * self.blend + 1.0
        parts |= {id(e): self._within(box, e, z0, img.shape[0], self.shape[1:], grow) for e in self.body}
        sdf = []
        for part in self.body:  # each part on its own box; far (1e4) elsewhere, where it cannot matter
            sdf.append(np.full([s.stop - s.start for s in box], 1e4, dtype=np.float32))
            if parts[id(part)] is not None:
                own, rel = parts[id(part)]
                sdf[-1][rel] = part.sdf(own, z0)
        body = _join(*sdf, self.blend)
        inside = body < 0
        coarse, fine = max(0.05 * length, 3.0), max(0.015 * length, 2.0)
        mottle = self._noise(box, z0, coarse, 1)
        lobules = value_noise(box[0].start + z0, box[0].stop + z0, (box[1].start, box[1].stop),
                              (box[2].start, box[2].stop), self.shape[1:], fine, (self.seed, 2))  # fmt: skip
        tissue = lv["tissue"] * (1.0 + 0.15 * mottle + 0.1 * lobules)
        # Flight muscle filling the thorax: bundles along the body axis, a grid of stripes in cross-section.
        if parts[id(self.body[1])] is not None:
            own, rel = parts[id(self.body[1])]
            fibre = max(0.035 * length, 3.0)
            coords = box_coords(own, z0)
            v = sum(np.float32(self.frame[i, 1]) * coords[i] for i in range(3)) / fibre
            w = sum(np.float32(self.frame[i, 2]) * coords[i] for i in range(3)) / fibre
            bundles = np.sin(2 * np.pi * v + 2.0 * mottle[rel]) * np.sin(2 * np.pi * w)
            del v, w, coords
            muscle = sdf[1][rel] < -2.0 * self.cuticle
            stripes = 1.0 + 0.2 * np.sign(bundles[muscle]) * np.abs(bundles[muscle]) ** 0.5
            tissue[rel][muscle] = lv["muscle"] * stripes
            del bundles, muscle, stripes
        # Fat body under the abdominal wall: bright lobules; body cavities and air sacs: dark pockets.
        fat = (sdf[2] > -0.05 * length) & (sdf[2] < 0) & (lobules > 0.1)
        tissue[fat] = lv["fat"]
        del fat, lobules
        for index, organ in enumerate(self.organs):
            if parts[id(organ)] is not None:
                own, rel = parts[id(organ)]
                inner = organ.sdf(own, z0) < 0
                chambers = self._noise(own, z0, max(0.025 * length, 2.5), 10 + index)
                tissue[rel][inner] = lv["organ"] * (1.0 + 0.3 * chambers[inner])
        if parts[id(self.brain)] is not None:
            own, rel = parts[id(self.brain)]
            tissue[rel][self.brain.sdf(own, z0) < 0] = lv["brain"]
        for eye in self.eyes:
            if parts[id(eye)] is not None:
                own, rel = parts[id(eye)]
                inner = eye.sdf(own, z0) < 0
                tissue[rel][inner] = lv["eye"] * (1.0 + 0.6 * self._grain(own, z0, 5)[inner])
        tissue[mottle < -0.75] = lv["trachea"]
        trachea, _ = self.tracheae.sdf(box[0].start + z0, box[0].stop + z0, self.shape[1:])
        tissue[trachea[:, box[1], box[2]] < 0] = lv["trachea"]
        del trachea
        shell = body > -self.cuticle
        tissue[shell] = lv["cuticle"] * (1.0 + 0.08 * mottle[shell])
        region = img[box]
        region[inside] = tissue[inside]
        return inside

    def _draw_gut(self, img: np.ndarray, labels: np.ndarray, inside: np.ndarray, z0: int, z1: int) -> None:
        lv = {k: np.float32(v) for k, v in self.levels.items()}
        shape_yx = self.shape[1:]
        gut, nearest = self.gut.sdf(z0, z1, shape_yx)
        duct, _ = self.duct.sdf(z0, z1, shape_yx)
        crop = duct
        lows, highs = zip(*(e.bbox(1.0) for e in self.crop), strict=True)
        box = box_in_slab(np.min(lows, axis=0), np.max(highs, axis=0), z0, z1, shape_yx)
        sac = None
        if box is not None:
            sac = np.full(img.shape, np.inf, dtype=np.float32)
            lobes = [e.sdf(box, z0) for e in self.crop]
            sac[box] = smooth_union(lobes[0], lobes[1], 0.3 * float(self.crop[0].axes.min()))
            crop = np.minimum(duct, sac)
        # A thin layer of plain tissue around both organs separates them from neighbouring organs.
        img[inside & (np.minimum(gut, crop) < max(1.0, 0.004 * self.length))] = lv["tissue"]
        in_crop = (crop < 0) & (gut >= 0)
        wall = max(1.0, 0.3 * self.cuticle)
        img[in_crop] = lv["crop"]
        if sac is not None:
            img[in_crop & (sac > -wall)] = lv["crop_wall"]
        labels[in_crop] = 2
        in_gut = gut < 0
        if in_gut.any():
            # Epithelium: granular, brightest at the outer rim; lumen: dark, with brighter food particles.
            depth = -gut[in_gut] / self.gut.radii[nearest[in_gut]]
            whole = (slice(0, z1 - z0), slice(0, shape_yx[0]), slice(0, shape_yx[1]))
            grain = self._grain(whole, z0, 7)[in_gut]
            epithelium = lv["gut_wall"] * (1.0 + 0.3 * grain + 0.12 * (depth < 0.25))
            food = lv["lumen"] * (1.0 + 1.0 * np.maximum(grain - 0.3, 0.0))
            img[in_gut] = np.where(depth > 1.0 - self.lumen_fraction, food, epithelium)
        labels[in_gut] = 1

    def _draw_appendages(self, img: np.ndarray, inside: np.ndarray, z0: int, z1: int) -> None:
        lv = self.levels
        legs, _ = self.legs.sdf(z0, z1, self.shape[1:])
        outside = ~inside
        img[outside & (legs < 0)] = lv["tissue"]
        img[outside & (legs < 0) & (legs > -self.cuticle)] = lv["cuticle"]
        for wing in self.wings:
            box = box_in_slab(*wing.bbox(1.0), z0, z1, self.shape[1:])
            if box is not None:
                region = img[box]
                region[(wing.sdf(box, z0) < 0) & outside[box]] = lv["cuticle"] * 0.9


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """3x3 rotation by ``angle`` radians about ``axis`` (Rodrigues)."""
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _random_frame(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Body frame (columns u, v, w in z, y, x): u near the longest axis, tilted 8-25 degrees, any roll."""
    long_axis = int(np.argmax(shape))
    others = [a for a in range(3) if a != long_axis]
    base = np.zeros((3, 3))
    base[long_axis, 0] = rng.choice([-1.0, 1.0])
    base[others[0], 1] = 1.0
    base[others[1], 2] = 1.0
    base[:, 2] = np.cross(base[:, 0], base[:, 1])
    roll = _rotation(base[:, 0], rng.uniform(0, 2 * np.pi))
    tilt_axis = np.cross(base[:, 0], rng.normal(size=3))
    tilt = _rotation(tilt_axis, np.deg2rad(rng.uniform(8, 25)))
    return tilt @ roll @ base


def _curve(waypoints: np.ndarray, radii: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth curve through ``waypoints`` (n, 3), resampled every ``step`` voxels, with radii interpolated."""
    chord = np.linalg.norm(np.diff(waypoints, axis=0), axis=1)
    t = np.concatenate([[0.0], np.cumsum(chord)])
    spline = CubicSpline(t, waypoints, bc_type="natural")
    fine = np.linspace(0.0, t[-1], max(int(t[-1] / step) * 4, 8))
    pts = spline(fine)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    at = np.linspace(0.0, arc[-1], max(int(arc[-1] / step), 2))
    param = np.interp(at, arc, fine)
    radius = PchipInterpolator(t, radii)(param)
    return spline(param), radius


def _separated(points: np.ndarray, radii: np.ndarray, gap: float, arc_step: float) -> bool:
    """True where no two samples of a curve far apart along it come closer than their radii plus ``gap``."""
    tree = cKDTree(points)
    pairs = tree.query_pairs(2.0 * float(radii.max()) + gap, output_type="ndarray")
    if not len(pairs):
        return True
    i, j = pairs[:, 0], pairs[:, 1]
    reach = radii[i] + radii[j] + gap
    far_along = np.abs(i - j) * arc_step > 2.0 * reach
    dist = np.linalg.norm(points[i] - points[j], axis=1)
    return not np.any(far_along & (dist < reach))


@dataclass(frozen=True)
class _Plan:
    """The body plan in body units (u anterior, v left, w dorsal; length about 1) and its placement."""

    frame: np.ndarray
    origin: np.ndarray
    scale: float
    parts: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]  # (centre, semi-axes, rotation) x 3

    def world(self, points: np.ndarray) -> np.ndarray:
        """(n, 3) body-frame points to (n, 3) voxel coordinates (z, y, x)."""
        return self.origin + self.scale * (np.atleast_2d(points) @ self.frame.T)

    def ellipsoid(self, centre, axes, rotation=None) -> Ellipsoid:
        """An ellipsoid given in body units, placed in the volume."""
        rotation = np.eye(3) if rotation is None else rotation
        return Ellipsoid(
            self.world(centre)[0], self.scale * np.asarray(axes, dtype=float), self.frame @ rotation
        )

    def part(self, index: int, offset) -> np.ndarray:
        """Body-frame point ``offset`` (fractions of the semi-axes) from part 0 head, 1 thorax, 2 abdomen."""
        centre, axes, rotation = self.parts[index]
        return centre + rotation @ (np.asarray(offset, dtype=float) * axes)

    def abdomen(self, t: float, rho: float, theta: float, margin: float) -> np.ndarray:
        """Body-frame point in the abdomen: ``t`` along its axis (-1 tip .. 1 front), ``rho`` in [0, 1] a
        fraction of the local cross-section shrunk by ``margin`` (body units), ``theta`` the angle from v."""
        centre, axes, rotation = self.parts[2]
        shrink = np.sqrt(max(1.0 - t * t, 0.0))
        half = np.maximum(shrink * axes[1:] - margin, 0.0)
        local = np.array([t * axes[0], rho * half[0] * np.cos(theta), rho * half[1] * np.sin(theta)])
        return centre + rotation @ local


def _plan_body(shape: tuple[int, int, int], rng: np.random.Generator) -> _Plan:
    """Random head, thorax and abdomen (+-10 % each), oriented and scaled to fill the volume (+-10 %)."""
    frame = _random_frame(shape, rng)
    abd_rot = _rotation(np.array([0.0, 1.0, 0.0]), np.deg2rad(rng.uniform(-10, 10)))
    parts = tuple(
        (np.array(c), np.array(a) * rng.uniform(0.9, 1.1, 3), r)
        for c, a, r in (
            ([0.37, 0.0, 0.02], [0.085, 0.13, 0.11], np.eye(3)),
            ([0.18, 0.0, 0.03], [0.17, 0.15, 0.15], np.eye(3)),
            ([-0.19, 0.0, -0.01], [0.3, 0.18, 0.17], abd_rot),
        )
    )
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for c, a, r in parts:
        half = np.sqrt(((frame @ r * a[None, :]) ** 2).sum(axis=1))
        lo, hi = np.minimum(lo, frame @ c - half), np.maximum(hi, frame @ c + half)
    vol = np.asarray(shape, dtype=float)
    scale = float(np.min(0.95 * vol / (hi - lo))) * rng.uniform(0.8, 1.0)
    slack = vol - scale * (hi - lo)
    origin = (vol - 1) / 2 - scale * (lo + hi) / 2 + rng.uniform(-0.35, 0.35, 3) * slack
    return _Plan(frame, origin, scale, parts)


def _foregut(plan: _Plan, r_eso: float, r_mid: float) -> tuple[np.ndarray, np.ndarray]:
    """Waypoints (body units) and radii from the mouth through the neck to the proventriculus (last point)."""
    points = [
        plan.part(0, [0.3, 0.0, -0.3]),
        plan.part(0, [-0.2, 0.0, -0.1]),
        plan.part(1, [0.8, 0.0, -0.05]),
        plan.part(1, [0.35, 0.0, -0.05]),
        plan.part(1, [-0.2, 0.0, 0.15]),
    ]
    return np.array(points), np.array([r_eso, r_eso, r_eso, r_eso, 1.4 * r_mid])


def _midgut(plan: _Plan, rng: np.random.Generator, r_mid: float, margin: float) -> tuple[list, list]:
    """Waypoints (body units) and radii from the waist to the anus: 3 or 5 passes along the abdomen in
    lanes around its axis (pass 0 dorsal), joined by U-turns, then the hindgut. Only U-turns between two
    dorsal lanes reach far forward, clear of the ventral crop."""
    n_pass = int(rng.choice([3, 5]))
    reach = 0.6 if n_pass == 3 else 0.55
    thetas = np.pi / 2 + np.arange(n_pass) * 2 * np.pi / n_pass + rng.uniform(-0.15, 0.15, n_pass)
    rhos = rng.uniform(0.7, 0.85, n_pass)
    keep = r_mid + margin
    points, radii = [plan.abdomen(0.85, 0.6, thetas[0], keep)], [0.8 * r_mid]
    ends = [rng.uniform(reach - 0.05, reach + 0.05)]  # pass j runs from ends[j] to ends[j + 1]
    for j in range(n_pass):
        if j % 2 == 0:
            ends.append(-rng.uniform(reach - 0.1, reach))
        elif min(np.sin(thetas[j]), np.sin(thetas[j + 1])) > 0.3:
            ends.append(rng.uniform(reach - 0.05, reach + 0.1))
        else:
            ends.append(rng.uniform(-0.15, 0.05))
    for j in range(n_pass):
        t0, t1 = ends[j], ends[j + 1]
        points.append(plan.abdomen(t0, rhos[j], thetas[j], keep))
        for f in (1 / 3, 2 / 3):
            t = t0 + f * (t1 - t0) + rng.uniform(-0.05, 0.05)
            rho = min(rhos[j] + rng.uniform(-0.06, 0.06), 0.95)
            points.append(plan.abdomen(t, rho, thetas[j] + rng.uniform(-0.12, 0.12), keep))
        points.append(plan.abdomen(t1, rhos[j], thetas[j], keep))
        radii += list(r_mid * rng.uniform(0.75, 1.25, 4))
        if j + 1 < n_pass:  # U-turn apex, beyond the pass ends, between the two lanes
            dtheta = np.angle(np.exp(1j * (thetas[j + 1] - thetas[j])))
            rho = 0.5 * (rhos[j] + rhos[j + 1])
            points.append(
                plan.abdomen(t1 + (-0.05 if j % 2 == 0 else 0.05), rho, thetas[j] + dtheta / 2, keep)
            )
            radii.append(r_mid * rng.uniform(0.8, 1.2))
    points.append(plan.abdomen(-0.85, 0.0, 0.0, keep))
    radii.append(0.6 * r_mid)
    return points, radii


def _crop_lobes(plan: _Plan, rng: np.random.Generator, crop_theta: float, margin: float):
    """The crop: two ellipsoid lobes in the front of the abdomen, ventral; returns (lobes, duct end point)."""
    _, _, abd_rot = plan.parts[2]
    lobe_a = np.array([0.055, 0.04, 0.035]) * rng.uniform(0.8, 1.2, 3)
    centre = plan.abdomen(rng.uniform(0.5, 0.6), 0.9, crop_theta, margin + float(lobe_a.max()))
    tangent = abd_rot @ np.array([0.0, -np.sin(crop_theta), np.cos(crop_theta)])
    radial = abd_rot @ np.array([0.0, np.cos(crop_theta), np.sin(crop_theta)])
    lobe_frame = np.stack([abd_rot[:, 0], tangent, radial], axis=1)
    offset = tangent * lobe_a[1] * rng.uniform(0.6, 0.9)
    lobes = tuple(
        plan.ellipsoid(centre + side * offset, lobe_a * rng.uniform(0.85, 1.15, 3), lobe_frame)
        for side in (-1, 1)
    )
    return lobes, centre + abd_rot @ np.array([0.8 * lobe_a[0], 0.0, 0.0])


def _join(head: np.ndarray, thorax: np.ndarray, abdomen: np.ndarray, blend: float) -> np.ndarray:
    """The body's signed distance from its parts': a narrow neck and a broad waist."""
    return smooth_union(smooth_union(head, thorax, blend), abdomen, 2.0 * blend)


def _body_distance(body, points: np.ndarray) -> np.ndarray:
    """Signed distance of (n, 3) world points to the body, never deeper than the truth (the smooth joins
    only add to the body)."""
    return np.min([e.distance(points) for e in body], axis=0)


def _violations(body, cuticle, gut, gut_r, duct, duct_r, lobes, branch, gap, rng) -> int:
    """How many of the gut's and crop's layout rules a candidate breaks (0: accept)."""
    step = float(np.linalg.norm(gut[1] - gut[0]))
    count = int(not _separated(gut, gut_r, gap, step))
    count += int(np.any(_body_distance(body, gut) > -(gut_r + cuticle + 0.5)))
    crop = np.min([e.sdf_at(*gut.T) for e in lobes], axis=0)
    count += int(np.any(crop < gut_r + gap))
    # Past the branch, the duct keeps clear of the whole gut (no re-entry into the foregut).
    reach = float(gut_r[cKDTree(gut).query(branch)[1]]) + 2 * float(duct_r.max()) + gap
    past = duct[np.linalg.norm(duct - branch, axis=1) > reach]
    dist, index = cKDTree(gut).query(past)
    count += int(np.any(dist < gut_r[index] + duct_r.max() + gap))
    surface = _ellipsoid_surface(lobes, rng)
    count += int(np.any(_body_distance(body, surface) > -(cuticle + 1.0)))
    return count


def design_fly(shape: tuple[int, int, int], seed: int, lumen: bool = True) -> Fly:
    """Draw a random fly for a volume of ``shape`` (z, y, x) from ``seed`` (deterministic).

    The body fills 75-95 % of the volume along the fly's long axis; the gut loops at least twice along the
    abdomen and, with the crop, makes one to a few percent of the volume. A layout whose loops come closer
    than 2 voxels (or 0.4 radii), or that leaves the body, is drawn again (up to 30 times, thinner every 6
    tries); after that the best try is kept.
    """
    rng = np.random.default_rng(seed)
    plan = _plan_body(shape, rng)
    scale = plan.scale
    body = tuple(plan.ellipsoid(*part) for part in plan.parts)
    blend = 0.03 * scale
    cuticle = max(1.5, 0.007 * scale)
    levels = {k: v * rng.uniform(0.94, 1.06) for k, v in LEVELS.items()}
    gain = rng.uniform(0.9, 1.1)
    levels = {k: v if k == "air" else levels["air"] + gain * (v - levels["air"]) for k, v in levels.items()}

    min_r = 2.0  # the duct (at least 1.5) stays thinner than the foregut it leaves
    step = max(0.5, 0.004 * scale)  # curve samples: error of the nearest-sample distance << 1 voxel
    margin = (cuticle + 1.5) / scale
    crop_theta = -np.pi / 2 + rng.uniform(-0.3, 0.3)
    best = None
    for attempt in range(30):
        r_mid = 0.038 * 0.92 ** (attempt // 6) * rng.uniform(0.85, 1.15)
        gap = max(2.0, 0.4 * r_mid * scale)
        way, way_r = _foregut(plan, 0.45 * r_mid, r_mid)
        mid, mid_r = _midgut(plan, rng, r_mid, margin)
        gut, gut_r = _curve(
            plan.world(np.vstack([way, mid])), np.maximum(scale * np.append(way_r, mid_r), min_r), step
        )
        lobes, duct_end = _crop_lobes(plan, rng, crop_theta, margin)
        duct_way = [way[3], plan.part(1, [0.25, 0.0, -0.5]), plan.part(1, [-0.4, 0.0, -0.65]), duct_end]
        duct_way = plan.world(np.array(duct_way))
        duct, duct_r = _curve(duct_way, np.full(len(duct_way), max(0.3 * scale * r_mid, 1.5)), step)
        bad = _violations(body, cuticle, gut, gut_r, duct, duct_r, lobes, duct_way[0], gap, rng)
        if best is None or bad < best[0]:
            best = (bad, gut, gut_r, duct, duct_r, lobes)
        if bad == 0:
            break
    _, gut, gut_r, duct, duct_r, lobes = best
    reach = max(1.0, 0.004 * scale) + 0.5
    head_a = plan.parts[0][1]
    organ_a = np.array([0.11, 0.055, 0.06]) * rng.uniform(0.8, 1.2, 3)
    return Fly(
        shape=tuple(int(s) for s in shape),
        seed=int(seed),
        levels=levels,
        body=body,
        blend=blend,
        cuticle=cuticle,
        brain=plan.ellipsoid(plan.part(0, [-0.1, 0.0, 0.05]), head_a * [0.5, 0.6, 0.55]),
        eyes=tuple(
            plan.ellipsoid(plan.part(0, [0.1, s * 0.85, 0.15]), head_a * [0.7, 0.35, 0.75]) for s in (-1, 1)
        ),
        organs=tuple(
            plan.ellipsoid(
                plan.abdomen(-0.35, 0.5, s * np.pi / 2 + rng.uniform(-0.6, 0.6), 0.0),
                organ_a,
                plan.parts[2][2],
            )
            for s in (-1, 1)
        ),
        wings=_wings(plan, rng),
        legs=_legs(plan, rng, step),
        tracheae=_tracheae(plan, step),
        gut=Tube(gut, gut_r, reach=reach),
        lumen_fraction=float(rng.uniform(0.45, 0.65)) if lumen else 0.0,
        crop=lobes,
        duct=Tube(duct, duct_r, reach=reach),
        length=scale,
        frame=plan.frame,
    )


def _tracheae(plan: _Plan, step: float) -> Tube:
    """Two air-filled tracheal trunks along the sides of thorax and abdomen."""
    points, radii = [], []
    for side in (-1, 1):
        way = [plan.part(1, [0.6, side * 0.75, 0.35])]
        way += [plan.abdomen(t, 0.9, side * (np.pi / 2 + 0.6), 0.0) for t in (0.6, 0.0, -0.6)]
        p, r = _curve(plan.world(np.array(way)), np.full(len(way), max(0.006 * plan.scale, 1.0)), step)
        points.append(p)
        radii.append(r)
    return Tube(np.concatenate(points), np.concatenate(radii))


def _legs(plan: _Plan, rng: np.random.Generator, step: float) -> Tube:
    """Six legs folded under the thorax: coxa, femur, tibia, tarsus as straight tapered segments."""
    points, radii = [], []
    widths = plan.scale * np.array([0.024, 0.021, 0.017, 0.013, 0.008])
    for pair, (du, swing) in enumerate(((0.4, 0.8), (0.0, -0.6), (-0.4, -0.9))):
        for side in (-1, 1):
            base = plan.part(1, [du, side * 0.35, -0.6])
            coxa = base + np.array([0.0, side * 0.02, -0.1])
            femur = np.array([swing, side * 0.25, -0.35]) + rng.normal(0, 0.08, 3)
            knee = coxa + 0.2 * femur / np.linalg.norm(femur)
            tibia = np.array([-0.6 * swing, side * 0.3, -0.25]) + rng.normal(0, 0.1, 3)
            ankle = knee + 0.19 * tibia / np.linalg.norm(tibia)
            foot = ankle + np.array([-0.12 + 0.04 * pair, side * 0.03, -0.04]) + rng.normal(0, 0.02, 3)
            joints = plan.world(np.array([base, coxa, knee, ankle, foot]))
            for a, b, ra, rb in zip(joints[:-1], joints[1:], widths[:-1], widths[1:], strict=True):
                f = np.linspace(0, 1, max(int(np.linalg.norm(b - a) / step), 2))[:, None]
                points.append(a + f * (b - a))
                radii.append(np.maximum(ra + f[:, 0] * (rb - ra), 1.0))
    return Tube(np.concatenate(points), np.concatenate(radii))


def _wings(plan: _Plan, rng: np.random.Generator) -> tuple[Ellipsoid, ...]:
    """Two thin wings (stubs to full length) folded over the abdomen."""
    length = rng.uniform(0.12, 0.3)
    abd_c, abd_a, _ = plan.parts[2]
    return tuple(
        plan.ellipsoid(
            [0.02 - length, side * 0.07, abd_c[2] + abd_a[2] + 0.03],
            [length, 0.075, max(0.7 / plan.scale, 0.0015)],
            _rotation(np.array([0.0, 0.0, 1.0]), side * np.deg2rad(rng.uniform(4, 14))),
        )
        for side in (-1, 1)
    )


def _ellipsoid_surface(ellipsoids, rng: np.random.Generator, n: int = 200) -> np.ndarray:
    """(len(ellipsoids) * n, 3) random points on the surfaces of the given ellipsoids."""
    out = []
    for e in ellipsoids:
        d = rng.normal(size=(n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        out.append(e.center + (d * e.axes) @ e.rotation.T)
    return np.concatenate(out)
