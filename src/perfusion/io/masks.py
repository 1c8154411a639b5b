"""Masks on the grid of a DSC series (brain, AIF, VOF, reference, ROI) and the names ROIs may take.

One rule reads every mask (:func:`mask_regions`): 0/1 or a single label, a label map, or a
probability map thresholded at :data:`MASK_PROBABILITY_THRESHOLD`; NaN, Inf and negative values are
refused. An ROI is named by its file name, which becomes a curves.tsv column, a report key and a file
name: :func:`check_roi_names` refuses names that cannot be all three, before any work.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from perfusion.errors import InputError, UsageError
from perfusion.io.nifti import read_image
from perfusion.io.series import Series

#: Affines of masks and series must agree to this (mm), element-wise, after float32 storage.
AFFINE_ATOL_MM = 1e-3


#: curves.tsv column of a region's mean curve before leakage correction: "<region>" + this suffix.
UNCORRECTED_SUFFIX = "_uncorrected"


#: Longest ROI name (characters): its mask copy "mask-<name>.nii.gz" or "<prefix>_label-<name>_mask.nii.gz"
#: must stay within the 255-byte file-name limit of ext4, XFS and APFS with a BIDS prefix of 40 characters.
MAX_ROI_NAME = 200


def roi_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an ROI (a curves.tsv column, a report key, a file name), or None.
    Refused: empty; longer than MAX_ROI_NAME; control characters (tab and newline break curves.tsv's
    rows and columns; str.splitlines also breaks at \\x0b, \\x0c, \\x1c-\\x1e, \\x85, U+2028 and U+2029);
    path separators; bytes that are not UTF-8 (a file name decoded with surrogate escapes)."""
    import unicodedata

    if not name:
        return "is empty"
    if len(name) > MAX_ROI_NAME:
        return f"is longer than {MAX_ROI_NAME} characters"
    for ch in name:
        cat = unicodedata.category(ch)
        if cat == "Cs":
            return "holds bytes that are not UTF-8"
        if cat in ("Cc", "Zl", "Zp"):
            return f"holds the control character {ch!r}"
        if ch in "/\\":
            return f"holds the path separator {ch!r}"
    return None


def check_roi_names(named: list[tuple[str, Path]]) -> None:
    """Refuse (UsageError, before any work) ROI names that cannot be written (``roi_name_problem``), a
    name given twice, and a name that is another's plus "_uncorrected" (curves.tsv would give both
    the same column). ``named``: (name, mask path) per ROI."""
    seen: dict[str, Path] = {}
    for name, path in named:
        problem = roi_name_problem(name)
        if problem:
            raise UsageError(f"{str(path)!r}: the ROI name {name!r} (the file name) {problem}; rename the file with "
                             "letters, digits, '-', '_' or '.' (e.g. lesion-1.nii.gz)")
        if name in seen:
            raise UsageError(f"{path}: two ROIs are named {name!r} ({seen[name]} and {path}); rename one file")
        seen[name] = path
    for name, path in named:
        base = name.removesuffix(UNCORRECTED_SUFFIX)
        if base != name and base in seen:
            raise UsageError(f"{path}: the ROI names {base!r} ({seen[base]}) and {name!r} collide in curves.tsv, "
                             f"where {base!r}'s curve before leakage correction is {name!r}; rename one file "
                             f"(e.g. without '{UNCORRECTED_SUFFIX}')")


#: A mask with values strictly between 0 and 1 (a probability or partial-volume map, e.g. a mask
#: resampled with linear interpolation or a segmentation network's output) is read as "in" where the
#: value is at least this: the voxel is more likely in than out. Not tuned on data.
MASK_PROBABILITY_THRESHOLD = 0.5


#: What a mask's labels mean (``load_mask`` ``labels``): "refuse" an integer label map with more than
#: one label (an AIF, VOF or reference mask must be one region), or "merge" its labels into one region
#: (a brain mask may be a tissue segmentation: every tissue label is brain).
MASK_LABEL_MODES = ("refuse", "merge")


def _mask_values(path: Path, like: Series, what: str) -> np.ndarray:
    """A 3-D mask file's values on the grid of ``like`` (float64, x y z); InputError for another grid."""
    path = Path(path)
    img, raw = read_image(path, what)
    data = np.asarray(raw)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != like.shape3d:
        raise InputError(
            f"{path}: {what} shape {data.shape} differs from the DSC series {like.path.name} {like.shape3d}; "
            "resample the mask onto the DSC grid"
        )
    if not np.allclose(img.affine, like.affine, rtol=1e-5, atol=AFFINE_ATOL_MM):
        raise InputError(
            f"{path}: {what} affine differs from the DSC series {like.path.name}; "
            "resample the mask onto the DSC grid"
        )
    return data


def mask_regions(path: Path, like: Series, *, what: str) -> dict[int | None, np.ndarray]:
    """The regions of a mask file on the grid of ``like``, each bool (x, y, z).

    One rule for every mask (brain, AIF, VOF, reference, ROI):

    - NaN, Inf or a negative value: InputError (not a mask; "non-zero is in" would take them in or out
      silently).
    - Integer values with one non-zero value (0/1, 0/255, a single label): one region, ``{None: mask}``.
    - Integer values with several non-zero values: a label map, one region per label, ``{N: mask}``.
    - Other values, all within [0, 1]: a probability map, thresholded at MASK_PROBABILITY_THRESHOLD
      (``{None: mask}``) with a warning naming the file (its name only: warnings reach report.json).
    - Other values above 1: InputError (neither a mask, a label map nor a probability map).

    InputError when no voxel is in."""
    path = Path(path)
    data = _mask_values(path, like, what)
    fix = "give a mask of 0 (out) and 1 (in), or integer labels"
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(f"{path}: {what} holds NaN or Inf in {int(bad.sum())} voxels; {fix}")
    low = float(data.min())
    if low < 0:
        raise InputError(f"{path}: {what} holds negative values (down to {low:g}); {fix}")
    nonzero = data != 0
    if not nonzero.any():
        raise InputError(f"{path}: {what} is empty (no non-zero voxel); give a mask with at least one voxel")
    values = np.unique(data[nonzero])
    if np.all(values == np.floor(values)):
        if values.size == 1:
            return {None: nonzero}
        return {int(v): data == v for v in values}
    if values.max() > 1:
        raise InputError(f"{path}: {what} holds non-integer values above 1 (up to {float(values.max()):g}): not a "
                         f"0/1 mask, a label map or a probability map; {fix}")
    mask = data >= MASK_PROBABILITY_THRESHOLD
    if not mask.any():
        raise InputError(f"{path}: {what} holds values between 0 and 1, none at or above "
                         f"{MASK_PROBABILITY_THRESHOLD:g}: nothing is in; {fix}")
    warnings.warn(f"{path.name}: the {what} holds values between 0 and 1 (a probability or partial-volume map): "
                  f"voxels at or above {MASK_PROBABILITY_THRESHOLD:g} are in ({int(mask.sum())} of "
                  f"{int(nonzero.sum())} non-zero voxels)", stacklevel=2)
    return {None: mask}


def load_mask(path: Path, like: Series, *, what: str, labels: str = "refuse") -> np.ndarray:
    """Load a 3-D mask that is one region on the grid of ``like`` (mask_regions' rule); returns bool
    (x, y, z). A label map with several labels is refused (``labels="refuse"``: InputError naming the
    labels) or merged into one region (``labels="merge"``)."""
    if labels not in MASK_LABEL_MODES:
        raise ValueError(f"labels={labels!r}: choose from {MASK_LABEL_MODES}")
    regions = mask_regions(path, like, what=what)
    if None in regions:
        return regions[None]
    if labels == "merge":
        return np.logical_or.reduce(list(regions.values()))
    listed = ", ".join(str(k) for k in list(regions)[:8]) + (", ..." if len(regions) > 8 else "")
    raise InputError(f"{path}: {what} is a label map with {len(regions)} labels ({listed}); it must be one region: "
                     "save the one label you mean as a 0/1 mask")


def header_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray] | None:
    """The 3-D shape and affine a NIfTI file's header states, without reading its data (nibabel reads
    the header alone; a .nii.gz is decompressed only that far); None when the header cannot be read
    (the file's full load then says why)."""
    import nibabel

    from perfusion.io.nifti import _quiet_nibabel

    try:
        with _quiet_nibabel():
            img: Any = nibabel.load(str(path))
            shape, affine = tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)
    except Exception:  # nibabel raises many types for broken files; the full load words the error
        return None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    return shape, affine


def check_masks_before_loading(series_path: Path, masks: list[tuple[Path, str]]) -> None:
    """Refuse a mask on another grid than the series before the series' data is decoded (a large series
    takes 10-30 s to read): each mask file (path, what) must exist, be NIfTI and state in its header the
    series' 3-D shape and affine, as :func:`mask_regions` requires after loading, with the same one-line
    InputError. Headers only; a series or mask whose header cannot be read is left to the full load.
    ``series_path``: a NIfTI series (a DICOM folder's grid is known only once read)."""
    series_path = Path(series_path)
    if series_path.is_dir() or not series_path.is_file():
        return
    series = header_grid(series_path)
    if series is None or len(series[0]) < 3:
        return
    shape3d, affine = series[0][:3], series[1]
    for path, what in masks:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: {what} not found; check the path")
        if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
            raise InputError(f"{path}: {what} must be a NIfTI file (.nii or .nii.gz)")
        grid = header_grid(path)
        if grid is None:
            continue
        if grid[0] != shape3d:
            raise InputError(f"{path}: {what} shape {grid[0]} differs from the DSC series {series_path.name} "
                             f"{shape3d}; resample the mask onto the DSC grid")
        if not np.allclose(grid[1], affine, rtol=1e-5, atol=AFFINE_ATOL_MM):
            raise InputError(f"{path}: {what} affine differs from the DSC series {series_path.name}; "
                             "resample the mask onto the DSC grid")
