"""Inputs named in outputs: never by their folders, which are often named after the patient.

One mechanism, :class:`Redactor`, rewrites every string bound for an output by a naming policy, a
table from each spelling of a path to what stands for it. Two policies use it: ``analyze``'s
(:func:`input_names`: an input by its file name, its folder as ``(input folder)``, a DICOM folder as
``DICOM folder``) and ``batch``'s (``batch.engine.Names``: paths relative to the input folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: How a DICOM folder input is named in the outputs (its own name is often the patient's).
DICOM_FOLDER_NAME = "DICOM folder"

#: What stands for an input's folder where a message quoted it.
INPUT_FOLDER_NAME = "(input folder)"

#: What stands for a folder whose paths a policy makes relative (an empty replacement), where it is
#: quoted alone: batch's input folder.
RELATIVE_ROOT_NAME = "INPUT"


def public_name(path: Path) -> str:
    """How an input is named in the outputs: its file name only, never its folders (folders are often
    named after the patient or hold a record number); a DICOM folder is ``DICOM_FOLDER_NAME``."""
    path = Path(path)
    return DICOM_FOLDER_NAME if path.is_dir() else path.name


def _spellings(path: Path) -> set[str]:
    """The ways a path may be written in a message: as given, absolute, resolved (symlinks followed)."""
    path = Path(path)
    out = {str(path), str(path.absolute()), os.path.normpath(path.absolute())}
    with contextlib.suppress(OSError, RuntimeError):
        out.add(str(path.resolve()))
    return {s for s in out if s not in ("", ".", os.sep)}


def input_names(paths: Iterable) -> dict[str, str]:
    """``analyze``'s naming policy as a Redactor table: every spelling of an input (as given, absolute,
    resolved) -> its ``public_name``; every spelling of its folder (absolute, or relative with a
    separator: a bare word could be any word) -> ``INPUT_FOLDER_NAME``, the folder a symlinked input
    points into too. None and empty paths are skipped."""
    table: dict[str, str] = {}
    for p in paths:
        if p is None or str(p) == "":
            continue
        p = Path(p)
        folders = {p.parent}  # a DICOM folder's own spellings get its public name below
        with contextlib.suppress(OSError, RuntimeError):
            folders.add(p.resolve().parent)  # a symlinked input: the folder it points into
        for folder in folders:
            for s in _spellings(folder):
                if os.path.isabs(s) or os.sep in s:
                    table.setdefault(s, INPUT_FOLDER_NAME)
        for s in _spellings(p):
            table[s] = public_name(p)
    return table


class Redactor:
    """Rewrites strings bound for an output so that no path of a naming policy remains.

    The policy is ``table``, each spelling of a path (text) -> what stands for it; by default
    ``analyze``'s for the inputs ``paths`` (:func:`input_names`). A spelling is replaced only where it
    stands alone (not inside a longer name or path: an input folder '/s' leaves '1/s' be; a sentence's
    full stop may follow it), longest first (a file's path goes before its folder's). Followed by '/',
    its replacement is followed by '/'; an empty replacement (a folder whose paths become relative)
    drops that '/' too and, where the spelling stands alone, becomes ``bare``."""

    def __init__(self, paths: Iterable = (), *, table: Mapping[str, str] | None = None,
                 bare: str = RELATIVE_ROOT_NAME):
        self._table = dict(table) if table is not None else input_names(paths)
        self._bare = bare
        spellings = "|".join(re.escape(k) for k in sorted(self._table, key=len, reverse=True))
        # not preceded by a name's or path's character; followed by '/' (kept apart: group 2) or by
        # no name's character (a sentence's full stop may follow)
        self._pattern = (re.compile(rf"(?<![\w./-])({spellings})(?:(/)|(?![\w-]|\.\w))")
                         if self._table else None)

    def _replace(self, m: re.Match) -> str:
        """The replacement of one match: group 1 the spelling, group 2 a '/' after it or None."""
        label = self._table[m.group(1)]
        if m.group(2):
            return f"{label}/" if label else ""
        return label or self._bare

    def text(self, s: str) -> str:
        """``s`` rewritten by the policy (the same object when nothing matched)."""
        if self._pattern is None or not s:
            return s
        return self._pattern.sub(self._replace, s)

    def __call__(self, obj: Any) -> Any:
        """``obj`` with every string inside it (dict keys and values, lists, tuples, dataclass fields,
        paths) rewritten; arrays and numbers are returned as they are."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, Path):
            return type(obj)(self.text(str(obj)))
        if isinstance(obj, dict):
            return {self(k): self(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(self(v) for v in obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            changes = {}
            for f in dataclasses.fields(obj):
                if not f.init:
                    continue
                value = getattr(obj, f.name)
                if isinstance(value, (str, Path, dict, list, tuple)) or dataclasses.is_dataclass(value):
                    new = self(value)
                    if new is not value:
                        changes[f.name] = new
            return dataclasses.replace(obj, **changes) if changes else obj
        return obj
