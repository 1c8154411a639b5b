"""Helpers shared by osipy_run.py (osipy's venv) and numpy_svd.py (perfusion's venv): numpy and the
standard library only, so either interpreter imports it. Not part of the perfusion package."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

#: perf_counter when this module was imported: the fallback for the process start.
_IMPORTED = time.perf_counter()


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc, 10 ms resolution, includes the interpreter
    start-up and imports); elsewhere, since this module was imported."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def frame_range(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B), frame numbers of the series, half-open, 0 <= A < B."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START:STOP frame numbers, e.g. 0:10") from None
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < STOP")
    return a, b


def load_aif(path: Path, *, n_t: int, tr: float, first_frame: int) -> np.ndarray:
    """An arterial input curve, delta R2* in 1/s, shape (n_t,): a 1-D .npy, or a TSV with a header
    row holding a ``delta_r2s`` column (perfusion's aif.tsv) and optionally ``time_s`` (frame times in
    s from the first frame of the series, checked against ``first_frame`` and ``tr``)."""
    path = Path(path)
    if path.suffix == ".npy":
        aif = np.load(path)
    else:
        rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines() if line.strip()]
        header, body = rows[0], np.array(rows[1:], dtype=np.float64)
        if "delta_r2s" not in header:
            raise SystemExit(f"{path}: no 'delta_r2s' column in the header {header}")
        aif = body[:, header.index("delta_r2s")]
        if "time_s" in header:
            t = body[:, header.index("time_s")]
            expected = (first_frame + np.arange(t.size)) * tr
            if not np.allclose(t, expected, atol=1e-3 * tr):
                raise SystemExit(f"{path}: time_s starts at {t[0]} s, step {np.diff(t[:2])}, but --first-frame "
                                 f"{first_frame} and --tr {tr} give {expected[0]} s: pass the matching --first-frame")
    aif = np.asarray(aif, dtype=np.float64)
    if aif.ndim != 1 or aif.size != n_t:
        raise SystemExit(f"{path}: the AIF has shape {aif.shape}; the series has {n_t} frames from --first-frame")
    if not np.all(np.isfinite(aif)) or not np.any(aif > 0):
        raise SystemExit(f"{path}: the AIF must be finite with a positive value")
    return aif
