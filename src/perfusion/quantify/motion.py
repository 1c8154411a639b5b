"""Head motion in a DSC series: a rigid transform per frame, framewise displacement, and correction.

Every frame (x, y, z) is compared with one reference image, the voxel-wise median of the baseline
(pre-bolus) frames, in two stages. A screen (screen_frames: numpy, all frames at once) estimates each
frame's rigid displacement by one linearised least-squares step, after taking out each voxel's bolus
signal as predicted from the other frames; frames it reads as still keep that estimate. Frames it reads
as moved are registered rigidly with Mattes mutual information (register.FrameRegistration; why MI and
not mean squares: README "Head motion"); in a thin slab (MIN_SLAB_MM) the registration's reading
stands above AUTO_THRESHOLD_MM only if the screen's does too. The baseline is found on the uncorrected
series' whole-volume mean signal: a rigid in-plane movement keeps the head inside the field of view and
so keeps that sum, whereas a brain mask's mean jumps when edge voxels move across the mask's border. The median, not
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

from perfusion.errors import InputError
from perfusion.io import Series

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

#: A frame whose half-resolution MI screening displacement is within this (mm) is still: it is not
#: registered again at full resolution and never resampled (--motion-correct on resamples every frame
#: above it). MI screening read up to 0.23 mm on motion-free frames (register.SCREEN_BINS).
REFINE_MM = 0.25

#: A frame whose least-squares screen (screen_frames) reads a displacement above this (mm) is registered
#: with mutual information; below it the frame is still and keeps the screen's estimate. Measured on the
#: textured phantom of tests/test_motion.py (TE 0.1 s, strong bolus; 64 and 128 matrix, 25 slices; also
#: at SNR 50 and with leaky lesions) and on a 128 x 128 x 24 stack of default phantoms: still frames read
#: up to 0.16 mm, and frames moved by exactly 0.5 mm (translations, rotations and mixtures, at and around
#: the bolus peak) 0.45-0.64 mm. A still frame read above it costs one registration; a moved one read
#: below it would go uncorrected, so the margin is kept on that side.
SCREEN_MM = 0.25

#: The screen works on 2 x 2 in-plane bins (sums) of the frames. At full resolution still frames read
#: a little less (up to 0.09 instead of 0.16 mm) but 0.5 mm frames too (down to 0.45 instead of 0.49 mm
#: on the test phantom: a sharper image leaves the linear range sooner), at four times the cost.
SCREEN_BIN = 2

#: Temporal regressors of each voxel's bolus signal in the screen, from the head's mean relative signal
#: change g(t): a constant, g, its running sum (leakage, as in Boxerman-Weisskoff) and its time
#: derivative (arrival delays). Without them a still frame at the bolus peak read 0.31 mm (test phantom);
#: without the running sum, leaky lesions (the phantom's, Ktrans x 10) made baseline frames read up to
#: 0.45 mm. The passes repeat, leaving out of the bolus fit the frames read as moved, until that set
#: repeats or SCREEN_PASSES are done; the first pass, without the bolus model, leaves out frames above
#: AUTO_THRESHOLD_MM. Two or three passes were needed on the phantoms.
SCREEN_PASSES = 5

#: Frames registered with mutual information at once (each registration on one thread, so the result
#: of a frame does not depend on how many run): the two cores this was measured on.
REGISTRATION_WORKERS = 2

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
#:
#: In such a slab a registered frame is also taken as moved beyond AUTO_THRESHOLD_MM only when the screen
#: reads it so too; when one of the two reads it below, the frame keeps the smaller reading (issue 16: an
#: in-vivo series of two slices had 8-10 still frames, the bolus peak among them, flagged and realigned).
#: Few slices leave both estimators exposed to the bolus, each in its own way: on 1-3 slices of the
#: textured phantom (strong bolus, seeds 0-2, SNR 30 and 50, with and without leaky lesions) the screen
#: read still bolus frames up to 1.82 mm (0.16 mm on 25 slices) and sent 128 still frames of 84 series to
#: registration, and mutual information, forced to refine a still single slice at the bolus peak, read
#: 0.72 mm; the two erred on different frames. A frame moved by 1.5 mm in-plane was read at least 1.0 mm
#: by the screen and 1.1 mm by the registration, so requiring both costs no moved frame there.
MIN_SLAB_MM = 50.0


@dataclass(frozen=True)
class MotionEstimate:
    """Rigid motion of every frame relative to the reference. Arrays have one row per frame."""

    rotation_deg: np.ndarray  # (n_t, 3): about x, y, z (RAS), deg
    translation_mm: np.ndarray  # (n_t, 3): of the grid centre, mm
    refined: np.ndarray  # (n_t,) bool: registered again at full resolution (MI)
    transforms: list  # register.Rigid per frame (reference -> frame points; the screen's for still frames)
    reference_frames: slice  # the baseline frames whose median is the reference
    centre_ras: np.ndarray  # (3,) mm, the rotation centre
    through_plane: bool  # False: a thin slab, only the in-plane parameters were estimated (MIN_SLAB_MM)
    seconds: float
    registered: np.ndarray | None = None  # (n_t,) bool: read as moved by the screen, registered with MI

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


def rigid_matrix(rotation_deg: np.ndarray, translation_mm: np.ndarray, centre_ras: np.ndarray) -> np.ndarray:
    """4 x 4 RAS matrix of rotations (deg; extrinsic x, y, z) about ``centre_ras`` and a translation (mm)
    of it: the inverse of rigid_parameters (numpy only: scipy.spatial costs 0.07 s to import)."""
    cx, cy, cz = np.cos(np.radians(rotation_deg))
    sx, sy, sz = np.sin(np.radians(rotation_deg))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    c = np.asarray(centre_ras, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx
    m[:3, 3] = c + np.asarray(translation_mm, dtype=np.float64) - m[:3, :3] @ c
    return m


def grid_centre(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """RAS position (mm) of the centre of a voxel grid."""
    return (np.asarray(affine, dtype=np.float64) @ np.r_[(np.asarray(shape[:3]) - 1) / 2.0, 1.0])[:3]


def slab_mm(affine: np.ndarray, shape: tuple[int, ...]) -> float:
    """Extent of the slab along the slice axis (mm): slices x slice spacing."""
    return float(shape[2] * np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, 2]))


def reference_frames(data: np.ndarray, *, tr: float, brain: np.ndarray | None = None, path=None) -> slice:
    """The baseline frames of the uncorrected series (x, y, z, t): signal.find_baseline on the
    whole-volume mean signal, else on the brain's (``brain`` or automatic) mean signal."""
    from perfusion.quantify import signal
    def brain_curve():
        mask = np.asarray(brain if brain is not None else signal.auto_head_mask(data.mean(axis=3)), dtype=bool)
        if not mask.any():
            raise signal.BaselineError("the brain mask is empty")
        return data[mask].mean(axis=0, dtype=np.float64)

    # mean over the three spatial axes, not over data.reshape(-1, n_t): on a NIfTI array (x fastest)
    # that reshape copies the whole series (1 s CPU at 128 x 128 x 24 x 80, against 0.02 s)
    curves = (lambda: data.mean(axis=(0, 1, 2), dtype=np.float64), brain_curve)
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

    from perfusion.quantify.signal import auto_head_mask

    head = auto_head_mask(reference)
    if head.sum() < MIN_HEAD_VOXELS:
        return np.ones(reference.shape, bool)
    return ndimage.binary_dilation(head, structure=np.ones((3, 3, 1), bool), iterations=HEAD_DILATION_VOXELS)


def _binned(image: np.ndarray, k: int) -> np.ndarray:
    """Sums (float64) of k x k bins over the first two axes of ``image`` (x, y, ...); a last odd row or
    column is dropped."""
    nx, ny = image.shape[0] // k * k, image.shape[1] // k * k
    out = image[0:nx:k, 0:ny:k].astype(np.float64)
    for i in range(k):
        for j in range(k):
            if i or j:
                out += image[i:nx:k, j:ny:k]
    return out


@dataclass(frozen=True)
class Screen:
    """Result of screen_frames, one row per frame."""

    rotation_deg: np.ndarray  # (n_t, 3): about x, y, z (RAS), deg
    translation_mm: np.ndarray  # (n_t, 3): of the grid centre, mm
    moved: np.ndarray  # (n_t,) bool: displacement above SCREEN_MM
    passes: int

    @property
    def displacement_mm(self) -> np.ndarray:
        return displacement(self.rotation_deg, self.translation_mm)


def _screen(data: np.ndarray, reference: np.ndarray, head: np.ndarray, affine: np.ndarray, *,
            baseline: slice, centre_ras: np.ndarray, through_plane: bool) -> Screen:
    n = data.shape[3]
    mask, r0, params, solve = _screen_design(reference, head, affine, centre_ras=centre_ras,
                                             through_plane=through_plane)
    raw, g = _raw_estimates(data, mask, r0, solve, baseline=baseline)
    regressors = np.c_[np.ones(n), g, np.cumsum(g), np.gradient(g)]

    def read(theta):  # small angles: the rotation vector's components are the Euler angles
        full = np.zeros((n, 6))
        full[:, params] = theta.T
        return np.degrees(full[:, :3]), full[:, 3:]

    rot, trans = read(raw)
    left_out = displacement(rot, trans) > AUTO_THRESHOLD_MM
    passes = 1
    while passes < SCREEN_PASSES:
        fit = np.zeros(n, bool)
        fit[baseline.start:] = True
        fit &= ~left_out
        h = regressors[fit]
        hp = np.linalg.pinv(h)  # (n_regressors, n_fit)
        theta = raw - (raw[:, fit] @ hp.T) @ regressors.T
        leverage = np.zeros(n)
        leverage[fit] = np.einsum("ij,ji->i", h, hp)
        theta /= 1.0 - np.minimum(leverage, 0.99)  # leave-one-out residual of the fitted frames
        rot, trans = read(theta)
        passes += 1
        moved = displacement(rot, trans) > SCREEN_MM
        if np.array_equal(moved, left_out):
            break
        left_out = moved
    return Screen(rotation_deg=rot, translation_mm=trans, moved=displacement(rot, trans) > SCREEN_MM, passes=passes)


def _screen_design(reference: np.ndarray, head: np.ndarray, affine: np.ndarray, *, centre_ras: np.ndarray,
                   through_plane: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The screen's linear model on the binned head: its mask (x y z bins), the reference's values in
    it, the rigid parameters fitted (all six, or the in-plane three) and the least-squares solver
    (n_params, n_bins) that reads omega (rad) and t (mm) from a frame's difference to the reference."""
    k = SCREEN_BIN
    ref = _binned(np.asarray(reference, dtype=np.float64), k)
    mask = _binned(np.asarray(head, dtype=np.float64), k) >= k * k / 2.0
    # the binned grid: bin (i, j) is centred on voxel (k i + (k - 1) / 2, k j + (k - 1) / 2)
    aff = np.asarray(affine, dtype=np.float64) @ np.array(
        [[k, 0, 0, (k - 1) / 2.0], [0, k, 0, (k - 1) / 2.0], [0, 0, 1, 0], [0, 0, 0, 1]])
    vox = np.argwhere(np.moveaxis(mask, 2, 0))[:, [1, 2, 0]]  # (x, y, z) of the bins, slice by slice
    at = tuple(vox.T)
    # d ref / d voxel (0 along an axis of one voxel: a single slice), then d ref / d RAS mm
    grad = np.stack([np.gradient(ref, axis=a)[at] if ref.shape[a] > 1 else np.zeros(len(vox)) for a in range(3)],
                    axis=-1) @ np.linalg.inv(aff[:3, :3])
    pos = (np.c_[vox, np.ones(len(vox))] @ aff.T)[:, :3] - np.asarray(centre_ras, dtype=np.float64)
    r0 = ref[at]
    # frame(p) = ref(p - delta(p)), delta(p) = omega x (p - c) + t: frame - ref = -grad . delta
    jac = np.c_[-np.cross(pos, grad), -grad]
    params = np.arange(6)
    if not through_plane:
        axis = int(np.argmax(np.abs(np.asarray(affine, dtype=np.float64)[:3, 2])))
        params = np.array([axis] + [3 + i for i in range(3) if i != axis])
    design = np.c_[jac[:, params], r0, np.ones(len(r0))]
    solve = np.linalg.pinv(design)[:len(params)]  # (n_params, n_vox): omega (rad), t (mm)
    return mask, r0, params, solve


def _raw_estimates(data: np.ndarray, mask: np.ndarray, r0: np.ndarray, solve: np.ndarray, *,
                   baseline: slice) -> tuple[np.ndarray, np.ndarray]:
    """Every frame's raw rigid estimate (n_params, n_t) and the head's mean relative signal change g
    (n_t,), baseline median 0, 0 before the baseline.

    Both fits are linear, so they commute: the spatial fit of a frame's bolus residual equals the
    spatial fit of the frame minus the temporal fit of the frames' spatial fits. Each frame is therefore
    reduced to its raw estimate (one product) and the head's summed signal; the rest works on those.
    One slice at a time (all frames): a slice is a contiguous block whether time runs fastest (the
    pipeline's voxel-major copy) or slowest (NIfTI order), where frame by frame would stride through
    the whole series once per frame."""
    n = data.shape[3]
    raw = np.zeros((solve.shape[0], n))
    g = np.zeros(n)
    first = 0
    for z in range(data.shape[2]):
        inside = mask[:, :, z]
        count = int(inside.sum())
        if not count:
            continue
        diff = _binned(data[:, :, z, :], SCREEN_BIN)[inside] - r0[first:first + count, None]  # (n_vox, n_t)
        raw += solve[:, first:first + count] @ diff
        g += diff.sum(axis=0)
        first += count
    g = g / r0.sum()  # the head's mean relative signal change
    g = g - np.median(g[baseline])
    g[:baseline.start] = 0.0  # the steady-state excess is no bolus: the scale column takes it
    return raw, g


def screen_frames(data: np.ndarray, reference: np.ndarray, head: np.ndarray, affine: np.ndarray, *,
                  baseline: slice, centre_ras: np.ndarray, through_plane: bool = True) -> Screen:
    """Rigid displacement of every frame of ``data`` (x, y, z, t; signal) from ``reference`` (x, y, z),
    linearised: one Gauss-Newton step from the identity, for all frames together.

    On SCREEN_BIN x SCREEN_BIN in-plane bins of the ``head`` voxels, frame - reference is fitted with the
    reference's gradient times the displacement of each voxel under small rotations (about
    ``centre_ras``) and translations, plus a scale and an offset (the first frames' steady-state
    excess). Before that each voxel's bolus signal is taken out: a per-voxel least-squares fit over the
    frames (``baseline`` onwards, frames read as moved left out) of the temporal regressors of
    SCREEN_PASSES' comment, leave-one-out, so that a frame's own motion is not fitted away as bolus.
    Without ``through_plane`` only the rotation about the slice axis and the two translations across
    it are estimated (the others are 0). BLAS runs on one thread: the products are small, and OpenBLAS's
    threads spinning on a busy machine cost more than they gain."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _screen(data, reference, head, affine, baseline=baseline, centre_ras=centre_ras,
                       through_plane=through_plane)


def estimate_motion(data: np.ndarray, affine: np.ndarray, *, tr: float, brain: np.ndarray | None = None,
                    path=None) -> MotionEstimate:
    """Screen every frame of ``data`` (x, y, z, t; signal) against the median baseline frame
    (screen_frames), then register the frames read as moved with mutual information: at half
    resolution, and again at full resolution if they moved more than REFINE_MM. InputError if a
    registration fails."""
    from concurrent.futures import ThreadPoolExecutor

    from perfusion.quantify.register import FrameRegistration, Rigid, one_itk_thread

    t0 = time.perf_counter()
    data = np.asarray(data)
    n = data.shape[3]
    frames = reference_frames(data, tr=tr, brain=brain, path=path)
    reference = np.median(np.ascontiguousarray(data[..., frames]), axis=3).astype(np.float32)
    centre = grid_centre(affine, data.shape)
    through_plane = slab_mm(affine, data.shape) >= MIN_SLAB_MM
    head = head_mask(reference)
    screen = screen_frames(data, reference, head, affine, baseline=frames, centre_ras=centre,
                           through_plane=through_plane)
    rot, trans = screen.rotation_deg.copy(), screen.translation_mm.copy()
    screen_mm = screen.displacement_mm
    refined = np.zeros(n, bool)
    transforms = [Rigid.from_matrix(rigid_matrix(r, t, centre)) for r, t in zip(rot, trans, strict=True)]
    moved = np.flatnonzero(screen.moved)
    if moved.size:
        def register(k):
            tx = reg.register(data[..., k], refine=False)
            r, t = rigid_parameters(tx.matrix, centre)
            if displacement(r, t) <= REFINE_MM:
                return tx, False
            return reg.register(data[..., k], refine=True, start=tx), True

        k = int(moved[0])
        try:
            reg = FrameRegistration(reference, affine, head, centre_ras=centre, through_plane=through_plane)
            with one_itk_thread(), ThreadPoolExecutor(min(REGISTRATION_WORKERS, moved.size)) as pool:
                # frame numbers as Python ints; pool.map returns one result per moved frame
                for k, (tx, again) in zip(moved.tolist(), pool.map(register, moved), strict=True):
                    r, t = rigid_parameters(tx.matrix, centre)
                    if not through_plane and screen_mm[k] <= AUTO_THRESHOLD_MM < displacement(r, t):
                        continue  # a thin slab: the registration alone is not enough (MIN_SLAB_MM's comment)
                    rot[k], trans[k] = r, t
                    refined[k] = again
                    transforms[k] = tx
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "no overlap"
            raise InputError(f"{path}: registration of frame {k} to the baseline failed ({reason}){OFF_HINT}") from None
    return MotionEstimate(rotation_deg=rot, translation_mm=trans, refined=refined, transforms=transforms,
                          reference_frames=frames, centre_ras=centre, through_plane=through_plane,
                          seconds=time.perf_counter() - t0, registered=screen.moved)


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
    from perfusion.quantify.register import realign_frame

    out = np.array(data, copy=True)
    for k in np.flatnonzero(which):
        frame = data[..., k]
        moved = realign_frame(frame, affine, estimate.transforms[k])
        out[..., k] = np.where(np.isfinite(moved), np.clip(moved, frame.min(), frame.max()), frame)
    return out


#: motion.tsv columns: name -> (units, description), for its JSON sidecar.
TIMESERIES_COLUMNS = {
    "frame": ("1", "Frame index from 0"),
    "time_s": ("s", "Time of the frame from the start of the series"),
    **{f"rot_{a}_deg": ("deg", f"Rotation about the {a} axis, relative to the reference (baseline) image")
       for a in "xyz"},
    **{f"trans_{a}_mm": ("mm", f"Translation along the {a} axis, relative to the reference (baseline) image")
       for a in "xyz"},
    "fd_mm": ("mm", "Framewise displacement from the previous frame (Power et al. 2012; rotations on a 50 mm sphere)"),
    "displacement_mm": ("mm", "Displacement from the reference image, measured the same way"),
    "flagged": ("1", "1 where the framewise displacement exceeds the threshold in report.json motion"),
    "corrected": ("1", "1 where the frame was realigned before the analysis"),
}


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
        "frames_registered": ([] if estimate.registered is None else np.flatnonzero(estimate.registered).tolist()),
        "frames_registered_full_resolution": np.flatnonzero(estimate.refined).tolist(),
        "reference": {"frames": [estimate.reference_frames.start, estimate.reference_frames.stop],
                      "image": "voxel-wise median of the baseline frames of the uncorrected series"},
        "method": ("every frame screened by a linearised least-squares fit of its rigid displacement, after "
                   "taking out each voxel's bolus signal as predicted from the other frames; frames above the "
                   "screening threshold registered rigidly with Mattes mutual information (SimpleITK), at half "
                   "the in-plane resolution and, above the refinement threshold, again at full resolution; "
                   "moved frames resampled onto the reference grid (cubic B-spline)"),
        "parameters": ("rotations (deg) about the RAS x, y, z axes through the grid centre, translation (mm) of "
                       "that centre; framewise displacement: sum of |change of translations| + "
                       f"{SPHERE_RADIUS_MM:g} mm x sum of |change of rotations (rad)|"),
        "screening_threshold_mm": SCREEN_MM,
        "refinement_threshold_mm": REFINE_MM,
        "parameters_estimated": ("all six" if estimate.through_plane else
                                 f"in-plane only (slab thinner than {MIN_SLAB_MM:g} mm): rotation about the slice "
                                 "axis and the two translations across it; a registered frame counts as moved "
                                 f"beyond {AUTO_THRESHOLD_MM:g} mm only if the screen reads it so too"),
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
                     f"(frames {listed}; maximum {info['fd_max_mm']:.2f} mm); {done}; "
                     "check the maps for motion artefacts")
    if not info["applied"]:
        return series, info, notes
    return dataclasses.replace(series, data=apply_correction(series.data, series.affine, est, which)), info, notes
