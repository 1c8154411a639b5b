"""DICOM in: a folder straight from PACS becomes an ``io.Series``, with no patient identifier carried out.

Two tools, each for what it does best, in two modules:

- :mod:`~perfusion.io.dicom.headers`: **pydicom** reads the headers only, sorts the files into series,
  frames and slices and checks them (:func:`inspect`, :func:`select_series`, :func:`check_series`).
- :mod:`~perfusion.io.dicom.convert`: **dcm2niix** converts the one selected series; its output is
  checked against the headers and its pixels against the DICOM pixels (:func:`read_dicom_echoes`,
  :func:`load_dicom_series`).
- :mod:`~perfusion.io.dicom.export`: **highdicom** writes the maps, ROIs and reference of an analysis
  back into the source study as DICOM objects (:func:`export_dicom`; the source series and its grid:
  :func:`load_source`, :func:`to_source_grid`).

Their public names are re-exported here (``from perfusion.io.dicom import load_dicom_series``).
"""

from __future__ import annotations

from perfusion.io.dicom.convert import (
    DCM2NIIX_ENV,
    DCM2NIIX_OPTIONS,
    SIDECAR_WHITELIST,
    DicomSeries,
    find_dcm2niix,
    load_dicom_echoes,
    load_dicom_series,
    read_dicom_echoes,
    read_dicom_series,
    whitelist_sidecar,
)
from perfusion.io.dicom.export import (
    SourceSeries,
    export_dicom,
    from_source_grid,
    load_source,
    source_indices,
    to_source_grid,
)
from perfusion.io.dicom.headers import (
    INTERVAL_JITTER,
    INTERVAL_TR_TOLERANCE,
    INTERVAL_UNUSABLE,
    SeriesInfo,
    check_series,
    inspect,
    scrub,
    select_series,
)

__all__ = ["DCM2NIIX_ENV", "DCM2NIIX_OPTIONS", "INTERVAL_JITTER", "INTERVAL_TR_TOLERANCE", "INTERVAL_UNUSABLE",
           "SIDECAR_WHITELIST", "DicomSeries", "SeriesInfo", "SourceSeries", "check_series", "export_dicom",
           "find_dcm2niix", "from_source_grid", "inspect", "load_dicom_echoes", "load_dicom_series", "load_source",
           "read_dicom_echoes", "read_dicom_series", "scrub", "select_series", "source_indices", "to_source_grid",
           "whitelist_sidecar"]
