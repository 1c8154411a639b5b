"""Input folders read without surprises: regular files only, and their hashes.

A DICOM folder may hold FIFOs, devices, sockets or links to outside it; reading one could block or
never end. :func:`folder_files` lists only regular files (nothing is opened), :func:`open_regular`
checks the opened descriptor, and :func:`sha256` hashes a file or a whole folder without revealing
its file names.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

#: Largest file of an input folder that is read (a DICOM folder), bytes. A DICOM file's uncompressed
#: Pixel Data is one element with a 32-bit length (at most 0xFFFFFFFE bytes), so 5 GiB holds any
#: DICOM file a scanner or PACS writes with room for its header (an Enhanced MR file of a
#: 256 x 256 x 30 x 120 DSC series at 16 bit is 0.47 GB); a larger regular file is something else (a
#: disk image, a sparse file) and reading or hashing it would only cost time.
MAX_FOLDER_FILE_BYTES = 5 << 30


def folder_files(folder: Path, *, max_bytes: int = MAX_FOLDER_FILE_BYTES) -> tuple[list[Path], dict[str, int]]:
    """The regular, non-hidden files under ``folder`` (sub-folders too), sorted, and the count of the
    other entries skipped, by kind. Nothing is opened: a FIFO, a device (a link to /dev/zero), a socket
    would block or never end a read. Skipped: those, symlinks whose target lies outside ``folder``,
    broken or looping symlinks, symlinked folders (not followed), entries that cannot be examined
    and files larger than ``max_bytes``. OSError when ``folder`` itself cannot be listed."""
    import stat

    top = os.path.realpath(folder)
    files: list[Path] = []
    skipped: dict[str, int] = {}

    def skip(kind: str) -> None:
        skipped[kind] = skipped.get(kind, 0) + 1

    def fail(exc: OSError) -> None:
        if Path(exc.filename or "") == Path(folder):
            raise exc
        skip("folder that cannot be listed")

    for root, dirs, names in os.walk(folder, onerror=fail):
        keep = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            if os.path.islink(os.path.join(root, d)):
                skip("symlinked folder (not followed)")
            else:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            try:
                if os.path.islink(path):
                    real = os.path.realpath(path)
                    if os.path.commonpath([top, real]) != top:
                        skip("symlink to outside the folder")
                        continue
                st = os.stat(path)
            except (OSError, ValueError):  # ELOOP, a broken link, no permission; ValueError: mixed drives
                skip("broken or looping symlink or unreadable entry")
                continue
            if stat.S_ISREG(st.st_mode):
                if st.st_size > max_bytes:
                    skip(f"file larger than {max_bytes / 2 ** 30:g} GiB")
                else:
                    files.append(Path(path))
            elif stat.S_ISFIFO(st.st_mode):
                skip("FIFO")
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                skip("device")
            elif stat.S_ISSOCK(st.st_mode):
                skip("socket")
            else:  # a symlink to a folder inside the tree, or another kind
                skip("other non-file entry")
    return files, skipped


def describe_skipped(skipped: dict[str, int]) -> str:
    """'3 entries skipped (2 FIFO, 1 device)' for the counts of ``folder_files``; '' when none."""
    n = sum(skipped.values())
    if not n:
        return ""
    parts = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{n} entr{'y' if n == 1 else 'ies'} skipped ({parts})"


def open_regular(path: Path, *, max_bytes: int = MAX_FOLDER_FILE_BYTES):
    """``path`` opened for binary reading only if it is a regular file of at most ``max_bytes``
    (checked on the open descriptor: a file swapped for a FIFO after it was listed cannot block).
    OSError otherwise."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            raise OSError(f"{path}: not a regular file of at most {max_bytes} bytes")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes. Of a folder (a DICOM input): SHA-256 over the sorted pairs
    (relative name, file SHA-256) of every file ``folder_files`` lists (the files a DICOM analysis
    reads: no FIFO, device or link to outside); no file name is revealed (DICOM file names can hold
    identifiers)."""
    if Path(path).is_dir():
        pairs = []
        for file in folder_files(Path(path))[0]:
            with contextlib.suppress(OSError):  # a file gone since it was listed is not hashed
                pairs.append((file.relative_to(path).as_posix(), _file_sha256(file, opener=open_regular)))
        h = hashlib.sha256()
        for name, digest in sorted(pairs):
            h.update(name.encode("utf-8", "surrogateescape") + b"\0" + digest.encode("ascii") + b"\n")
        return h.hexdigest()
    return _file_sha256(Path(path))


def _file_sha256(path: Path, *, opener=lambda p: open(p, "rb")) -> str:
    h = hashlib.sha256()
    with opener(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
