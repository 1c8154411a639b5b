"""Loading a case and running its analysis, the layer under the command line and batch: the options
become a Config (``make_config``, config.py: validated as it is made), the series (one NIfTI, a DICOM
folder or the echoes of a multi-echo run) and masks are loaded and checked (``load_inputs``), and
``compute_case`` repairs frames,
corrects head motion, analyses and registers the anatomical image. Nothing here prints or writes."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

from perfusion.errors import InputError, UsageError

if TYPE_CHECKING:
    from perfusion.config import AifSelection, LeakageChoice, LeakageGate, Method, MotionMode, Recirculation, VofMode
    from perfusion.pipeline import Inputs


def own_warnings(caught) -> list[str]:
    """The messages of the tool's own warnings among ``caught`` (warnings.WarningMessage): plain
    UserWarnings and perfusion's own categories. Raw library warnings (numpy's RuntimeWarning "overflow
    encountered in ...", DeprecationWarning, ...) never reach report.json or the terminal: what a user
    must know is said by the tool in its own sentences."""
    return [str(w.message) for w in caught
            if w.category is UserWarning or w.category.__module__.startswith("perfusion")]


def dsc_list(dsc) -> list[Path]:
    """The series argument as a list: one NIfTI or DICOM folder, or the echoes of a multi-echo run."""
    return [Path(p) for p in dsc] if isinstance(dsc, (list, tuple)) else [Path(dsc)]


def check_echo_options(dscs: list[Path], *, te: float | None, dicom_series: int | None) -> None:
    """Several series are echoes of one run: each TE comes from its sidecar, and none may be a folder."""
    for p in dscs:
        if p.is_dir():
            raise UsageError(f"{p}: a DICOM folder holds its own echoes; give it alone (perfusion analyze FOLDER)")
    if te is not None:
        raise UsageError(f"--te {te:g}: {len(dscs)} echoes were given, each with its own TE; leave --te out and give "
                         "each echo's EchoTime (s) in its JSON sidecar")
    if dicom_series is not None:
        raise UsageError(f"--series {dicom_series} applies to a DICOM folder, not to NIfTI echoes; leave it out")
    if len({p.resolve() for p in dscs}) < len(dscs):
        raise UsageError(f"{dscs[0]}: a file is given twice; give each echo once")


def load_inputs(*, dsc: Path | list[Path], mask: Path | None, aif: str, reference: Path | None, rois: list[Path],
                te: float | None, tr: float | None, vof: str = "guarded", anat: Path | None = None,
                roi_names: list[str] | None = None, dicom_series: int | None = None):
    """Load the series and every mask, checking grids; return pipeline.Inputs and loader warnings.
    ROI names are the file names without extension unless ``roi_names`` (one per ROI) are given.
    A folder ``dsc`` is a DICOM folder (io.dicom.load_dicom_echoes, echoes combined; ``dicom_series`` its
    SeriesNumber)."""
    from perfusion.config import VOF_WITHOUT_FILE
    from perfusion.io import check_roi_names, load_mask, stem
    from perfusion.pipeline import Inputs

    names = [roi_names[i] if roi_names is not None else stem(p) for i, p in enumerate(rois)]
    check_roi_names(list(zip(names, map(Path, rois), strict=True)))  # before any file is read
    _check_masks_first(dsc_list(dsc), mask=mask, aif=aif, reference=reference, rois=rois, vof=vof)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        series, paths = _load_series(dsc_list(dsc), te=te, tr=tr, dicom_series=dicom_series)
        # masks (io.mask_regions): a brain mask's labels are merged (a tissue segmentation); an AIF, VOF or
        # reference label map is refused (one region each); an ROI label map is one ROI per label
        brain = load_mask(mask, series, what="brain mask", labels="merge") if mask else None
        if mask:
            paths["brain"] = Path(mask)
        aif_mask = None
        if aif != "auto":
            aif_mask = load_mask(Path(aif), series, what="AIF mask")
            paths["aif"] = Path(aif)
        ref = load_mask(reference, series, what="reference mask") if reference else None
        if reference:
            paths["reference"] = Path(reference)
        vof_mask = None
        if vof not in VOF_WITHOUT_FILE:
            vof_mask = load_mask(Path(vof), series, what="VOF mask")
            paths["vof"] = Path(vof)
        roi_masks = _load_rois(rois, roi_names, series, paths)
    if anat is not None:
        paths["anat"] = Path(anat)
    inputs = Inputs(series=series, brain=brain, aif=aif_mask, reference=ref, vof=vof_mask, rois=roi_masks, paths=paths)
    return inputs, own_warnings(caught)


def _check_masks_first(dscs: list[Path], *, mask, aif: str, reference, rois, vof: str) -> None:
    """Every mask file against the series' grid from the headers alone, before the series is decoded
    (io.check_masks_before_loading): a wrong-shape ROI is refused in a fraction of a second, not after
    the 10-30 s a large series takes to read."""
    from perfusion.config import VOF_WITHOUT_FILE
    from perfusion.io.masks import check_masks_before_loading

    files = [(mask, "brain mask"), (None if aif == "auto" else aif, "AIF mask"), (reference, "reference mask"),
             (None if vof in VOF_WITHOUT_FILE else vof, "VOF mask"), *((p, "ROI") for p in rois)]
    check_masks_before_loading(dscs[0], [(Path(p), what) for p, what in files if p])


def _load_series(dscs: list[Path], *, te: float | None, tr: float | None, dicom_series: int | None):
    """The series (io.Series) of one NIfTI, a DICOM folder or the NIfTI echoes of one multi-echo run
    (echoes.combine_echoes), and its input paths: "dsc" and, for NIfTI echoes, each further echo
    ("dsc_echo-<k>") and its sidecar."""
    from perfusion.io import load_series, sidecar_path_for

    if len(dscs) > 1:  # the echoes of one multi-echo acquisition (echoes.py)
        from perfusion.quantify.echoes import combine_echoes

        check_echo_options(dscs, te=te, dicom_series=dicom_series)
        series = combine_echoes([load_series(p, te=None, tr=tr) for p in dscs])
        for note in series.echo_notes:
            warnings.warn(note, stacklevel=1)
    elif dscs[0].is_dir():
        from perfusion.io.dicom import load_dicom_echoes
        from perfusion.quantify.echoes import combine_echoes

        loaded = load_dicom_echoes(dscs[0], te=te, tr=tr, series=dicom_series)
        series = loaded[0] if len(loaded) == 1 else replace(combine_echoes(loaded), path=dscs[0])
    else:
        if dicom_series is not None:
            raise UsageError(f"{dscs[0]}: --series {dicom_series} applies to a DICOM folder, not a NIfTI file; "
                             "leave it out")
        series = load_series(dscs[0], te=te, tr=tr)
    paths: dict[str, Path] = {"dsc": Path(series.path)}
    # NIfTI echoes: echo 1 (shortest TE) is "dsc", the others are hashed too (a DICOM folder's echoes are
    # named FOLDER/echo-<k>, not files: the folder's hash covers them)
    for i, echo in enumerate(series.echoes[1:] if not Path(series.path).is_dir() else (), start=2):
        paths[f"dsc_echo-{i}"] = Path(echo.path)
        side = sidecar_path_for(Path(echo.path))
        if side.is_file():
            paths[f"dsc_echo-{i}_sidecar"] = side
    return series, paths


def _load_rois(rois: list[Path], roi_names: list[str] | None, series, paths: dict[str, Path]) -> dict:
    """The lesion ROIs by name (bool x y z), a label map one ROI per label ("<name>-label<k>", with a
    warning); adds each ROI's file to ``paths`` ("roi:<name>"). UsageError for two ROIs of one name."""
    from perfusion.io import check_roi_names, mask_regions, stem

    roi_masks = {}
    for i, p in enumerate(rois):
        base = roi_names[i] if roi_names is not None else stem(p)
        regions = mask_regions(p, series, what="ROI")
        names = {label: base if label is None else f"{base}-label{label}" for label in regions}
        if None not in regions:
            warnings.warn(f"{Path(p).name}: the ROI is a label map with {len(regions)} labels: one ROI per label, "
                          f"{', '.join(names.values())}", stacklevel=1)
        for label, m in regions.items():
            name = names[label]
            if name in roi_masks:
                raise UsageError(f"{p}: two ROIs are named {name!r}; rename one file")
            roi_masks[name] = m
            paths[f"roi:{name}"] = Path(p)
    if len(roi_masks) > len(rois):  # label maps: their per-label names pass the same rules
        check_roi_names([(n, paths[f"roi:{n}"]) for n in roi_masks])
    return roi_masks


def make_config(*, method: Method = "model", threshold: float | None = None, oi_target: float | None = None,
                leakage: LeakageChoice = "auto", leakage_gate: LeakageGate = "lesion", rcbv_low: float = 1.0,
                rcbv_high: float = 1.75, aif_voxels: int = 10, aif_selection: AifSelection = "cluster",
                vof: str = "guarded", recirculation: Recirculation = "keep",
                weeks_since_radiation: float | None = None, motion_correct: MotionMode = "auto",
                bevacizumab: bool = False, steroids: bool = False, gamma_maps: bool = False):
    """The Config of the command-line options (a --vof mask file becomes "mask"), validated as it is
    made (UsageError: the option strings are typed as Config's choices, which Config checks)."""
    from perfusion.config import VOF_WITHOUT_FILE, Config

    # cast: a --vof value of VOF_WITHOUT_FILE is one of VofMode (membership in a tuple does not narrow a str)
    vof_mode = cast("VofMode", vof) if vof in VOF_WITHOUT_FILE else "mask"
    return Config(method=method, threshold=threshold, oi_target=oi_target, leakage=leakage, leakage_gate=leakage_gate,
                  aif_voxels=aif_voxels,
                  aif_selection=aif_selection, vof=vof_mode,
                  recirculation=recirculation, weeks_since_radiation=weeks_since_radiation,
                  rcbv_low=rcbv_low, rcbv_high=rcbv_high, motion_correct=motion_correct, bevacizumab=bevacizumab,
                  steroids=steroids, gamma_maps=gamma_maps)


@dataclass(frozen=True)
class Case:
    """A loaded case (``load_case``): the series and masks (pipeline.Inputs), the loader's warnings and the
    anatomical image (data, affine) with its file, if one was given."""

    inputs: Inputs
    warnings: tuple[str, ...] = ()
    anat: tuple | None = None
    anat_path: Path | None = None


def load_case(dsc, *, mask=None, aif: str = "auto", reference=None, rois=(), te: float | None = None,
              tr: float | None = None, vof: str = "guarded", anat=None, roi_names: list[str] | None = None,
              dicom_series: int | None = None) -> Case:
    """Load one case as ``perfusion analyze`` does: ``dsc`` a 4-D NIfTI (TE/TR in s from its sidecar, or
    ``te``/``tr``), a DICOM folder, or a list of NIfTI echoes of one multi-echo run; masks on its grid.
    Raises PerfusionError subclasses (InputError, UsageError) with a one-line message; prints nothing."""
    inputs, load_warnings = load_inputs(dsc=dsc, mask=mask, aif=aif, reference=reference, rois=list(rois), te=te,
                                        tr=tr, vof=vof, anat=anat, roi_names=roi_names, dicom_series=dicom_series)
    anat_image = None
    if anat is not None:  # read before the analysis so a bad file fails fast
        from perfusion.io import load_volume

        anat_image = load_volume(Path(anat), what="anatomical image (--anat)")
    return Case(inputs=inputs, warnings=tuple(load_warnings), anat=anat_image,
                anat_path=Path(anat) if anat is not None else None)


def analyze_case(case: Case, config=None):
    """Analyse a loaded case with every option of ``config`` (config.Config; default: the command
    line's defaults): frame repair, head motion (``config.motion_correct``), the analysis, and the
    registration of the anatomical image. Returns the pipeline.Result; writes and prints nothing."""
    import dataclasses
    import time

    from perfusion.config import Config
    from perfusion.pipeline import analyze, repair_series
    from perfusion.quantify.motion import correct_series
    from perfusion.results import Motion

    config = config or Config()
    inputs = case.inputs
    t1 = time.perf_counter()
    series, frames_repaired, frame_notes = repair_series(inputs.series)  # before motion: it registers every frame
    series, motion_entry, motion_notes = correct_series(series, mode=config.motion_correct, brain=inputs.brain)
    motion = Motion.of(motion_entry)
    inputs = dataclasses.replace(inputs, series=series)
    t2 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = analyze(inputs, config)
    timings = {"motion": round(t2 - t1, 4), **result.timings}
    result = dataclasses.replace(result, motion=motion, timings=timings,
                                 frames_repaired=frames_repaired or result.frames_repaired,
                                 warnings=[*frame_notes, *result.warnings, *case.warnings, *motion_notes,
                                           *own_warnings(caught)])
    if case.anat is not None:
        from perfusion.quantify.register import anat_background

        if result.baseline_image is None:
            raise InputError(f"{case.anat_path}: no baseline image to register the anatomical image to; "
                             "the series needs pre-bolus frames")
        t3 = time.perf_counter()
        bg = anat_background(result.baseline_image, inputs.series.affine, *case.anat, path=case.anat_path)
        result = dataclasses.replace(result, anat=bg, timings={**timings, "anat": round(time.perf_counter() - t3, 4)})
    return result


def compute_case(config, *, dsc: Path | list[Path], mask: Path | None = None, aif: str = "auto",
                 reference: Path | None = None, rois: Sequence[Path] = (), te: float | None = None,
                 tr: float | None = None, vof: str = "guarded", anat: Path | None = None,
                 roi_names: list[str] | None = None, dicom_series: int | None = None, on_analysis=None):
    """``load_case`` then ``analyze_case`` (the command line's and batch's path); return (Result, Inputs)
    with the loading time in the Result's timings. ``on_analysis``: called with no argument between the
    two (the command line's progress bar names the stage)."""
    import dataclasses
    import time

    t0 = time.perf_counter()
    case = load_case(dsc, mask=mask, aif=aif, reference=reference, rois=rois, te=te, tr=tr, vof=vof, anat=anat,
                     roi_names=roi_names, dicom_series=dicom_series)
    load_s = round(time.perf_counter() - t0, 4)
    if on_analysis is not None:
        on_analysis()
    result = analyze_case(case, config)
    result = dataclasses.replace(result, timings={"load": load_s, **result.timings})
    return result, case.inputs


def save(result, case: Case, out, *, force: bool = False, html: bool = True, label: str | None = None,
         scan_date: str | None = None) -> Path:
    """Write a Result into the folder ``out`` as ``perfusion analyze`` does (maps with JSON sidecars,
    report.json, report.html unless ``html`` is False), atomically and under the folder's lock; ``out``
    must be empty unless ``force``. ``label`` and ``scan_date`` (YYYY-MM-DD), when given, are shown at the
    top of report.html and kept in report.json "case": the caller chooses them, so that no identifier
    is taken from the input. Returns ``out``. Raises OutputError (exit 5 on the command line)."""
    from perfusion.io import check_output_folder, output_lock, staged_output
    from perfusion.report.outputs import write_result

    out = Path(out)
    check_output_folder(out, force=force)
    with output_lock(out):
        check_output_folder(out, force=force)
        with staged_output(out, force=force) as stage:
            write_result(result, case.inputs, stage, label=label, scan_date=scan_date)
            if html:
                from perfusion.report.html import write_html

                write_html(stage)
    return out
