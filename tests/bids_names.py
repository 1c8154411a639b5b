"""File names against the BIDS schema (bidsschematools): a test helper.

BIDS 1.11 defines no DSC perfusion derivative (BEP009), so the BIDS validator cannot check the names
of what ``perfusion bids`` writes into ``perf/`` (OUTPUT_DIR's .bidsignore hides them from it). This
check applies the schema's naming rules, which hold for every BIDS file, to each of them:

- below ``sub-<label>/[ses-<label>/]<datatype>/``, the datatype one of the schema's;
- the name ``<entity>-<value>_..._<suffix><extension>``: every entity one of the schema's
  (``rules.entities``), at most once and in the schema's order, ``sub`` first; each value in its
  entity's format (``label``: letters, digits and +; ``index``: digits); the suffix alphanumeric; the
  extension one of the schema's;
- the file's ``sub-`` and ``ses-`` entities those of the folders it lies in;
- a JSON sidecar beside every NIfTI file.

Besides the schema, EXTRA_EXTENSIONS and EXTRA_ENTITIES: what perfusion writes on purpose though BIDS
1.11 lacks it, each with the reason. Files at the top of the tree are checked only against ``top``
(the files a derivatives folder may hold there), hidden files not at all (BIDS ignores them).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

#: Extensions perfusion writes that the schema lacks: the report page, and the T1-to-DSC transform
#: (an ITK text transform; BIDS's transform BEP014 names it ``_xfm``, as fMRIPrep does).
EXTRA_EXTENSIONS = {".html": "the report page", ".tfm": "ITK transform (BEP014 _xfm)"}

#: Entities perfusion writes that the schema lacks: BEP014's transform entities, after the schema's.
EXTRA_ENTITIES = ("from", "to", "mode")

#: Top-level files of perfusion's OUTPUT_DIR: BIDS's dataset_description.json, README, .bidsignore,
#: and the batch summary (hidden from the validator by .bidsignore).
TOP_FILES = frozenset({"dataset_description.json", "README", "README.md", "summary.tsv", "summary.json",
                       "index.html"})


@functools.cache
def schema_rules() -> dict:
    """What the check needs from the BIDS schema: entity names in order with their value pattern,
    datatypes, extensions, and the schema's BIDS version."""
    from bidsschematools import schema

    s = schema.load_schema()
    ents = s.objects.entities
    formats = s.objects.formats
    order = [(ents[k]["name"], formats[ents[k]["format"]]["pattern"]) for k in s.rules.entities]
    return {"order": order, "datatypes": {s.objects.datatypes[k]["value"] for k in s.objects.datatypes},
            "extensions": {s.objects.extensions[k]["value"] for k in s.objects.extensions} - {"", ".*", "/"},
            "bids_version": s.bids_version}


def split_name(name: str) -> tuple[list[str], str, str]:
    """(entity parts, suffix, extension) of a file name: the extension is the longest allowed one it
    ends with (``.nii.gz`` before ``.gz``), else everything from the first dot."""
    allowed = schema_rules()["extensions"] | set(EXTRA_EXTENSIONS)
    ext = max((e for e in allowed if name.endswith(e) and len(e) < len(name)), key=len, default=None)
    if ext is None:
        ext = name[name.index("."):] if "." in name else ""
    parts = name[: len(name) - len(ext)].split("_")
    return parts[:-1], parts[-1], ext


def check_name(name: str) -> list[str]:
    """Problems of one file name by the schema's naming rules (empty: none)."""
    rules = schema_rules()
    order = [*rules["order"], *((e, "[0-9a-zA-Z+]+") for e in EXTRA_ENTITIES)]
    rank = {key: i for i, (key, _) in enumerate(order)}
    pattern = dict(order)
    entities, suffix, ext = split_name(name)
    problems = []
    if ext not in rules["extensions"] and ext not in EXTRA_EXTENSIONS:
        problems.append(f"{name}: extension {ext!r} is not a BIDS extension")
    if not re.fullmatch(r"[a-zA-Z0-9]+", suffix):
        problems.append(f"{name}: suffix {suffix!r} is not alphanumeric")
    last = -1
    for part in entities:
        key, sep, value = part.partition("-")
        if not sep or key not in rank:
            problems.append(f"{name}: {part!r} is not a BIDS entity (key-value with a schema entity)")
            continue
        if not re.fullmatch(pattern[key], value):
            problems.append(f"{name}: {key}-{value}: the value does not match {pattern[key]}")
        if rank[key] <= last:
            problems.append(f"{name}: entity {key!r} out of the schema's order (or repeated)")
        last = max(last, rank[key])
    if not entities or not entities[0].startswith("sub-"):
        problems.append(f"{name}: does not begin with sub-<label>")
    return problems


def check_file(rel: Path) -> list[str]:
    """Problems of one file below a subject folder (``rel``: relative to the dataset's top)."""
    parts = rel.parts
    problems = check_name(rel.name)
    sub = parts[0]
    ses = parts[1] if len(parts) > 3 and parts[1].startswith("ses-") else None
    datatype = parts[-2] if len(parts) > 2 else None
    if len(parts) != (4 if ses else 3):
        problems.append(f"{rel}: not in sub-<label>/[ses-<label>/]<datatype>/")
    if datatype not in schema_rules()["datatypes"]:
        problems.append(f"{rel}: folder {datatype!r} is not a BIDS datatype")
    entities = dict(p.partition("-")[::2] for p in split_name(rel.name)[0])
    if f"sub-{entities.get('sub')}" != sub:
        problems.append(f"{rel}: its sub- entity differs from the folder {sub}")
    if (f"ses-{entities['ses']}" if "ses" in entities else None) != ses:
        problems.append(f"{rel}: its ses- entity differs from the folder {ses or '(none)'}")
    return problems


def check_tree(root: Path, *, top=TOP_FILES) -> tuple[list[str], int]:
    """(problems, number of files checked) of every file under ``root``; hidden files and folders are
    skipped, top-level files must be in ``top``, a NIfTI without its JSON sidecar is a problem."""
    root = Path(root)
    problems: list[str] = []
    checked = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(p.startswith(".") for p in rel.parts) or path.is_dir():
            continue
        checked += 1
        if len(rel.parts) == 1:
            if rel.name not in top:
                problems.append(f"{rel}: not a file of a BIDS derivatives folder's top")
            continue
        if not rel.parts[0].startswith("sub-"):
            problems.append(f"{rel}: outside every sub-<label>/ folder")
            continue
        problems += check_file(rel)
        entities, suffix, ext = split_name(rel.name)
        if ext in (".nii", ".nii.gz") and not path.with_name("_".join([*entities, suffix]) + ".json").is_file():
            problems.append(f"{rel}: no JSON sidecar")
    return problems, checked
