"""One synthetic subject: analytic anatomy, subject pose and breathing, in millimetres.

Construction (exact ground truth without inverting a discontinuous field)
-------------------------------------------------------------------------
* The anatomy ``A0`` is analytic, in a *canonical patient frame* at inhale (x = patient
  left, y = posterior, z = superior, mm; the same axes as ITK/LPS world space): body with
  subcutaneous fat, muscle wall and ribs, thoracic cavity, heart, spine with discs, liver and
  abdomen below a domed diaphragm, two lungs (superellipse cross-section, elliptic apex cap,
  domed base, heart carved out, right lung larger), vessel trees from the hila, trachea and
  bronchi.  Shapes have soft edges (one voxel wide along their normal) and thin tubes are
  rendered with area-preserving partial volume, so the images are anti-aliased.
* Subject pose ``P_i`` (small rotation + translation) places the anatomy in the scanner:
  ``inhale(y) = A0(P_i^-1(y))``.
* Breathing ``B`` maps canonical exhale points to canonical inhale points and the exhale pose
  ``P_e = P_i o R`` adds a small rigid repositioning ``R``.  The map from exhale scanner points
  to inhale scanner points is ``phi = P_i o B o P_e^-1`` and the exhale image is rendered as
  ``exhale(x) = A0(B(P_e^-1(x)))``.  Hence ``u_e(x) = phi(x) - x`` *is* the ground truth for
  (fixed = exhale, moving = inhale) in the ITK displacement-field convention.
* ``B = Z o E``: ``E`` is a smooth horizontal (AP + lateral) expansion shared by lungs and
  body; ``Z`` moves points along z inside their (x, y) column.  ``Z`` has a lung branch
  (diaphragm "piston": zero at the apex, the full excursion ``D`` at the base) and a body
  branch (chest wall almost still, abdomen moving with the diaphragm, spine still).  A point
  takes the lung branch when its lung-branch image lies inside the inhale lung.  Both
  branches move the diaphragm surface by the same ``D``, so lungs and abdomen stay in contact,
  while at the vertical lung walls the jump in ``u_z`` is tangential: the lungs slide.
* The inverse (``u_i`` on the inhale grid, fixed = inhale) is computed per branch: the branch
  is decided in the inhale frame (inside the analytic inhale lung or not), ``Z`` is inverted
  per column (monotone in z: Newton with a bisection fallback) and ``E`` by fixed-point
  iteration.  Its residual ``|phi(x) - y|`` is ~0 in the lung; it is non-zero only in thin
  slivers at the lung shoulders where the sliding branches leave a gap; it is logged and
  written to parameters.json.

ILD vs healthy: only the motion differs (never the image intensities or the anatomy).  ILD
subjects have less basal strain (motion shifted from the base towards the apex), less
peripheral diaphragm excursion, less chest-wall expansion and a more heterogeneous motion,
all scaled by one ``effect_size``.  Every random number is drawn for every subject whatever
its label, so at ``effect_size == 0`` both groups come from the same distribution.  The
breathing depth is random in both groups, so magnitude alone does not give the label away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from .settings import Intensities, SyntheticCohortSettings, subject_table

F32 = np.float32
LANDMARK_NAMES = (
    "carina",
    "right_upper_vessel_bifurcation",
    "right_middle_vessel_bifurcation",
    "right_lower_vessel_bifurcation",
    "left_upper_vessel_bifurcation",
    "left_middle_vessel_bifurcation",
    "left_lower_vessel_bifurcation",
    "right_diaphragm_dome",
    "left_diaphragm_dome",
    "right_apex",
    "left_apex",
)

# How an ILD subject's motion differs, per unit of effect_size (calibrated: see
# calibration_accuracy and tests/test_cohort.py).
ILD_BASAL_STRAIN_SHIFT = 0.30  # subtracted from the basal strain parameter kappa
ILD_PERIPHERAL_REDUCTION = 0.20  # added to the peripheral excursion reduction
ILD_EXPANSION_REDUCTION = 0.20  # relative reduction of AP / lateral expansion
ILD_HETEROGENEITY_MM = 1.5  # added amplitude of the random perturbation field

LUNG_TAPER = 0.1  # the lungs' horizontal size shrinks by this fraction from base to apex
_TUBE_VESSEL, _TUBE_RIB, _TUBE_AORTA, _TUBE_WALL, _TUBE_LUMEN = range(5)
_N_MODES = 6  # random cosine modes of the heterogeneity field


# ------------------------------------------------------------------------------ subjects


def _subject_index(settings: SyntheticCohortSettings, subject: str) -> int:
    ids = settings.subject_ids()
    if subject not in ids:
        raise ValueError(f"subject {subject!r} is not in the synthetic cohort ({ids[0]} .. {ids[-1]})")
    return ids.index(subject)


def _streams(settings: SyntheticCohortSettings, index: int) -> list[np.random.Generator]:
    """Independent generators for one subject: parameters, vessel tree, inhale / exhale noise.

    Derived from (seed, subject index) only, so one subject alone equals the same subject
    generated within the whole cohort.
    """
    sequence = np.random.SeedSequence(settings.seed, spawn_key=(1, index))
    return [np.random.default_rng(child) for child in sequence.spawn(4)]


class _Draws:
    """Clipped (+-2.5 sd) random draws, so that no subject has absurd anatomy or motion."""

    def __init__(self, rng: np.random.Generator, variation: float):
        self.rng, self.variation = rng, variation

    def z(self, size: int | None = None) -> Any:
        return np.clip(self.rng.standard_normal(size), -2.5, 2.5)

    def rel(self, mean: float, sd: float | None = None) -> float:
        return float(mean * (1 + (self.variation if sd is None else sd) * self.z()))

    def normal(self, mean: float, sd: float, size: int | None = None) -> Any:
        draw = mean + sd * self.z(size)
        return draw.tolist() if size else float(draw)

    def lognormal(self, median: float, sigma: float) -> float:
        return float(median * np.exp(sigma * self.z()))


def _draw_parameters(settings: SyntheticCohortSettings, rng: np.random.Generator, ild: bool) -> dict:
    """All random parameters of one subject; the same draws, in the same order, whatever the label."""
    draws = _Draws(rng, settings.anatomy_variation)
    p = {**_draw_anatomy(draws), **_draw_pose(draws, settings), **_draw_motion(draws, settings)}
    p["bias_coefficients"] = rng.standard_normal(9).tolist()
    p["gain"] = draws.normal(1.0, 0.05)
    _apply_label(p, settings.effect_size if ild else 0.0)
    p["label"] = "ILD" if ild else "healthy"
    return p


def _draw_anatomy(d: _Draws) -> dict[str, Any]:
    """Body, lungs, diaphragm, heart, spine: sizes in mm around an adult thorax."""
    return {
        "body_semi_axes_mm": [d.rel(165), d.rel(125)],
        "body_exponent": d.rel(2.6, 0.05),
        "fat_mm": d.rel(15, 0.3),
        "muscle_mm": d.rel(12, 0.15),
        "lung_medial_gap_mm": d.rel(30, 0.08),
        "lung_exponent": d.rel(2.3, 0.06),
        "right_apex_z_mm": d.normal(118, 4),
        "left_apex_drop_mm": d.normal(3, 2),
        "apex_cap_mm": d.rel(80),
        "right_lung_height_mm": d.rel(188),
        "left_dome_drop_mm": d.normal(12, 4),
        "dome_depth_mm": d.rel(34, 0.15),
        "heart_semi_axes_mm": [d.rel(60), d.rel(44), d.rel(55)],
        "heart_x_mm": d.normal(16, 4),
        "spine_radius_mm": d.rel(17),
        "disc_period_mm": d.rel(27, 0.05),
        "disc_phase": float(d.rng.uniform()),
    }


def _draw_pose(d: _Draws, settings: SyntheticCohortSettings) -> dict[str, Any]:
    """Subject position in the scanner (inhale) and repositioning between the two scans."""
    return {
        "pose_rotation_deg": d.normal(0, settings.pose_rotation_deg, 3),
        "pose_translation_mm": d.normal(0, settings.pose_translation_mm, 3),
        "repositioning_rotation_deg": d.normal(0, settings.repositioning_rotation_deg, 3),
        "repositioning_translation_mm": d.normal(0, settings.repositioning_translation_mm, 3),
    }


def _draw_motion(d: _Draws, settings: SyntheticCohortSettings) -> dict[str, Any]:
    """Breathing: depth (random in both groups), its shape, expansion and heterogeneity."""
    depth = float(np.clip(d.lognormal(settings.breathing_depth_mm, settings.breathing_depth_variation), 8, 62))
    p = {
        "diaphragm_excursion_mm": depth,
        "left_excursion_ratio": d.normal(1.0, 0.06),
        "posterior_excursion_gradient": d.normal(0.15, 0.05),
        "basal_strain": d.normal(0.45, 0.15),
        "peripheral_reduction": d.normal(0.0, 0.08),
    }
    scale = np.sqrt(depth / 35.0)  # deeper breaths also expand the chest more
    p["lateral_expansion"] = d.lognormal(0.05 * scale, 0.2)
    p["ap_expansion"] = d.lognormal(0.08 * scale, 0.2)
    p["heterogeneity_mm"] = d.rel(0.8, 0.3)
    p["heterogeneity_wavelength_mm"] = d.rng.uniform(90, 160, _N_MODES).tolist()
    p["heterogeneity_directions"] = _unit(d.rng.standard_normal((_N_MODES, 3))).tolist()
    p["heterogeneity_phases"] = d.rng.uniform(0, 2 * np.pi, _N_MODES).tolist()
    p["heterogeneity_weights"] = d.rng.standard_normal((_N_MODES, 3)).tolist()
    return p


def _apply_label(p: dict, effect: float) -> None:
    """The only place where the label matters: ILD changes the motion, scaled by `effect`."""
    p["basal_strain"] = float(np.clip(p["basal_strain"] - ILD_BASAL_STRAIN_SHIFT * effect, -0.85, 0.9))
    p["peripheral_reduction"] = float(np.clip(p["peripheral_reduction"] + ILD_PERIPHERAL_REDUCTION * effect, -0.3, 0.6))
    p["lateral_expansion"] *= float(max(0.0, 1 - ILD_EXPANSION_REDUCTION * effect))
    p["ap_expansion"] *= float(max(0.0, 1 - ILD_EXPANSION_REDUCTION * effect))
    p["heterogeneity_mm"] = float(min(p["heterogeneity_mm"] + ILD_HETEROGENEITY_MM * effect, 4.0))


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


# ------------------------------------------------------------------------- small math


def _rotation(angles_deg: Iterable[float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(list(angles_deg))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Rigid:
    """world = matrix @ canonical + offset."""

    matrix: np.ndarray
    offset: np.ndarray

    def apply(self, points: np.ndarray) -> np.ndarray:
        return skinny_matmul(points, self.matrix.T) + self.offset.astype(points.dtype)

    def invert(self, points: np.ndarray) -> np.ndarray:
        return skinny_matmul(points - self.offset.astype(points.dtype), self.matrix)


def skinny_matmul(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """points (n, k) @ matrix (k, m) by broadcasting: BLAS is slow for such skinny products."""
    matrix = np.asarray(matrix, dtype=points.dtype)
    if points.ndim == 1:
        return points @ matrix
    out = points[:, :1] * matrix[0]
    for i in range(1, matrix.shape[0]):
        out += points[:, i : i + 1] * matrix[i]
    return out


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


def _ramp(sd: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (negative inside), one voxel wide."""
    return np.clip(0.5 - sd / width, 0, 1)


def _superellipse(dx: np.ndarray, dy: np.ndarray, ax: float, ay: float, n: float) -> tuple:
    """Norm h (1 on the curve |dx/ax|^n + |dy/ay|^n = 1) and its gradient."""
    ux, uy = np.abs(dx) / ax, np.abs(dy) / ay
    h = (ux**n + uy**n) ** (1 / n)
    hs = np.maximum(h, 1e-6)
    return h, np.sign(dx) * (ux / hs) ** (n - 1) / ax, np.sign(dy) * (uy / hs) ** (n - 1) / ay


def _level_to_sd(level: np.ndarray, grads: list, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance ~ level / |grad| and the voxel width along the normal."""
    norm = np.sqrt(sum(g * g for g in grads))
    norm = np.maximum(norm, 1e-6)
    width = np.sqrt(sum((g * float(s)) ** 2 for g, s in zip(grads, spacing))) / norm
    return level / norm, width


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(t, -30, 30)))


# ------------------------------------------------------------------------------ anatomy


@dataclass(frozen=True)
class _Lung:
    side: int  # -1 right (patient right is -x in LPS), +1 left
    centre: tuple[float, float]
    axes: tuple[float, float]
    exponent: float
    apex: float
    cap: float
    dome_top: float
    hilum: tuple[float, float, float]


class SubjectModel:
    """One subject: analytic anatomy, breathing map and poses (canonical frame in mm)."""

    def __init__(self, settings: SyntheticCohortSettings, params: dict, tree_rng: np.random.Generator):
        self.settings, self.p = settings, params
        self.spacing = np.asarray(settings.grid.spacing)
        self.values = settings.intensities
        self._body(params)
        self._lungs(params)
        self._organs(params)
        self._motion(params)
        self.pose_inhale = _Rigid(_rotation(params["pose_rotation_deg"]), np.asarray(params["pose_translation_mm"]))
        rep = _rotation(params["repositioning_rotation_deg"])
        self.pose_exhale = _Rigid(
            self.pose_inhale.matrix @ rep,
            self.pose_inhale.apply(np.asarray(params["repositioning_translation_mm"], float)),
        )
        self.tubes, self.landmarks_canonical = self._tubes_and_landmarks(tree_rng)
        self._layers: tuple | None = None

    # -- geometry derived from the drawn parameters

    def _body(self, p: dict) -> None:
        self.body_axes = tuple(p["body_semi_axes_mm"])
        self.body_n = p["body_exponent"]
        inset = p["fat_mm"]
        self.muscle_axes = (self.body_axes[0] - inset, self.body_axes[1] - inset)
        inset += p["muscle_mm"]
        self.cavity_axes = (self.body_axes[0] - inset, self.body_axes[1] - inset)
        self.spine_r = p["spine_radius_mm"]
        self.spine_y = self.cavity_axes[1] - 0.5 * self.spine_r

    def _lungs(self, p: dict) -> None:
        cx, cy = self.cavity_axes
        gap, n = p["lung_medial_gap_mm"], p["lung_exponent"]
        y_ant, y_post = -0.76 * cy, 0.94 * cy
        lungs = []
        for side, width_factor in ((-1, 1.0), (1, 0.94)):
            half_x = (0.97 * cx - gap) / 2 * width_factor
            ax, ay = half_x, (y_post - y_ant) / 2
            for _ in range(40):  # shrink until inscribed in the cavity and clear of the spine
                if self._lung_fits(side * (gap + ax), (y_post + y_ant) / 2, ax, ay, n):
                    break
                ax, ay = ax * 0.98, ay * 0.98
            centre = (side * (gap + ax), (y_post + y_ant) / 2)
            apex = p["right_apex_z_mm"] - (p["left_apex_drop_mm"] if side > 0 else 0.0)
            dome_top = p["right_apex_z_mm"] - p["right_lung_height_mm"] - (p["left_dome_drop_mm"] if side > 0 else 0.0)
            hilum_z = apex - 0.42 * (apex - dome_top)
            hilum = (side * (gap + 15.0), centre[1] + 0.1 * ay, hilum_z)
            lungs.append(_Lung(side, centre, (ax, ay), n, apex, p["apex_cap_mm"], dome_top, hilum))
        self.lungs = tuple(lungs)

    def _lung_fits(self, x0: float, y0: float, ax: float, ay: float, n: float) -> bool:
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        c, s = np.cos(t), np.sin(t)
        x = x0 + ax * np.sign(c) * np.abs(c) ** (2 / n)
        y = y0 + ay * np.sign(s) * np.abs(s) ** (2 / n)
        h = _superellipse(x, y, *self.cavity_axes, self.body_n)[0]
        spine = np.hypot(x, y - self.spine_y)
        return bool(h.max() <= 0.965 and spine.min() >= self.spine_r + 12)

    def _organs(self, p: dict) -> None:
        self.heart_axes = tuple(p["heart_semi_axes_mm"])
        hx, hy = p["heart_x_mm"], -0.45 * self.cavity_axes[1]
        hz = float(self.dome(np.array([hx]), np.array([hy]))[0][0]) + 0.75 * self.heart_axes[2]
        self.heart_centre = (hx, hy, hz)
        right, left = self.lungs
        carina_y = 0.5 * (right.centre[1] + self.spine_y - self.spine_r)  # just in front of the spine
        self.carina = (0.0, carina_y, max(right.hilum[2], left.hilum[2]) + 25.0)
        self.disc_period, self.disc_phase = p["disc_period_mm"], p["disc_phase"]

    def _motion(self, p: dict) -> None:
        self.excursion = (p["diaphragm_excursion_mm"], p["diaphragm_excursion_mm"] * p["left_excursion_ratio"])
        self.kappa = p["basal_strain"]
        self.apex_mean = float(np.mean([lung.apex for lung in self.lungs]))
        self.dome_mean = float(np.mean([lung.dome_top for lung in self.lungs]))
        wavelengths = np.asarray(p["heterogeneity_wavelength_mm"])[:, None]
        self.het_k = 2 * np.pi / wavelengths * np.asarray(p["heterogeneity_directions"])
        self.het_phase = np.asarray(p["heterogeneity_phases"])
        self.het_w = np.asarray(p["heterogeneity_weights"]) / np.sqrt(_N_MODES / 2)

    # -- analytic shapes (canonical inhale frame)

    def dome(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Height of the (inhale) diaphragm under every (x, y) and its slopes."""
        k = self.p["dome_depth_mm"]
        heights, slopes_x, slopes_y = [], [], []
        for lung in self.lungs:  # one paraboloid dome under each lung
            ax, ay = 1.5 * lung.axes[0], 1.1 * lung.axes[1]
            dx, dy = x - 0.75 * lung.centre[0], y - (lung.centre[1] - 0.2 * lung.axes[1])
            heights.append(lung.dome_top - k * ((dx / ax) ** 2 + (dy / ay) ** 2))
            slopes_x.append(-2 * k * dx / ax**2)
            slopes_y.append(-2 * k * dy / ay**2)
        # the diaphragm is the smooth upper envelope of both domes (8 mm log-sum-exp)
        top = np.maximum(heights[0], heights[1])
        e0, e1 = np.exp((heights[0] - top) / 8.0), np.exp((heights[1] - top) / 8.0)
        w = e1 / (e0 + e1)
        z = top + 8.0 * np.log(e0 + e1)
        return z, (1 - w) * slopes_x[0] + w * slopes_x[1], (1 - w) * slopes_y[0] + w * slopes_y[1]

    def _below_dome(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Signed distance to the diaphragm, positive below it; and the normal voxel width."""
        z, gx, gy = self.dome(c[:, 0], c[:, 1])
        return _level_to_sd(z - c[:, 2], [gx, gy, -np.ones_like(gx)], self.spacing)

    def _heart_sd(self, c: np.ndarray, below: tuple) -> tuple[np.ndarray, np.ndarray]:
        d = [(c[:, i] - self.heart_centre[i]) / self.heart_axes[i] for i in range(3)]
        rho = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        grads = [d[i] / (self.heart_axes[i] * np.maximum(rho, 1e-6)) for i in range(3)]
        sd, width = _level_to_sd(rho - 1, grads, self.spacing)
        return _intersect((sd, width), below)

    def lung_sd(self, c: np.ndarray, below: tuple | None = None, heart: tuple | None = None) -> tuple:
        """Signed distance (mm, negative inside) to the union of both inhale lungs, and width."""
        below = below if below is not None else self._below_dome(c)
        heart = heart if heart is not None else self._heart_sd(c, below)
        best = None
        for lung in self.lungs:
            height = lung.apex - lung.dome_top
            taper = 1 - LUNG_TAPER * np.clip((c[:, 2] - lung.dome_top) / height, 0, 1)  # widest at the base
            h, gx, gy = _superellipse(
                c[:, 0] - lung.centre[0],
                c[:, 1] - lung.centre[1],
                lung.axes[0] * taper,
                lung.axes[1] * taper,
                lung.exponent,
            )
            hz = h / taper * LUNG_TAPER / height
            v = np.maximum(c[:, 2] - (lung.apex - lung.cap), 0) / lung.cap
            rho = np.maximum(np.sqrt(h * h + v * v), 1e-6)
            shell = _level_to_sd(rho - 1, [h / rho * gx, h / rho * gy, (h * hz + v / lung.cap) / rho], self.spacing)
            one = _intersect(shell, below)
            best = one if best is None else _union(best, one)
        return _intersect(best, (-heart[0], heart[1]))

    def render(self, c: np.ndarray, lung: tuple | None = None) -> np.ndarray:
        """Noise-free intensity of the anatomy at canonical points c (N, 3)."""
        v, s = self.values, self.spacing
        x, y, z = c[:, 0], c[:, 1], c[:, 2]
        image = np.zeros(len(c), dtype=c.dtype)
        body = _superellipse(x, y, *self.body_axes, self.body_n)
        _over(image, self._occ_xy(body, s), v.fat)
        muscle = _superellipse(x, y, *self.muscle_axes, self.body_n)
        _over(image, self._occ_xy(muscle, s), v.muscle)
        cavity = _superellipse(x, y, *self.cavity_axes, self.body_n)
        cavity_occ = self._occ_xy(cavity, s)
        _over(image, cavity_occ, v.mediastinum)
        below = self._below_dome(c)
        liver_share = _sigmoid((35.0 - x) / 12.0)
        _over(image, cavity_occ * _ramp(-below[0], below[1]), v.liver * liver_share + v.abdomen * (1 - liver_share))
        heart = self._heart_sd(c, below)
        _over(image, _ramp(*heart), v.heart)
        self._render_spine(image, x, y, z)
        lung = lung if lung is not None else self.lung_sd(c, below, heart)
        side = np.where(x < 0, 0, 1)
        centre_y = np.array([lg.centre[1] for lg in self.lungs], dtype=c.dtype)[side]
        half_y = np.array([lg.axes[1] for lg in self.lungs], dtype=c.dtype)[side]
        _over(image, _ramp(*lung), v.lung + v.lung_gradient * np.clip((y - centre_y) / half_y, -1, 1))
        alpha, premultiplied = self._sample_layers(c)
        image *= 1 - alpha
        image += premultiplied
        return image

    def _occ_xy(self, shape: tuple, spacing: np.ndarray) -> np.ndarray:
        h, gx, gy = shape
        return _ramp(*_level_to_sd(h - 1, [gx, gy], spacing[:2]))

    def _render_spine(self, image: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
        v, s = self.values, float(np.mean(self.spacing[:2]))
        phase = 2 * np.pi * (z / self.disc_period + self.disc_phase)
        disc = ((1 + np.cos(phase)) / 2) ** 6  # thin bands of lower intensity: the discs
        _over(image, _ramp(np.hypot(x, y - self.spine_y) - self.spine_r, s), v.bone + (v.disc - v.bone) * disc)
        canal_y = self.spine_y + self.spine_r + 7.0
        _over(image, _ramp(np.hypot(x, y - canal_y) - 6.0, s), v.csf)

    # -- tubes: vessels, airways, ribs, aorta (pre-rendered on a canonical grid)

    def _tubes_and_landmarks(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """All tubes (rows: start, end, radii, kind) and the 11 inhale landmarks (canonical mm).

        Landmarks: carina; first bifurcation of the upper, middle and lower vessel trunk of each
        lung; a point 16 mm above each diaphragm dome; a point 24 mm below each apex.
        """
        tubes, bifurcations = [], []
        for lung in self.lungs:
            vessels, nodes = self._vessel_tree(lung, rng)
            tubes += vessels
            bifurcations += nodes
            tubes += self._airways(lung, vessels)
        tubes += self._trachea_and_aorta() + self._ribs()
        marks = [self.carina, *bifurcations]
        for lung in self.lungs:  # dome points: central-posterior, away from the sliding walls
            x = lung.centre[0] + 0.15 * lung.side * lung.axes[0]
            y = lung.centre[1] + 0.3 * lung.axes[1]
            marks.append((x, y, float(self.dome(np.array([x]), np.array([y]))[0][0]) + 16.0))
        marks += [(lg.centre[0], lg.centre[1], lg.apex - 24.0) for lg in self.lungs]
        marks = np.asarray(marks, dtype=float)
        self._check_landmarks(marks)
        return np.asarray(tubes, dtype=float), marks

    def _check_landmarks(self, marks: np.ndarray) -> None:
        """Every landmark but the carina must lie well inside the inhale lung."""
        sd = self.lung_sd(marks[1:])[0]
        if np.any(sd > -6.0):
            bad = [LANDMARK_NAMES[i + 1] for i in np.nonzero(sd > -6.0)[0]]
            raise RuntimeError(f"synthetic landmark(s) {bad} too close to the lung surface (sd {sd.round(1)})")

    def _vessel_tree(self, lung: _Lung, rng: np.random.Generator) -> tuple[list, list]:
        """Three trunks (upper, middle, lower) from the hilum, branching dichotomously, tapering.

        Grown level by level so that each level's candidate ends are tested in one call.
        """
        trunks = np.array([(0.45, 0.0, 1.0), (1.0, -0.15, -0.1), (0.35, 0.35, -1.0)]) * [lung.side, 1, 1]
        hilum = np.tile(np.asarray(lung.hilum), (3, 1))
        ends = self._branch_ends(hilum, _unit(trunks), np.array([50.0, 42.0, 52.0]), lung, margin=10.0)
        if np.isnan(ends).any():
            raise RuntimeError(f"synthetic cohort: a vessel trunk does not fit inside the lung on side {lung.side}")
        segments = [(*a, *b, 6.0, 5.4, _TUBE_VESSEL) for a, b in zip(hilum, ends)]
        nodes = [tuple(e) for e in ends]
        starts, radius = hilum, 4.3
        for _ in range(5):
            directions = ends - starts
            lengths = np.linalg.norm(directions, axis=1)
            directions /= lengths[:, None]
            axes = _unit(np.cross(directions, rng.standard_normal(directions.shape)))
            angles = np.deg2rad(rng.uniform(20, 40, (len(ends), 2))) * [1, -1]
            shrink = rng.uniform(0.62, 0.8, (len(ends), 2))
            child_dirs = np.concatenate([_rotate_about(directions, axes, angles[:, i]) for i in range(2)])
            parents = np.concatenate([ends, ends])
            child_lengths = np.concatenate([lengths * shrink[:, 0], lengths * shrink[:, 1]])
            child_ends = self._branch_ends(parents, child_dirs, child_lengths, lung)
            kept = ~np.isnan(child_ends[:, 0])
            segments += [(*a, *b, radius, 0.85 * radius, _TUBE_VESSEL) for a, b in zip(parents[kept], child_ends[kept])]
            starts, ends, radius = parents[kept], child_ends[kept], 0.72 * radius
            if not len(ends):
                break
        return segments, nodes

    def _branch_ends(
        self, starts: np.ndarray, directions: np.ndarray, lengths: np.ndarray, lung: _Lung, margin: float = 4.0
    ) -> np.ndarray:
        """Branch ends inside the lung: shortened, or bent towards the lung's core; NaN if none fits."""
        core = np.array([lung.centre[0], lung.centre[1], (lung.apex + lung.dome_top) / 2])
        towards_core = _unit(core - starts)
        candidates = np.stack(
            [
                starts + _unit(directions + bend * towards_core) * (lengths * shrink)[:, None]
                for bend in (0.0, 0.6, 1.5)
                for shrink in (1.0, 0.65, 0.42)
            ],
            axis=1,
        )
        fits = (self.lung_sd(candidates.reshape(-1, 3))[0] <= -margin).reshape(len(starts), -1)
        first = np.argmax(fits, axis=1)  # candidates are in order of preference
        ends = candidates[np.arange(len(starts)), first]
        ends[~fits.any(axis=1)] = np.nan
        return ends

    def _airways(self, lung: _Lung, vessels: list) -> list:
        """Bronchi: main bronchus from the carina, then airways alongside the larger vessels."""
        bronchus_end = np.asarray(lung.hilum) + np.array([0.0, 9.0, 5.0])
        tubes = [(*self.carina, *bronchus_end, 6.5, 5.5, -1)]
        for seg in vessels:
            start, end, radius = np.asarray(seg[:3]), np.asarray(seg[3:6]), seg[6]
            if radius < 3.0:
                continue
            offset = 8.0 * _perpendicular(end - start)
            begin = bronchus_end if np.allclose(start, lung.hilum) else start + offset
            tubes.append((*begin, *(end + offset), 0.75 * radius, 0.7 * radius, -1))
        return _walled(tubes)

    def _trachea_and_aorta(self) -> list:
        top = (self.carina[0], self.carina[1] - 6.0, 200.0)
        aorta_y = self.spine_y - self.spine_r - 12.0
        aorta = (14.0, aorta_y, self.carina[2] + 20.0, 12.0, aorta_y, -220.0, 11.0, 10.0, _TUBE_AORTA)
        return _walled([(*top, *self.carina, 9.0, 8.5, -1)]) + [aorta]

    def _ribs(self) -> list:
        """Ten rib arcs per side in the muscle wall, sloping down towards the front."""
        ax, ay = self.cavity_axes[0] + 7.0, self.cavity_axes[1] + 7.0
        tubes = []
        for k in range(10):
            z0 = self.apex_mean - 5.0 - 24.0 * k
            for side in (-1, 1):
                theta = np.deg2rad(np.linspace(80, -70, 13))
                c, s = np.cos(theta), np.sin(theta)
                x = side * ax * np.abs(c) ** (2 / self.body_n)
                y = ay * np.sign(s) * np.abs(s) ** (2 / self.body_n)
                z = z0 - 35.0 * np.linspace(0, 1, 13) ** 1.3
                for i in range(12):
                    tubes.append((x[i], y[i], z[i], x[i + 1], y[i + 1], z[i + 1], 5.0, 5.0, _TUBE_RIB))
        return tubes

    def _sample_layers(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._layers is None:
            bound = np.asarray(self.settings.field_of_view_mm[::-1]) / 2 + 120.0  # FOV plus motion and pose
            self._layers = _render_tube_layers(self.tubes, self.spacing, self.values, bound)
        return _trilinear(*self._layers, c)

    # -- breathing: B = Z o E, canonical exhale -> canonical inhale

    def _expansion(self, q: np.ndarray) -> np.ndarray:
        """Horizontal (x, y) offsets of E: lateral and AP expansion plus lung heterogeneity."""
        x, y, z = q[:, 0], q[:, 1], q[:, 2]
        level = 0.3 + 0.7 * _smoothstep((self.apex_mean - z) / (self.apex_mean - self.dome_mean))
        offsets = np.empty((len(q), 2), dtype=q.dtype)
        offsets[:, 0] = self.p["lateral_expansion"] * x * level
        offsets[:, 1] = -self.p["ap_expansion"] * np.maximum(self.spine_y - y, 0) * level
        envelope = sum(
            np.exp(
                -(
                    ((x - lg.centre[0]) / lg.axes[0]) ** 2
                    + ((y - lg.centre[1]) / lg.axes[1]) ** 2
                    + ((z - (lg.apex + lg.dome_top) / 2) / (0.5 * (lg.apex - lg.dome_top))) ** 2
                )
            )
            for lg in self.lungs
        )
        envelope = np.maximum(envelope - 1e-3, 0)  # exactly zero far away, and continuous (E must be)
        near = envelope > 0
        if np.any(near):
            field_xy = self._heterogeneity(q[near], components=(0, 1))
            offsets[near] += (0.5 * self.p["heterogeneity_mm"] * envelope[near])[:, None] * field_xy
        return offsets

    def _heterogeneity(self, q: np.ndarray, components: tuple) -> np.ndarray:
        """A smooth random field of unit-ish amplitude (sum of random cosine modes)."""
        phases = skinny_matmul(q, self.het_k.T)
        phases += self.het_phase.astype(q.dtype)
        return skinny_matmul(np.cos(phases, out=phases), self.het_w[:, list(components)])

    def _columns(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Per-(x, y) quantities of the z motion, blended smoothly between the two sides."""
        w = _sigmoid(x / 15.0)
        blend = lambda right, left: (1 - w) * right + w * left  # noqa: E731
        rho = [_superellipse(x - lg.centre[0], y - lg.centre[1], *lg.axes, lg.exponent)[0] for lg in self.lungs]
        periph = blend(*(np.minimum(r, 1.2) ** 2 for r in rho))
        footprint = blend(*(_smoothstep((1 - r) / 0.3) for r in rho))
        posterior = blend(*((y - lg.centre[1]) / lg.axes[1] for lg in self.lungs))
        gradient = self.p["posterior_excursion_gradient"]  # the posterior diaphragm moves more
        excursion = blend(*self.excursion) * (1 + gradient * np.clip(posterior, -1.5, 1.5))
        excursion = np.maximum(excursion * (1 - self.p["peripheral_reduction"] * periph), 0)
        cavity = _superellipse(x, y, *self.cavity_axes, self.body_n)[0]
        spine = np.hypot(x, y - self.spine_y)
        moving = _smoothstep((1.06 - cavity) / 0.08) * _smoothstep((spine - self.spine_r - 2.0) / 10.0)
        base = self.dome(x, y)[0] + excursion  # exhale diaphragm height
        apex = blend(*(lg.apex for lg in self.lungs))
        return {
            "D": excursion,
            "base": base,
            "apex": apex,
            "length": np.maximum(apex - base, 40.0),
            "footprint": footprint,
            "moving": moving,
        }

    def _profile(self, col: dict, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalised height s (0 apex, 1 base), piston fraction h(s) and dh/dz."""
        s = (col["apex"] - z) / col["length"]
        inside = (s > 0) & (s < 1)
        sc = np.clip(s, 0, 1)
        h = sc + self.kappa * sc * (sc - 1)
        dh = np.where(inside, (1 + self.kappa * (2 * sc - 1)) / col["length"], 0)
        return sc, h, dh

    def _w_lung(self, col: dict, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """z offset of the lung branch and its derivative along z."""
        sc, h, dh = self._profile(col, p[:, 2])
        het = self.p["heterogeneity_mm"] * 4 * sc * (1 - sc) * self._heterogeneity(p, (2,))[:, 0]
        return -col["D"] * h + het, col["D"] * dh

    def _w_body(self, col: dict, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """z offset of the body branch: chest wall nearly still, abdomen follows the diaphragm."""
        sc, h, dh = self._profile(col, z)
        t = z - col["base"]
        wall = np.clip(1 - t / 160.0, 0, 1)
        above = col["footprint"] * h + (1 - col["footprint"]) * wall**2
        d_above = col["footprint"] * dh + (1 - col["footprint"]) * 2 * wall / 160.0
        depth = np.maximum(-t, 0)
        gauss = np.exp(-((depth / 150.0) ** 2))
        frac = np.where(t >= 0, above, gauss)
        dfrac = np.where(t >= 0, d_above, 2 * depth / 150.0**2 * gauss)
        scale = col["D"] * col["moving"]
        return -scale * frac, scale * dfrac

    def breathe(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """B: canonical exhale points -> canonical inhale points, and which took the lung branch."""
        p = q.copy()
        p[:, :2] += self._expansion(q)
        col = self._columns(p[:, 0], p[:, 1])
        out = p.copy()
        out[:, 2] += self._w_lung(col, p)[0]
        in_lung = self.lung_sd(out)[0] < 0
        body = ~in_lung
        out[body, 2] = p[body, 2] + self._w_body(_subset(col, body), p[body, 2])[0]
        return out, in_lung

    def unbreathe(self, c: np.ndarray, in_lung: np.ndarray | None = None) -> np.ndarray:
        """B^-1: canonical inhale points -> canonical exhale points (branch from the inhale lung)."""
        in_lung = self.lung_sd(c)[0] < 0 if in_lung is None else in_lung
        p = c.copy()
        col = self._columns(c[:, 0], c[:, 1])
        for mask, branch in ((in_lung, "lung"), (~in_lung, "body")):
            if np.any(mask):
                p[mask, 2] = self._solve_column(_subset(col, mask), c[mask], branch)
        q = p.copy()
        for _ in range(30):  # E is a small smooth perturbation of the identity: fixed point
            new = p[:, :2] - self._expansion(q)
            change = np.abs(new - q[:, :2]).max(initial=0.0)
            q[:, :2] = new
            if change < 1e-4:
                break
        return q

    def _solve_column(self, col: dict, c: np.ndarray, branch: str) -> np.ndarray:
        """Solve z + w(z) = c_z per column; z + w is strictly increasing, so bisection is safe."""

        def residual(z: np.ndarray, cols: dict, pts: np.ndarray) -> tuple:
            if branch == "lung":
                w, dw = self._w_lung(cols, np.stack([pts[:, 0], pts[:, 1], z], axis=1))
            else:
                w, dw = self._w_body(cols, z)
            return z + w - pts[:, 2], 1 + dw

        tolerance = 2e-5 if c.dtype == np.float64 else 1e-4  # float32 resolves ~1e-5 mm at 200 mm
        z = c[:, 2].copy()
        for _ in range(12):
            f, df = residual(z, col, c)
            if np.abs(f).max(initial=0.0) < tolerance / 10:
                return z
            z -= f / np.maximum(df, 0.3)
        f = residual(z, col, c)[0]
        bad = np.abs(f) > tolerance
        if np.any(bad):
            z[bad] = self._bisect(lambda zz, m=bad: residual(zz, _subset(col, m), c[m])[0], c[bad, 2])
        return z

    @staticmethod
    def _bisect(fun: Callable, target: np.ndarray) -> np.ndarray:
        lo, hi = target - 120.0, target + 120.0
        for _ in range(48):
            mid = (lo + hi) / 2
            high = fun(mid) > 0
            hi, lo = np.where(high, mid, hi), np.where(high, lo, mid)
        return (lo + hi) / 2

    # -- world-space maps

    def phi(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exhale scanner points -> inhale scanner points; second value: lung branch taken."""
        c, in_lung = self.breathe(self.pose_exhale.invert(x))
        return self.pose_inhale.apply(c), in_lung

    def phi_inverse(self, y: np.ndarray) -> np.ndarray:
        """Inhale scanner points -> exhale scanner points (numerical inverse of phi)."""
        return self.pose_exhale.apply(self.unbreathe(self.pose_inhale.invert(y)))

    def landmarks(self) -> tuple[np.ndarray, np.ndarray]:
        """Inhale landmarks y_k and exhale landmarks x_k with phi(x_k) = y_k (< 1e-3 mm)."""
        y = self.pose_inhale.apply(self.landmarks_canonical)
        x = self.phi_inverse(y)
        for _ in range(20):  # Newton polish on the forward map (numerical Jacobian)
            r = self.phi(x)[0] - y
            if np.abs(r).max() < 1e-6:
                break
            for k in range(len(x)):
                jac = np.stack(
                    [(self.phi(x[k] + e)[0] - self.phi(x[k] - e)[0])[0] / 2e-3 for e in np.eye(3)[:, None, :] * 1e-3],
                    axis=1,
                )
                x[k] -= np.linalg.solve(jac, r[k])
        error = np.linalg.norm(self.phi(x)[0] - y, axis=1).max()
        if error > 1e-3:
            raise RuntimeError(f"exhale landmarks: phi(x) misses y by {error:.2g} mm")
        return y, x


def _intersect(a: tuple, b: tuple) -> tuple:
    take_a = a[0] >= b[0]
    return np.where(take_a, a[0], b[0]), np.where(take_a, a[1], b[1])


def _union(a: tuple, b: tuple) -> tuple:
    take_a = a[0] <= b[0]
    return np.where(take_a, a[0], b[0]), np.where(take_a, a[1], b[1])


def _over(image: np.ndarray, occupancy: np.ndarray, value: np.ndarray | float) -> None:
    """Composite a tissue over the image in place (partial volume)."""
    image += occupancy * (value - image)


def _subset(col: dict, mask: np.ndarray) -> dict:
    return {k: v[mask] for k, v in col.items()}


def _rotate_about(vectors: np.ndarray, axes: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rodrigues' rotation of (n, 3) `vectors` about unit `axes` by `angles` (n,)."""
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    dot = np.sum(axes * vectors, axis=1, keepdims=True)
    return vectors * cos + np.cross(axes, vectors) * sin + axes * dot * (1 - cos)


def _perpendicular(direction: np.ndarray) -> np.ndarray:
    """A unit vector perpendicular to `direction`, preferring the posterior side."""
    cross = np.cross(direction, [1.0, 0.0, 0.0])
    if np.linalg.norm(cross) < 1e-3 * np.linalg.norm(direction):
        cross = np.cross(direction, [0.0, 0.0, 1.0])
    cross = _unit(cross)
    return cross if cross[1] >= 0 else -cross


def _walled(airways: list) -> list:
    """Airway tubes (kind -1) as a bright wall tube plus a dark lumen tube."""
    out = []
    for *ends, r0, r1, _ in airways:
        wall = max(1.5, 0.25 * r0)
        out.append((*ends, r0 + wall, r1 + wall, _TUBE_WALL))
        out.append((*ends, r0, r1, _TUBE_LUMEN))
    return out


# -------------------------------------------------------------------------- tube layers


def _render_tube_layers(tubes: np.ndarray, spacing: np.ndarray, values: Intensities, bound: np.ndarray) -> tuple:
    """Tubes on a canonical grid as (alpha, premultiplied value) layers for trilinear sampling.

    Each kind is the maximum of its tubes' occupancies (no beads at joints), then the kinds
    are composited in order: vessels, ribs, aorta, airway walls, airway lumens.
    """
    pieces = _split_tubes(tubes, 3.0 * float(spacing.max()))
    margin = pieces[:, 6:8].max() + 2 * float(spacing.max())
    lo = np.minimum(pieces[:, 0:3], pieces[:, 3:6]).min(axis=0) - margin
    hi = np.maximum(pieces[:, 0:3], pieces[:, 3:6]).max(axis=0) + margin
    lo, hi = np.maximum(lo, -bound), np.minimum(hi, bound)
    size = np.ceil((hi - lo) / spacing).astype(int) + 1
    kinds = np.zeros((5, *size[::-1]), dtype=F32)
    for piece in pieces:
        _paint_piece(kinds[int(piece[8])], piece, lo, spacing)
    value = [values.vessel, values.rib, values.aorta, values.airway_wall, values.airway_lumen]
    alpha = np.zeros(size[::-1], dtype=F32)
    premultiplied = np.zeros(size[::-1], dtype=F32)
    for occupancy, v in zip(kinds, value):
        premultiplied *= 1 - occupancy
        premultiplied += occupancy * v
        alpha += occupancy * (1 - alpha)
    return np.stack([alpha, premultiplied], axis=-1), lo, spacing


def _split_tubes(tubes: np.ndarray, max_length: float) -> np.ndarray:
    """Cut long tubes into short pieces so that every piece has a tight bounding box."""
    pieces = []
    for tube in tubes:
        a, b, r0, r1 = tube[0:3], tube[3:6], tube[6], tube[7]
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / max_length)))
        t = np.linspace(0, 1, n + 1)
        for i in range(n):
            pieces.append(
                (
                    *(a + t[i] * (b - a)),
                    *(a + t[i + 1] * (b - a)),
                    r0 + t[i] * (r1 - r0),
                    r0 + t[i + 1] * (r1 - r0),
                    tube[8],
                )
            )
    return np.asarray(pieces)


def _paint_piece(layer: np.ndarray, piece: np.ndarray, lo: np.ndarray, spacing: np.ndarray) -> None:
    """Max-composite one tapered tube piece into `layer` with area-preserving partial volume."""
    a, b, r0, r1 = piece[0:3], piece[3:6], piece[6], piece[7]
    axis = b - a
    length2 = max(float(axis @ axis), 1e-9)
    t_hat = axis / np.sqrt(length2)
    width = float(np.sqrt(((1 - t_hat**2) * spacing**2).sum() / 2))  # voxel size across the tube
    reach = max(r0, r1, width / 2) + width
    first = np.floor((np.minimum(a, b) - reach - lo) / spacing).astype(int)
    last = np.ceil((np.maximum(a, b) + reach - lo) / spacing).astype(int)
    first = np.maximum(first, 0)
    last = np.minimum(last, np.asarray(layer.shape[::-1]) - 1)
    if np.any(last < first):
        return
    axes = [lo[i] + spacing[i] * np.arange(first[i], last[i] + 1, dtype=F32) for i in range(3)]
    dx, dy, dz = (axes[0] - a[0])[None, None, :], (axes[1] - a[1])[None, :, None], (axes[2] - a[2])[:, None, None]
    t = np.clip((dx * axis[0] + dy * axis[1] + dz * axis[2]) / length2, 0, 1)
    dist = np.sqrt((dx - t * axis[0]) ** 2 + (dy - t * axis[1]) ** 2 + (dz - t * axis[2]) ** 2)
    radius = r0 + t * (r1 - r0)
    effective = np.maximum(radius, width / 2)  # thinner tubes: wider but fainter (same area)
    occupancy = np.clip(0.5 + (effective - dist) / width, 0, 1) * (radius / effective) ** 2
    block = layer[first[2] : last[2] + 1, first[1] : last[1] + 1, first[0] : last[0] + 1]
    np.maximum(block, occupancy.astype(F32), out=block)


def _trilinear(layers: np.ndarray, lo: np.ndarray, spacing: np.ndarray, c: np.ndarray) -> tuple:
    """Trilinear sample of the (z, y, x, 2) layers at canonical points; zero outside."""
    index = (c - lo.astype(c.dtype)) / spacing.astype(c.dtype)
    shape = np.asarray(layers.shape[:3][::-1])
    inside = np.all((index >= 0) & (index <= shape - 1.001), axis=1)
    out = np.zeros((len(c), 2), dtype=c.dtype)
    if not np.any(inside):
        return out[:, 0], out[:, 1]
    idx = index[inside]
    base = np.floor(idx).astype(np.int64)
    frac = (idx - base).astype(c.dtype)
    flat = layers.reshape(-1, 2)
    stride = np.array([1, shape[0], shape[0] * shape[1]])
    start = base @ stride
    acc = np.zeros((len(idx), 2), dtype=c.dtype)
    for corner in np.ndindex(2, 2, 2):
        weight = np.prod([frac[:, i] if corner[i] else 1 - frac[:, i] for i in range(3)], axis=0)
        acc += weight[:, None] * flat[start + np.dot(corner, stride)]
    out[inside] = acc
    return out[:, 0], out[:, 1]


def build_model(settings: SyntheticCohortSettings, subject: str) -> tuple[SubjectModel, list]:
    index = _subject_index(settings, subject)
    label = subject_table(settings)["label"].iloc[index]
    streams = _streams(settings, index)
    params = _draw_parameters(settings, streams[0], ild=(label == "ILD"))
    params["subject"] = subject
    return SubjectModel(settings, params, streams[1]), streams[2:]
