"""perfusion batch, issue 17: no lost, mixed-up or leaked outputs, through the command line on real
NIfTI files.

- BIDS runs and acquisitions (echoes, ...) of one subject or session each get their own output folder
  and done-marker; two series that would still share a folder are refused before any work (exit 4,
  naming both), as is a case folder that would replace a summary file;
- resume is by content: a dataset (and its outputs) copied or moved elsewhere is not recomputed; a
  changed input recomputes its case only, a changed parameter every case;
- nothing written (case outputs, markers, summaries, index.html, NIfTI headers, gzip streams, log lines)
  carries an absolute path or a folder name above the dataset or OUT_DIR.

Cases are 32 x 32 phantoms (perfusion.tools.phantom, seeds 1 and 2; 2 lesions, brain mask): the smallest
matrix whose lesions still get a verdict, so each case takes about a second.
"""

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import folder_digest
from perfusion.batch.discovery import marker_name
from perfusion.batch.engine import MARKER, TOP_FILES
from perfusion.cli.app import main

MATRIX = 32
SECRET = "DOE_JOHN_1957"  # a patient-named folder above the dataset and above OUT_DIR


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from perfusion.io import staged_output
    from perfusion.tools.phantom import PhantomSpec, make_phantom, write_phantom

    base = tmp_path_factory.mktemp("hardening_sources")
    out = []
    for seed in (1, 2):
        folder = base / f"seed{seed}"
        with staged_output(folder, force=False) as stage:
            paths = write_phantom(make_phantom(PhantomSpec(matrix=MATRIX, seed=seed)), stage)
        out.append({k: folder / v.relative_to(stage) for k, v in paths.items()})
    return out


def _summary(out: Path) -> list[dict]:
    lines = (out / "summary.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, ln.split("\t"))) for ln in lines[1:]]


def _markers(out: Path) -> dict[str, tuple[int, str]]:
    """case id -> (marker mtime, finished time) of every done-marker under ``out``."""
    found = {}
    for p in out.rglob(f"*{MARKER}"):  # a plain case's MARKER, a BIDS series' .<prefix>.perfusion-done.json
        m = json.loads(p.read_text())
        found[m.get("case", str(p.parent.relative_to(out)))] = (p.stat().st_mtime_ns, m["finished_utc"])
    return found


def _bids_series(root: Path, rel: str, prefix: str, src: dict) -> None:
    (root / rel).mkdir(parents=True, exist_ok=True)
    shutil.copy(src["dsc"], root / rel / f"{prefix}_dsc.nii.gz")
    shutil.copy(src["dsc"].with_name("sub-phantom_dsc.json"), root / rel / f"{prefix}_dsc.json")


def _bids_masks(der: Path, rel: str, prefix: str, src: dict) -> None:
    (der / rel).mkdir(parents=True, exist_ok=True)
    shutil.copy(src["lesion_hyper"], der / rel / f"{prefix}_label-tumor_mask.nii.gz")
    shutil.copy(src["brain"], der / rel / f"{prefix}_label-brain_mask.nii.gz")


def _new_bids(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    return root


# ---------------------------------------------------------------------- 1. one folder per series

#: The series of the BIDS dataset and the output folder each must get.
SERIES = {"sub-01_run-1": "sub-01/perf", "sub-01_run-2": "sub-01/perf",  # BIDS: runs share their session's folder
          "sub-02_ses-1_acq-gre": "sub-02/ses-1/perf", "sub-02_ses-1_acq-se": "sub-02/ses-1/perf"}


@pytest.fixture(scope="module")
def bids_run(tmp_path_factory, sources):
    """Two runs of sub-01 (one run-less mask set for both), two acquisitions of sub-02's session 1 (masks
    each), a corrupt sub-03, a symlinked sub-04 leaving the dataset; masks in a --derivatives folder
    beside the dataset; the dataset and OUT_DIR below folders named SECRET. Run once, log captured."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("hardening_bids")
    top = tmp / SECRET
    root = _new_bids(top / "study" / "rawdata")
    masks = top / "study" / "masks"
    for i, (prefix, folder) in enumerate(SERIES.items()):
        rel = folder
        _bids_series(root, rel, prefix, sources[i % 2])
        if prefix.startswith("sub-02"):
            _bids_masks(masks, rel, prefix, sources[i % 2])
    _bids_masks(masks, "sub-01/perf", "sub-01", sources[0])  # run-less masks: both runs
    bad = root / "sub-03" / "perf"
    bad.mkdir(parents=True)
    (bad / "sub-03_dsc.nii.gz").write_bytes(b"\x1f\x8b truncated")  # a failed case: its error names the file
    outside = top / "elsewhere" / "sub-04" / "perf"
    outside.mkdir(parents=True)
    os.symlink(outside.parent, root / "sub-04")  # skipped with a warning naming both paths
    before = folder_digest(root)
    out = tmp / "results" / SECRET / "perfusion"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["batch", str(root), str(out), "--derivatives", str(masks)])
    return {"tmp": tmp, "root": root, "masks": masks, "out": out, "code": code, "before": before,
            "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def test_bids_runs_and_acquisitions_each_keep_their_outputs(bids_run, capsys):
    out = bids_run["out"]
    assert bids_run["code"] == 3  # sub-03 is corrupt
    rows = [r for r in _summary(out) if r["case"] != "sub-03"]
    assert sorted(r["case"] for r in rows) == sorted(SERIES)
    for r in rows:
        assert r["status"] == "ok" and r["roi"] == "tumor", r
        assert (out / r["report"]).is_file(), r["report"]  # every link of the summary leads to its report
        folder = SERIES[r["case"]]
        assert r["report"] == f"{folder}/{r['case']}_report.html"
        rep = json.loads((out / folder / f"{r['case']}_report.json").read_text())
        assert rep["inputs"]["dsc"]["file"] == f"{r['case']}_dsc.nii.gz"  # its own series
        assert all(f.startswith(r["case"] + "_") for f in rep["files"].values())  # every entity in the names
        marker = json.loads((out / folder / marker_name(r["case"])).read_text())
        assert marker["case"] == r["case"] and marker["out"] == folder  # ... and in the done-marker
        assert sorted(marker["files"]) == sorted(p.name for p in (out / folder).glob(f"{r['case']}_*"))
    # the runs' numbers are their own (different phantoms), not one run's shown twice
    med = {r["case"]: float(r["rcbv_median"]) for r in rows}
    assert med["sub-01_run-1"] != med["sub-01_run-2"] and med["sub-02_ses-1_acq-gre"] != med["sub-02_ses-1_acq-se"]
    index = (out / "index.html").read_text()
    assert all(f'href="{v}/{k}_report.html"' in index for k, v in SERIES.items())
    assert folder_digest(bids_run["root"]) == bids_run["before"]  # inputs unchanged
    first = _markers(out)
    assert set(first) == set(SERIES)
    capsys.readouterr()
    assert main(["batch", str(bids_run["root"]), str(out), "--derivatives", str(bids_run["masks"])]) == 3
    assert "4 ok (4 already done), 1 failed" in capsys.readouterr().out  # no case overwrote another's
    assert _markers(out) == first


def test_two_series_that_still_share_a_folder_are_refused_before_any_work(tmp_path, sources, capsys):
    """``ses-1_sub-01_dsc`` (entities out of order) and ``sub-01_ses-1_dsc`` are two case ids with the
    same entities: one output folder. Refused with exit 4 naming both files; OUT_DIR not created."""
    root = _new_bids(tmp_path / "ds")
    _bids_series(root, "sub-01/ses-1/perf", "sub-01_ses-1", sources[0])
    _bids_series(root, "sub-01/ses-1/perf", "ses-1_sub-01", sources[1])
    before = folder_digest(root)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["batch", str(root), str(out), "-q"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "sub-01/ses-1/perf/ses-1_sub-01_dsc.nii.gz" in err[0] and "sub-01/ses-1/perf/sub-01_ses-1_dsc.nii.gz" in err[0]
    assert "rename one" in err[0] and str(tmp_path) not in err[0]
    assert not out.exists()
    assert folder_digest(root) == before


@pytest.mark.parametrize("name", TOP_FILES[:3])
def test_a_case_folder_named_like_a_summary_file_is_refused(tmp_path, sources, capsys, name):
    """A plain case folder ``summary.tsv/`` (``index.html/``, ...) would be replaced by the summary."""
    root = tmp_path / "in"
    for folder in ("case1", name):
        (root / folder).mkdir(parents=True)
        shutil.copy(sources[0]["dsc"], root / folder / "series.nii.gz")
        shutil.copy(sources[0]["dsc"].with_name("sub-phantom_dsc.json"), root / folder / "series.json")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    before_out, before_in = folder_digest(out), folder_digest(root)
    capsys.readouterr()
    assert main(["batch", str(root), str(out), "-q"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{name}/series.nii.gz" in err[0] and "rename the case folder" in err[0], err
    assert folder_digest(out) == before_out and folder_digest(root) == before_in


# ----------------------------------------------------------------------------- 2. resume by content


def _plain(root: Path, sources) -> Path:
    for i, src in enumerate(sources, start=1):
        d = root / f"case{i}"
        d.mkdir(parents=True)
        for key in ("dsc", "lesion_hyper", "brain"):
            shutil.copy(src[key], d / src[key].name)
        shutil.copy(src["dsc"].with_name("sub-phantom_dsc.json"), d / "sub-phantom_dsc.json")
    return root


def test_resume_by_content_after_the_dataset_is_copied_or_moved(tmp_path, sources, capsys):
    laptop = tmp_path / "laptop"
    root, out = _plain(laptop / "ds", sources), laptop / "out"
    assert main(["batch", str(root), str(out), "-q"]) == 0
    done = {c: f for c, (_, f) in _markers(out).items()}
    assert set(done) == {"case1", "case2"}
    # copied to cluster scratch, dataset and outputs: nothing recomputed
    scratch = tmp_path / "scratch" / "job1"
    shutil.copytree(laptop, scratch)
    root2, out2 = scratch / "ds", scratch / "out"
    capsys.readouterr()
    assert main(["batch", str(root2), str(out2)]) == 0
    assert "2 ok (2 already done)" in capsys.readouterr().out
    assert {c: f for c, (_, f) in _markers(out2).items()} == done
    marker = json.loads((out2 / "case1" / MARKER).read_text())  # inputs named relative to the dataset
    assert set(marker["fingerprint"]["inputs"]) == {"case1/sub-phantom_dsc.nii.gz", "case1/sub-phantom_dsc.json",
                                                    "case1/roi-lesion_hyper.nii.gz", "case1/mask-brain.nii.gz"}
    # the dataset moved (renamed), the outputs left where they were: still nothing recomputed
    moved = scratch / "ds-moved"
    os.rename(root2, moved)
    assert main(["batch", str(moved), str(out2)]) == 0
    assert "2 ok (2 already done)" in capsys.readouterr().out
    # one changed input: only its case
    roi = moved / "case2" / "roi-lesion_hyper.nii.gz"
    img = nib.load(str(roi))
    data = np.asarray(img.dataobj).copy()
    data[tuple(np.argwhere(data)[0])] = 0
    nib.save(nib.Nifti1Image(data, img.affine), str(roi))
    assert main(["batch", str(moved), str(out2)]) == 0
    assert "2 ok (1 already done)" in capsys.readouterr().out
    after = {c: f for c, (_, f) in _markers(out2).items()}
    assert after["case1"] == done["case1"] and after["case2"] != done["case2"]
    # a changed parameter recomputes every case: test_batch.py::test_resume_skips_done_cases_and_recomputes_changed_ones


# ---------------------------------------------------------------------------------- 3. privacy


def _leaks(folder: Path, secret: str) -> list[str]:
    """Files under ``folder`` whose bytes, decompressed gzip content or NIfTI header text hold ``secret``."""
    needle = secret.encode()
    bad = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        raw = p.read_bytes()
        if needle in raw:
            bad.append(str(p))
            continue
        if raw[:2] == b"\x1f\x8b" and needle in gzip.decompress(raw):
            bad.append(f"{p} (gzip content)")
            continue
        if p.name.endswith((".nii", ".nii.gz")):
            hdr = nib.load(str(p)).header
            if any(secret in hdr[f].tobytes().decode("latin-1") for f in ("descrip", "aux_file", "intent_name")):
                bad.append(f"{p} (NIfTI header)")
    return bad


def test_no_output_or_log_line_carries_a_folder_above_the_dataset(bids_run):
    out, tmp = bids_run["out"], bids_run["tmp"]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert marker_name("sub-01_run-1") in {Path(w).name for w in written}  # the done-markers are checked too
    assert "summary.json" in written and "index.html" in written
    assert _leaks(out, SECRET) == []
    for text in (bids_run["stdout"], bids_run["stderr"]):
        assert SECRET not in text and str(tmp) not in text, text
    assert "symlink" in bids_run["stderr"] and "case sub-03 failed" in bids_run["stderr"]  # the lines are there
    for p in out.rglob("*"):  # no absolute path at all in what is text
        if p.is_file() and p.suffix in (".json", ".tsv", ".html"):
            assert str(tmp) not in p.read_text(), p
    # files are still named: relative to the dataset in the summary, by file name and hash in each case's
    # report.json (analyze's own rule: no folder at all)
    rows = {r["case"]: r for r in _summary(out)}
    assert rows["sub-03"]["status"] == "failed" and "sub-03/perf/sub-03_dsc.nii.gz" in rows["sub-03"]["error"]
    rep = json.loads((out / SERIES["sub-01_run-1"] / "sub-01_run-1_report.json").read_text())
    assert rep["brain"]["source"] == "sub-01_label-brain_mask.nii.gz"
    assert rep["inputs"]["dsc"]["file"] == "sub-01_run-1_dsc.nii.gz" and len(rep["inputs"]["dsc"]["sha256"]) == 64
