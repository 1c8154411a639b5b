"""Rigid registration of 3-D volumes with SimpleITK: the only module that imports SimpleITK.

Volumes travel as :class:`Volume` (a numpy array in nibabel's (x, y, z) voxel order and its NIfTI
affine, RAS+ mm). SimpleITK works in LPS+: converting an affine flips the sign of its first two rows.
A :class:`Rigid` maps points of the fixed volume's space to the moving volume's space (ITK's
convention), which is what resampling the moving volume onto the fixed grid needs.

Metric: Mattes mutual information, so a post-contrast T1 registers to a T2*-weighted DSC baseline
(different contrast) and a prior baseline to a current one (different scanner gain). Sampling is
random with a fixed seed and the registration runs on one thread, so results repeat exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perfusion.errors import InputError, OutputError

#: LPS <-> RAS: ITK's physical space flips x and y of NIfTI's.
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Histogram bins of Mattes mutual information: 32-50 is ITK's usual range for brain MRI; 32 keeps the
#: joint histogram populated on small DSC volumes (64 x 64 x 6 = 24 k voxels).
MI_BINS = 32

#: Voxels of the fixed image sampled by the metric per iteration: all of them up to this many (a DSC
#: grid, 128 x 128 x 24 = 0.4 M, is the usual fixed image), fewer beyond. On the demo phantom
#: (64 x 64 x 6) sampling 25 % left 0.66 mm mean misregistration, all voxels 0.11 mm.
MAX_SAMPLES = 1_000_000
SEED = 20201262

#: Multi-resolution schedule, in-plane shrink factors and smoothing sigmas (mm). Through-plane the
#: shrink is capped so thin DSC slabs (5-30 slices) keep at least 4 slices at the coarsest level.
SHRINK = (4, 2, 1)
SMOOTH_MM = (4.0, 2.0, 0.0)


def _xyz(values: Iterable[float]) -> tuple[float, float, float]:
    """Three numbers (x, y, z) as Python floats: the typed triple that ``Rigid`` keeps, from a
    generator or an array row, which mypy sees only as a tuple of unknown length."""
    x, y, z = (float(v) for v in values)
    return (x, y, z)


@dataclass(frozen=True)
class Volume:
    data: np.ndarray  # (x, y, z)
    affine: np.ndarray  # 4 x 4, voxel -> RAS+ mm


@dataclass(frozen=True)
class Rigid:
    """A rigid transform from fixed space to moving space (ITK convention), in RAS+ mm.

    ``matrix`` is the 4 x 4 homogeneous matrix; ``rotation_deg`` and ``translation_mm`` summarise it
    (Euler angles of ITK's Euler3DTransform, in LPS); ``metric`` is the final Mattes MI value
    (more negative is better)."""

    matrix: np.ndarray
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    metric: float
    _itk: object = None  # the SimpleITK transform, for saving

    @classmethod
    def identity(cls) -> Rigid:
        return cls(np.eye(4), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), float("nan"), None)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray) -> Rigid:
        """A rigid 4 x 4 RAS matrix that no registration produced (no metric, no ITK object; SimpleITK is
        not imported): the motion screen's estimate of a still frame. Angles as Euler3DTransform reports
        them (its matrix Rz Rx Ry, in LPS)."""
        m = np.asarray(matrix, dtype=np.float64)
        lps = (_FLIP @ m @ _FLIP)[:3, :3]
        ax = float(np.arcsin(np.clip(lps[2, 1], -1.0, 1.0)))
        ay = float(np.arctan2(-lps[2, 0], lps[2, 2]))
        az = float(np.arctan2(-lps[0, 1], lps[1, 1]))
        return cls(m, _xyz(np.degrees(a) for a in (ax, ay, az)), _xyz(m[:3, 3]), float("nan"), None)

    def as_dict(self) -> dict:
        return {"matrix_ras_mm": self.matrix.tolist(), "rotation_deg": list(self.rotation_deg),
                "translation_mm": list(self.translation_mm), "mattes_mi": self.metric,
                "convention": "maps points of the fixed (DSC / current) space to the moving space, RAS+ mm"}


def _sitk():
    import SimpleITK as sitk

    return sitk


def to_itk(vol: Volume):
    """A SimpleITK image (float32) with the volume's geometry converted to LPS."""
    sitk = _sitk()
    data = np.asarray(vol.data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"registration needs a 3-D volume, got shape {data.shape}")
    lps = _FLIP @ np.asarray(vol.affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(lps)):
        raise ValueError("affine has a zero or non-finite voxel size")
    direction = lps[:3, :3] / spacing
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in lps[:3, 3]])
    img.SetDirection([float(d) for d in direction.ravel()])
    return img


def from_itk(img) -> np.ndarray:
    return _sitk().GetArrayFromImage(img).transpose(2, 1, 0)


def _matrix_ras(tx) -> np.ndarray:
    """4 x 4 RAS matrix of an ITK rigid transform (fixed -> moving points)."""
    rot = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    center = np.asarray(tx.GetCenter(), dtype=np.float64)
    trans = np.asarray(tx.GetTranslation(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = rot
    lps[:3, 3] = trans + center - rot @ center
    return _FLIP @ lps @ _FLIP


def _normalised(vol: Volume) -> Volume:
    """Finite, robustly scaled intensities (1st-99th percentile -> 0-1) so MI's histogram is well used."""
    d = np.nan_to_num(np.asarray(vol.data, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    nz = d[d != 0]
    if nz.size < 64:
        raise ValueError("image has fewer than 64 non-zero voxels")
    lo, hi = np.percentile(nz, [1.0, 99.0])
    if not hi > lo:
        raise ValueError("image has no intensity contrast")
    return Volume(np.clip((d - lo) / (hi - lo), 0.0, 1.0), vol.affine)


def rigid(fixed: Volume, moving: Volume, *, what: str = "image", path: Path | None = None) -> Rigid:
    """Register ``moving`` to ``fixed`` rigidly (6 parameters); InputError naming ``path`` if it fails."""
    sitk = _sitk()
    where = f"{path}: " if path is not None else ""
    try:
        f_img = to_itk(_normalised(fixed))
        m_img = to_itk(_normalised(moving))
    except ValueError as exc:
        raise InputError(f"{where}cannot register the {what} ({exc}); give an image with tissue contrast") from None
    f_size = np.asarray(f_img.GetSize())
    m_size = np.asarray(m_img.GetSize())
    init = sitk.CenteredTransformInitializer(f_img, m_img, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(1)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=MI_BINS)
    # random (off-grid) sample points even when taking all of them: grid-aligned samples give MI
    # interpolation artefacts (0.49 mm mean error on the demo phantom vs 0.11 mm jittered)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(min(1.0, MAX_SAMPLES / int(np.prod(f_size))), SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=300,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    # a thin slab must keep >= 4 slices at the coarsest level; pick shrink levels that all images allow
    smallest = int(min(f_size.min(), m_size.min()))
    levels = [s for s in SHRINK if smallest // s >= 4] or [1]
    sigmas = [SMOOTH_MM[SHRINK.index(s)] for s in levels]
    reg.SetShrinkFactorsPerLevel(levels)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=False)
    try:
        tx = reg.Execute(f_img, m_img)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "no overlap"
        raise InputError(f"{where}registration of the {what} failed ({first}); check that it shows the same head "
                         "and overlaps the DSC field of view") from None
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(tx).GetNthTransform(0)) \
        if tx.GetName() == "CompositeTransform" else sitk.Euler3DTransform(tx)
    angles = _xyz(np.degrees(a) for a in (euler.GetAngleX(), euler.GetAngleY(), euler.GetAngleZ()))
    matrix = _matrix_ras(euler)
    return Rigid(matrix=matrix, rotation_deg=angles, translation_mm=_xyz(matrix[:3, 3]),
                 metric=float(reg.GetMetricValue()), _itk=euler)


def _itk_transform(transform: Rigid):
    """The transform's ITK object, or an ITK affine transform of its matrix if it has none."""
    tx = transform._itk
    if tx is None:  # identity or a matrix without its ITK object
        tx = _sitk().AffineTransform(3)
        lps = _FLIP @ transform.matrix @ _FLIP
        tx.SetMatrix([float(v) for v in lps[:3, :3].ravel()])
        tx.SetTranslation([float(v) for v in lps[:3, 3]])
    return tx


def resample(moving: Volume, onto: Volume, transform: Rigid, *, nearest: bool = False) -> np.ndarray:
    """``moving`` resampled on ``onto``'s grid through ``transform`` (fixed -> moving points); 0 outside.
    ``nearest`` for masks and label maps, linear otherwise."""
    sitk = _sitk()
    tx = _itk_transform(transform)
    m_img = to_itk(Volume(np.nan_to_num(np.asarray(moving.data, dtype=np.float32)), moving.affine))
    ref = to_itk(Volume(np.zeros(np.asarray(onto.data).shape[:3], np.float32), onto.affine))
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(m_img, ref, tx, interp, 0.0, sitk.sitkFloat32)
    return from_itk(out)


# ----------------------------------------------------------------- frames of a series (motion.py)

#: Frame-to-reference registration of a DSC series (motion.py): Mattes MI as above, because the bolus
#: darkens tissue by 10-60 % and vessels by up to 100 % and other metrics read that as motion (README
#: "Head motion": worst bolus frame 0.98 mm with mean squares, 0.23 mm with correlation, 0.09 mm with
#: MI). Only the frames that motion.py's least-squares screen reads as moved come here. Two passes;
#: numbers measured on the 64 x 64 x 25 textured phantom of tests/test_motion.py.
#: Screening: the frame at half the in-plane resolution (2 x 2 voxels averaged), from the identity,
#: 64 bins, steps from 0.5 down to 3e-3 halving on each reversal (optimizer's scaled units, about a
#: voxel at first): about 13 iterations per frame; motion-free frames read up to 0.23 mm (test phantom,
#: 60 and 100 mm slabs) and 0.05-0.09 mm (demo phantoms), moved frames 0.7-1.3 times their motion:
#: enough to tell which frames moved. (32 bins: up to 0.24 and 0.15 mm.)
SCREEN_SHRINK = (2, 2, 1)
SCREEN_BINS = 64
SCREEN_STEP = (0.5, 3e-3, 0.5)  # first step, smallest step, relaxation
#: Screening samples at most this many head voxels (all of a 64 x 64 matrix; a third at 128 x 128 x 24,
#: where sampling all took 15 s for 80 frames, this 8 s; 10 s once strictly on one thread, when every
#: frame came here).
SCREEN_MAX_SAMPLES = 20_000
#: Refinement: full resolution from the screening estimate, 64 bins (32 bins: worst bolus frame 0.18 mm
#: instead of 0.09 mm), steps down to 1e-4 relaxing by 0.7 (by 0.5 the optimizer stopped early: 0.14
#: instead of 0.03 deg).
REFINE_BINS = 64
REFINE_STEP = (0.25, 1e-4, 0.7)
#: Samples of the refinement: this fraction of the head voxels, at least FRAME_MIN_SAMPLES (all voxels
#: of a small image) and at most FRAME_MAX_SAMPLES. A quarter was as accurate as all voxels (worst frame
#: 0.03 deg and 0.09 mm both) in less than half the time. At 128 x 128 x 25 (the test phantom at twice
#: the matrix, 215 k head voxels, 9 moved frames) 30 k samples gave worst frame 0.014 deg, 0.085 mm at
#: 0.85 s CPU per moved frame (screening and refinement), 60 k 0.056 deg, 0.058 mm at 1.36 s.
FRAME_SAMPLE_FRACTION = 0.25
FRAME_MIN_SAMPLES = 20_000
FRAME_MAX_SAMPLES = 30_000
FRAME_MAX_ITERATIONS = 300


@contextmanager
def one_itk_thread():
    """ITK's global default number of threads set to one inside the block, then put back: for running
    several FrameRegistration.register calls at once from Python threads, whose own setting and
    restoring of that global would otherwise race."""
    sitk = _sitk()
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


class FrameRegistration:
    """Rigid registration of single frames of a series to one reference image, all on the same grid.

    ``reference`` (x, y, z) and ``mask`` (bool, the voxels the metric samples: the head) are converted
    once; each :meth:`register` call builds only the frame's image. Transforms are ITK Euler transforms
    about ``centre_ras`` (mm) and map reference points to frame points (the head's displacement in that
    frame). Deterministic: seeded sampling, one thread. Calls may run at once on Python threads (ITK
    releases the GIL) inside :func:`one_itk_thread`. Without ``through_plane`` only the in-plane
    parameters move (the rotation about the physical axis nearest the slice direction and the two
    translations across it), for slabs too thin to show a tilt."""

    def __init__(self, reference: np.ndarray, affine: np.ndarray, mask: np.ndarray, *, centre_ras: np.ndarray,
                 through_plane: bool = True):
        sitk = _sitk()
        self.affine = np.asarray(affine, dtype=np.float64)
        self._fixed = to_itk(Volume(np.asarray(reference, dtype=np.float32), self.affine))
        m = to_itk(Volume(np.asarray(mask, dtype=np.float32), self.affine))
        self._mask = sitk.Cast(m > 0.5, sitk.sitkUInt8)
        self._fixed_small = sitk.BinShrink(self._fixed, list(SCREEN_SHRINK))
        self._mask_small = sitk.Cast(sitk.BinShrink(m, list(SCREEN_SHRINK)) > 0.5, sitk.sitkUInt8)
        self._n_mask = max(int(np.count_nonzero(mask)), 1)
        self._n_mask_small = max(int(np.count_nonzero(sitk.GetArrayViewFromImage(self._mask_small))), 1)
        self._centre_lps = [float(v) for v in (_FLIP @ np.r_[np.asarray(centre_ras, dtype=np.float64), 1.0])[:3]]
        self._weights = None  # Euler3D parameters: angles about x, y, z, then translations along x, y, z
        if not through_plane:
            axis = int(np.argmax(np.abs(self.affine[:3, 2])))  # physical axis nearest the slice direction
            self._weights = ([1.0 if i == axis else 0.0 for i in range(3)]
                             + [0.0 if i == axis else 1.0 for i in range(3)])

    def _start(self, start: Rigid | None):
        sitk = _sitk()
        if start is not None and start._itk is not None:
            return sitk.Euler3DTransform(start._itk)
        tx = sitk.Euler3DTransform()
        tx.SetCenter(self._centre_lps)
        return tx

    def register(self, frame: np.ndarray, *, refine: bool, start: Rigid | None = None) -> Rigid:
        """The transform of one frame (x, y, z; same grid as the reference): the screening pass
        (``refine`` False, from the identity) or the refinement (from ``start``). Raises RuntimeError
        when ITK fails (no overlap)."""
        sitk = _sitk()
        # SetNumberOfThreads(1) alone left the last bits (1e-15 deg) varying from run to run: parts of the
        # metric follow ITK's global default; set it to one thread for this call, then put it back
        threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        try:
            return self._register(frame, refine=refine, start=start)
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)

    def _register(self, frame: np.ndarray, *, refine: bool, start: Rigid | None) -> Rigid:
        sitk = _sitk()
        moving = to_itk(Volume(np.asarray(frame, dtype=np.float32), self.affine))
        reg = sitk.ImageRegistrationMethod()
        reg.SetNumberOfThreads(1)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        if refine:
            fixed, mask, bins, (step, min_step, relax) = self._fixed, self._mask, REFINE_BINS, REFINE_STEP
            n = min(FRAME_MAX_SAMPLES, max(FRAME_MIN_SAMPLES, FRAME_SAMPLE_FRACTION * self._n_mask))
            fraction = min(1.0, n / self._n_mask)
        else:
            fixed, mask, bins, (step, min_step, relax) = self._fixed_small, self._mask_small, SCREEN_BINS, SCREEN_STEP
            moving = sitk.BinShrink(moving, list(SCREEN_SHRINK))
            fraction = min(1.0, SCREEN_MAX_SAMPLES / self._n_mask_small)
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
        # image gradients by central differences, not ITK's default recursive Gaussian filter: that
        # filter refuses images of fewer than 4 slices, and the result was as good (0.03 vs 0.06 deg, 0.09
        # vs 0.11 mm worst frame on the test phantom) at the same speed
        reg.MetricUseFixedImageGradientFilterOff()
        reg.MetricUseMovingImageGradientFilterOff()
        reg.SetMetricSamplingPercentage(fraction, SEED)
        reg.SetMetricFixedMask(mask)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=step, minStep=min_step,
                                                     numberOfIterations=FRAME_MAX_ITERATIONS,
                                                     relaxationFactor=relax, gradientMagnitudeTolerance=1e-10)
        reg.SetOptimizerScalesFromPhysicalShift()
        if self._weights is not None:
            reg.SetOptimizerWeights(self._weights)
        tx = self._start(start if refine else None)
        reg.SetInitialTransform(tx, inPlace=True)
        reg.Execute(fixed, moving)
        matrix = _matrix_ras(tx)
        angles = _xyz(np.degrees(a) for a in (tx.GetAngleX(), tx.GetAngleY(), tx.GetAngleZ()))
        return Rigid(matrix=matrix, rotation_deg=angles, translation_mm=_xyz(matrix[:3, 3]),
                     metric=float(reg.GetMetricValue()), _itk=tx)


def realign_frame(frame: np.ndarray, affine: np.ndarray, transform: Rigid) -> np.ndarray:
    """A frame (x, y, z) resampled on its own grid through ``transform`` (reference -> frame points, from
    FrameRegistration): the frame seen from the reference position. Cubic B-spline, not linear: on the
    motion test phantom, resampling with the true transforms cost 5.6 % of CBV linearly (the smoothing
    flattens the arteries' input function) and 1.0 % with the B-spline. NaN where the source point lies
    outside the frame; values may overshoot the frame's range near sharp edges (the caller clips)."""
    sitk = _sitk()
    img = to_itk(Volume(np.asarray(frame, dtype=np.float32), affine))
    return from_itk(sitk.Resample(img, img, _itk_transform(transform), sitk.sitkBSpline, float("nan"),
                                  sitk.sitkFloat32))


def same_grid(a: Volume, b: Volume, *, atol_mm: float = 1e-3) -> bool:
    return (np.asarray(a.data).shape[:3] == np.asarray(b.data).shape[:3]
            and np.allclose(a.affine, b.affine, atol=atol_mm))


def write_transform(path: Path, transform: Rigid) -> Path:
    """Save the transform as an ITK text transform (.tfm, LPS, readable by ITK-SNAP, 3D Slicer, ANTs)
    plus nothing else; the caller writes its JSON summary. ``path`` should sit in a staging folder."""
    sitk = _sitk()
    tx = transform._itk
    if tx is None:
        tx = sitk.Euler3DTransform()
    try:
        sitk.WriteTransform(tx, str(path))
    except RuntimeError as exc:
        raise OutputError(f"{path}: cannot write the transform ({str(exc).strip().splitlines()[-1][:120]}); "
                          "check free space and permissions") from None
    return Path(path)


#: In-plane upsampling of the DSC grid for the anatomical background: DSC voxels (about 2 mm) over
#: T1 voxels (about 1 mm), rounded, within 1-4 (4x keeps a 128 x 128 DSC page under a few MB).
MAX_ANAT_ZOOM = 4


@dataclass(frozen=True)
class AnatBackground:
    """A post-contrast T1 registered to the DSC baseline and resampled on the DSC slices at
    ``zoom`` times the DSC in-plane resolution (``affine`` is that grid's)."""

    data: np.ndarray  # (x * zoom, y * zoom, z), a.u.
    affine: np.ndarray
    zoom: int
    transform: Rigid


def upsampled_affine(affine: np.ndarray, zoom: int) -> np.ndarray:
    """Affine of a grid with ``zoom`` x ``zoom`` sub-voxels per voxel in-plane, same slices: sub-voxel
    i' of voxel i sits at i + (i' + 0.5) / zoom - 0.5 in the original voxel coordinates."""
    k = float(zoom)
    off = (1.0 / k - 1.0) / 2.0
    s = np.array([[1 / k, 0, 0, off], [0, 1 / k, 0, off], [0, 0, 1, 0], [0, 0, 0, 1]])
    return np.asarray(affine, dtype=np.float64) @ s


def anat_zoom(dsc_affine: np.ndarray, anat_affine: np.ndarray) -> int:
    dsc_mm = float(np.min(np.linalg.norm(np.asarray(dsc_affine)[:3, :2], axis=0)))
    anat_mm = float(np.min(np.linalg.norm(np.asarray(anat_affine)[:3, :3], axis=0)))
    return int(np.clip(round(dsc_mm / anat_mm), 1, MAX_ANAT_ZOOM)) if anat_mm > 0 else 1


def anat_background(baseline: np.ndarray, dsc_affine: np.ndarray, anat: np.ndarray, anat_affine: np.ndarray, *,
                    path: Path | None) -> AnatBackground:
    """Register the T1 ``anat`` (any grid) rigidly to the DSC ``baseline`` image and resample it on the
    DSC slices, upsampled in-plane (linear interpolation, sampled at slice centres). InputError naming
    ``path`` (the T1's file, when known) if that fails."""
    fixed = Volume(np.asarray(baseline, dtype=np.float32), dsc_affine)
    moving = Volume(np.asarray(anat, dtype=np.float32), anat_affine)
    tx = rigid(fixed, moving, what="anatomical image (--anat)", path=path)
    zoom = anat_zoom(dsc_affine, anat_affine)
    shape = (baseline.shape[0] * zoom, baseline.shape[1] * zoom, baseline.shape[2])
    up = upsampled_affine(dsc_affine, zoom)
    data = resample(moving, Volume(np.zeros(shape, np.float32), up), tx)
    if not np.any(data != 0):
        where = f"{path}: " if path is not None else ""
        raise InputError(f"{where}the registered anatomical image does not overlap the DSC slices; "
                         "check that it shows the same head")
    return AnatBackground(data=data.astype(np.float32), affine=up, zoom=zoom, transform=tx)
