"""Head motion in a DSC series: a rigid transform per frame, framewise displacement, and correction.

Every frame (x, y, z) is registered rigidly to one reference image, the voxel-wise median of the
baseline (pre-bolus) frames, with Mattes mutual information (register.FrameRegistration; why MI and
not mean squares: README "Head motion"). The baseline is found on the uncorrected series' whole-volume
mean signal: a rigid in-plane movement keeps the head inside the field of view and so keeps that sum,
whereas a brain mask's mean jumps when edge voxels move across the mask's border. The median, not
the mean, so that a moved baseline frame does not blur the reference (one frame moved by 1.5 mm among
10 shifted a mean reference by 0.13 mm).

Parameters, per frame: rotations (deg) about the x, y, z axes of the scanner's RAS+ space through the
centre of the voxel grid (extrinsic x, then y, then z) and the translation (mm) of that centre, so
that a point p of the reference lies at R (p - c) + c + t in the frame.

Framewise displacement after Power et al. 2012 (NeuroImage 59:2142): the sum of the absolute changes
of the three translations plus the three rotations' changes as arc lengths on a sphere of 50 mm;
the displacement relative to the reference is the same sum over the parameters themselves.

Correction resamples a moved frame onto the reference grid with a cubic B-spline (register.realign_frame):
any interpolation smooths the frame it resamples, and linear interpolation smooths most where DSC can
least afford it, the few arterial voxels of the input function (true transforms on the test phantom:
5.6 % CBV error linearly, 1.0 % with the B-spline). Values are clipped to the frame's own range
(the spline overshoots at sharp edges); voxels whose source falls outside the frame keep their
uncorrected value. Frames that did not move are left bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .io import Series

#: --motion-correct choices.
MODES = ("auto", "on", "off")

#: Radius (mm) turning rotations into arc lengths: Power et al. 2012's approximate distance from the
#: centre of the head to the cortex.
SPHERE_RADIUS_MM = 50.0

#: Frames whose framewise displacement exceeds this (mm) are flagged: the censoring threshold of
#: Power et al. 2012 (NeuroImage 59:2142), the usual one for task-free series.
FD_THRESHOLD_MM = 0.5
FD_THRESHOLD_SOURCE = "Power et al. 2012, NeuroImage 59:2142 (framewise displacement > 0.5 mm)"

#: --motion-correct auto resamples a frame whose displacement from the reference exceeds this (mm).
#: Estimates are not exact and the bolus moves the registration's optimum: on motion-free textured
#: phantoms with a realistic bolus (white matter -13 %, grey-matter-like blocks -13 to -60 %, arteries
#: -100 %; tests/test_motion.py) frames read up to 0.23 mm, and with mean squares instead of mutual
#: information up to 0.83 mm; a frame resampled by such a reading gains an error rather than losing one.
#: 0.5 mm keeps twice that margin and is the motion Power et al. 2012 take as negligible between frames.
AUTO_THRESHOLD_MM = 0.5

#: A frame whose half-resolution screening displacement is within this (mm) is still: it is not
#: registered again at full resolution and never resampled (--motion-correct on resamples every frame
#: above it). Screening read up to 0.23 mm on motion-free frames (register.SCREEN_BINS).
REFINE_MM = 0.25

#: The metric samples the head: the automatic brain mask of the reference (Otsu) grown by this many
#: voxels in-plane, so that the head's edge, the most informative structure, is inside.
HEAD_DILATION_VOXELS = 2

#: The end of every error message of this module (auto drops it: it goes on without correction).
OFF_HINT = "; run with --motion-correct off"

#: Fewest head voxels for a mask; below it the whole field of view is sampled.
MIN_HEAD_VOXELS = 500

#: A slab thinner than this (mm, slices x spacing) is registered in-plane only (rotation about the slice
#: axis, translations across it): the bolus changes each slice differently, and in a thin slab that
#: reads as a tilt. Motion-free 48 x 48 x 5 phantom (20 mm) with smooth anatomy: 1.7 deg of false tilt and
#: 0.65 mm along z at the bolus peak with all six parameters. A 60 mm slab was sound (worst moved frame
#: 0.06 deg, 0.17 mm); 100 mm is a clinical slab.
MIN_SLAB_MM = 50.0


@dataclass(frozen=True)
class MotionEstimate:
    """Rigid motion of every frame relative to the reference. Arrays have one row per frame."""

    rotation_deg: np.ndarray  # (n_t, 3): about x, y, z (RAS), deg
    translation_mm: np.ndarray  # (n_t, 3): of the grid centre, mm
    refined: np.ndarray  # (n_t,) bool: registered again at full resolution
    transforms: list  # register.Rigid per frame (reference -> frame points)
    reference_frames: slice  # the baseline frames whose median is the reference
    centre_ras: np.ndarray  # (3,) mm, the rotation centre
    through_plane: bool  # False: a thin slab, only the in-plane parameters were estimated (MIN_SLAB_MM)
    seconds: float

    @property
    def displacement_mm(self) -> np.ndarray:
        return displacement(self.rotation_deg, self.translation_mm)

    @property
    def fd_mm(self) -> np.ndarray:
        return framewise_displacement(self.rotation_deg, self.translation_mm)


def displacement(rotation_deg: np.ndarray, translation_mm: np.ndarray, *,
                 radius_mm: float = SPHERE_RADIUS_MM) -> np.ndarray:
    """Power-style displacement (mm) of parameters (n, 3) deg and (n, 3) mm: sum |t| + radius sum |rad|."""
    rot = np.radians(np.asarray(rotation_deg, dtype=np.float64))
    trans = np.asarray(translation_mm, dtype=np.float64)
    return np.abs(trans).sum(axis=-1) + radius_mm * np.abs(rot).sum(axis=-1)


def framewise_displacement(rotation_deg: np.ndarray, translation_mm: np.ndarray, *,
                           radius_mm: float = SPHERE_RADIUS_MM) -> np.ndarray:
    """Framewise displacement (mm, (n,)) of Power et al. 2012: the displacement of the parameters'
    change from the previous frame; 0 for the first frame, which has none."""
    rot = np.asarray(rotation_deg, dtype=np.float64)
    trans = np.asarray(translation_mm, dtype=np.float64)
    fd = np.zeros(rot.shape[0])
    if rot.shape[0] > 1:
        fd[1:] = displacement(np.diff(rot, axis=0), np.diff(trans, axis=0), radius_mm=radius_mm)
    return fd


def rigid_parameters(matrix: np.ndarray, centre_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotations (deg; extrinsic x, y, z) and translation of ``centre_ras`` (mm) of a 4 x 4 RAS matrix."""
    from scipy.spatial.transform import Rotation

    m = np.asarray(matrix, dtype=np.float64)
    c = np.asarray(centre_ras, dtype=np.float64)
    return Rotation.from_matrix(m[:3, :3]).as_euler("xyz", degrees=True), m[:3, :3] @ c + m[:3, 3] - c


def grid_centre(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """RAS position (mm) of the centre of a voxel grid."""
    return (np.asarray(affine, dtype=np.float64) @ np.r_[(np.asarray(shape[:3]) - 1) / 2.0, 1.0])[:3]


def slab_mm(affine: np.ndarray, shape: tuple[int, ...]) -> float:
    """Extent of the slab along the slice axis (mm): slices x slice spacing."""
    return float(shape[2] * np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, 2]))


def reference_frames(data: np.ndarray, *, tr: float, brain: np.ndarray | None = None, path=None) -> slice:
    """The baseline frames of the uncorrected series (x, y, z, t): signal.find_baseline on the
    whole-volume mean signal, else on the brain's (``brain`` or automatic) mean signal."""
    from . import signal

    n = data.shape[3]
    flat = data.reshape(-1, n)

    def brain_curve():
        mask = brain if brain is not None else signal.auto_brain_mask(data.mean(axis=3))
        return flat[np.asarray(mask).ravel()].mean(axis=0, dtype=np.float64)

    curves = (lambda: flat.mean(axis=0, dtype=np.float64), brain_curve)
    error = None
    for curve in curves:
        try:
            base = signal.find_baseline(curve(), tr=tr)
            return slice(base.start, base.stop)
        except signal.BaselineError as exc:
            error = exc
    raise InputError(f"{path}: no baseline for the motion reference ({error}){OFF_HINT}")


def head_mask(reference: np.ndarray) -> np.ndarray:
    """Voxels the registration metric samples (bool, x y z): the head, with its edge."""
    from scipy import ndimage

    from .signal import auto_brain_mask

    head = auto_brain_mask(reference)
    if head.sum() < MIN_HEAD_VOXELS:
        return np.ones(reference.shape, bool)
    return ndimage.binary_dilation(head, structure=np.ones((3, 3, 1), bool), iterations=HEAD_DILATION_VOXELS)


def estimate_motion(data: np.ndarray, affine: np.ndarray, *, tr: float, brain: np.ndarray | None = None,
                    path=None) -> MotionEstimate:
    """Register every frame of ``data`` (x, y, z, t; signal) to the median baseline frame: a screening
    pass at half resolution for all frames, then full resolution for frames that moved more than
    REFINE_MM. InputError if the registration fails."""
    from .register import FrameRegistration

    t0 = time.perf_counter()
    data = np.asarray(data)
    n = data.shape[3]
    frames = reference_frames(data, tr=tr, brain=brain, path=path)
    reference = np.median(data[..., frames], axis=3).astype(np.float32)
    centre = grid_centre(affine, data.shape)
    through_plane = slab_mm(affine, data.shape) >= MIN_SLAB_MM
    rot, trans = np.zeros((n, 3)), np.zeros((n, 3))
    refined = np.zeros(n, bool)
    transforms = []
    k = 0
    try:
        reg = FrameRegistration(reference, affine, head_mask(reference), centre_ras=centre,
                                through_plane=through_plane)
        for k in range(n):
            tx = reg.register(data[..., k], refine=False)
            r, t = rigid_parameters(tx.matrix, centre)
            if displacement(r, t) > REFINE_MM:
                tx = reg.register(data[..., k], refine=True, start=tx)
                r, t = rigid_parameters(tx.matrix, centre)
                refined[k] = True
            rot[k], trans[k] = r, t
            transforms.append(tx)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "no overlap"
        raise InputError(f"{path}: registration of frame {k} to the baseline failed ({reason}){OFF_HINT}") from None
    return MotionEstimate(rotation_deg=rot, translation_mm=trans, refined=refined, transforms=transforms,
                          reference_frames=frames, centre_ras=centre, through_plane=through_plane,
                          seconds=time.perf_counter() - t0)


def frames_to_correct(estimate: MotionEstimate, mode: str) -> np.ndarray:
    """Bool (n_t,): frames to resample. ``auto``: displacement above AUTO_THRESHOLD_MM; ``on``: every
    refined frame still above REFINE_MM; ``off``: none."""
    disp = estimate.displacement_mm
    if mode == "auto":
        return disp > AUTO_THRESHOLD_MM
    if mode == "on":
        return estimate.refined & (disp > REFINE_MM)
    return np.zeros(disp.shape, bool)


def apply_correction(data: np.ndarray, affine: np.ndarray, estimate: MotionEstimate,
                     which: np.ndarray) -> np.ndarray:
    """A copy of ``data`` (x, y, z, t) with the frames in ``which`` resampled onto the reference grid
    (cubic B-spline, clipped to the frame's own range); voxels whose source lies outside the frame keep
    their value; other frames untouched."""
    from .register import realign_frame

    out = np.array(data, copy=True)
    for k in np.flatnonzero(which):
        frame = data[..., k]
        moved = realign_frame(frame, affine, estimate.transforms[k])
        out[..., k] = np.where(np.isfinite(moved), np.clip(moved, frame.min(), frame.max()), frame)
    return out


def timeseries(estimate: MotionEstimate, corrected: np.ndarray, *, tr: float) -> dict[str, np.ndarray]:
    """The columns of motion.tsv (units in the names; flags 0/1)."""
    n = estimate.rotation_deg.shape[0]
    fd = estimate.fd_mm
    cols = {"frame": np.arange(n), "time_s": np.arange(n) * tr}
    for i, axis in enumerate("xyz"):
        cols[f"rot_{axis}_deg"] = estimate.rotation_deg[:, i]
    for i, axis in enumerate("xyz"):
        cols[f"trans_{axis}_mm"] = estimate.translation_mm[:, i]
    cols.update({"fd_mm": fd, "displacement_mm": estimate.displacement_mm,
                 "flagged": (fd > FD_THRESHOLD_MM).astype(int), "corrected": np.asarray(corrected).astype(int)})
    return cols


def summary(estimate: MotionEstimate, corrected: np.ndarray, *, mode: str) -> dict:
    """report.json "motion" (numbers in mm and s)."""
    fd = estimate.fd_mm
    flagged = np.flatnonzero(fd > FD_THRESHOLD_MM)
    fixed = np.flatnonzero(corrected)
    return {
        "assessed": True, "correction": mode, "applied": bool(fixed.size),
        "n_frames_corrected": int(fixed.size), "frames_corrected": fixed.tolist(),
        "fd_max_mm": float(fd.max()) if fd.size else 0.0,
        "fd_mean_mm": float(fd[1:].mean()) if fd.size > 1 else 0.0,
        "fd_threshold_mm": FD_THRESHOLD_MM, "fd_threshold_source": FD_THRESHOLD_SOURCE,
        "n_frames_above_threshold": int(flagged.size), "frames_above_threshold": flagged.tolist(),
        "displacement_max_mm": float(estimate.displacement_mm.max()),
        "correction_threshold_mm": AUTO_THRESHOLD_MM if mode == "auto" else REFINE_MM,
        "frames_registered_full_resolution": np.flatnonzero(estimate.refined).tolist(),
        "reference": {"frames": [estimate.reference_frames.start, estimate.reference_frames.stop],
                      "image": "voxel-wise median of the baseline frames of the uncorrected series"},
        "method": ("rigid, Mattes mutual information, SimpleITK; every frame at half the in-plane "
                   "resolution, frames above the screening threshold again at full resolution; "
                   "moved frames resampled onto the reference grid (cubic B-spline)"),
        "parameters": ("rotations (deg) about the RAS x, y, z axes through the grid centre, translation (mm) of "
                       "that centre; framewise displacement: sum of |change of translations| + "
                       f"{SPHERE_RADIUS_MM:g} mm x sum of |change of rotations (rad)|"),
        "screening_threshold_mm": REFINE_MM,
        "parameters_estimated": ("all six" if estimate.through_plane else
                                 f"in-plane only (slab thinner than {MIN_SLAB_MM:g} mm): rotation about the slice "
                                 "axis and the two translations across it"),
        "seconds": estimate.seconds,
    }


def correct_series(series: Series, *, mode: str, brain: np.ndarray | None = None) -> tuple[Series, dict, list[str]]:
    """Estimate (unless ``mode`` is off) and correct the head motion of ``series``: the series to analyse
    (the same object when no frame was resampled), the motion entry of the Result (report.json "motion"
    plus "timeseries", the motion.tsv columns) and warnings."""
    import dataclasses

    if mode not in MODES:
        raise ValueError(f"motion correction mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return series, {"assessed": False, "correction": "off", "applied": False}, []
    try:
        est = estimate_motion(series.data, series.affine, tr=series.tr, brain=brain, path=series.path)
    except InputError as exc:
        if mode == "on":
            raise
        # auto must not stop an analysis that would run without it
        reason = str(exc).split(": ", 1)[-1].removesuffix(OFF_HINT)
        return series, {"assessed": False, "correction": "auto", "applied": False, "reason": reason}, [
            f"head motion not assessed: {reason}"]
    which = frames_to_correct(est, mode)
    info = summary(est, which, mode=mode)
    info["timeseries"] = timeseries(est, which, tr=series.tr)
    notes = []
    if info["n_frames_above_threshold"]:
        frames = info["frames_above_threshold"]
        listed = ", ".join(str(f) for f in frames[:10]) + (", ..." if len(frames) > 10 else "")
        done = (f"{info['n_frames_corrected']} frame(s) realigned to the baseline" if info["applied"]
                else "no frame realigned")
        notes.append(f"head motion: {len(frames)} frame(s) with framewise displacement above {FD_THRESHOLD_MM:g} mm "
                     f"(frames {listed}; maximum {info['fd_max_mm']:.2f} mm); {done}; check the maps for motion artefacts")
    if not info["applied"]:
        return series, info, notes
    return dataclasses.replace(series, data=apply_correction(series.data, series.affine, est, which)), info, notes
