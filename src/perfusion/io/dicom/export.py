"""DICOM out (issue 22): the maps, ROIs and verdict of a DICOM-folder analysis, back into the source study.

The source: :func:`load_source` reads the headers (no pixels) of the DSC series the analysis used
(the same series selection as :func:`~perfusion.io.dicom.convert.read_dicom_series`), one dataset per
slice of its first temporal position. The grid: :func:`to_source_grid` takes a map on the NIfTI grid
(dcm2niix's: x, y, z, RAS affine, mm) onto the source images' pixel order (slice, row, column) by an
exact index permutation / flip computed from the geometry (the affine against ImagePositionPatient,
ImageOrientationPatient and PixelSpacing, DICOM LPS), never by resampling; a grid that does not match
is an InputError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perfusion.errors import InputError
from perfusion.io.dicom.headers import import_pydicom, inspect, quiet_pydicom, select_series

#: Largest distance (in voxels) between a source pixel's centre and the nearest NIfTI voxel centre for
#: the two grids to count as one: the headers round positions to 0.1 um and orientations to 1e-6, and
#: dcm2niix's affine is float32 (about 1e-5 mm at 200 mm); 0.05 voxel is far above both and far below
#: any real mismatch (half a voxel).
GRID_TOLERANCE_VOXELS = 0.05

#: LPS (DICOM) <-> RAS (NIfTI): the sign of each world axis.
LPS_RAS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class SourceSeries:
    """The source DSC series of an analysis, as the export needs it: one header-only pydicom dataset per
    slice of its first temporal position, in slice order along the slice normal (``datasets``; the
    order of dcm2niix's k index for a classic series), each image ``rows`` x ``cols`` pixels.

    Geometry (DICOM patient coordinates, LPS, mm): ``positions`` (n_slices, 3) ImagePositionPatient per
    slice; ``orientation`` (6,) ImageOrientationPatient (row direction, then column direction);
    ``spacing`` PixelSpacing (between rows, between columns). ``number``: the SeriesNumber;
    ``secrets``: identifying header values (to scrub from messages; never written)."""

    datasets: list[Any]
    rows: int
    cols: int
    positions: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    number: int | None = None
    secrets: frozenset = field(default=frozenset(), repr=False)

    @property
    def n_slices(self) -> int:
        return len(self.datasets)


def load_source(dicom_dir: Path, *, series: int | None = None) -> SourceSeries:
    """The DSC series of ``dicom_dir`` (``series``: its SeriesNumber, when the folder holds several) as a
    SourceSeries: headers of the first temporal position (of the first echo for a multi-echo series),
    one per slice, sorted along the slice normal. InputError for a series the export cannot reference
    (an enhanced multi-frame or mosaic series, a slice without a file), UsageError as select_series."""
    dicom_dir = Path(dicom_dir)
    info = select_series(inspect(dicom_dir), dicom_dir, series)
    where = f"{dicom_dir}: series {info.number}"
    first = info.echoes[0] if info.echoes else info
    if info.mosaic or any(im.frame_no is not None for im, _, _ in first.images):
        raise InputError(f"{where}: an enhanced multi-frame or mosaic series cannot be exported yet (the export "
                         "references one classic image per slice); export the maps as NIfTI, or re-export the "
                         "series from the scanner as classic single-frame images")
    chosen = sorted(((s, im) for im, f, s in first.images if f == 0), key=lambda x: x[0])
    if [s for s, _ in chosen] != list(range(first.slices)):
        raise InputError(f"{where}: the first frame lacks a slice or holds one twice; check the series with "
                         "perfusion dicom-inspect")
    pydicom = import_pydicom(dicom_dir)
    datasets = []
    with quiet_pydicom():
        for _, im in chosen:
            try:
                datasets.append(pydicom.dcmread(im.path, stop_before_pixels=True))
            except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged file
                raise InputError(f"{where}: a header cannot be read again ({type(exc).__name__}); the folder "
                                 "changed since it was inspected? run the export again") from None
    im0 = chosen[0][1]
    return SourceSeries(datasets=datasets, rows=im0.rows, cols=im0.columns,
                        positions=np.array([im.position for _, im in chosen], dtype=np.float64),
                        orientation=np.array(im0.orientation, dtype=np.float64), spacing=im0.spacing,
                        number=info.number, secrets=info.secrets)


def source_indices(shape: tuple[int, ...], affine: np.ndarray, source: SourceSeries) -> np.ndarray:
    """The NIfTI voxel (i, j, k) of every source pixel: int array (n_slices, rows, cols, 3), from the
    geometry alone (pixel (r, c) of slice s lies at positions[s] + c * spacing[1] * row direction
    + r * spacing[0] * column direction, LPS mm; ``affine`` maps voxels to RAS mm). InputError unless
    the two grids are one grid up to a permutation / flip of axes (GRID_TOLERANCE_VOXELS)."""
    if len(shape) != 3:
        raise InputError(f"a map to export must be 3-D (x, y, z), not of shape {tuple(shape)}")
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    row_dir, col_dir = source.orientation[:3], source.orientation[3:]
    steps_lps = np.stack([col_dir * source.spacing[0], row_dir * source.spacing[1]])  # per row, per column
    origin = (inv[:3, :3] @ (source.positions * LPS_RAS).T).T + inv[:3, 3]  # (n_slices, 3) voxel of pixel (0, 0)
    d_row, d_col = (inv[:3, :3] @ (steps_lps * LPS_RAS).T).T
    rr, cc = np.mgrid[0:source.rows, 0:source.cols]
    idx = origin[:, None, None, :] + rr[None, ..., None] * d_row + cc[None, ..., None] * d_col
    rounded = np.rint(idx).astype(np.int64)
    off = float(np.abs(idx - rounded).max()) if idx.size else 0.0
    inside = all((rounded[..., a] >= 0).all() and (rounded[..., a] < shape[a]).all() for a in range(3))
    same_size = int(np.prod(shape)) == rounded.size // 3
    one_to_one = same_size and inside and np.unique(
        np.ravel_multi_index(tuple(rounded.reshape(-1, 3).T), tuple(shape))).size == rounded.size // 3
    if off > GRID_TOLERANCE_VOXELS or not one_to_one:
        where = "outside the map" if not inside else f"{off:.2f} voxel off its voxel centres"
        if not same_size:
            where = (f"{source.n_slices} x {source.rows} x {source.cols} source pixels against a map of "
                     f"{' x '.join(str(n) for n in shape[:3])} voxels")
        elif off <= GRID_TOLERANCE_VOXELS and inside:
            where = "pixels fall on the same voxel: the axes are not the map's"
        raise InputError(f"the maps do not lie on the grid of source series {source.number} ({where}); give the "
                         "DICOM folder (and --series) the analysis was run on")
    return rounded


def to_source_grid(volume: np.ndarray, affine: np.ndarray, source: SourceSeries) -> np.ndarray:
    """A map (x, y, z) on the NIfTI grid with its RAS ``affine`` (mm) as an array (n_slices, rows, cols)
    in the pixel order of ``source``'s images (slice s as source.datasets[s]; row along the column
    direction of ImageOrientationPatient, column along its row direction): an exact index permutation
    and flip, no resampling; dtype kept. InputError when the grids differ (:func:`source_indices`)."""
    volume = np.asarray(volume)
    idx = source_indices(volume.shape, affine, source)
    return volume[idx[..., 0], idx[..., 1], idx[..., 2]]


def from_source_grid(frames: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int],
                     source: SourceSeries) -> np.ndarray:
    """The inverse of :func:`to_source_grid`: frames (n_slices, rows, cols) back onto the NIfTI grid
    ``shape`` (x, y, z) of ``affine``."""
    idx = source_indices(shape, affine, source)
    out = np.zeros(shape, dtype=np.asarray(frames).dtype)
    out[idx[..., 0], idx[..., 1], idx[..., 2]] = frames
    return out
