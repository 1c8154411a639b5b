"""Case discovery for ``perfusion batch``: walk an input folder and list its cases.

Only directory listings are read: no image data, no JSON content (a sidecar is only looked for), and
nothing is written. ``discover`` returns the layout used and the cases sorted by ``case_id``. A case
that cannot run (two DSC candidates, two brain masks, ...) is still returned, with a one-line
``problem`` naming the file and the fix; only a root that is missing, not a folder or without any
case raises ``InputError``.

BIDS layout (``layout="bids"``, or ``"auto"`` when the root holds ``dataset_description.json`` or a
``sub-*`` folder)
    One case per ``sub-<label>/[ses-<label>/]perf/*_dsc.nii.gz`` (or ``.nii``). ``case_id`` and the
    output ``prefix`` are the file name without ``_dsc.nii.gz`` (``sub-01_ses-02_run-1``); the outputs
    go to ``sub-01/ses-02/perf`` (``sub-01/perf`` without sessions) under OUT_DIR, as BIDS derivatives
    mirror the raw tree: every run, echo or acquisition of a session shares that folder, each file
    carrying its case's full prefix (``bids_out_rel``; the done-markers are per case). A name part that
    is not ``key-value`` (letters and digits) is the case's problem. The sidecar is the
    ``.json`` twin of the series (a missing one is not a problem: TE/TR can be given as options). The
    file name's ``sub-`` / ``ses-`` must agree with the folders it lies in.

    Multi-echo runs: files of one perf folder whose names differ only in the ``echo-<index>`` entity
    (``sub-01_run-1_echo-1_dsc.nii.gz``, ``sub-01_run-1_echo-2_dsc.nii.gz``) are ONE case
    (``Case.echoes``, ordered by echo index; ``dsc`` is the first); its ``case_id``, ``prefix`` and
    output prefix are the name without the echo entity (``sub-01_run-1``, in ``sub-01/perf``). Echo
    indices need not be consecutive; runs, sessions or acquisitions never mix. Two files of one echo
    index (``.nii`` and ``.nii.gz``) are the case's problem. A lone ``echo-`` file is a case as any
    other (its name keeps the entity). A mask carrying ``echo-`` applies to a multi-echo case when
    that index is one of its echoes.

    Masks come from every folder under ``ROOT/derivatives/`` (or the ``derivatives`` argument, which
    may lie outside the root, and then replaces it), at any depth, named
    ``sub-<label>[_ses-<label>][_<entity>-<value>...]_label-<name>[_desc-<value>]_mask.nii.gz``
    (or ``.nii``): label ``brain`` is the brain mask, ``nawm`` the reference (normal-appearing white
    matter), ``aif`` the arterial mask, any other label a lesion ROI (``tumor``, ``edema``, ...).
    A mask applies to a DSC series when every raw-data entity it carries (``sub``, ``ses``, ``task``,
    ``acq``, ``ce``, ``rec``, ``dir``, ``run``, ``echo``, ``part``) has the DSC file's value. So a mask
    without ``ses-`` applies to every session of its subject, one without ``run-`` to every run, and a
    mask with an entity the DSC file lacks (``ses-01`` for a session-less series) applies to none.
    Derivative entities (``space``, ``desc``, ``res``, ...) and the folder a mask lies in are not
    compared: two brain, nawm or aif masks for one case make that case's ``problem``. Case folders
    written by ``perfusion batch`` (holding its done-marker) are not searched.

plain layout (``layout="plain"``, or ``"auto"`` otherwise)
    Every direct sub-folder of the root holding a ``.nii`` / ``.nii.gz`` file is a case; its name is
    the ``case_id`` and the output folder. In it, by file name (case-insensitive, ``.nii`` or
    ``.nii.gz``):

    ====================  ==========================================
    ``roi-<name>``        a lesion ROI (any number; ROI name = file name without extension)
    ``mask-brain``        the brain mask
    ``mask-reference``    the reference (normal-appearing white matter) mask
    ``mask-aif``          the arterial mask
    ``mask-vein``, ``-vof`` a venous mask: noted, not used
    ``mask-<other>``      a problem: unknown mask kind
    anything else         the DSC series: exactly one such file, else a problem
    ``dicom/`` folder     the DSC series as DICOM files, instead of a NIfTI (masks on the grid that
                          ``perfusion convert`` gives)
    ====================  ==========================================

    The sidecar is the series' ``.json`` twin. Sub-folders without a NIfTI file are skipped.

Mask patterns (``roi_globs``, ``brain_glob``, ``reference_glob``, ``aif_glob``) replace the search
above for their kind of mask. They are glob patterns (``*``, ``?``, ``[...]``, ``**`` for any depth)
relative to the root (BIDS) or to the case folder (plain), with placeholders filled per case: BIDS
``{sub}``, ``{ses}``, ``{task}``, ``{acq}``, ``{run}`` (labels without ``sub-`` etc.) and ``{case}``;
plain ``{case}``. Only NIfTI matches count, the case's own series excluded. A placeholder the case
has no value for (``{ses}`` without sessions) is that case's problem; a pattern that matches
nothing is a note (``Case.notes``), and so is a case without a lesion ROI (maps only, no verdict).
A brain, reference or AIF pattern matching several files is a problem.

Anatomical image (``Case.anat``, what ``analyze --anat`` takes): ``anat_glob`` (a pattern as above, both
layouts; several matches are a problem), else in BIDS the ``*_T1w.nii[.gz]`` of the case's
``sub-<label>/[ses-<label>/]anat/`` folder (of several, those with a ``ce-`` entity; still several: a
note, none used). Plain layout without the pattern: none.

JSON sidecars of BIDS series are inherited as BIDS says (io.series.inherited_sidecars: a top-level
``dsc.json`` applies to every series, a more specific file overrides); the series reader merges them.

Never walked, in both layouts: names starting with ``.``, ``derivatives/`` and ``sourcedata/`` (and
``code/``, ``stimuli/`` in BIDS) as cases, and symlinks (files or folders) whose target lies outside
the root (or outside the ``derivatives`` folder given, for masks found there); each such link is
skipped with a warning. Symlinks inside the root are followed, loops are not. A symlink whose target
is missing (a git-annex / DataLad file not fetched) is listed and makes its case's ``problem``.
Case ids equal up to letter case (one output folder on macOS and Windows) are a problem for both
cases; ids are never renamed.
"""

from __future__ import annotations

import fnmatch
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

from perfusion.errors import InputError, UsageError
from perfusion.io import sidecar_path_for, stem

LAYOUTS = ("auto", "bids", "plain")

#: Folder names never taken as cases (besides hidden names).
BIDS_SKIP = frozenset({"derivatives", "sourcedata", "code", "stimuli"})
PLAIN_SKIP = frozenset({"derivatives", "sourcedata"})

#: Entities of raw BIDS file names: a derivatives mask carrying one must have the DSC file's value.
RAW_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "part")

#: A folder holding this file, or a BIDS case's ``.<prefix>.perfusion-done.json`` (marker_name), holds
#: cases written by ``perfusion batch`` (their done-markers): never searched for masks, though its copies
#: of the ROI masks carry BIDS mask names (a batch writing into INPUT/derivatives/ would otherwise find
#: its own outputs on the next run).
OUTPUT_MARKER = ".perfusion-done.json"

#: BIDS mask labels with a fixed role; every other label is a lesion ROI, except those below.
BIDS_LABELS = {"brain": "brain", "nawm": "reference", "aif": "aif"}

#: BIDS mask labels of tissue classes and vessels (BIDS common derivatives and segmentation tools):
#: never a lesion, so not scored as one (a WM mask would get an rCBV near 1 and a verdict); a note.
BIDS_IGNORED = {"gm": "grey matter", "wm": "white matter", "csf": "cerebrospinal fluid", "head": "the head",
                "bg": "background", "background": "background", "vein": "a venous mask", "vof": "a venous mask"}

#: Plain layout: a case folder's sub-folder of this name (any letter case) holds the DSC series as DICOM
#: files (converted by perfusion.io.dicom); masks then lie on the converted grid (``perfusion convert``).
DICOM_FOLDER = "dicom"

#: Plain-layout mask file names (without extension, lower case) and their role.
PLAIN_MASKS = {"mask-brain": "brain", "mask-reference": "reference", "mask-aif": "aif"}

#: Plain-layout masks that are recognised but not used by a batch (a note, not a problem): the venous
#: mask that ``perfusion phantom`` writes, so a phantom folder is a valid case as it is.
PLAIN_IGNORED = {"mask-vein": "venous mask", "mask-vof": "venous mask"}

PLACEHOLDERS = {"bids": ("sub", "ses", "task", "acq", "run", "case"), "plain": ("case",)}

KINDS = ("roi", "brain", "reference", "aif")
_KIND_TEXT = {"roi": "lesion ROI", "brain": "brain", "reference": "reference", "aif": "AIF"}
_DSC_SUFFIXES = ("_dsc.nii.gz", "_dsc.nii")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Case:
    """One DSC series and its masks, as found on disk; paths are absolute (symlinks not resolved)."""

    case_id: str  # unique, file-name safe: "sub-01_ses-02" (BIDS) or the case folder's name (plain)
    dsc: Path | None  # the 4-D DSC NIfTI; None when `problem` says why
    rois: tuple[Path, ...] = ()  # lesion masks, sorted; the ROI name is the file name without extension
    brain: Path | None = None  # brain mask
    reference: Path | None = None  # normal-appearing white matter mask (BIDS label "nawm")
    aif: Path | None = None  # arterial mask
    out_rel: Path = Path()  # output folder relative to OUT_DIR: "sub-01/ses-02/perf" or the case folder name
    prefix: str | None = None  # BIDS output file-name prefix ("sub-01_ses-02_run-1"); None in plain mode
    problem: str | None = None  # why the case cannot run: one line naming the file and the fix
    sidecar: Path | None = None  # the DSC file's JSON twin, when present
    notes: tuple[str, ...] = ()  # things worth knowing that do not stop the case (no ROI, empty pattern)
    echoes: tuple[Path, ...] = ()  # a multi-echo run: every echo's file by echo index (dsc is the first); else ()
    echo_sidecars: tuple[Path, ...] = ()  # the echoes' JSON twins that are present
    anat: Path | None = None  # anatomical image (post-contrast T1) for registration and figures (analyze --anat)

    @property
    def series_paths(self) -> list[Path]:
        """The series file(s) to analyse: the echoes of a multi-echo run, else [dsc]."""
        return list(self.echoes) if self.echoes else ([self.dsc] if self.dsc is not None else [])


def discover(root: Path, *, layout: str = "auto", derivatives: Path | None = None,
             roi_globs: tuple[str, ...] = (), brain_glob: str | None = None, reference_glob: str | None = None,
             aif_glob: str | None = None, anat_glob: str | None = None) -> tuple[str, list[Case]]:
    """Return (layout used: "bids" or "plain", cases sorted by case_id); see the module docstring.

    InputError when ``root`` is missing, not a folder or holds no case, or ``derivatives`` is not a
    folder; UsageError for an unknown layout, a malformed pattern, or ``derivatives`` with the plain
    layout. Warns (``warnings.warn``, once each, when discovery ends) for every symlink skipped because
    it points outside the root and every folder below the root that cannot be listed.
    """
    if layout not in LAYOUTS:
        raise UsageError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if isinstance(roi_globs, str):  # one pattern given bare, not as a tuple
        roi_globs = (roi_globs,)
    given = Path(root)
    if not given.exists():
        raise InputError(f"{given}: input folder not found; check the path")
    if not given.is_dir():
        raise InputError(f"{given}: is not a folder; give the dataset folder (BIDS, or one sub-folder per case)")
    root_abs = given.absolute()
    bases = _Bounds(os.path.realpath(root_abs))
    try:
        return _discover(given, root_abs, bases, layout=layout, derivatives=derivatives, patterns={
            "roi": tuple(roi_globs), "brain": _opt(brain_glob), "reference": _opt(reference_glob),
            "aif": _opt(aif_glob), "anat": _opt(anat_glob)})
    finally:  # each skipped link or unreadable folder once, also when no case was found
        for message in bases.messages:
            warnings.warn(message, stacklevel=2)


def _discover(given: Path, root_abs: Path, bases: _Bounds, *, layout: str, derivatives: Path | None,
              patterns: dict[str, tuple[str, ...]]) -> tuple[str, list[Case]]:
    try:
        top = _scan(root_abs, bases)
    except OSError as exc:
        raise InputError(f"{given}: cannot list the folder ({exc.strerror}); check its permissions") from None

    if layout == "auto":
        is_bids = os.path.lexists(root_abs / "dataset_description.json") or any(
            e.is_dir and e.name.startswith("sub-") for e in top)
        layout = "bids" if is_bids else "plain"

    for kind, pats in patterns.items():
        for pattern in pats:
            _check_pattern(pattern, layout=layout, kind=kind)

    if layout == "bids":
        cases = _discover_bids(given, root_abs, top, bases, derivatives, patterns)
    else:
        if derivatives is not None:
            raise UsageError(f"{derivatives}: a derivatives folder applies to the BIDS layout only; "
                             "leave it out or use the BIDS layout")
        cases = _discover_plain(given, top, bases, patterns)
    return layout, _flag_duplicates(cases)


# ------------------------------------------------------------------------------------------ BIDS


def _discover_bids(given: Path, root: Path, top: list[_Entry], bases: _Bounds,
                   derivatives: Path | None, patterns: dict[str, tuple[str, ...]]) -> list[Case]:
    mask_bases = bases
    deriv_top: Path | None = None
    if derivatives is not None:
        deriv = Path(derivatives)
        if not deriv.is_dir():
            raise InputError(f"{deriv}: derivatives folder not found; check the path or leave it out")
        deriv_top = deriv.absolute()
        mask_bases = bases.widen(os.path.realpath(deriv_top))
    else:
        deriv_top = next((e.path for e in top if e.is_dir and e.name == "derivatives"), None)
    index: list[_Mask] = []
    if deriv_top is not None and not all(patterns[k] for k in KINDS):
        index = _index_masks(deriv_top, mask_bases)

    cases: list[Case] = []
    for sub in top:
        if not (sub.is_dir and sub.name.startswith("sub-")) or sub.name in BIDS_SKIP:
            continue
        perf_dirs: list[tuple[Path, str | None]] = []
        listed = _scan_or_case(sub.path, bases, case_id=sub.name, out_rel=Path(sub.name), cases=cases)
        for entry in listed or ():
            if entry.is_dir and entry.name == "perf":
                perf_dirs.append((entry.path, None))
            elif entry.is_dir and entry.name.startswith("ses-"):
                ses_id = f"{sub.name}_{entry.name}"
                for inner in _scan_or_case(entry.path, bases, case_id=ses_id, out_rel=Path(sub.name, entry.name),
                                           cases=cases) or ():
                    if inner.is_dir and inner.name == "perf":
                        perf_dirs.append((inner.path, entry.name))
        for perf, ses_name in perf_dirs:
            perf_rel = Path(sub.name, ses_name, "perf") if ses_name else Path(sub.name, "perf")
            case_id = f"{sub.name}_{ses_name}" if ses_name else sub.name
            files = _scan_or_case(perf, bases, case_id=case_id, out_rel=perf_rel, cases=cases)
            by_name = {f.name: f for f in files or ()}
            dscs = [f for f in files or () if (f.is_file or f.broken) and f.name.endswith(_DSC_SUFFIXES)]
            for group in _group_echoes(dscs):
                cases.append(_bids_case(group, sub.name, ses_name, by_name, root, bases, index, patterns))
    if not cases:
        raise InputError(f"{given}: no DSC series found (looked for sub-*/[ses-*/]perf/*_dsc.nii[.gz]); "
                         "check the dataset, or use the plain layout (one sub-folder per case)")
    return cases


def _dsc_prefix(name: str) -> str:
    return next(name[: -len(s)] for s in _DSC_SUFFIXES if name.endswith(s))


def _echo_key(prefix: str) -> tuple[str, str | None]:
    """(the name without its ``echo-`` part, the echo index or None)."""
    parts = prefix.split("_")
    echo = [p for p in parts if p.startswith("echo-")]
    if len(echo) != 1 or not _ENTITY_PART.fullmatch(echo[0]):
        return prefix, None
    return "_".join(p for p in parts if p != echo[0]), echo[0][5:]


def _echo_order(index: str) -> tuple[int, int | str]:
    return (0, int(index)) if index.isdigit() else (1, index)


def _group_echoes(dscs: list[_Entry]) -> list[list[_Entry]]:
    """The DSC files of one perf folder as cases: files that differ only in ``echo-`` form one group,
    ordered by echo index; every other file is a group of its own."""
    groups: dict[str, list[tuple[str, _Entry]]] = {}
    singles: list[list[_Entry]] = []
    for f in dscs:
        key, echo = _echo_key(_dsc_prefix(f.name))
        if echo is None:
            singles.append([f])
        else:
            groups.setdefault(key, []).append((echo, f))
    out = singles
    for members in groups.values():
        out.append([f for _, f in sorted(members, key=lambda m: (_echo_order(m[0]), m[1].name))])
    return out


def _bids_case(group: list[_Entry], sub_name: str, ses_name: str | None, by_name: dict[str, _Entry], root: Path,
               bases: _Bounds, index: list[_Mask], patterns: dict[str, tuple[str, ...]]) -> Case:
    f = group[0]
    prefix = _dsc_prefix(f.name)
    echo_values: frozenset[str] = frozenset()
    problems: list[str] = []
    if len(group) > 1:  # a multi-echo run: named without its echo entity
        prefix, _ = _echo_key(prefix)
        indices = [_echo_key(_dsc_prefix(g.name))[1] for g in group]
        echo_values = frozenset(i for i in indices if i is not None)  # all set: _group_echoes groups echo- files
        for a, b in pairwise(group):
            if _echo_key(_dsc_prefix(a.name))[1] == _echo_key(_dsc_prefix(b.name))[1]:
                problems.append(f"{b.path}: echo {_echo_key(_dsc_prefix(b.name))[1]} is also {a.name}; keep one file "
                                "per echo")
    ents = _entities(prefix.split("_"))
    out_rel, problem = bids_out_rel(prefix, sub_name, ses_name)
    if problem:
        problems.append(f"{f.path}: {problem}")
    if ents.get("sub") != sub_name[4:]:
        problems.append(f"{f.path}: the file name's subject ({_ent_text(ents, 'sub')}) differs from its folder "
                        f"{sub_name}; rename or move the file")
    ses_label = ses_name[4:] if ses_name else None
    if ents.get("ses") != ses_label:
        problems.append(f"{f.path}: the file name's session ({_ent_text(ents, 'ses')}) differs from its folder "
                        f"({ses_name or 'no ses- folder'}); rename or move the file")
    sidecar_entries = [by_name.get(sidecar_path_for(g.path).name) for g in group]
    sidecars = [sc.path if sc is not None and sc.is_file else None for sc in sidecar_entries]
    values = {k: ents.get(k) for k in PLACEHOLDERS["bids"]} | {"case": prefix}
    found: dict[str, list[_Entry]] = {}
    notes: list[str] = []
    own = {g.path for g in group}
    for kind in KINDS:
        if patterns[kind]:
            found[kind] = [e for e in _match_patterns(patterns[kind], root, values, bases, exclude=f.path, kind=kind,
                                                      case_id=prefix, problems=problems, notes=notes)
                           if e.path not in own]
        else:
            found[kind] = [m.entry for m in index if m.kind == kind and m.applies_to(ents, echo_values)]
    if not patterns["roi"]:
        for m in index:
            if m.kind == "ignored" and m.applies_to(ents, echo_values):
                label = m.entities["label"]
                notes.append(f"{m.entry.path}: label {label} is {BIDS_IGNORED[label.lower()]}, "
                             "not a lesion: not used by batch (lesions: label-<name>; reference: label-nawm)")
    if not found["roi"] and not patterns["roi"]:
        notes.append(f"{prefix}: no lesion mask (derivatives *_label-<name>_mask.nii.gz) found: maps only, no verdict")
    anat = _bids_anat(root, sub_name, ses_name, values, bases, patterns["anat"], prefix, problems, notes)
    case = replace(_assemble(prefix, f, sidecars[0], found, problems, notes, out_rel=out_rel, prefix=prefix),
                   anat=anat)
    if len(group) == 1:
        return case
    for g in group[1:]:
        if g.broken:
            problems.append(_broken(g.path, "DSC series (echo)"))
    problem = "; ".join(problems) or None  # _assemble added its own to ``problems``
    return replace(case, echoes=tuple(g.path for g in group), echo_sidecars=tuple(p for p in sidecars if p),
                   problem=problem)


_ENTITY_PART = re.compile(r"[A-Za-z0-9]+-[A-Za-z0-9]+")


def bids_out_rel(prefix: str, sub_name: str, ses_name: str | None) -> tuple[Path, str | None]:
    """Output folder (relative to OUT_DIR) of the BIDS series ``<prefix>_dsc.nii.gz`` and a problem or None.

    ``sub-01/[ses-1/]perf``, as the BIDS derivatives layout mirrors the raw tree: every run, echo or
    acquisition of a session shares that folder, its files told apart by their full entity prefix
    (``sub-01_ses-1_run-2_cbv.nii.gz``); each case's done-marker, lock and staging folder are its own
    (batch.engine: ``.<prefix>.perfusion-done.json``, ...). A name part that is not ``key-value``
    (letters and digits) is a problem: it could not be told apart from the outputs' own entities."""
    base = Path(sub_name, ses_name) if ses_name else Path(sub_name)
    rest = [p for p in prefix.split("_") if p.partition("-")[0] not in ("sub", "ses")]
    bad = [p for p in rest if not _ENTITY_PART.fullmatch(p)]
    if bad:
        return base / "perf", (f"{bad[0]!r} in the file name is not a BIDS entity (key-value, letters and digits); "
                               "rename the file (e.g. sub-01_run-1_dsc.nii.gz)")
    return base / "perf", None


def marker_name(prefix: str | None) -> str:
    """File name of a case's done-marker in its output folder: OUTPUT_MARKER for a case with a folder of
    its own (plain layout), ``.<prefix>.perfusion-done.json`` for a BIDS series, whose folder
    (``sub-01/ses-1/perf``) holds every run of the session."""
    return OUTPUT_MARKER if not prefix else f".{prefix}{OUTPUT_MARKER}"


def is_marker(name: str) -> bool:
    """True for a done-marker's file name (marker_name of any case)."""
    return name == OUTPUT_MARKER or (name.startswith(".") and name.endswith(OUTPUT_MARKER) and len(name) > 1
                                     + len(OUTPUT_MARKER))


def holds_output(folder: str | Path) -> bool:
    """True when ``folder`` holds a done-marker: a case folder written by ``perfusion batch``."""
    try:
        with os.scandir(folder) as it:
            return any(is_marker(e.name) for e in it)
    except OSError:
        return False


@dataclass(frozen=True)
class _Mask:
    entry: _Entry
    entities: dict[str, str]
    kind: str

    def applies_to(self, dsc_entities: dict[str, str], echoes: frozenset[str] = frozenset()) -> bool:
        """Every raw entity of the mask has the series' value; ``echo-`` may be any of a multi-echo
        run's ``echoes``."""
        return all(dsc_entities.get(k) == v or (k == "echo" and v in echoes)
                   for k, v in self.entities.items() if k in RAW_ENTITIES)


def _index_masks(top: Path, bases: _Bounds) -> list[_Mask]:
    """Every ``*_label-<name>_mask.nii[.gz]`` with a ``sub-`` entity under ``top``, sorted by path."""
    masks = []
    for entry in _walk_files(top, bases):
        name = _nifti_stem(entry.name)
        if name is None:
            continue
        parts = name.split("_")
        if parts[-1] != "mask":
            continue
        ents = _entities(parts[:-1])
        if "sub" not in ents or not ents.get("label"):
            continue
        label = ents["label"].lower()
        masks.append(_Mask(entry, ents, "ignored" if label in BIDS_IGNORED else BIDS_LABELS.get(label, "roi")))
    return masks


def _entities(parts: list[str]) -> dict[str, str]:
    """``key-value`` parts of a BIDS file name as a dict (first occurrence wins; other parts ignored)."""
    ents: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("-")
        if sep and key.isalnum() and value:
            ents.setdefault(key, value)
    return ents


def _ent_text(ents: dict[str, str], key: str) -> str:
    return f"{key}-{ents[key]}" if key in ents else f"no {key}-"


def _bids_anat(root: Path, sub_name: str, ses_name: str | None, values: Mapping[str, str | None], bases: _Bounds,
               pats: tuple[str, ...], case_id: str, problems: list[str], notes: list[str]) -> Path | None:
    """The case's anatomical image: by ``--anat-glob`` when given, else the ``*_T1w.nii[.gz]`` of its
    session's (or, without sessions, its subject's) ``anat/`` folder; of several, those with a ``ce-``
    entity (post-contrast: what ``--anat`` wants) are preferred; still several is a note (none used)."""
    if pats:
        hits = _match_patterns(pats, root, values, bases, exclude=None, kind="anat", case_id=case_id,
                               problems=problems, notes=notes)
        return _one_anat(hits, case_id, problems)
    folder = root / sub_name / ses_name / "anat" if ses_name else root / sub_name / "anat"
    if not folder.is_dir():
        return None
    t1 = [e for e in _scan_quiet(folder, bases)
          if (e.is_file or e.broken) and (_nifti_stem(e.name) or "").endswith("_T1w")]
    post = [e for e in t1 if "ce" in _entities((_nifti_stem(e.name) or "").split("_"))]
    chosen = post or t1
    if len(chosen) > 1:
        notes.append(f"{case_id}: {len(chosen)} T1w images in {folder}; none used as --anat (choose one with "
                     "--anat-glob)")
        return None
    if chosen and chosen[0].broken:
        problems.append(_broken(chosen[0].path, "anatomical image"))
    return chosen[0].path if chosen else None


def _one_anat(hits: list[_Entry], case_id: str, problems: list[str]) -> Path | None:
    """The one anatomical image an --anat-glob matched; several are a problem."""
    if len(hits) > 1:
        problems.append(f"{len(hits)} anatomical images for {case_id} ({', '.join(str(e.path) for e in hits)}); "
                        "keep one, or narrow --anat-glob")
        return None
    if hits and hits[0].broken:
        problems.append(_broken(hits[0].path, "anatomical image"))
    return hits[0].path if hits else None


# ----------------------------------------------------------------------------------------- plain


def _discover_plain(given: Path, top: list[_Entry], bases: _Bounds,
                    patterns: dict[str, tuple[str, ...]]) -> list[Case]:
    cases: list[Case] = []
    for folder in top:
        if not folder.is_dir or folder.name in PLAIN_SKIP:
            continue
        files = _scan_or_case(folder.path, bases, case_id=folder.name, out_rel=Path(folder.name), cases=cases)
        if files is None:
            continue
        niftis = [f for f in files if (f.is_file or f.broken) and _nifti_stem(f.name) is not None]
        dicom = [f for f in files if f.is_dir and f.name.lower() == DICOM_FOLDER]
        if niftis or dicom:
            cases.append(_plain_case(folder, files, niftis, bases, patterns))
    if not cases:
        if any((e.is_file or e.broken) and _nifti_stem(e.name) is not None for e in top):
            raise InputError(f"{given}: NIfTI files lie directly in it but no sub-folder holds one; put each case "
                             "in its own sub-folder (or run `perfusion analyze` on a single series)")
        raise InputError(f"{given}: no case found (no sub-folder holds a .nii or .nii.gz file or a dicom/ "
                         "folder); give the folder that holds one sub-folder per case, or a BIDS dataset")
    return cases


def _plain_case(folder: _Entry, files: list[_Entry], niftis: list[_Entry], bases: _Bounds,
                patterns: dict[str, tuple[str, ...]]) -> Case:
    case_id = folder.name
    problems: list[str] = []
    notes: list[str] = []
    values = {"case": case_id}
    globbed = {kind: _match_patterns(patterns[kind], folder.path, values, bases, exclude=None, kind=kind,
                                     case_id=case_id, problems=problems, notes=notes)
               for kind in KINDS if patterns[kind]}
    anat_hits = _match_patterns(patterns["anat"], folder.path, values, bases, exclude=None, kind="anat",
                                case_id=case_id, problems=problems, notes=notes) if patterns["anat"] else []
    claimed = {e.path for matches in [*globbed.values(), anat_hits] for e in matches}
    named: dict[str, list[_Entry]] = {kind: [] for kind in KINDS}
    candidates: list[_Entry] = []
    for f in niftis:
        if f.path in claimed:
            continue
        low = (_nifti_stem(f.name) or "").lower()
        if low.startswith("roi-"):
            named["roi"].append(f)
        elif low.startswith("mask-"):
            if low in PLAIN_MASKS:
                named[PLAIN_MASKS[low]].append(f)
            elif low in PLAIN_IGNORED:
                notes.append(f"{f.path}: {PLAIN_IGNORED[low]}, not used by batch")
            else:
                problems.append(f"{f.path}: unknown mask kind; name masks mask-brain, mask-reference or mask-aif, "
                                "and lesions roi-<name>")
        else:
            candidates.append(f)
    dsc = None
    dicom = [f for f in files if f.is_dir and f.name.lower() == DICOM_FOLDER]
    if dicom and candidates:
        problems.insert(0, f"{folder.path}: holds both a dicom/ folder and a 4-D NIfTI ({candidates[0].name}); "
                           "keep one of them")
    elif dicom:
        dsc = dicom[0]
    elif len(candidates) == 1:
        dsc = candidates[0]
    elif not candidates:
        problems.insert(0, f"{folder.path}: no DSC series (a .nii/.nii.gz not named roi-* or mask-*); "
                           "add the 4-D series to the folder")
    else:
        names = ", ".join(c.name for c in candidates)
        problems.insert(0, f"{folder.path}: {len(candidates)} DSC candidates ({names}); keep one 4-D series in "
                           "the folder and name masks roi-<name> or mask-brain/-reference/-aif")
    if dsc is not None:
        # a DSC found by a mask pattern cannot be its own mask
        globbed = {k: [e for e in v if e.path != dsc.path] for k, v in globbed.items()}
    found = {kind: globbed.get(kind, named[kind]) for kind in KINDS}
    if not found["roi"] and not patterns["roi"]:
        notes.append(f"{case_id}: no lesion ROI (roi-<name>.nii.gz): maps only, no verdict")
    sidecar = None
    if dsc is not None and not dsc.is_dir:
        by_name = {f.name: f for f in files}
        sc = by_name.get(sidecar_path_for(dsc.path).name)
        sidecar = sc.path if sc is not None and sc.is_file else None
    anat = _one_anat(anat_hits, case_id, problems)
    case = _assemble(case_id, dsc, sidecar, found, problems, notes, out_rel=Path(case_id), prefix=None)
    return replace(case, anat=anat, problem="; ".join(problems) or None)


# --------------------------------------------------------------------------------------- shared


def _assemble(case_id: str, dsc: _Entry | None, sidecar: Path | None, found: dict[str, list[_Entry]],
              problems: list[str], notes: list[str], *, out_rel: Path, prefix: str | None) -> Case:
    """A Case from the files found, adding the problems the masks make (duplicates, broken links)."""
    if dsc is not None and dsc.broken:
        problems.append(_broken(dsc.path, "DSC series"))
    for kind in KINDS:
        for e in found[kind]:
            if e.broken:
                problems.append(_broken(e.path, f"{_KIND_TEXT[kind]} mask"))
    single: dict[str, Path | None] = {}
    for kind in ("brain", "reference", "aif"):
        paths = sorted({e.path for e in found[kind]})
        if len(paths) > 1:
            problems.append(f"{len(paths)} {_KIND_TEXT[kind]} masks for {case_id} ({', '.join(map(str, paths))}); "
                            "keep one, or choose it with a mask pattern")
        single[kind] = paths[0] if len(paths) == 1 else None
    rois = sorted({e.path for e in found["roi"]})
    by_stem: dict[str, list[Path]] = {}
    for p in rois:
        by_stem.setdefault(stem(p), []).append(p)
    for name, paths in by_stem.items():
        if len(paths) > 1:
            problems.append(f"{' and '.join(map(str, paths))}: two ROIs named {name!r}; rename one "
                            "(the ROI name is the file name)")
    return Case(case_id=case_id, dsc=dsc.path if dsc is not None else None, rois=tuple(rois),
                brain=single["brain"], reference=single["reference"], aif=single["aif"], out_rel=out_rel,
                prefix=prefix, problem="; ".join(problems) or None, sidecar=sidecar, notes=tuple(notes))


def _broken(path: Path, what: str) -> str:
    return (f"{path}: {what} is a symlink to a missing file (e.g. DataLad/git-annex content not fetched); "
            "fetch or restore the file")


def _flag_duplicates(cases: list[Case]) -> list[Case]:
    """Sort by case_id; ids equal up to letter case get a problem each (never renamed)."""
    cases = sorted(cases, key=lambda c: (c.case_id, str(c.dsc or c.out_rel)))
    groups: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(case.case_id.casefold(), []).append(i)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        where = [str(cases[i].dsc or cases[i].out_rel) for i in idx]
        for i in idx:
            others = ", ".join(w for j, w in zip(idx, where, strict=True) if j != i)
            msg = (f"{where[idx.index(i)]}: case id {cases[i].case_id!r} is also that of {others}; "
                   "rename or remove one so each case has its own id")
            problem = f"{cases[i].problem}; {msg}" if cases[i].problem else msg
            cases[i] = replace(cases[i], problem=problem)
    return cases


def _opt(pattern: str | None) -> tuple[str, ...]:
    return (pattern,) if pattern else ()


def _nifti_stem(name: str) -> str | None:
    """The name without ``.nii`` / ``.nii.gz``, or None for another file."""
    return stem(Path(name)) if name.endswith((".nii", ".nii.gz")) else None


# ------------------------------------------------------------------------------ file-system walk


@dataclass(frozen=True)
class _Entry:
    path: Path
    is_dir: bool
    is_file: bool
    broken: bool  # a symlink whose target does not exist

    @property
    def name(self) -> str:
        return self.path.name


class _Bounds:
    """The real folders symlinks may point into, and the warnings to give once discovery ends
    (shared by widened copies, each message once)."""

    def __init__(self, *reals: str, messages: dict[str, None] | None = None):
        self.reals = reals
        self.messages: dict[str, None] = {} if messages is None else messages

    def widen(self, real: str) -> _Bounds:
        return _Bounds(*self.reals, real, messages=self.messages)

    def allows(self, real: str) -> bool:
        return any(real == b or real.startswith(b.rstrip(os.sep) + os.sep) for b in self.reals)

    def warn(self, message: str) -> None:
        self.messages.setdefault(message, None)


def _scan(folder: Path, bases: _Bounds, *, hidden: bool = False) -> list[_Entry]:
    """Entries of ``folder`` sorted by name, without hidden names (unless ``hidden``) and without
    symlinks whose target lies outside ``bases`` (warned). OSError when the folder cannot be listed."""
    with os.scandir(folder) as it:
        raw = sorted(it, key=lambda e: e.name)
    entries = []
    for e in raw:
        if e.name.startswith(".") and not hidden:
            continue
        path = folder / e.name
        broken = False
        if e.is_symlink():
            real = os.path.realpath(path)
            if not bases.allows(real):
                bases.warn(f"{path}: symlink to {real}, outside {bases.reals[0]}; skipped (move the target into "
                           "the dataset, or give the folder it lies in)")
                continue
            broken = not os.path.exists(real)
        try:
            is_dir, is_file = e.is_dir(), e.is_file()
        except OSError:
            is_dir = is_file = False
        entries.append(_Entry(path, is_dir, is_file, broken))
    return entries


def _scan_or_case(folder: Path, bases: _Bounds, *, case_id: str, out_rel: Path,
                  cases: list[Case]) -> list[_Entry] | None:
    """``_scan``, or None after appending a case whose problem says the folder cannot be listed."""
    try:
        return _scan(folder, bases)
    except OSError as exc:
        cases.append(Case(case_id=case_id, dsc=None, out_rel=out_rel,
                          problem=f"{folder}: cannot list the folder ({exc.strerror}); check its permissions"))
        return None


def _scan_quiet(folder: Path, bases: _Bounds, *, hidden: bool = False) -> list[_Entry]:
    try:
        return _scan(folder, bases, hidden=hidden)
    except OSError as exc:
        bases.warn(f"{folder}: cannot list the folder ({exc.strerror}); files in it are not used")
        return []


def _walk_files(top: Path, bases: _Bounds) -> list[_Entry]:
    """Files (and broken links) under ``top`` at any depth, sorted by path; loops visited once."""
    files: list[_Entry] = []
    seen: set[str] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen or holds_output(folder):
            continue
        seen.add(real)
        for e in _scan_quiet(folder, bases):
            if e.is_dir:
                stack.append(e.path)
            elif e.is_file or e.broken:
                files.append(e)
    return sorted(files, key=lambda e: str(e.path))


def _glob(base: Path, pattern: str, bases: _Bounds) -> list[_Entry]:
    """Files matching ``pattern`` (``/``-separated, relative to ``base``) by the walk rules of ``_scan``;
    a component starting with ``.`` is needed to match hidden names, ``**`` matches any depth."""
    parts = [p for p in pattern.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if parts and parts[-1] == "**":
        parts.append("*")
    folders = [base]
    hits: list[_Entry] = []  # files the last part matches
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            folders = _all_dirs(folders, bases)
            continue
        nxt: list[Path] = []
        for folder in folders:
            for e in _scan_quiet(folder, bases, hidden=part.startswith(".")):
                if not fnmatch.fnmatchcase(e.name, part):
                    continue
                if last and (e.is_file or e.broken):
                    hits.append(e)
                elif not last and e.is_dir:
                    nxt.append(e.path)
        folders = nxt
    unique = {e.path: e for e in hits}
    return [unique[p] for p in sorted(unique)]


def _all_dirs(starts: list[Path], bases: _Bounds) -> list[Path]:
    """``starts`` and every folder below them, each real folder once."""
    out, seen, stack = [], set(), list(reversed(starts))
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        out.append(folder)
        stack.extend(reversed([e.path for e in _scan_quiet(folder, bases) if e.is_dir]))
    return out


# -------------------------------------------------------------------------------------- patterns


def _check_pattern(pattern: str, *, layout: str, kind: str) -> None:
    known = PLACEHOLDERS[layout]
    where = "the input folder" if layout == "bids" else "the case folder"
    if not isinstance(pattern, str) or not pattern.strip():
        raise UsageError(f"{kind} mask pattern {pattern!r}: empty; give a glob pattern relative to {where}")
    if os.path.isabs(pattern) or pattern.startswith(("/", "\\")):
        raise UsageError(f"{kind} mask pattern {pattern!r}: must be relative to {where}; drop the leading /")
    if ".." in pattern.replace("\\", "/").split("/"):
        raise UsageError(f"{kind} mask pattern {pattern!r}: '..' is not allowed; write it relative to {where}")
    for name in _PLACEHOLDER.findall(pattern):
        if name not in known:
            allowed = ", ".join("{" + k + "}" for k in known)
            raise UsageError(f"{kind} mask pattern {pattern!r}: unknown placeholder {{{name}}} for the {layout} "
                             f"layout; use {allowed}")


def _match_patterns(pats: tuple[str, ...], base: Path, values: Mapping[str, str | None], bases: _Bounds, *,
                    exclude: Path | None, kind: str, case_id: str, problems: list[str],
                    notes: list[str]) -> list[_Entry]:
    """NIfTI files matched by any of ``pats`` after filling the placeholders from ``values``."""
    matched: dict[Path, _Entry] = {}
    for pattern in pats:
        missing = [n for n in _PLACEHOLDER.findall(pattern) if not values.get(n)]
        if missing:
            problems.append(f"{base}: {kind} mask pattern {pattern!r} needs {{{missing[0]}}}, which {case_id} lacks; "
                            "give a pattern without it for such cases")
            continue
        filled = _PLACEHOLDER.sub(lambda m: _glob_escape(values[m.group(1)] or ""), pattern)
        hits = [e for e in _glob(base, filled, bases) if _nifti_stem(e.name) is not None and e.path != exclude]
        if not hits:
            notes.append(f"{case_id}: {kind} mask pattern {filled!r} matched no NIfTI file under {base}")
        for e in hits:
            matched[e.path] = e
    return [matched[p] for p in sorted(matched)]


def _glob_escape(value: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", value)
