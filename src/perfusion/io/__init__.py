"""Files in and out: the only package that touches nibabel (and dcm2niix).

Units are fixed here and nowhere else: TE and TR leave it in seconds whatever the file said, and
every map written carries a JSON sidecar with its ``Units``. Arrays are ``(x, y, z, t)``, time last,
as nibabel returns them.

Submodules, by role (their public names are re-exported here: ``from perfusion.io import X``):

- :mod:`~perfusion.io.nifti`: reading NIfTI images safely (volumes, arrays, signal as float32).
- :mod:`~perfusion.io.series`: the DSC :class:`Series` and its TE / TR in seconds (:func:`load_series`).
- :mod:`~perfusion.io.masks`: masks on the series' grid (:func:`load_mask`) and the names ROIs may take.
- :mod:`~perfusion.io.display`: the radiological display orientation of maps (:func:`display_grid`).
- :mod:`~perfusion.io.files`: regular files of an input folder, their hashes (:func:`sha256`).
- :mod:`~perfusion.io.privacy`: how inputs are named in outputs (:func:`public_name`, :class:`Redactor`).
- :mod:`~perfusion.io.outputs`: writing NIfTI, JSON and TSV files, each atomically (:func:`atomic_write`).
- :mod:`~perfusion.io.folders`: output folders checked, locked and written by staging (:func:`staged_output`).
- :mod:`~perfusion.io.names`: output file names, plain or BIDS (:func:`output_file`, :func:`output_path`).
- :mod:`~perfusion.io.dicom`: a DICOM folder as a Series (header inspection; the dcm2niix driver).
"""

from __future__ import annotations

from perfusion.io.display import DISPLAY_AXCODES, DisplayGrid, display_grid
from perfusion.io.files import MAX_FOLDER_FILE_BYTES, describe_skipped, folder_files, open_regular, sha256
from perfusion.io.folders import check_output_folder, inputs_replaced_in, output_lock, staged_output
from perfusion.io.masks import (
    AFFINE_ATOL_MM,
    MASK_LABEL_MODES,
    MASK_PROBABILITY_THRESHOLD,
    MAX_ROI_NAME,
    UNCORRECTED_SUFFIX,
    check_roi_names,
    load_mask,
    mask_regions,
    roi_name_problem,
)
from perfusion.io.names import (
    BIDS_FILES,
    PLAIN_FILES,
    analysis_of,
    analyze_output_names,
    find_report,
    is_analyze_output,
    output_file,
    output_path,
    roi_mask_files,
    sidecar_of,
)
from perfusion.io.nifti import (
    MAX_SIGNAL,
    SCALED_PEAK_EXPONENT,
    image_affine,
    load_array,
    load_array_affine,
    load_volume,
    read_image,
    read_json_object,
    sidecar_path_for,
    signal_float32,
    stem,
    voxel_major_float32,
)
from perfusion.io.outputs import (
    atomic_write,
    current_umask,
    dumps_json,
    json_safe,
    write_json,
    write_map,
    write_nifti,
    write_tsv,
    write_tsv_sidecar,
)
from perfusion.io.privacy import DICOM_FOLDER_NAME, INPUT_FOLDER_NAME, Redactor, input_names, public_name
from perfusion.io.series import MIN_FRAMES, Series, check_time, load_series

__all__ = [
    "AFFINE_ATOL_MM", "BIDS_FILES", "DICOM_FOLDER_NAME", "DISPLAY_AXCODES", "DisplayGrid", "INPUT_FOLDER_NAME",
    "MASK_LABEL_MODES", "MASK_PROBABILITY_THRESHOLD", "MAX_FOLDER_FILE_BYTES", "MAX_ROI_NAME", "MAX_SIGNAL",
    "MIN_FRAMES", "PLAIN_FILES", "Redactor", "SCALED_PEAK_EXPONENT", "Series", "UNCORRECTED_SUFFIX",
    "analysis_of", "analyze_output_names", "atomic_write",
    "current_umask", "check_output_folder", "check_roi_names", "check_time",
    "describe_skipped", "display_grid", "dumps_json", "find_report", "folder_files", "image_affine",
    "input_names", "inputs_replaced_in", "is_analyze_output", "json_safe", "load_array", "load_array_affine",
    "load_mask", "load_series", "load_volume", "mask_regions", "open_regular", "output_file", "output_lock",
    "output_path", "public_name", "read_image", "read_json_object", "roi_mask_files", "roi_name_problem",
    "sha256", "sidecar_of", "sidecar_path_for", "signal_float32", "staged_output", "stem", "voxel_major_float32",
    "write_json", "write_map", "write_nifti", "write_tsv", "write_tsv_sidecar",
]
