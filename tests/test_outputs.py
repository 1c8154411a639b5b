"""Issue 17, single-case outputs of ``perfusion analyze``, through the command line on real files:

- privacy: no output names an input's folder or path (folders are named after patients), whatever
  way the inputs were given (absolute, relative, through a symbolic link);
- one run at a time per --out: a second run into the same folder fails at once (exit 5); a run
  killed with SIGKILL blocks nothing;
- --force never removes nor replaces an input that lies in --out;
- every output condition is checked before the analysis (exit 5 in well under a second).

Runs use --method osvd --motion-correct off (about 4 s each here) unless the case needs more.
"""

import base64
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import pytest

import perfusion.pipeline  # noqa: F401  (imported once here, so timings measure the command, not imports)
from conftest import folder_digest
from perfusion.cli.app import main

FAST = ["--method", "osvd", "--motion-correct", "off"]
SRC = Path(__file__).resolve().parents[1] / "src"

#: Folder names as a PACS export or a clinic's share names them: the patient, a birth date, a record number.
CASE_DIR = ("MRN12345", "DOE_JOHN_1957-03-02")
MASK_DIR = ("MRN77777", "SMITH_ANNA_1960-01-01")
LINK_DIR = ("MRN55555", "ROE_MARY_1949-12-31")
OUT_DIR = ("MRN99999", "POE_RICHARD_1970-05-05")
IDENTIFIERS = ["MRN12345", "DOE_JOHN", "1957-03-02", "MRN77777", "SMITH_ANNA", "1960-01-01", "MRN55555", "ROE_MARY",
               "1949-12-31", "MRN99999", "POE_RICHARD", "1970-05-05"]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------ privacy


def _png_texts(png: bytes) -> bytes:
    """A PNG's text chunks (tEXt as is, zTXt and compressed iTXt inflated): where metadata lives."""
    out, pos = [], 8
    while pos + 8 <= len(png):
        n = int.from_bytes(png[pos:pos + 4], "big")
        kind, body = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]
        if kind == b"tEXt":
            out.append(body)
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            out.append(key + b" " + zlib.decompress(rest[1:]))
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            flag, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _tkey, _, text = rest.partition(b"\0")
            out.append(key + b" " + (zlib.decompress(text) if flag else text))
        pos += 12 + n
    return b"\n".join(out)


def _readable(path: Path) -> list[tuple[str, bytes]]:
    """Every place of an output file where text can hide: the bytes (a .gz decompressed: NIfTI header,
    extensions and data), NIfTI header strings, and an HTML page without its base64 figures plus the
    figures' PNG text chunks."""
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    parts = [(path.name, raw)]
    if ".nii" in path.name:
        hdr = nib.load(path).header
        for key in ("descrip", "intent_name", "aux_file", "db_name"):
            if key in hdr:
                parts.append((f"{path.name} {key}", hdr[key].tobytes()))
    if path.suffix == ".html":
        text = raw.decode("utf-8")
        figures = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
        assert figures, "the page has figures"
        parts = [(path.name, re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", text).encode())]
        parts += [(f"{path.name} figure {i}", _png_texts(base64.b64decode(f))) for i, f in enumerate(figures)]
    return parts


def _leaks(folder: Path, needles: list[str]) -> list[tuple[str, str]]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    assert files
    return [(where, n) for f in files for where, data in _readable(f) for n in needles
            if n.lower().encode() in data.lower()]


def test_outputs_name_no_input_folder(phantom_case, tmp_path, monkeypatch, capsys):
    """The case in MRN12345/DOE_JOHN_1957-03-02, masks from another patient-named folder (absolute,
    relative and through a symbolic link from a third), --out in a fourth, a header TR that disagrees
    with the sidecar (its warning quotes the series' path), a T1 for --anat: no output file (json, tsv,
    html and its figures' metadata, NIfTI headers and decompressed bytes) holds a folder name or the
    temporary root; report.json names each input by file name with its SHA-256."""
    import hashlib

    case, masks, links, out_parent = (tmp_path.joinpath(*d) for d in (CASE_DIR, MASK_DIR, LINK_DIR, OUT_DIR))
    for d in (case, masks, links, out_parent):
        d.mkdir(parents=True)
    src = phantom_case
    img = nib.load(src["dsc"])
    img.header.set_zooms(img.header.get_zooms()[:3] + (2.0,))  # header TR 2 s, sidecar 1.5 s: a warning
    nib.save(img, case / src["dsc"].name)
    shutil.copy(src["dsc"].with_name(src["dsc"].name.replace(".nii.gz", ".json")), case)
    nib.save(nib.Nifti1Image(img.get_fdata()[..., :10].mean(axis=3), img.affine), case / "t1.nii.gz")
    for key in ("brain", "vein", "lesion_hypo"):
        shutil.copy(src[key], case)
    for key in ("lesion_hyper", "nawm", "aif"):
        shutil.copy(src[key], masks)
    (links / src["lesion_hypo"].name).symlink_to(case / src["lesion_hypo"].name)
    before = {d: folder_digest(d) for d in (case, masks)}
    out = out_parent / "out"
    monkeypatch.chdir(case.parent)  # inputs given relative to here, too
    code = main(["analyze", str(Path(CASE_DIR[1]) / src["dsc"].name), "--out", str(out), *FAST,
                 "--mask", str(case / src["brain"].name), "--vof", str(case / src["vein"].name),
                 "--roi", str(masks / src["lesion_hyper"].name), "--roi", str(links / src["lesion_hypo"].name),
                 "--reference", str(Path("..", *MASK_DIR, src["nawm"].name)), "--aif", str(masks / src["aif"].name),
                 "--anat", str(case / "t1.nii.gz"), "-q"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert any("header TR" in w for w in rep["warnings"])  # the warning that quoted the path is there
    assert {"report.html", "anat.nii.gz", "mask-roi-lesion_hyper.json", "rcbv.json", "aif.json"} <= {
        p.name for p in out.iterdir()}
    assert _leaks(out, IDENTIFIERS + [str(tmp_path)]) == []
    # the inputs: by role, file name only, and the hash of the bytes read
    assert rep["inputs"]["roi:roi-lesion_hyper"] == {
        "file": src["lesion_hyper"].name, "sha256": hashlib.sha256(src["lesion_hyper"].read_bytes()).hexdigest()}
    assert rep["inputs"]["dsc"]["file"] == src["dsc"].name and rep["inputs"]["dsc_sidecar"]["file"].endswith(".json")
    assert set(rep["inputs"]) == {"dsc", "dsc_sidecar", "brain", "vof", "aif", "reference", "roi:roi-lesion_hyper",
                                  "roi:roi-lesion_hypo", "anat"}
    assert rep["aif"]["source"] == src["aif"].name and rep["reference"]["source"] == src["nawm"].name
    assert {d: folder_digest(d) for d in (case, masks)} == before
    assert sorted(p.name for p in out_parent.iterdir()) == ["out"]  # no lock file nor staging folder left


# ---------------------------------------------------------------------------------- one run per --out


def _spawn(phantom_case, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "NUMBA_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "perfusion", "analyze", str(phantom_case["dsc"]), "--out", str(out),
                             "--roi", str(phantom_case["lesion_hyper"]), "-q", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _lock_of(out: Path) -> Path:
    return out.resolve().parent / f".{out.name}.lock"


def _wait_for_lock(proc: subprocess.Popen, out: Path, timeout: float = 60.0) -> None:
    """Until ``proc`` holds the lock of ``out`` (its pid is written into the lock file once it holds it)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        try:
            if _lock_of(out).read_text().split()[:1] == [str(proc.pid)]:
                return
        except (FileNotFoundError, IndexError):
            pass
        time.sleep(0.02)
    raise AssertionError("the first run never took the lock")


@pytest.mark.parametrize("command", ["compare", "convert"])
def test_every_writing_command_takes_the_folder_lock(command, phantom_case, tmp_path, capsys):
    """compare and convert take the same lock as analyze: while another run holds OUT (here this
    process, through io.output_lock, on its own open file), each exits 5 with one line naming the
    folder and writes nothing. (batch and bids lock each case folder instead, so that array-job tasks
    share one OUT_DIR: tests/test_bids.py::test_a_case_locked_by_another_process_fails_alone.)"""
    from perfusion.io import output_lock

    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {"compare": ["compare", str(empty), str(empty), "--out", str(out)],
            "convert": ["convert", str(empty), str(out)]}[command]
    with output_lock(out):
        assert main([*args, "-q"]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another perfusion run is writing" in err[0] and str(out) in err[0], err
    assert not out.exists()


def test_second_run_into_the_same_out_fails_at_once(phantom_case, tmp_path):
    """Two real processes into one --out: while the first holds the folder, the second exits 5 at once
    with one line naming it; the first completes, and --out holds its outputs only."""
    out = tmp_path / "out"
    first = _spawn(phantom_case, out, "--method", "osvd", "--no-html")
    try:
        _wait_for_lock(first, out)
        t0 = time.monotonic()
        second = _spawn(phantom_case, out, "--method", "csvd", "--force")
        _, err = second.communicate(timeout=60)
        took = time.monotonic() - t0
        assert first.poll() is None  # it was refused while the first still ran
    finally:
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 5
    line = _one_line(err)
    assert f"another perfusion run is writing {out}" in line and "choose another --out" in line
    assert took < 15, took  # the interpreter's start and imports, no analysis (a run takes longer)
    rep = json.loads((out / "report.json").read_text())
    assert rep["parameters"]["method"] == "osvd" and {"cbv.nii.gz", "rcbv.nii.gz", "ftb.nii.gz"} <= {
        p.name for p in out.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_run_blocks_nothing(phantom_case, tmp_path, capsys):
    """SIGKILL a run that holds --out (and leave a staging folder as a run killed while writing does):
    the next run into that --out succeeds, and no lock file nor staging folder remains."""
    out = tmp_path / "out"
    first = _spawn(phantom_case, out, *FAST)
    _wait_for_lock(first, out)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL and _lock_of(out).exists()  # the lock file stays, unlocked
    stale = tmp_path / ".out.partial-killed"
    stale.mkdir()
    (stale / "cbv.nii.gz").write_bytes(b"half")
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), *FAST, "--no-html", "-q"]) == 0, \
        capsys.readouterr().err
    assert (out / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------- --force and the inputs


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, phantom_case):
    """An output folder of an earlier run with an ROI (its mask copy mask-roi-lesion_hyper.nii.gz)."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "--roi", str(phantom_case["lesion_hyper"]),
                 *FAST, "--no-html", "-q"]) == 0
    return out


def test_force_keeps_an_input_named_like_an_earlier_output(earlier, phantom_case, tmp_path, capsys):
    """Re-running with the earlier run's own ROI copy as --roi (OUT/mask-roi-lesion_hyper.nii.gz) and
    --force: that file matches the earlier outputs' names but is an input, so it stays as it was."""
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    roi = out / "mask-roi-lesion_hyper.nii.gz"
    digest = roi.read_bytes()
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "--roi", str(roi), *FAST, "--no-html",
                 "--force", "-q"]) == 0, capsys.readouterr().err
    assert roi.read_bytes() == digest
    rep = json.loads((out / "report.json").read_text())
    assert [r["mask_file"] for r in rep["rois"]] == ["mask-mask-roi-lesion_hyper.nii.gz"]


@pytest.mark.parametrize("option,name", [
    ("--reference", "reference_mask.nii.gz"),  # a mask an output takes the name of
    ("--aif", "aif_mask.nii.gz"),
    ("--mask", "brain_mask.nii.gz"),
    ("--roi", "ftb.nii.gz"),
    ("--vof", "cbv.nii.gz"),
    ("--reference", "mask-roi-lesion_hyper.nii.gz"),  # the name this run's ROI copy takes
    ("--anat", "baseline.nii.gz"),
])
def test_force_refuses_an_input_an_output_would_replace(option, name, earlier, phantom_case, tmp_path, capsys):
    """An input in --out under a name an output of this run takes: exit 2 before any work, one line naming
    the input, --out unchanged."""
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    source = {"--reference": "nawm", "--aif": "aif", "--mask": "brain", "--roi": "lesion_hypo", "--vof": "vein",
              "--anat": "brain"}[option]
    shutil.copy(phantom_case[source], out / name)
    before = folder_digest(out)
    t0 = time.monotonic()
    code = main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "--roi", str(phantom_case["lesion_hyper"]),
                 option, str(out / name), *FAST, "--force", "-q"])
    took = time.monotonic() - t0
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert str(out / name) in line and "move the input out of" in line
    assert took < 1.0 and folder_digest(out) == before


def test_force_refuses_a_link_to_a_file_an_output_would_replace(earlier, phantom_case, tmp_path, capsys):
    """The input is a symbolic link elsewhere to OUT/rcbv.nii.gz: replacing that file would change the
    input, so the run is refused (exit 2) and --out is unchanged."""
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    shutil.copy(phantom_case["lesion_hypo"], out / "rcbv.nii.gz")
    link = tmp_path / "lesion.nii.gz"
    link.symlink_to(out / "rcbv.nii.gz")
    before = folder_digest(out)
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "--roi", str(link), *FAST, "--force",
                 "-q"]) == 2
    assert str(link) in _one_line(capsys.readouterr().err) and folder_digest(out) == before


def test_the_series_in_out_is_refused(phantom_case, tmp_path, capsys):
    """The series (with its sidecar) inside --out: exit 5 before any work, inputs unchanged; also when
    the series is given through a symbolic link from another folder."""
    out = tmp_path / "out"
    out.mkdir()
    for p in (phantom_case["dsc"], phantom_case["dsc"].with_name(phantom_case["dsc"].name.replace(".nii.gz", ".json"))):
        shutil.copy(p, out / p.name.replace("sub-phantom_dsc", "baseline"))
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "baseline.nii.gz"
    link.symlink_to(out / "baseline.nii.gz")
    before = folder_digest(out)
    for series in (out / "baseline.nii.gz", link):
        assert main(["analyze", str(series), "--out", str(out), "--force", "-q"]) == 5
        assert "is the folder of the input series" in _one_line(capsys.readouterr().err)
    assert folder_digest(out) == before


# ------------------------------------------------------------------- output conditions before the work


def _refused_at_once(args: list[str], capsys, *, code: int = 5) -> str:
    t0 = time.monotonic()
    got = main(args)
    took = time.monotonic() - t0
    assert got == code
    assert took < 1.0, took  # an analysis of the phantom takes several seconds
    return _one_line(capsys.readouterr().err)


def test_unusable_out_is_refused_before_the_analysis(phantom_case, tmp_path, capsys):
    """A dangling --out link, a dangling link above --out, a link loop, a file as --out or above it, a
    place that cannot take a folder, and --out inside a DICOM input folder: exit 5 in under a second,
    one line naming --out, nothing created."""
    dsc = str(phantom_case["dsc"])
    dangling = tmp_path / "link-out"
    dangling.symlink_to(tmp_path / "missing")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    dicom_dir = tmp_path / "dicom"
    dicom_dir.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [(dangling, "symbolic link to a missing target"), (dangling / "sub", "a folder above it"),
             (loop, "symbolic link to a missing target"), (a_file, "is not a folder"),
             (a_file / "sub", "is not a folder"), (Path("/proc/perfusion-out"), "cannot write")]
    for out, says in cases:
        line = _refused_at_once(["analyze", dsc, "--out", str(out), "-q"], capsys)
        assert line.startswith(f"perfusion: error: {out}:") and says in line and "--out" in line, line
    line = _refused_at_once(["analyze", str(dicom_dir), "--out", str(dicom_dir / "out"), "-q"], capsys)
    assert "lies inside the DICOM folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before and list(dicom_dir.iterdir()) == []
    assert not (tmp_path / "missing").exists()


def test_redaction_replaces_whole_paths_only():
    """An input folder's spelling is replaced only where it stands alone: an input in '/s' leaves the
    unit '1/s' be; a path under an input folder loses the folder; another folder is left as it is."""
    from perfusion.io import Redactor

    r = Redactor([Path("/s/x.nii.gz"), Path("/data/MRN1/DOE/dsc.nii.gz")])
    assert r("K2 in 1/s from /s/x.nii.gz.") == "K2 in 1/s from x.nii.gz."
    assert r({"/data/MRN1/DOE/dsc.nii.gz": ["(/data/MRN1/DOE/a.json)"]}) == {"dsc.nii.gz": ["((input folder)/a.json)"]}
    assert r("/data/MRN1/DOEX/y.nii.gz") == "/data/MRN1/DOEX/y.nii.gz"



def test_case_label_and_scan_date_are_the_callers_only(phantom_case, tmp_path):
    """report.json "case" holds the label and scan date save() was given, and null without them: none is
    read from the input (its folder here is named after a patient)."""
    import json
    import shutil

    from perfusion import Config, analyze, load_case, save

    named = tmp_path / "Doe_Jane" / "dsc.nii.gz"
    named.parent.mkdir()
    shutil.copy(phantom_case["dsc"], named)
    case = load_case(named, te=0.025, tr=1.5)
    result = analyze(case, Config(method="osvd"))
    save(result, case, tmp_path / "a", html=False, label="case 7", scan_date="2026-11-30")
    save(result, case, tmp_path / "b", html=False)
    assert json.loads((tmp_path / "a" / "report.json").read_text())["case"] == {"label": "case 7",
                                                                              "scan_date": "2026-11-30"}
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert b["case"] == {"label": None, "scan_date": None}
    assert "Doe" not in json.dumps(b)
