"""``perfusion bids BIDS_DIR OUTPUT_DIR participant|group``: the BIDS-App command line (as fMRIPrep,
ASLPrep, QSIPrep): ``participant`` analyses the DSC series of the chosen participants, sessions and
entities (one subject per task of a cluster array job, all into one OUTPUT_DIR); ``group`` only
rebuilds OUTPUT_DIR's summary.tsv, summary.json and index.html from the cases finished there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from perfusion.cli.options import (
    AifGlob,
    AifSelection,
    AifVoxels,
    AnatGlob,
    Bevacizumab,
    BrainGlob,
    Derivatives,
    GammaMaps,
    Html,
    Jobs,
    Leakage,
    LeakageGate,
    Method,
    MotionCorrect,
    OiTarget,
    Quiet,
    RcbvHigh,
    RcbvLow,
    Recirculation,
    ReferenceGlob,
    RoiGlob,
    Scheduler,
    SchedulerFile,
    Steroids,
    Te,
    Threshold,
    Tr,
    Vof,
    WeeksSinceRadiation,
    batch_params,
    check_options,
)
from perfusion.errors import InputError, UsageError

#: The analysis levels of a BIDS-App.
LEVELS = ("participant", "group")

#: --bids-filter-file: the file-name entities it may filter on (its keys, as fMRIPrep names them) and
#: their BIDS file-name keys.
FILTER_ENTITIES = {"subject": "sub", "session": "ses", "task": "task", "acquisition": "acq", "ceagent": "ce",
                   "reconstruction": "rec", "direction": "dir", "run": "run", "echo": "echo", "part": "part"}

#: --bids-filter-file: its one query, the DSC series ({"dsc": {"session": "1", "run": [1, 2]}}).
FILTER_QUERY = "dsc"


def bids(
    bids_dir: Annotated[Path, typer.Argument(
        metavar="BIDS_DIR", help="The BIDS dataset (sub-*/[ses-*/]perf/*_dsc.nii.gz; masks in derivatives/).")],
    output_dir: Annotated[Path, typer.Argument(
        metavar="OUTPUT_DIR", help="The derivatives folder (e.g. BIDS_DIR/derivatives/perfusion).")],
    analysis_level: Annotated[str, typer.Argument(
        metavar="ANALYSIS_LEVEL", help="participant (analyse the chosen participants) or group (rebuild "
                                       "OUTPUT_DIR's summary from its finished cases).")],
    participant_label: Annotated[Optional[list[str]], typer.Option(
        metavar="LABEL", help="A participant to analyse, with or without sub- (default: all); repeatable.")] = None,
    session_label: Annotated[Optional[list[str]], typer.Option(
        metavar="LABEL", help="A session to analyse, with or without ses- (default: all); repeatable.")] = None,
    bids_filter_file: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False, metavar="FILE",
        help="JSON file of entity filters for the DSC series, as fMRIPrep's: "
             '{"dsc": {"session": "1", "run": [1, 2], "acquisition": null}}.')] = None,
    derivatives: Derivatives = None,
    roi_glob: RoiGlob = None,
    brain_glob: BrainGlob = None,
    reference_glob: ReferenceGlob = None,
    aif_glob: AifGlob = None,
    anat_glob: AnatGlob = None,
    jobs: Jobs = 1,
    scheduler: Scheduler = None,
    scheduler_file: SchedulerFile = None,
    method: Method = "model",
    threshold: Threshold = None,
    oi_target: OiTarget = None,
    leakage: Leakage = "auto",
    leakage_gate: LeakageGate = "lesion",
    te: Te = None,
    tr: Tr = None,
    rcbv_low: RcbvLow = 1.0,
    rcbv_high: RcbvHigh = 1.75,
    aif_voxels: AifVoxels = 10,
    aif_selection: AifSelection = "cluster",
    vof: Vof = "guarded",
    recirculation: Recirculation = "keep",
    gamma_maps: GammaMaps = False,
    weeks_since_radiation: WeeksSinceRadiation = None,
    bevacizumab: Bevacizumab = False,
    steroids: Steroids = False,
    motion_correct: MotionCorrect = "auto",
    quiet: Quiet = False,
    html: Html = True,
) -> None:
    """BIDS-App entry point: analyse the DSC series of a BIDS dataset (participant level) or rebuild
    OUTPUT_DIR's summary (group level). Exit code 3 when some cases failed (see summary.tsv)."""
    values = dict(locals())  # every option by name, as the signature orders them
    if analysis_level not in LEVELS:
        raise UsageError(f"analysis level {analysis_level!r}: choose participant or group")
    check_options(values)
    if analysis_level == "group":
        code = run_group(Path(bids_dir), Path(output_dir), quiet=quiet)
    else:
        from perfusion.cli.batch import run_batch_command

        select = case_filter(participant_label or (), session_label or (),
                             read_filter_file(bids_filter_file) if bids_filter_file else {})
        code = run_batch_command(input_dir=bids_dir, out=output_dir, layout="bids", derivatives=derivatives,
                                 roi_globs=tuple(roi_glob or ()), brain_glob=brain_glob, reference_glob=reference_glob,
                                 aif_glob=aif_glob, anat_glob=anat_glob, jobs=jobs, scheduler=scheduler,
                                 scheduler_file=scheduler_file, quiet=quiet, params=batch_params(values),
                                 select=select)
    if code:
        raise typer.Exit(code=code)


def run_group(bids_dir: Path, out: Path, *, quiet: bool) -> int:
    """Group level: summary.tsv, summary.json, index.html and dataset_description.json of ``out`` from every
    case finished there (each participant task's done-markers); the parameters recorded are those of
    the last summary. InputError when ``out`` holds no finished case."""
    import json

    from perfusion.batch.engine import BatchResult, finished_rows
    from perfusion.cli.batch import _finish

    if not bids_dir.is_dir():
        raise InputError(f"{bids_dir}: BIDS dataset folder not found; check the path")
    if not out.is_dir() or not finished_rows(out):
        raise InputError(f"{out}: holds no finished case; run the participant level first")
    try:
        params = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("parameters", {})
    except (OSError, ValueError, AttributeError):
        params = {}
    code = _finish(out, BatchResult([]), layout="bids", params=params if isinstance(params, dict) else {},
                   input_root=bids_dir, quiet=True)
    if not quiet:
        from perfusion.cli.console import console

        console().print(f"group level: summary.tsv, summary.json and index.html of {len(finished_rows(out))} "
                        "finished cases in OUTPUT_DIR")
    return code


def _label(value: str, prefix: str) -> str:
    return value[len(prefix):] if value.startswith(prefix) else value


def read_filter_file(path: Path) -> dict[str, Any]:
    """The DSC query of a --bids-filter-file (entity -> value, list of values or null: absent); InputError,
    one line naming the file, when it is not such a JSON object."""
    from perfusion.io import read_json_object

    fix = ('give a JSON object such as {"dsc": {"session": "1", "run": [1, 2]}} (entities: '
           + ", ".join(FILTER_ENTITIES) + ")")
    data = read_json_object(path, what="BIDS filter file", fix=fix)
    unknown = [k for k in data if k != FILTER_QUERY]
    if unknown or not isinstance(data.get(FILTER_QUERY, {}), dict):
        what = f"query {unknown[0]!r}" if unknown else f"{FILTER_QUERY!r} is not an object"
        raise InputError(f"{path}: BIDS filter file: {what}; perfusion reads only the \"dsc\" query: {fix}")
    query = data.get(FILTER_QUERY, {})
    for key, value in query.items():
        if key not in FILTER_ENTITIES:
            raise InputError(f"{path}: BIDS filter file: unknown entity {key!r}; {fix}")
        values = value if isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            raise InputError(f"{path}: BIDS filter file: {key} must be a label, a number, a list of them or null; "
                             f"{fix}")
    return query


def _matches(value: str | None, wanted) -> bool:
    """An entity value of a file name against a filter value: equal labels, equal numbers (run 1 is
    run-01), null for an entity the name lacks, or any of a list."""
    if isinstance(wanted, list):
        return any(_matches(value, w) for w in wanted)
    if wanted is None:
        return value is None
    if value is None:
        return False
    text = str(wanted)
    return value == text or (value.isdigit() and text.isdigit() and int(value) == int(text))


def case_filter(participants, sessions, query: dict[str, Any]):
    """The selection of cases (discovery.Case, BIDS) that --participant-label, --session-label and the
    filter file's query keep; a label that keeps no case is an InputError naming it."""
    subs = {_label(p, "sub-") for p in participants}
    sess = {_label(s, "ses-") for s in sessions}

    def select(cases: list) -> list:
        kept = []
        for case in cases:
            ents = _entities(case.prefix or case.case_id)
            if subs and ents.get("sub") not in subs or sess and ents.get("ses") not in sess:
                continue
            if all(_matches(ents.get(FILTER_ENTITIES[k]), v) for k, v in query.items()):
                kept.append(case)
        for given, key, flag in ((subs, "sub", "participant"), (sess, "ses", "session")):
            missing = sorted(g for g in given if not any(_entities(c.prefix or c.case_id).get(key) == g for c in kept))
            if missing:
                raise InputError(f"--{flag}-label {', '.join(missing)}: no DSC series of that {flag} in BIDS_DIR "
                                 "(after the filters); check the label")
        if not kept:
            raise InputError("no DSC series left after --bids-filter-file; check its entities and values")
        return kept

    return select


def _entities(name: str) -> dict[str, str]:
    """``key-value`` parts of a BIDS name (``sub-01_ses-1_run-2`` -> sub 01, ses 1, run 2)."""
    out: dict[str, str] = {}
    for part in name.split("_"):
        key, sep, value = part.partition("-")
        if sep and value:
            out.setdefault(key, value)
    return out
