"""Many cases: ``perfusion batch INPUT OUT_DIR``. Each case runs in isolation, is written atomically and
is marked done with the fingerprint of what made it; a re-run skips done cases and recomputes changed
ones; ``--jobs N`` or ``--scheduler`` spread the cases over Dask distributed workers.

A case's outputs are written into a hidden staging folder, with the done-marker (:data:`MARKER`: input
hashes, parameters, software version, the case's summary rows, its files) written last. A plain case
has a folder of its own: the staging folder beside it replaces it by renames, and a batch killed at any
moment leaves the old folder, no folder or the new complete one. A BIDS series shares its session's
``perf/`` folder with the other runs (``sub-01/ses-1/perf/sub-01_ses-1_run-2_cbv.nii.gz``, as derivatives
mirror the raw tree): its marker ``.<prefix>.perfusion-done.json``, lock ``.<prefix>.lock`` and staging
folder are its own, and its files move in one by one between a journal and the marker
(:func:`_move_case_in`), touching no other series' file; a killed run leaves the case without a marker,
recomputed next time. Hidden leftovers are removed by the case's next run; a case counts as done only
when its marker matches. Files are named relative to the input
folder in the markers, summaries and log lines (:class:`Names`; each case's own outputs name their inputs
by file name, as ``analyze`` does: report.outputs.write_result), so a copied dataset resumes and no folder
above the dataset (often a patient's name) leaks; two cases never write one file
(:func:`check_collisions`). Library code: no printing (``on_done`` is
the caller's hook for progress), PerfusionError for problems of the whole batch, each case's own
problem recorded in its rows.

Several processes may write one OUT_DIR at once (``perfusion bids ... participant --participant-label``
per task of a cluster array job): each case is locked while it is written (:func:`case_lock`), a
case cleans only its own leftovers, and the top files (summary.tsv/.json, index.html,
dataset_description.json, .bidsignore) are rebuilt, under a short lock, from every finished case found
in OUT_DIR (:func:`write_summary`), so the last process to finish writes every case.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfusion import DISCLAIMER, __version__
from perfusion.batch.discovery import OUTPUT_MARKER, is_marker, marker_name
from perfusion.errors import OutputError, PerfusionError, UsageError
from perfusion.io import Redactor, atomic_write, current_umask, dumps_json
from perfusion.verdicts import VERDICT_WORDS  # the index's verdict column

#: Done-marker file inside each case's output folder (hidden: BIDS tools ignore it; discovery never
#: takes masks from a folder holding it).
MARKER = OUTPUT_MARKER
#: Prefixes of the hidden staging / replaced folders beside a case folder; leftovers of a killed run.
STAGE_PREFIX = ".perfusion-partial-"
OLD_PREFIX = ".perfusion-old-"

#: Columns of summary.tsv, in order (summary.json rows hold the same keys).
#: ``participant_id`` / ``session_id``: BIDS ``sub-<label>`` / ``ses-<label>`` of the case, ``n/a`` when it has none
#: (BIDS tabular files' missing value); ``warnings``: the case's report.json warnings and quality flags
#: (:func:`quality_flags`), joined by "; ".
COLUMNS = ("participant_id", "session_id", "case", "roi", "status", "rcbv_median", "rcbv_ci_low", "rcbv_ci_high",
           "ftb_low", "ftb_mid", "ftb_high", "mixed", "verdict", "warnings", "error", "seconds", "report")

#: BIDS tabular files' "no value".
NA = "n/a"

#: Keys of a batch's ``params`` besides the pipeline Config's fields: those that load each case (TE and
#: TR in s, overriding the sidecars) and ``html`` (write report.html, default True); ``params`` holds
#: nothing else (analysis_config).
LOAD_PARAMS = ("te", "tr", "html")


def analysis_config(params: dict[str, Any]):
    """The validated pipeline Config of a batch's ``params`` (the analysis options every case gets, by
    name, as ``perfusion analyze`` takes them): UsageError for a bad option or a key that is neither a
    Config field nor in LOAD_PARAMS."""
    import dataclasses

    import perfusion
    from perfusion.case import make_config

    fields = {f.name for f in dataclasses.fields(perfusion.Config)}
    unknown = [k for k in params if k not in fields and k not in LOAD_PARAMS]
    if unknown:
        raise UsageError(f"batch parameters {', '.join(unknown)}: not analysis options")
    return make_config(**{k: v for k, v in params.items() if k in fields})


@dataclass
class CaseResult:
    """What one case contributes to the summary: rows (one per ROI, or one without ROIs) and status."""

    case_id: str
    status: str  # "ok" or "failed"
    rows: list[dict[str, Any]]
    seconds: float
    resumed: bool = False
    error: str = ""


@dataclass
class BatchResult:
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return sum(1 for c in self.cases if c.status != "ok")

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [r for c in sorted(self.cases, key=lambda c: c.case_id) for r in c.rows]


# ---------------------------------------------------------------------------------- one case


def case_inputs(case) -> list[Path]:
    """Every input file of a case (series, sidecars, masks, anatomical image) in a fixed order; every echo
    of a multi-echo run and each echo's sidecar; the JSON files a BIDS series inherits (io.series
    .inherited_sidecars: a top-level ``dsc.json``, ...), whose content TE and TR may come from."""
    from perfusion.io.series import inherited_sidecars

    echoes = tuple(getattr(case, "echoes", ()) or ())
    if echoes:
        series = [*echoes, *getattr(case, "echo_sidecars", ())]
    else:
        series = [case.dsc, getattr(case, "sidecar", None)]
    inherited = dict.fromkeys(p for s in (echoes or (case.dsc,)) if s is not None and not Path(s).is_dir()
                              for p in inherited_sidecars(Path(s)) if p not in series)
    paths = [*series, *inherited, case.brain, case.reference, case.aif, *case.rois, getattr(case, "anat", None)]
    return [Path(p) for p in paths if p is not None]


def roi_names(case) -> list[str]:
    """ROI names of a case: in BIDS (a case with a prefix) the mask's ``label-`` value (``tumor`` of
    ``sub-01_ses-1_label-tumor_mask.nii.gz``), so one lesion keeps its name across sessions and
    ``perfusion compare`` can match it; otherwise the file name without extension, as in ``analyze``."""
    import re

    from perfusion.io import stem

    out = []
    for p in case.rois:
        m = re.search(r"(?:^|_)label-([A-Za-z0-9]+)", stem(p)) if getattr(case, "prefix", None) else None
        out.append(m.group(1) if m else stem(p))
    return out


@dataclass(frozen=True)
class Names:
    """How a batch names files in everything it writes (done-markers, case outputs, summary, log lines):
    relative to the input folder, never absolute, because the folders above a dataset (and above OUT_DIR)
    are often named after patients or sites. ``input_root``, ``out_root`` and ``derivatives`` are
    absolute (symlinks not resolved); a dataset moved or copied elsewhere keeps its names, so a done
    case stays done."""

    input_root: Path
    out_root: Path
    derivatives: Path | None = None  # --derivatives given outside the input folder

    @classmethod
    def of(cls, input_root: Path, out_root: Path, derivatives: Path | None = None) -> Names:
        root = Path(input_root).absolute()
        deriv = Path(derivatives).absolute() if derivatives is not None else None
        if deriv is not None and (deriv == root or root in deriv.parents):
            deriv = None  # inside the input folder: named relative to it
        return cls(root, Path(out_root).absolute(), deriv)

    def _bases(self) -> list[tuple[Path, str]]:
        """(folder, label) pairs, most specific first; the input folder's label is empty."""
        bases = [(self.out_root, "OUT_DIR")]
        if self.derivatives is not None:
            bases.append((self.derivatives, "DERIVATIVES"))
        bases.append((self.input_root, ""))
        out = []
        for folder, label in bases:
            for form in dict.fromkeys((folder, Path(os.path.realpath(folder)))):
                out.append((form, label))
        return sorted(out, key=lambda b: len(b[0].parts), reverse=True)

    def rel(self, path: Path | str) -> str:
        """``path``'s name relative to the input folder (``sub-01/perf/sub-01_dsc.nii.gz``), or to
        DERIVATIVES/ or OUT_DIR/; a path outside all of them: its file name only."""
        p = Path(path)
        p = p if p.is_absolute() else p.absolute()
        for base, label in self._bases():
            try:
                r = p.relative_to(base).as_posix()
            except ValueError:
                continue
            return f"{label}/{r}" if label else r
        return p.name

    def _table(self) -> dict[str, str]:
        """batch's naming policy as an io.Redactor table, each folder's spelling (as given and with
        symlinks resolved) -> its label: the output folder "OUT_DIR", DERIVATIVES, the input folder ""
        (paths under it become relative), the folders above the input folder and OUT_DIR "..", "../.."
        and "OUT_DIR/..", ... (the longest spelling of a path wins)."""
        pairs: dict[str, str] = {}
        for base, label in self._bases():
            pairs.setdefault(str(base), label)
        for folder, label in ((self.input_root, ""), (self.out_root, "OUT_DIR/")):
            for form in dict.fromkeys((folder, Path(os.path.realpath(folder)))):
                for k, parent in enumerate(form.parents, start=1):  # above: ../, ../../, ...
                    if parent != Path(parent.anchor):
                        pairs.setdefault(str(parent), label + "/".join([".."] * k))
        return pairs

    @functools.cached_property
    def _redactor(self) -> Redactor:
        """Built once (it resolves symlinks)."""
        return Redactor(table=self._table(), bare="INPUT")

    def scrub(self, text: str) -> str:
        """``text`` with every absolute path under the input, derivatives, output folder or a folder
        above the input made relative (``/data/DOE_JOHN/ds/sub-01/x`` -> ``sub-01/x``,
        ``/data/DOE_JOHN/other`` -> ``../other``, the input folder itself -> ``INPUT``): io.Redactor
        with this policy."""
        return self._redactor.text(text)


def fingerprint(case, params: dict[str, Any], names: Names) -> dict[str, Any]:
    """What a case's outputs depend on: input contents (sha256, by names relative to the input folder),
    analysis parameters, software version. Not where the dataset lies: a copy is the same case."""
    from perfusion.io import sha256

    return {"software_version": __version__, "parameters": params,
            "inputs": {names.rel(p): sha256(p) for p in case_inputs(case) if p.exists()}}  # a DICOM folder: one hash


#: Files a batch writes at the top of OUT_DIR; no case folder may take one of these names.
TOP_FILES = ("summary.tsv", "summary.json", "index.html", "dataset_description.json")


def check_collisions(cases, names: Names) -> None:
    """InputError naming both inputs when two runnable cases would write into one output folder (equal
    up to letter case, as on macOS and Windows), one case's folder lies inside another's, or a case
    folder takes the name of a summary file; for BIDS series, which share their session's folder, when
    two would write one file (_check_shared_folders). Cases with a ``problem`` write nothing and are
    not checked."""
    from perfusion.errors import InputError

    def what(case) -> str:
        return names.rel(case.dsc) if case.dsc is not None else case.case_id

    runnable = [c for c in cases if not getattr(c, "problem", None)]
    _check_shared_folders([c for c in runnable if getattr(c, "prefix", None)], what)
    seen: dict[tuple[str, ...], Any] = {}
    plain = sorted((c for c in runnable if not getattr(c, "prefix", None)), key=lambda c: len(Path(c.out_rel).parts))
    for case in plain:
        key = tuple(p.casefold() for p in Path(case.out_rel).parts)
        if not key or key[0] in TOP_FILES:
            raise InputError(f"{what(case)}: its output folder {Path(case.out_rel).as_posix() or '.'} would replace "
                             f"the batch's {key[0] if key else 'OUT_DIR'}; rename the case folder")
        for n in range(1, len(key) + 1):
            other = seen.get(key[:n])
            if other is not None:
                how = "the same output folder" if n == len(key) else "an output folder inside the other's"
                raise InputError(f"{what(other)} and {what(case)}: both would write into {how} "
                                 f"({Path(case.out_rel).as_posix()}); rename one so each case has its own folder")
        seen[key] = case


def case_file_names(case) -> set[str]:
    """Every file name a BIDS case may write into its shared folder (io.analyze_output_names with its
    ROIs), its done-marker included."""
    from perfusion.io.names import analyze_output_names

    return analyze_output_names(roi_names(case), case.prefix) | {marker_name(case.prefix)}


def _check_shared_folders(cases, what) -> None:
    """InputError naming both inputs when two BIDS series of one output folder carry the same entities
    (``ses-1_sub-01`` and ``sub-01_ses-1``: one series named twice) or would write a file of the same
    name (up to letter case; names the outputs' own entities make equal, e.g. a raw ``desc-`` entity)."""
    from perfusion.errors import InputError

    owner: dict[tuple[str, ...], Any] = {}
    for case in sorted(cases, key=lambda c: c.case_id):
        folder = Path(case.out_rel).as_posix().casefold()
        entities = "_".join(sorted(case.prefix.casefold().split("_")))
        keys = [(folder, "entities", entities)] + [(folder, n.casefold()) for n in sorted(case_file_names(case))]
        for key in keys:
            other = owner.setdefault(key, case)
            if other is not case:
                clash = "carry the same entities" if key[1] == "entities" else f"would write {key[1]}"
                raise InputError(f"{what(other)} and {what(case)}: both {clash} in {Path(case.out_rel).as_posix()}; "
                                 "rename one so each series has its own entities")


def read_marker(path: Path) -> dict | None:
    """The done-marker file ``path`` as a dict; None when missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _failed(case_id: str, error: str, seconds: float, names: Names | None = None) -> CaseResult:
    error = names.scrub(error) if names is not None else error
    row = {**case_entities(case_id), "case": case_id, "roi": "", "status": "failed", "warnings": "", "error": error,
           "seconds": round(seconds, 3)}
    return CaseResult(case_id, "failed", [row], seconds, error=error)


def case_entities(case_id: str) -> dict[str, str]:
    """``participant_id`` and ``session_id`` of a case id (``sub-01_ses-2_run-1`` -> ``sub-01``, ``ses-2``),
    each ``n/a`` when the id has no such entity (a plain-layout case folder, a session-less subject)."""
    parts = case_id.split("_")
    sub = next((p for p in parts if p.startswith("sub-")), NA)
    ses = next((p for p in parts if p.startswith("ses-")), NA) if sub != NA else NA
    return {"participant_id": sub, "session_id": ses}


def quality_flags(report: dict) -> list[str]:
    """What a reader of the summary should know about a case, from its report.json: its "warnings"
    (sentences the analysis wrote), then an AIF quality score below quantify.aif.QUALITY_OK (the report's
    quality table's bar) and an AIF not valid for absolute quantification (CBV and CBF then relative
    only; rCBV stays valid)."""
    from perfusion.quantify.aif import QUALITY_OK

    flags = [str(w) for w in report.get("warnings", []) or []]
    aif = report.get("aif") or {}
    score = aif.get("quality_score")
    said = " ".join(flags)  # a flag the warnings already state is not repeated
    if isinstance(score, (int, float)) and score < QUALITY_OK and "quality score" not in said:
        flags.append(f"AIF quality score {score:.2f} < {QUALITY_OK:g}")
    if aif.get("absolute_quantification") is False and "not quantitative" not in said:
        flags.append("AIF not valid for absolute CBV/CBF (relative values and rCBV only)")
    return flags


def _rows(case_id: str, report: dict, seconds: float, report_rel: str) -> list[dict[str, Any]]:
    base = {**case_entities(case_id), "case": case_id, "status": "ok", "warnings": "; ".join(quality_flags(report)),
            "error": "", "seconds": round(seconds, 3), "report": report_rel}
    rois = report.get("rois", [])
    if not rois:
        return [{**base, "roi": ""}]
    return [{**base, "roi": r.get("name", ""), "rcbv_median": r.get("rcbv_median"), "rcbv_ci_low": r.get("rcbv_ci_low"),
             "rcbv_ci_high": r.get("rcbv_ci_high"), "ftb_low": r.get("ftb_low"), "ftb_mid": r.get("ftb_mid"),
             "ftb_high": r.get("ftb_high"), "mixed": r.get("mixed"), "verdict": r.get("verdict", "")}
            for r in rois]


def _replace_folder(stage: Path, final: Path) -> None:
    """Put ``stage`` in place of ``final`` (io.replace_folder), the old folder moved aside under
    OLD_PREFIX, which clean_leftovers recognises after a kill."""
    from perfusion.io.folders import replace_folder

    replace_folder(stage, final, final.parent / f"{OLD_PREFIX}{final.name}-{os.getpid()}-{time.monotonic_ns()}")


def case_lock(final: Path, prefix: str | None):
    """The lock a case holds while it runs (io.output_lock): on its own folder ``final`` (plain layout),
    or, for a BIDS series whose folder holds every run of its session, on the hidden file
    ``final/.<prefix>.lock``, so two processes on two runs of one session both proceed."""
    from perfusion.io import output_lock

    if not prefix:
        return output_lock(final)
    final.mkdir(parents=True, exist_ok=True)  # made here, not by the lock: a failed run never removes it,
    return output_lock(final / prefix)  # as another run of the session may be writing into it


def run_case(case, out_root: Path, params: dict[str, Any], names: Names) -> CaseResult:
    """Analyse one case into ``out_root``/case.out_rel unless its marker matches; never raises for a
    problem of the case (it becomes a failed CaseResult). Runs in a Dask worker or in-process.
    Everything written names files as ``names`` does (relative to the input folder).

    The case is locked for the run (case_lock: a second process on the same case fails that case at
    once) and only this case's leftovers of a killed run are removed, so processes on disjoint cases
    (an array job, one subject per task; two runs of one BIDS session) share one OUT_DIR."""
    t0 = time.perf_counter()
    case_id = case.case_id

    def failed(error: str) -> CaseResult:
        return _failed(case_id, error, time.perf_counter() - t0, names)

    try:
        if getattr(case, "problem", None):
            return failed(case.problem)
        final = Path(out_root) / case.out_rel
        prefix = getattr(case, "prefix", None)
        with case_lock(final, prefix):
            _clean_case_leftovers(final, prefix)
            fp = fingerprint(case, params, names)
            marker = read_marker(final / marker_name(prefix))
            if marker is not None and marker.get("case") == case_id and marker.get("fingerprint") == fp:
                rows = [{**case_entities(case_id), "warnings": "", **r} for r in marker.get("rows", [])]
                return CaseResult(case_id, "ok", rows, float(marker.get("seconds", 0.0)), resumed=True)
            rows, seconds = _compute_and_write(case, final, params, names, fp, t0)
        return CaseResult(case_id, "ok", rows, seconds)
    except PerfusionError as exc:
        return failed(str(exc))
    except OSError as exc:
        return failed(f"{exc.filename or case_id}: {exc.strerror or exc}; check the file and free space")
    except Exception as exc:  # a bug, but one case must not stop the batch
        return failed(f"internal error ({type(exc).__name__}: {exc}); please report it")


def _compute_and_write(case, final: Path, params: dict[str, Any], names: Names, fp: dict,
                       t0: float) -> tuple[list[dict[str, Any]], float]:
    """Analyse ``case`` and put its outputs in place (staging folder, marker last): a plain case's
    folder replaces ``final`` (_replace_folder), a BIDS series' files join their shared folder
    (_move_case_in). Return its summary rows and seconds. Raises what the analysis or writing raises."""
    from perfusion.case import compute_case
    from perfusion.io import output_file, write_json
    from perfusion.report.outputs import write_result

    config = analysis_config(params)
    echoes = list(getattr(case, "echoes", ()) or ())
    anat = getattr(case, "anat", None)
    result, inputs = compute_case(config, dsc=echoes if len(echoes) > 1 else case.dsc, mask=case.brain,
                                  reference=case.reference, aif=str(case.aif) if case.aif is not None else "auto",
                                  rois=list(case.rois), te=params.get("te"), tr=params.get("tr"),
                                  vof=params.get("vof", "guarded"), anat=anat, roi_names=roi_names(case))
    prefix = getattr(case, "prefix", None)
    where = final if prefix else final.parent  # a BIDS series' staging folder: hidden, inside the shared folder
    where.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{prefix or final.name}-", dir=where))
    try:
        os.chmod(stage, 0o777 & ~current_umask())
        sources = [source_uri(names, p) for p in case_inputs(case) if not p.name.endswith(".json")] if prefix else None
        files = write_result(result, inputs, stage, prefix=prefix, label=case.case_id,  # names inputs by file name
                             sources=sources)
        html = "report_html" if params.get("html", True) else None
        if html:
            from perfusion.report.html import write_html

            write_html(stage)
        report = json.loads((stage / files["report"]).read_text(encoding="utf-8"))
        seconds = time.perf_counter() - t0
        rel = (Path(case.out_rel) / output_file(html or "report", prefix)).as_posix()
        rows = _rows(case.case_id, report, seconds, rel)
        written = sorted(p.name for p in stage.iterdir())
        write_json(stage / marker_name(prefix), {"case": case.case_id, "out": Path(case.out_rel).as_posix(),
                                                 "fingerprint": fp, "rows": rows, "seconds": seconds,
                                                 "finished_utc": _now(), "files": written})
        if prefix:
            _move_case_in(stage, final, prefix)
        else:
            _replace_folder(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return rows, seconds


#: A BIDS case's journal while its files move into the shared folder: ``.<prefix>`` + this; lists every
#: file of the case, old and new, so a run killed while moving leaves no file the next run cannot find.
PENDING = ".perfusion-pending.json"


def _move_case_in(stage: Path, final: Path, prefix: str) -> None:
    """Move a BIDS case's staged files into its shared folder ``final``, touching no other case's file:
    first a journal naming the case's old and new files, then its done-marker removed (the case is
    not done while its files change), each file renamed into place (atomic, one by one), the case's
    old files the new run did not write removed, the new marker renamed in last, the journal removed.
    A run killed at any step leaves the case without a marker (recomputed by the next run, which
    removes what the journal lists and it does not write) or complete."""
    from perfusion.io import write_json

    marker = marker_name(prefix)
    journal = final / f".{prefix}{PENDING}"
    old = _recorded_files(final, prefix)
    new = [p.name for p in sorted(stage.iterdir()) if p.name != marker]
    write_json(journal, {"case": prefix, "files": sorted(set(old) | set(new))})
    (final / marker).unlink(missing_ok=True)
    for name in new:
        os.replace(stage / name, final / name)
    for name in sorted(set(old) - set(new)):
        (final / name).unlink(missing_ok=True)
    os.replace(stage / marker, final / marker)
    journal.unlink(missing_ok=True)
    stage.rmdir()


def _recorded_files(final: Path, prefix: str) -> list[str]:
    """The files of BIDS case ``prefix`` in ``final`` that its done-marker or a killed run's journal
    lists, or its report.json (``perfusion report --anat`` adds the T1 and its transform there): plain
    names starting with ``<prefix>_`` only, so a damaged record cannot name another case's file or
    anything outside the folder."""
    from perfusion.io.names import output_file, sidecar_of

    listed: list = []
    for record in (final / marker_name(prefix), final / f".{prefix}{PENDING}"):
        files = (read_marker(record) or {}).get("files")
        listed += files if isinstance(files, list) else []
    files = (read_marker(final / output_file("report", prefix)) or {}).get("files")
    named = [str(v) for v in files.values()] if isinstance(files, dict) else []
    listed += named + [sidecar_of(v) for v in named if v.endswith((".nii", ".nii.gz"))]
    return sorted({f for f in listed if isinstance(f, str) and f.startswith(f"{prefix}_") and "/" not in f
                   and "\\" not in f and (final / f).is_file() and not (final / f).is_symlink()})


def source_uri(names: Names, path: Path) -> str:
    """A BIDS URI of an input file for a sidecar's ``Sources``: ``bids:raw:<path in the input dataset>``
    (``raw``: the input dataset, DatasetLinks of dataset_description.json), ``bids:derivatives:<path>``
    for a --derivatives folder outside it; never an absolute path."""
    rel = names.rel(path)
    if rel.startswith("DERIVATIVES/"):
        return "bids:derivatives:" + rel.removeprefix("DERIVATIVES/")
    return "bids:raw:" + rel


def _clean_case_leftovers(final: Path, prefix: str | None = None) -> None:
    """Remove what a killed run of this case left (its lock is held): the staging / replaced folders
    beside a plain case's folder ``final``; a BIDS series' staging folders inside its shared folder
    and, when its journal (PENDING) survives, the files it lists (the case has no marker then: it is
    recomputed)."""
    parent, key = (final, prefix) if prefix else (final.parent, final.name)
    if not parent.is_dir():
        return
    for start in (STAGE_PREFIX, OLD_PREFIX):
        for old in parent.glob(f"{start}{glob.escape(key)}-*"):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
    journal = final / f".{prefix}{PENDING}"
    if prefix and journal.is_file():
        if not (final / marker_name(prefix)).is_file():
            for name in _recorded_files(final, prefix):
                (final / name).unlink(missing_ok=True)
        journal.unlink(missing_ok=True)


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------ engines


def thread_env(n_workers: int, cores: int | None = None) -> dict[str, str]:
    """Environment of worker processes: numba and BLAS threads bounded so workers x threads <= cores;
    numba's on-disk cache in a per-user folder (parallel writers into site-packages' __pycache__ are
    what crashes numba's cache, numba#4807)."""
    cores = cores or os.cpu_count() or 1
    per = str(max(1, cores // max(1, n_workers)))
    from perfusion._kernels.cache import _writable

    env = {"NUMBA_NUM_THREADS": per, "OMP_NUM_THREADS": per, "OPENBLAS_NUM_THREADS": per, "MKL_NUM_THREADS": per}
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")))
    cache = cache_home / "perfusion" / f"numba-{__version__}"
    if _writable(cache):
        env["NUMBA_CACHE_DIR"] = str(cache)
    elif os.environ.get("NUMBA_CACHE_DIR"):  # an unwritable HOME: the folder _numba_cache.configure chose
        env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
    return env  # without NUMBA_CACHE_DIR each worker decides as this process did (_numba_cache.configure)


#: Dask settings of the local cluster's workers, each measured on 2 cores with 12 phantom cases on two
#: workers: the statistical profiler (a stack sample every 10 ms, taking the GIL from the case) and
#: the system monitor cost 15 % (14.5 -> 12.3 s); distributed's default MALLOC_TRIM_THRESHOLD_=65536 is
#: dropped: it made each case's analysis about 40 % slower (0.75 -> 1.1 s on the 64 x 64 x 5 phantom,
#: glibc returning every freed array to the OS).
WORKER_CONFIG = {"distributed.worker.profile.enabled": False, "distributed.admin.system-monitor.interval": "10s",
                 "distributed.worker.memory.monitor-interval": "5s"}


def _run_local(cases, out_root, params, names, on_done) -> list[CaseResult]:
    results = []
    for case in cases:
        r = run_case(case, out_root, params, names)
        results.append(r)
        on_done(r)
    return results


def _run_dask(cases, out_root, params, names, on_done, *, jobs: int, scheduler: str | None,
              scheduler_file: Path | None) -> list[CaseResult]:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:  # pragma: no cover - a regular dependency
        raise UsageError("--jobs > 1 and --scheduler need dask.distributed; run 'make install'") from None
    import logging

    cluster = None
    try:
        if scheduler or scheduler_file:
            try:
                client = Client(address=scheduler, scheduler_file=str(scheduler_file) if scheduler_file else None,
                                timeout="20s")
            except (OSError, TimeoutError, ValueError) as exc:
                where = scheduler or scheduler_file
                raise UsageError(f"{where}: cannot reach the Dask scheduler ({exc}); start it or check the address") \
                    from None
        else:
            import dask

            # the thread variables go in through `env`, set inside each worker process before it runs a
            # task; distributed's pre-spawn variables are written into this process's os.environ (and
            # left there), which made numba refuse to run here afterwards ("Cannot set
            # NUMBA_NUM_THREADS ... once the threads have been launched"): the environment is restored
            saved = dict(os.environ)
            try:
                no_trim = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
                with dask.config.set(WORKER_CONFIG | no_trim):
                    cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.ERROR, env=thread_env(jobs))
            finally:
                os.environ.clear()
                os.environ.update(saved)
            client = Client(cluster)
        by_key = {}
        futures = []
        for case in cases:
            f = client.submit(run_case, case, out_root, params, names, pure=False,
                              key=f"perfusion-case-{case.case_id}")
            by_key[f.key] = case
            futures.append(f)
        results = []
        for f in as_completed(futures):
            case = by_key[f.key]
            try:
                r = f.result()
            except Exception as exc:  # the worker died (KilledWorker) or the task could not run
                r = _failed(case.case_id, f"worker failure ({type(exc).__name__}: {exc}); the case was not written",
                            0.0, names)
            results.append(r)
            on_done(r)
        client.close()
        return results
    finally:
        if cluster is not None:
            cluster.close()


def run_batch(cases, out_root: Path, params: dict[str, Any], *, input_root: Path, derivatives: Path | None = None,
              jobs: int = 1, scheduler: str | None = None, scheduler_file: Path | None = None,
              on_done: Callable[[CaseResult], None] = lambda r: None) -> BatchResult:
    """Run every case; one case's failure never stops the others. ``jobs`` 1 runs in this process.
    InputError before any work when two cases would share an output folder (check_collisions)."""
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    out_root = Path(out_root)
    names = Names.of(input_root, out_root, derivatives)
    check_collisions(cases, names)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_root}: cannot create the output folder ({exc.strerror}); choose another") from None
    # no clean_leftovers here: another process may be writing other cases of OUT_DIR (an array job);
    # each case removes its own leftovers under its lock (run_case)
    if jobs == 1 and not scheduler and not scheduler_file:
        results = _run_local(cases, out_root, params, names, on_done)
    else:
        results = _run_dask(cases, out_root, params, names, on_done, jobs=jobs, scheduler=scheduler,
                            scheduler_file=scheduler_file)
    return BatchResult(results)


# ------------------------------------------------------------------------------------ summary


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace("\t", " ").replace("\n", " ")


#: BIDS version of the derivatives' dataset_description.json.
BIDS_VERSION = "1.10.0"

#: The project's code URL for GeneratedBy, used when the installed package's metadata (pyproject
#: ``[project.urls]``) gives none; None: the project has no public repository address yet, so
#: GeneratedBy carries no CodeURL rather than a made-up one.
CODE_URL: str | None = None

def _suffixes() -> list[str]:
    """The BIDS suffixes of every file a case may write (io.names.BIDS_FILES, ROI masks' ``mask``)."""
    import re

    from perfusion.io.names import BIDS_FILES

    return sorted({re.sub(r"\..*$", "", v).split("_")[-1] for v in BIDS_FILES.values()} | {"mask"})


#: OUT_DIR's .bidsignore (BIDS layout): only what BIDS 1.11 does not accept, so that the validator checks
#: the rest. It has no DSC perfusion derivative (BEP009); its ``perf`` datatype holds ASL files only, and
#: no derivative rule lists ``perf`` (a ``_mask``, ``_dseg`` or ``_T2starw``, valid in ``anat/``, is an
#: error in ``perf/``). So each suffix perfusion writes is ignored in ``perf/`` only, by name: any other
#: file there (a misnamed map, a stray series) is still reported, as is everything outside ``perf/``
#: (folders, dataset_description.json). The batch's summary and pages are not BIDS files.
BIDSIGNORE = ("# perfusion: BIDS 1.11 defines no DSC perfusion derivative (BEP009) and no derivative in perf/;\n"
              "# the names follow the derivatives rules (checked by perfusion's tests against the BIDS schema)\n"
              "summary.tsv\nsummary.json\nindex.html\n" + "".join(f"**/perf/*_{s}.*\n" for s in _suffixes()))


def code_url() -> str | None:
    """The project's code URL: the package metadata's Source / Repository / Homepage URL, else CODE_URL."""
    from importlib import metadata

    try:
        urls = metadata.metadata("dsc-perfusion").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        urls = []
    by_name = {u.split(",", 1)[0].strip().lower(): u.split(",", 1)[1].strip() for u in urls if "," in u}
    return next((by_name[k] for k in ("source", "repository", "homepage") if k in by_name), CODE_URL)


def dataset_description(out_root: Path, input_root: Path | None) -> dict[str, Any]:
    """OUT_DIR's dataset_description.json (BIDS derivatives). SourceDatasets never names a folder: the
    input's DatasetDOI when its dataset_description.json has one (a DOI identifies the dataset wherever
    it is copied); else, when OUT_DIR lies in INPUT/derivatives/ (the BIDS-App habit), the relative
    ``../..``, which stays right when the dataset moves; else only ``bids:raw:``, the name under which
    every sidecar's Sources cites the input (where the input lies is then not recorded: its path would
    carry folder names, often a patient's or a site's). DatasetLinks maps ``raw`` to the same DOI or
    relative path when there is one."""
    gen = {"Name": "perfusion", "Version": __version__, "Description": DISCLAIMER}
    if code_url():
        gen["CodeURL"] = code_url()
    desc: dict[str, Any] = {"Name": "perfusion: DSC perfusion maps and lesion scores", "BIDSVersion": BIDS_VERSION,
                            "DatasetType": "derivative", "GeneratedBy": [gen]}
    link = None
    if input_root is not None:
        doi = _source_doi(Path(input_root))
        src, out = Path(input_root).resolve(), Path(out_root).resolve()
        if doi:
            link = doi if doi.startswith("doi:") else f"doi:{doi}"
            desc["SourceDatasets"] = [{"DOI": link}]
        elif out.parent.parent == src / "derivatives" or out.parent == src / "derivatives":
            link = Path(os.path.relpath(src, out)).as_posix()
            desc["SourceDatasets"] = [{"URL": link}]
        else:
            desc["SourceDatasets"] = [{"URL": "bids:raw:"}]
    if link:
        desc["DatasetLinks"] = {"raw": link}
    return desc


def _source_doi(input_root: Path) -> str | None:
    """DatasetDOI of the input's dataset_description.json, or None (missing, unreadable, not a string)."""
    try:
        doi = json.loads((input_root / "dataset_description.json").read_text(encoding="utf-8-sig")).get("DatasetDOI")
    except (OSError, ValueError, AttributeError):
        return None
    return doi.strip() if isinstance(doi, str) and doi.strip() else None


def finished_rows(out_root: Path) -> dict[str, list[dict[str, Any]]]:
    """case id -> summary rows of every finished case under ``out_root`` (its done-marker), whichever
    process wrote it; hidden folders (staging, replaced) are not searched. Rows of markers written
    before the BIDS columns existed get them (case_entities; no warnings)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in case_markers(out_root):
        marker = read_marker(path)
        if marker and isinstance(marker.get("case"), str) and isinstance(marker.get("rows"), list):
            found[marker["case"]] = [{**case_entities(marker["case"]), "warnings": "", **r}
                                     for r in marker["rows"] if isinstance(r, dict)]
    return found


def case_markers(out_root: Path) -> list[Path]:
    """Every done-marker under ``out_root`` (a plain case folder's MARKER, a BIDS series'
    ``.<prefix>.perfusion-done.json``), sorted; hidden folders are not searched."""
    found = []
    for dirpath, dirnames, filenames in os.walk(out_root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in filenames if is_marker(f)]
    return sorted(found)


def bidsignore(out_root: Path) -> str:
    """OUT_DIR's .bidsignore: BIDSIGNORE (every case's files lie in its session's ``perf/`` folder, as
    the raw data's series do: no case folder to hide)."""
    return BIDSIGNORE


def write_summary(out_root: Path, batch: BatchResult, *, layout: str, params: dict[str, Any],
                  input_root: Path | None = None) -> dict[str, Path]:
    """summary.tsv, summary.json, index.html (and dataset_description.json and .bidsignore in BIDS layout)
    at the top of ``out_root``, each whole or not at all (io.atomic_write; OutputError naming the file).

    The summary holds every finished case found in ``out_root`` (finished_rows), this batch's results
    replacing them: processes running disjoint cases into one OUT_DIR (an array job) each rebuild it
    under a lock (``.summary.lock``), so the last one to finish writes every case."""
    import fcntl

    lock = os.open(Path(out_root) / ".summary.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a few ms per writer: wait for it
        by_case = finished_rows(out_root) | {c.case_id: c.rows for c in batch.cases}
        return _write_top_files(out_root, by_case, layout=layout, params=params, input_root=input_root)
    finally:
        os.close(lock)


def _write_top_files(out_root: Path, by_case: dict[str, list[dict[str, Any]]], *, layout: str,
                     params: dict[str, Any], input_root: Path | None) -> dict[str, Path]:
    """The top files of ``out_root`` from every case's rows (case id -> rows)."""
    rows = [{k: r.get(k) for k in COLUMNS} for case in sorted(by_case) for r in by_case[case]]
    tsv = "\t".join(COLUMNS) + "\n" + "".join("\t".join(_fmt(r[k]) for k in COLUMNS) + "\n" for r in rows)
    n_failed = sum(1 for rs in by_case.values() if any(r.get("status") != "ok" for r in rs))
    summary = {"software": {"name": "perfusion", "version": __version__}, "created_utc": _now(),
               "disclaimer": DISCLAIMER, "layout": layout, "parameters": params,
               "paths": "relative to the input folder (report links: to this folder); no absolute path is written",
               "n_cases": len(by_case), "n_failed": n_failed,
               "units": {"rcbv_median": "ratio", "rcbv_ci_low": "ratio", "rcbv_ci_high": "ratio", "ftb_low": "fraction",
                         "ftb_mid": "fraction", "ftb_high": "fraction", "mixed": "boolean", "seconds": "s"},
               "rows": rows}
    files = {"summary.tsv": tsv, "summary.json": dumps_json(summary) + "\n", "index.html": index_html(summary)}
    if layout == "bids":
        files["dataset_description.json"] = dumps_json(dataset_description(out_root, input_root)) + "\n"
        files[".bidsignore"] = bidsignore(out_root)
    return {name: atomic_write(out_root / name, text) for name, text in files.items()}


def index_html(summary: dict) -> str:
    """One page linking every case's report (relative links), with participant, session, status,
    verdicts and warnings; escaped."""
    import html

    def e(x: Any) -> str:
        return html.escape("" if x is None else str(x), quote=True)

    body = []
    for r in summary["rows"]:
        link = f'<a href="{e(r["report"])}">report</a>' if r.get("report") and r["status"] == "ok" else ""
        rc = r.get("rcbv_median")
        body.append(f'<tr class="{e(r["status"])}"><td>{e(r.get("participant_id"))}</td><td>{e(r.get("session_id"))}'
                    f'</td><td>{e(r["case"])}</td><td>{e(r["roi"])}</td>'
                    f'<td>{e(r["status"])}</td><td>{"" if rc is None else f"{rc:.2f}"}</td>'
                    f'<td>{e(VERDICT_WORDS.get(r.get("verdict") or "", r.get("verdict") or ""))}</td>'
                    f'<td>{link}</td><td class="warn">{e(r.get("warnings") or "")}</td>'
                    f'<td>{e(r.get("error") or "")}</td></tr>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>perfusion batch</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}"
            ".failed td{background:#fff3f3}td.warn{color:#8a4b00;font-size:90%}"
            ".disclaimer{border:3px solid #b71c1c;padding:.5em;font-weight:bold}"
            "</style></head><body>\n"
            f"<h1>perfusion batch</h1><div class=\"disclaimer\">{e(DISCLAIMER)}</div>"
            f"<p>{e(summary['layout'])} layout; {summary['n_cases']} cases, "
            f"{summary['n_failed']} failed; perfusion {e(__version__)}, {e(summary['created_utc'])}.</p>"
            "<table><tr><th>participant</th><th>session</th><th>case</th><th>ROI</th><th>status</th>"
            "<th>median rCBV</th><th>verdict</th><th>report</th><th>warnings</th><th>error</th></tr>"
            + "".join(body) + "</table></body></html>\n")
