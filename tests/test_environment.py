"""Environments and hangs (issue 17): real processes, real files, no mocks.

- numba's compiled-kernel cache when neither the package's __pycache__ nor HOME can be written (a
  container running as another user). Tests may run as root, where chmod stops no write: a folder
  that cannot be created is simulated by a path under a regular file (HOME=<file>/home), and the
  package's __pycache__ by a regular file of that name in a copy of the package. numba tries
  NUMBA_CACHE_DIR, the source's __pycache__, then ~/.cache/numba (numba/core/caching.py).
- A DICOM folder holding a FIFO, a link to /dev/zero and their siblings: every command that reads
  the folder (analyze, dicom-inspect, batch) once blocked forever. Each run has a timeout.
- A temporary folder or cache that refuses writes (full disk, quota, file-size limit): exit 5 with
  one line naming the folder. A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so writes fail with
  EFBIG) stands in for a full disk; where user namespaces allow it, a 300 kB tmpfs gives a real
  ENOSPC.

The numba tests compile every kernel once (a cold cache, about 20 s of CPU each): the price of
checking that the analysis really runs in such an environment.
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from perfusion.cli.console import COMPILE_NOTICE

SRC = Path(__file__).resolve().parents[1] / "src"
#: A hang shows as a timeout; the slowest run here (a cold numba compile on a loaded 2-core machine,
#: 47 s measured) stays well below it.
TIMEOUT_S = 240
#: Options that keep the analysis short (the kernels compiled are most of the cost).
FAST = ["--method", "osvd", "--leakage", "none", "--motion-correct", "off", "--no-html"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env["PYTHONPATH"] = str(SRC)
    env["NUMBA_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _run(args, *, env=None, timeout=TIMEOUT_S, preexec_fn=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or _env(), preexec_fn=preexec_fn, cwd=cwd)


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# ------------------------------------------------------------------------------ numba's cache


def _package_without_cache(tmp_path: Path) -> Path:
    """A copy of the package whose kernels' __pycache__ cannot be made (a regular file holds its name)."""
    dst = tmp_path / "site" / "perfusion"
    shutil.copytree(SRC / "perfusion", dst, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "_kernels" / "__pycache__").write_bytes(b"")
    return dst.parent


def _unwritable_home(tmp_path: Path) -> Path:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    return blocker / "home"


def test_unwritable_home_and_package_use_a_private_tmp_cache(phantom_case, tmp_path):
    site, home = _package_without_cache(tmp_path), _unwritable_home(tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = _env(PYTHONPATH=str(site), HOME=str(home), TMPDIR=str(tmp))
    out = tmp_path / "out"
    proc = _run(["-m", "perfusion", "analyze", phantom_case["dsc"], "--out", out, *FAST], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    err = _lines(proc.stderr)  # the note, then the cold cache's compile notice (test_cold_start.py)
    assert len(err) == 2 and err[0].startswith("perfusion: warning: numba cannot write its cache"), proc.stderr
    assert err[1] == COMPILE_NOTICE
    cache = tmp / f"perfusion-numba-{os.getuid()}"
    assert str(cache) in err[0] and "NUMBA_CACHE_DIR" in err[0]
    assert any(cache.rglob("*.nbi")), "the kernels were not cached in the fallback folder"
    assert (cache.stat().st_mode & 0o777) == 0o700  # private: numba unpickles what it finds there
    assert (out / "report.json").is_file() and "Traceback" not in proc.stderr + proc.stdout
    # -q: the note is not printed (only errors are)
    again = _run(["-m", "perfusion", "analyze", phantom_case["dsc"], "--out", tmp_path / "out2", *FAST, "-q"],
                 env=env, cwd=tmp_path)
    assert again.returncode == 0 and again.stderr == "", again.stderr


def test_no_writable_folder_at_all_compiles_in_memory(phantom_case, tmp_path):
    """Not even the temporary folder can be written: the kernels are compiled without the disk cache.
    (tempfile falls back to /tmp and the working folder on its own; the temporary folder is pinned to
    an impossible path so that this branch runs.)"""
    site, home = _package_without_cache(tmp_path), _unwritable_home(tmp_path)
    code = ("import sys, tempfile; tempfile.tempdir = sys.argv[1]; from perfusion.cli.app import main; "
            "sys.exit(main(sys.argv[2:]))")
    out = tmp_path / "out"
    proc = _run(["-c", code, home.parent / "tmp", "analyze", phantom_case["dsc"], "--out", out, *FAST],
                env=_env(PYTHONPATH=str(site), HOME=str(home)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    err = _lines(proc.stderr)
    assert len(err) == 1 and "compiled in every run" in err[0] and "NUMBA_CACHE_DIR" in err[0], proc.stderr
    assert (out / "report.json").is_file()
    assert not list(tmp_path.rglob("*.nbi"))  # nothing cached anywhere


def _limit_file_size(n_bytes: int):
    def pre():  # in the child: writes beyond n_bytes fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return pre


def test_full_numba_cache_disk_is_exit_5(phantom_case, tmp_path):
    """The cache folder takes no more bytes (numba raises the OSError from inside a kernel call): exit 5
    naming the folder, --out untouched."""
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    proc = _run(["-m", "perfusion", "analyze", phantom_case["dsc"], "--out", out, *FAST],
                env=_env(NUMBA_CACHE_DIR=str(cache)), preexec_fn=_limit_file_size(1024))
    assert proc.returncode == 5, proc.stderr
    err = [line for line in _lines(proc.stderr) if line != COMPILE_NOTICE]  # the cache is cold: it compiles
    assert len(err) == 1 and err[0].startswith("perfusion: error: writing failed (File too large"), proc.stderr
    assert f"numba's cache {cache} (NUMBA_CACHE_DIR)" in err[0] and "free space" in err[0]
    assert not out.exists() and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- special files in DICOM


def _dicom_phantom(folder: Path) -> None:
    """The phantom (48 x 48 x 5, 40 frames) as single-frame DICOM files (tests/test_dicom.py's writer)."""
    from test_dicom import write_dicom_series

    from perfusion.tools.phantom import PhantomSpec, make_phantom

    ph = make_phantom(PhantomSpec(matrix=48, n_frames=40))
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(ph.affine),
                                           nib.orientations.axcodes2ornt(("L", "P", "S")))
    data = nib.orientations.apply_orientation(ph.signal.astype(np.float64), ornt)
    affine = ph.affine @ nib.orientations.inv_ornt_aff(ornt, ph.signal.shape[:3])
    write_dicom_series(folder, data, affine, tr=ph.spec.tr, te=ph.spec.te, series_number=7, seed=3)


def _plant_specials(folder: Path, outside: Path) -> dict[str, int]:
    """Every kind of entry that is not a readable file of ours; returns the counts expected."""
    os.mkfifo(folder / "zz-fifo")
    (folder / "zz-zero").symlink_to("/dev/zero")
    (folder / "zz-outside").symlink_to(outside)
    (folder / "zz-loop-a").symlink_to(folder / "zz-loop-b")
    (folder / "zz-loop-b").symlink_to(folder / "zz-loop-a")
    (folder / "zz-broken").symlink_to(folder / "no-such-file")
    (folder / "zz-folder-link").symlink_to(outside.parent, target_is_directory=True)
    with open(folder / "zz-sparse", "wb") as fh:  # 6 GiB of nothing: stat says 6 GiB, the disk holds none
        fh.truncate(6 << 30)
    expected = {"FIFO": 1, "symlink to outside the folder": 2, "broken or looping symlink or unreadable entry": 3,
                "symlinked folder (not followed)": 1, "file larger than 5 GiB": 1}
    sock_path = folder / "zz-sock"
    if len(str(sock_path)) < 100:  # AF_UNIX paths are limited to 108 bytes
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(sock_path))
        s.close()
        expected["socket"] = 1
    return expected


def _dicom_digest(folder: Path) -> dict[str, str]:
    """sha256 of the DICOM files (regular files, not the sparse one) and the kind of every other entry."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or not p.is_file():
            out[p.name] = oct(os.lstat(p).st_mode)
        elif p.stat().st_size < 1 << 20:
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[p.name] = str(p.stat().st_size)
    return out


@pytest.fixture(scope="module")
def special_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("specials")
    folder = root / "in" / "case-1" / "dicom"
    _dicom_phantom(folder)
    outside = root / "elsewhere" / "file.dcm"
    outside.parent.mkdir()
    shutil.copy(next(folder.iterdir()), outside)
    expected = _plant_specials(folder, outside)
    return {"root": root, "folder": folder, "expected": expected}


def _skip_note(expected: dict[str, int]) -> str:
    from perfusion.io import describe_skipped

    return describe_skipped(expected)


def test_dicom_inspect_skips_special_files(special_dataset, tmp_path):
    folder = special_dataset["folder"]
    before = _dicom_digest(folder)
    proc = _run(["-m", "perfusion", "dicom-inspect", folder, "--json", tmp_path / "i.json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "i.json").read_text())
    assert [s["n_files"] for s in data["series"]] == [200]  # the DICOM files, nothing else
    note = _skip_note(special_dataset["expected"])
    assert any(w.startswith(note) for w in data["series"][0]["warnings"]), data["series"][0]["warnings"]
    assert proc.stderr == "" and _dicom_digest(folder) == before


def test_analyze_skips_special_files(special_dataset, tmp_path):
    folder = special_dataset["folder"]
    before = _dicom_digest(folder)
    out = tmp_path / "out"
    proc = _run(["-m", "perfusion", "analyze", folder, "--out", out, *FAST])
    assert proc.returncode == 0, proc.stderr
    note = _skip_note(special_dataset["expected"])
    assert note in proc.stdout and "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert any(note in w for w in report["warnings"])
    assert _dicom_digest(folder) == before


def test_batch_skips_special_files(special_dataset, tmp_path):
    out = tmp_path / "out"
    proc = _run(["-m", "perfusion", "batch", special_dataset["root"] / "in", out, "-q", "--method", "osvd",
                 "--leakage", "none", "--motion-correct", "off"])
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lines = (out / "summary.tsv").read_text().splitlines()
    assert len(lines) == 2 and "\tok\t" in lines[1], lines
    report = json.loads((out / "case-1" / "report.json").read_text())
    assert any(_skip_note(special_dataset["expected"]) in w for w in report["warnings"])


@pytest.mark.parametrize("command", ["dicom-inspect", "analyze", "convert"])
def test_folder_of_only_special_files_is_exit_4(tmp_path, command):
    folder = tmp_path / "dicom"
    folder.mkdir()
    os.mkfifo(folder / "fifo")
    (folder / "zero").symlink_to("/dev/zero")
    args = {"dicom-inspect": [folder], "analyze": [folder, "--out", tmp_path / "out"],
            "convert": [folder, tmp_path / "out"]}[command]
    proc = _run(["-m", "perfusion", command, *args], timeout=60)
    assert proc.returncode == 4, proc.stderr
    err = _lines(proc.stderr)
    assert len(err) == 1 and err[0].startswith(f"perfusion: error: {folder}: no DICOM files"), proc.stderr
    assert "2 entries skipped (1 FIFO, 1 symlink to outside the folder)" in err[0] and "copy the DICOM" in err[0]
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------- a temporary disk that is full


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain") / "dicom"
    _dicom_phantom(folder)
    return folder


# 2 kB: the private copies (about 5 kB each: the writer's InstanceNumbers are random, so the files are
# renumbered in copies) fail in Python; 100 kB: the copies pass and dcm2niix's image (1 MB) fails
@pytest.mark.parametrize("limit", [2048, 100_000])
@pytest.mark.parametrize("command", ["convert", "analyze"])
def test_full_temporary_folder_is_exit_5(dicom_folder, tmp_path, limit, command):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    args = [dicom_folder, out] if command == "convert" else [dicom_folder, "--out", out, *FAST]
    before = _dicom_digest(dicom_folder)
    proc = _run(["-m", "perfusion", command, *args], env=_env(TMPDIR=str(tmp)), preexec_fn=_limit_file_size(limit),
                timeout=120)
    assert proc.returncode == 5, proc.stderr
    err = _lines(proc.stderr)
    assert len(err) == 1 and err[0].startswith(f"perfusion: error: {tmp}: the temporary folder cannot hold"), err
    assert "set TMPDIR" in err[0] and "Traceback" not in proc.stderr
    assert list(tmp.iterdir()) == [] and not out.exists()  # nothing left behind
    assert _dicom_digest(dicom_folder) == before


def test_full_tmpfs_is_exit_5(dicom_folder, tmp_path):
    """A real ENOSPC: a 300 kB tmpfs as TMPDIR, mounted in a private user and mount namespace."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user namespaces here (unshare -rm) to mount a small tmpfs")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    script = 'mount -t tmpfs -o size=300k tmpfs "$1" && shift && exec "$@"'
    proc = subprocess.run([unshare, "-rm", "sh", "-c", script, "sh", str(tmp), sys.executable, "-m", "perfusion",
                           "convert", str(dicom_folder), str(out)], capture_output=True, text=True,
                          env=_env(TMPDIR=str(tmp)), timeout=120)
    assert proc.returncode == 5, proc.stderr
    err = _lines(proc.stderr)
    assert len(err) == 1 and err[0].startswith(f"perfusion: error: {tmp}: the temporary folder cannot hold"), err
    assert "No space left on device" in err[0] and not out.exists()
