"""perfusion bids: the BIDS-App command line, through real processes on real NIfTI files.

A BIDS dataset of 2 subjects x 2 sessions x 2 runs (32 x 32 phantoms, perfusion.tools.phantom seed 1;
lesion_hyper as label-tumor, truth rCBV 3.0) with TE/TR only in a top-level dsc.json (BIDS
inheritance), sub-02's FlipAngle overridden by sub-02/sub-02_dsc.json, masks in derivatives/masks.
It is analysed as a cluster array job would: one ``perfusion bids ... participant --participant-label``
process per subject, both at once, into one OUTPUT_DIR; then the group level rebuilds the summary; then
the BIDS validator (bids-validator-deno) checks the raw dataset and OUTPUT_DIR.

The raw dataset's .bidsignore lists the DSC files: BIDS 1.11 defines no DSC perfusion series yet
(BEP009), so without it the validator reports every *_dsc.nii.gz as NOT_INCLUDED.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import perfusion
from perfusion.cli.app import main

MATRIX = 32
RCBV_TOL = 0.10  # test_phantom.py's tolerance for a lesion's median rCBV
SUBJECTS, SESSIONS, RUNS = ("01", "02"), ("1", "2"), ("1", "2")
SRC = str(Path(perfusion.__file__).resolve().parents[1])  # this checkout's package, for the subprocesses
VALIDATOR_INSTALL = "pip install deno bids-validator-deno  (the test extra: pip install -e '.[test]')"


def _validator() -> str | None:
    found = shutil.which("bids-validator-deno") or str(Path(sys.executable).parent / "bids-validator-deno")
    return found if Path(found).is_file() else None


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from perfusion.io import staged_output
    from perfusion.tools.phantom import PhantomSpec, make_phantom, write_phantom

    folder = tmp_path_factory.mktemp("bids_source") / "seed1"
    with staged_output(folder, force=False) as stage:
        paths = write_phantom(make_phantom(PhantomSpec(matrix=MATRIX, seed=1)), stage)
    return {k: folder / v.relative_to(stage) for k, v in paths.items()}


def _dataset(root: Path, src: dict) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "perfusion test", "BIDSVersion": "1.10.0", "Authors": ["perfusion tests", "second author"]}))
    (root / "README").write_text("A test dataset of DSC phantoms written by perfusion's tests. " * 5 + "\n")
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in SUBJECTS))
    (root / ".bidsignore").write_text("# DSC perfusion is not in BIDS 1.11 (BEP009)\n*_dsc.nii.gz\n*_dsc.json\ndsc.json\n")
    sidecar = json.loads(src["dsc"].with_name("sub-phantom_dsc.json").read_text())
    (root / "dsc.json").write_text(json.dumps(sidecar))  # TE, TR, flip angle 60: inherited by every series
    (root / "sub-02").mkdir()
    (root / "sub-02" / "sub-02_dsc.json").write_text(json.dumps({"FlipAngle": 45}))  # more specific: overrides
    masks = root / "derivatives" / "masks"
    masks.mkdir(parents=True)
    (masks / "dataset_description.json").write_text(json.dumps(
        {"Name": "masks", "BIDSVersion": "1.10.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "manual"}]}))
    for sub in SUBJECTS:
        for ses in SESSIONS:
            rel = Path(f"sub-{sub}", f"ses-{ses}", "perf")
            (root / rel).mkdir(parents=True)
            (masks / rel).mkdir(parents=True)
            for run in RUNS:
                prefix = f"sub-{sub}_ses-{ses}_run-{run}"
                shutil.copy(src["dsc"], root / rel / f"{prefix}_dsc.nii.gz")
                shutil.copy(src["lesion_hyper"], masks / rel / f"{prefix}_label-tumor_mask.nii.gz")
                shutil.copy(src["brain"], masks / rel / f"{prefix}_label-brain_mask.nii.gz")
            # a session-level reference mask: applies to both runs (no run- entity)
            shutil.copy(src["nawm"], masks / rel / f"sub-{sub}_ses-{ses}_label-nawm_mask.nii.gz")
    return root


def _perfusion(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "perfusion", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _summary(out: Path) -> list[dict]:
    lines = (out / "summary.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, ln.split("\t"))) for ln in lines[1:]]


@pytest.fixture(scope="module")
def array_job(tmp_path_factory, source):
    """Two participant-level processes at once (sub-01 with the prefix, 02 without), as two tasks of an
    array job, into BIDS_DIR/derivatives/perfusion."""
    base = tmp_path_factory.mktemp("bids_app")
    root = _dataset(base / "ds", source)
    out = root / "derivatives" / "perfusion"
    t0 = time.monotonic()
    procs = [_perfusion("bids", str(root), str(out), "participant", "--participant-label", label)
             for label in ("sub-01", "02")]
    results = [p.communicate(timeout=900) for p in procs]
    return {"root": root, "out": out, "codes": [p.returncode for p in procs], "logs": results,
            "seconds": time.monotonic() - t0}


def test_two_concurrent_participant_tasks_share_one_output_dir(array_job):
    out = array_job["out"]
    assert array_job["codes"] == [0, 0], array_job["logs"]
    for (stdout, _), sub in zip(array_job["logs"], SUBJECTS):
        assert f"case sub-{sub}_ses-1_run-1: ok" in stdout and "4 cases (bids layout): 4 ok" in stdout
        other = "02" if sub == "01" else "01"
        assert f"sub-{other}_" not in stdout  # each task ran its own subject only
        assert "[4/4, done]" in stdout and "ETA" in stdout  # log lines with the time left (not a terminal)
    rows = _summary(out)  # written last by whichever task finished last: holds both subjects
    assert len(rows) == 8 and len({r["case"] for r in rows}) == 8
    assert {(r["participant_id"], r["session_id"]) for r in rows} == {
        (f"sub-{s}", f"ses-{e}") for s in SUBJECTS for e in SESSIONS}
    for r in rows:
        assert r["status"] == "ok" and r["roi"] == "tumor", r
        assert abs(float(r["rcbv_median"]) - 3.0) <= RCBV_TOL * 3.0, r
        assert r["case"].startswith(f"{r['participant_id']}_{r['session_id']}_run-")
    assert not list(out.rglob(".perfusion-partial-*")) and not list(out.rglob(".perfusion-old-*"))


def test_every_case_holds_bids_derivatives(array_job):
    out, root = array_job["out"], array_job["root"]
    for sub in SUBJECTS:
        for ses in SESSIONS:
            for run in RUNS:
                prefix = f"sub-{sub}_ses-{ses}_run-{run}"
                perf = out / f"sub-{sub}" / f"ses-{ses}" / "perf"  # every run of the session, as in the raw tree
                for name in ("cbv.nii.gz", "cbf.nii.gz", "rcbv.nii.gz", "desc-ftb_dseg.nii.gz", "desc-ftb_dseg.tsv",
                             "desc-brain_mask.nii.gz", "label-tumor_mask.nii.gz", "desc-baseline_T2starw.nii.gz",
                             "report.json", "report.html"):
                    assert (perf / f"{prefix}_{name}").is_file(), f"{prefix}_{name}"
                assert not list(perf.glob("*_dsc.*")) and not list(perf.glob("*ftb.nii.gz"))
                assert nib.load(str(perf / f"{prefix}_desc-baseline_T2starw.nii.gz")).ndim == 3
                lut = (perf / f"{prefix}_desc-ftb_dseg.tsv").read_text().splitlines()
                assert lut == ["index\tname", "1\tlow", "2\tmid", "3\thigh"]
                ftb = np.asarray(nib.load(str(perf / f"{prefix}_desc-ftb_dseg.nii.gz")).dataobj)
                assert set(np.unique(ftb)) <= {0, 1, 2, 3} and (ftb == 3).sum() > 0
                rep = json.loads((perf / f"{prefix}_report.json").read_text())
                assert rep["case"]["label"] == prefix
                assert rep["acquisition"]["te_source"] == "sidecar dsc.json EchoTime"  # inherited
                assert rep["acquisition"]["flip_angle_deg"] == (45 if sub == "02" else 60)  # sub-level overrides
                _check_sidecars(perf, prefix, root)


def _check_sidecars(perf: Path, prefix: str, root: Path) -> None:
    """Every map's sidecar: Units, Sources as BIDS URIs of the input files (series and masks, relative
    to the dataset), no absolute path, no RawSources (deprecated in BIDS 1.9)."""
    rel = f"sub-{prefix[4:6]}/ses-{prefix[11]}/perf"
    want = [f"bids:raw:{rel}/{prefix}_dsc.nii.gz", f"bids:raw:derivatives/masks/{rel}/{prefix}_label-brain_mask.nii.gz",
            f"bids:raw:derivatives/masks/{rel}/{prefix[:12]}_label-nawm_mask.nii.gz",
            f"bids:raw:derivatives/masks/{rel}/{prefix}_label-tumor_mask.nii.gz"]
    units = {"cbv": "mL/100 g", "cbf": "mL/100 g/min", "mtt": "s", "rcbv": "ratio", "desc-ftb_dseg": "label"}
    maps = sorted(perf.glob(f"{prefix}_*.nii.gz"))
    assert len(maps) >= 12
    for image in maps:
        side = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
        assert side["Sources"] == want, image.name
        assert "RawSources" not in side and side["Units"]
        text = json.dumps(side)
        assert str(root) not in text and str(root.parent) not in text
    for key, unit in units.items():
        assert json.loads((perf / f"{prefix}_{key}.json").read_text())["Units"] == unit
    tables = sorted(perf.glob(f"{prefix}_*_timeseries.json"))  # the TSV tables' sidecars: Sources, then columns
    assert len(tables) == 3
    for table in tables:
        side = json.loads(table.read_text())
        assert side["Sources"] == want and side["time_s"]["Units"] == "s", table.name


def test_dataset_description_and_group_level(array_job):
    out = array_job["out"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "perfusion" and gen["Version"] == perfusion.__version__
    # OUTPUT_DIR lies in BIDS_DIR/derivatives/: the source is the relative ../.., never a folder name
    assert desc["SourceDatasets"] == [{"URL": "../.."}] and desc["DatasetLinks"] == {"raw": "../.."}
    for name in ("dataset_description.json", "summary.tsv", "summary.json", "index.html"):
        assert str(array_job["root"].parent) not in (out / name).read_text(), name
    page = (out / "index.html").read_text()
    assert "<th>participant</th><th>session</th>" in page and page.count("<td>sub-02</td>") == 4
    assert "<th>warnings</th>" in page and page.count('<td class="warn">') == 8
    # the group level rebuilds the top files from the finished cases alone
    for name in ("summary.tsv", "summary.json", "index.html"):
        (out / name).unlink()
    proc = _perfusion("bids", str(array_job["root"]), str(out), "group")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "summary.tsv, summary.json and index.html of 8 finished cases" in stdout
    assert len(_summary(out)) == 8 and json.loads((out / "summary.json").read_text())["n_cases"] == 8


def _validate(folder: Path) -> tuple[list[dict], list[dict]]:
    exe = _validator()
    res = subprocess.run([exe, str(folder), "--format", "json"], capture_output=True, text=True, timeout=300)
    issues = json.loads(res.stdout)["issues"]["issues"]
    return ([i for i in issues if i["severity"] == "error"], [i for i in issues if i["severity"] == "warning"])


@pytest.mark.skipif(_validator() is None, reason=f"the BIDS validator is not installed: {VALIDATOR_INSTALL}")
def test_bids_validator_accepts_the_raw_dataset_and_the_derivatives(array_job, capsys):
    for folder in (array_job["root"], array_job["out"]):
        errors, warns = _validate(folder)
        with capsys.disabled():
            print(f"\nbids-validator {folder.name}: {len(errors)} errors, warnings: "
                  f"{sorted({w['code'] for w in warns})}")
        assert errors == [], [(e["code"], e.get("location")) for e in errors]


@pytest.mark.skipif(_validator() is None, reason=f"the BIDS validator is not installed: {VALIDATOR_INSTALL}")
def test_bids_validator_sees_a_misnamed_derivative(array_job, tmp_path):
    """The validator run above can fail: OUTPUT_DIR's .bidsignore hides perfusion's suffixes in perf/
    only, by name, so a map with a suffix perfusion does not write, in perf/ itself, is an error."""
    out = tmp_path / "out"
    shutil.copytree(array_job["out"], out)
    perf = out / "sub-01" / "ses-1" / "perf"
    shutil.copy(perf / "sub-01_ses-1_run-1_cbv.nii.gz", perf / "sub-01_ses-1_run-1_cbvmap.nii.gz")
    errors, _ = _validate(out)
    assert [e["code"] for e in errors] == ["NOT_INCLUDED"], errors
    assert errors[0]["location"] == "/sub-01/ses-1/perf/sub-01_ses-1_run-1_cbvmap.nii.gz"


@pytest.mark.skipif(_validator() is None, reason=f"the BIDS validator is not installed: {VALIDATOR_INSTALL}")
def test_bids_validator_checks_the_names_it_knows_in_anat(array_job, tmp_path):
    """BIDS 1.11 has no derivative in perf/, but anat/ derivatives take _mask, _dseg (+ .tsv) and
    _T2starw: in a copy with perf/ renamed anat/ and only the other suffixes ignored, the validator
    itself accepts those names (entities, order, label-/desc-), with the one error BIDS requires of an
    anat/ image derivative: a SkullStripped key, which perfusion does not write (its sidecars are not
    anat/'s)."""
    out = tmp_path / "out"
    shutil.copytree(array_job["out"], out)
    for perf in sorted(out.rglob("perf")):
        perf.rename(perf.with_name("anat"))
    keep = ("mask", "dseg", "T2starw")
    (out / ".bidsignore").write_text("".join(ln.replace("**/perf/", "**/anat/") + "\n"
                                             for ln in (out / ".bidsignore").read_text().splitlines()
                                             if not any(ln.endswith(f"_{k}.*") for k in keep)))
    errors, _ = _validate(out)
    assert {(e["code"], e.get("subCode")) for e in errors} <= {("SIDECAR_KEY_REQUIRED", "SkullStripped")}, errors
    assert all(e["location"].endswith("_desc-baseline_T2starw.nii.gz") for e in errors)
    assert len(list(out.rglob("anat/*_mask.nii.gz"))) == 8 * 4 and len(list(out.rglob("anat/*_dseg.tsv"))) == 8


def test_every_output_name_follows_the_bids_schema(array_job):
    """The check the validator cannot make (tests/bids_names.py, the BIDS schema of bidsschematools):
    every file perfusion wrote into OUTPUT_DIR, maps, sidecars, masks, tables and reports."""
    from bids_names import check_tree, schema_rules

    problems, checked = check_tree(array_job["out"])
    assert problems == []
    n_perf = len([p for p in array_job["out"].rglob("perf/*") if not p.name.startswith(".")])
    assert checked == n_perf + 4 and n_perf >= 8 * 35  # 8 series of 39 files each; 4 top files
    assert schema_rules()["bids_version"].startswith("1.")


@pytest.mark.parametrize("rel, problem", [
    ("sub-01/ses-1/perf/sub-01_ses-1_desc-x_run-1_cbv.nii.gz", "entity 'run' out of the schema's order"),
    ("sub-01/ses-1/perf/sub-01_ses-1_foo-1_cbv.nii.gz", "'foo-1' is not a BIDS entity"),
    ("sub-01/ses-1/perf/sub-01_ses-1_run-a_cbv.nii.gz", "run-a: the value does not match [0-9]+"),
    ("sub-01/ses-1/perf/sub-01_ses-1_label-tu_mor_mask.nii.gz", "'mor' is not a BIDS entity"),
    ("sub-01/ses-1/perf/sub-01_ses-1_cbv.nii.gzip", "extension '.nii.gzip' is not a BIDS extension"),
    ("sub-01/ses-1/perf/sub-01_ses-2_cbv.nii.gz", "its ses- entity differs from the folder ses-1"),
    ("sub-01/ses-1/run-1/perf/sub-01_ses-1_run-1_cbv.nii.gz", "not in sub-<label>/[ses-<label>/]<datatype>/"),
    ("sub-01/ses-1/perf/sub-01_ses-1_cbv.nii.gz", "no JSON sidecar"),
])
def test_the_schema_check_catches_a_wrong_name(tmp_path, rel, problem):
    from bids_names import check_tree

    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_bytes(b"x")
    if "sidecar" not in problem:
        (tmp_path / rel).with_name(rel.rsplit("/", 1)[1].split(".")[0] + ".json").write_text("{}")
    problems, checked = check_tree(tmp_path)  # the sidecar, named alike, has the same problem
    mine = [p for p in problems if p.split(":")[0].endswith(Path(rel).name)]
    assert checked == (1 if "sidecar" in problem else 2) and len(mine) == 1 and problem in mine[0], problems
    assert all(problem in p for p in problems), problems  # the sidecar's, if any: the same problem


def test_report_and_compare_take_one_analysis_of_a_shared_folder(array_job, tmp_path, capsys):
    """A session's perf/ folder holds both runs' analyses: report and compare take one by its
    *_report.json file; given the folder, they fail in one line listing the reports (exit 4)."""
    perf1, perf2 = (array_job["out"] / "sub-01" / f"ses-{s}" / "perf" for s in SESSIONS)
    page = perf1 / "sub-01_ses-1_run-2_report.html"
    before = page.read_bytes()
    page.unlink()
    assert main(["report", str(perf1 / "sub-01_ses-1_run-2_report.json"), "-q"]) == 0
    # the same page as the batch wrote, from run-2's files alone, but for the minute the page was written
    written = re.compile(rb"page written by perfusion [^<]*? on \d{4}-\d\d-\d\d \d\d:\d\d UTC")
    assert len(written.findall(before)) == 1
    assert written.sub(b"", page.read_bytes()) == written.sub(b"", before)
    assert not list(perf1.glob(".report-view-*"))
    out = tmp_path / "cmp"
    assert main(["compare", str(perf1 / "sub-01_ses-1_run-1_report.json"), str(perf2 / "sub-01_ses-2_run-1_report.json"),
                 "--out", str(out), "-q"]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in data["rois"]] == ["tumor"]
    assert data["inputs"]["prior"]["report_json"] == "sub-01_ses-1_run-1_report.json"
    assert data["inputs"]["current"]["report_json"] == "sub-01_ses-2_run-1_report.json"
    capsys.readouterr()
    for args in (["report", str(perf1)], ["compare", str(perf1), str(perf2), "--out", str(tmp_path / "c2")]):
        assert main([*args, "-q"]) == 4
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{perf1}: holds 2 analyses (sub-01_ses-1_run-1_report.json, " \
                                 "sub-01_ses-1_run-2_report.json); give the report file of one" in err[0], err


def test_a_failed_or_killed_run_never_touches_another_run_of_its_session(small_ds, tmp_path):
    """Two runs share sub-01/ses-1/perf/. A killed run of run-1 (its staging folder, its journal naming
    a file it had moved in, no marker) and then a failing run-1 (its series broken) leave run-2's
    files byte for byte and its marker untouched (resumed); run-1's leftovers are removed, and a
    journal entry naming another case's file or a path outside the folder is not followed."""
    from perfusion.batch.discovery import marker_name

    ds = tmp_path / "ds"
    shutil.copytree(small_ds, ds)
    out = tmp_path / "out"
    args = ["bids", str(ds), str(out), "participant", "--participant-label", "01", "--session-label", "1", "-q",
            "--no-html"]
    assert main(args) == 0
    perf = out / "sub-01" / "ses-1" / "perf"
    assert sorted(p.name for p in perf.glob(".*")) == [marker_name("sub-01_ses-1_run-1"),
                                                       marker_name("sub-01_ses-1_run-2")]  # no lock, stage, journal
    run2 = {p.name: p.read_bytes() for p in perf.glob("sub-01_ses-1_run-2_*")}
    assert len(run2) >= 35
    mark2 = perf / marker_name("sub-01_ses-1_run-2")
    stamp = mark2.stat().st_mtime_ns
    (perf / marker_name("sub-01_ses-1_run-1")).unlink()
    stage = perf / ".perfusion-partial-sub-01_ses-1_run-1-killed"
    stage.mkdir()
    (stage / "sub-01_ses-1_run-1_cbv.nii.gz").write_bytes(b"half")
    stale = perf / "sub-01_ses-1_run-1_desc-stale_cbv.nii.gz"
    stale.write_bytes(b"moved in by the killed run")
    (tmp_path / "outside.txt").write_text("keep")
    (perf / ".sub-01_ses-1_run-1.perfusion-pending.json").write_text(json.dumps(
        {"files": [stale.name, "sub-01_ses-1_run-2_cbv.nii.gz", "../../../../outside.txt"]}))
    (ds / "sub-01" / "ses-1" / "perf" / "sub-01_ses-1_run-1_dsc.nii.gz").write_bytes(b"\x1f\x8b truncated")
    assert main(args) == 3
    assert {r["case"]: r["status"] for r in _summary(out)} == {"sub-01_ses-1_run-1": "failed",
                                                                 "sub-01_ses-1_run-2": "ok"}
    assert {p.name: p.read_bytes() for p in perf.glob("sub-01_ses-1_run-2_*")} == run2
    assert mark2.stat().st_mtime_ns == stamp  # resumed, not rewritten
    assert not stage.exists() and not stale.exists() and (tmp_path / "outside.txt").read_text() == "keep"
    assert sorted(p.name for p in perf.glob(".*")) == [mark2.name]


def test_a_recomputed_run_removes_its_own_old_files_only(small_ds, tmp_path):
    """``report --anat`` adds run-1's T1 files to the shared folder (named in its report.json); when
    run-1 is computed again without them, they go, and run-2's files stay as they were."""
    out = tmp_path / "out"
    base = ["bids", str(small_ds), str(out), "participant", "--participant-label", "01", "--session-label", "1", "-q",
            "--no-html"]
    assert main(base) == 0
    perf = out / "sub-01" / "ses-1" / "perf"
    anat = perf / "sub-01_ses-1_run-2_desc-baseline_T2starw.nii.gz"  # any 3-D image registers
    assert main(["report", str(perf / "sub-01_ses-1_run-1_report.json"), "--anat", str(anat), "-q"]) == 0
    t1 = ["sub-01_ses-1_run-1_space-dsc_T1w.nii.gz", "sub-01_ses-1_run-1_space-dsc_T1w.json",
          "sub-01_ses-1_run-1_from-T1w_to-dsc_mode-image_xfm.tfm", "sub-01_ses-1_run-1_report.html"]
    assert all((perf / n).is_file() for n in t1)
    run2 = {p.name: p.read_bytes() for p in perf.glob("sub-01_ses-1_run-2_*")}
    f = tmp_path / "f.json"
    f.write_text('{"dsc": {"run": 1}}')
    assert main([*base, "--bids-filter-file", str(f), "--rcbv-high", "1.8"]) == 0
    assert not any((perf / n).exists() for n in t1)
    assert (perf / "sub-01_ses-1_run-1_rcbv.nii.gz").is_file()
    assert {p.name: p.read_bytes() for p in perf.glob("sub-01_ses-1_run-2_*")} == run2


def test_two_series_writing_one_file_are_refused_before_any_work(tmp_path, source, capsys):
    """Series of one session share its folder: two whose outputs would take one name (a raw desc-
    entity equal to one perfusion writes) are refused, naming both (exit 4), before OUT_DIR exists."""
    root = tmp_path / "ds"
    (root / "sub-01" / "perf").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    for name in ("sub-01", "sub-01_desc-standardized"):
        shutil.copy(source["dsc"], root / "sub-01" / "perf" / f"{name}_dsc.nii.gz")
    capsys.readouterr()
    assert main(["bids", str(root), str(tmp_path / "out"), "participant", "-q"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sub-01/perf/sub-01_dsc.nii.gz and sub-01/perf/sub-01_desc-standardized_dsc.nii.gz: " \
        "both would write sub-01_desc-standardized_rcbv" in err[0], err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- command line, without analysis


def test_analysis_level_is_participant_or_group(tmp_path, capsys):
    assert main(["bids", str(tmp_path), str(tmp_path / "out"), "session"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["perfusion: error: analysis level 'session': choose participant or group"]


def test_group_level_without_finished_cases_is_bad_input(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    assert main(["bids", str(tmp_path / "ds"), str(tmp_path / "out"), "group", "-q"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no finished case" in err[0]


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory, source):
    return _dataset(tmp_path_factory.mktemp("bids_small") / "ds", source)


@pytest.mark.parametrize("content, what", [
    ("{not json", "is not valid JSON"),
    ('["dsc"]', "must hold a JSON object"),
    ('{"bold": {"task": "rest"}}', "query 'bold'"),
    ('{"dsc": {"session": "1", "space": "MNI"}}', "unknown entity 'space'"),
    ('{"dsc": {"run": {"a": 1}}}', "run must be a label"),
])
def test_a_bad_filter_file_is_one_line_naming_it(small_ds, tmp_path, capsys, content, what):
    bad = tmp_path / "filter.json"
    bad.write_text(content)
    code = main(["bids", str(small_ds), str(tmp_path / "out"), "participant", "--bids-filter-file", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and str(bad) in err[0] and what in err[0], err
    assert not (tmp_path / "out").exists()


def test_labels_and_filters_select_the_series(small_ds, tmp_path):
    from perfusion.batch.discovery import discover
    from perfusion.cli.bids import case_filter, read_filter_file

    _, cases = discover(small_ds)
    assert len(cases) == 8

    def ids(participants=(), sessions=(), query=None):
        return [c.case_id for c in case_filter(participants, sessions, query or {})(cases)]

    assert ids(["sub-02"], ["1"]) == ["sub-02_ses-1_run-1", "sub-02_ses-1_run-2"]
    assert ids(["01", "sub-02"], ["ses-2"], {"run": 2}) == ["sub-01_ses-2_run-2", "sub-02_ses-2_run-2"]
    assert ids(query={"session": ["1"], "run": "01", "acquisition": None}) == [
        "sub-01_ses-1_run-1", "sub-02_ses-1_run-1"]
    with pytest.raises(perfusion.errors.InputError, match="no DSC series left"):
        ids(query={"acquisition": "gre"})
    with pytest.raises(perfusion.errors.InputError, match="--participant-label 03"):
        ids(["03", "01"])
    f = tmp_path / "f.json"
    f.write_text('{"dsc": {"session": "2", "run": [1]}}')
    assert ids(query=read_filter_file(f)) == ["sub-01_ses-2_run-1", "sub-02_ses-2_run-1"]


def test_filter_file_run_analyses_only_the_kept_series(small_ds, tmp_path):
    f = tmp_path / "f.json"
    f.write_text('{"dsc": {"subject": "01", "session": "2", "run": 2}}')
    out = tmp_path / "out"
    assert main(["bids", str(small_ds), str(out), "participant", "--bids-filter-file", str(f), "-q", "--no-html"]) == 0
    rows = _summary(out)
    assert [r["case"] for r in rows] == ["sub-01_ses-2_run-2"]
    perf = out / "sub-01" / "ses-2" / "perf"
    assert (perf / "sub-01_ses-2_run-2_report.json").is_file() and not list(perf.glob("*report.html"))
    assert not (out / "sub-01" / "ses-2" / "run-2").exists() and not list(perf.glob("sub-01_ses-2_run-1_*"))
    assert rows[0]["report"].endswith("_report.json")  # --no-html: the summary links the report.json


def test_a_case_locked_by_another_process_fails_alone(small_ds, tmp_path, capsys):
    """Per-case locks: while another run holds sub-01_ses-1_run-1's folder, that case fails (exit 3,
    named) and the other kept case is written."""
    from perfusion.batch.engine import case_lock

    out = tmp_path / "out"
    with case_lock(out / "sub-01" / "ses-1" / "perf", "sub-01_ses-1_run-1"):
        code = main(["bids", str(small_ds), str(out), "participant", "--participant-label", "01", "--session-label",
                     "1", "-q", "--no-html"])
    assert code == 3
    err = capsys.readouterr().err
    assert "case sub-01_ses-1_run-1 failed" in err and "another perfusion run is writing" in err
    status = {r["case"]: r["status"] for r in _summary(out)}
    assert status == {"sub-01_ses-1_run-1": "failed", "sub-01_ses-1_run-2": "ok"}


# ----------------------------------------------------------------------------------- options


def _params(command: str) -> dict[str, object]:
    import typer

    from perfusion.cli.app import app

    cmd = typer.main.get_command(app).commands[command]
    return {p.name: p for p in cmd.params}


def test_batch_and_bids_take_every_analyze_option():
    """Each analyze option is in batch and bids with the same flags, help and default, or is one of
    options.PER_CASE (found per case in the dataset, by the batch option named there)."""
    from perfusion.cli.options import PER_CASE

    analyze = _params("analyze")
    assert set(PER_CASE) <= set(analyze)
    for command in ("batch", "bids"):
        params = _params(command)
        for name, p in analyze.items():
            if name in PER_CASE:
                flag = PER_CASE[name].split()[0]
                if flag.startswith("--"):
                    assert flag in [o for q in params.values() for o in q.opts], (command, name, flag)
                continue
            assert name in params, f"{command} lacks analyze's {p.opts}"
            q = params[name]
            assert (q.opts, q.secondary_opts, q.help, q.default) == (p.opts, p.secondary_opts, p.help, p.default), \
                (command, name)
    assert "--no-html" in _params("batch")["html"].secondary_opts


# ------------------------------------------------------------------------------------ pieces


def test_sidecar_inheritance_order(tmp_path):
    from perfusion.io.series import inherited_sidecars

    root = tmp_path / "ds"
    perf = root / "sub-01" / "ses-1" / "perf"
    perf.mkdir(parents=True)
    series = perf / "sub-01_ses-1_run-1_dsc.nii.gz"
    series.write_bytes(b"")
    for rel in ("dsc.json", "run-1_dsc.json", "sub-01/sub-01_dsc.json", "sub-01/ses-1/sub-01_ses-1_dsc.json",
                "sub-01/ses-1/perf/sub-01_ses-1_run-1_dsc.json", "sub-01/ses-1/perf/sub-01_ses-1_run-2_dsc.json",
                "sub-01/sub-01_asl.json", "sub-02_dsc.json"):
        (root / rel).write_text("{}")
    assert inherited_sidecars(series) == [perf / "sub-01_ses-1_run-1_dsc.json"]  # not a BIDS dataset: the twin alone
    (root / "dataset_description.json").write_text("{}")
    got = [p.relative_to(root).as_posix() for p in inherited_sidecars(series)]
    assert got == ["dsc.json", "run-1_dsc.json", "sub-01/sub-01_dsc.json", "sub-01/ses-1/sub-01_ses-1_dsc.json",
                   "sub-01/ses-1/perf/sub-01_ses-1_run-1_dsc.json"]


def test_twin_alone_outside_a_bids_dataset(tmp_path):
    from perfusion.io.series import inherited_sidecars

    series = tmp_path / "x_dsc.nii.gz"
    series.write_bytes(b"")
    (tmp_path / "dsc.json").write_text("{}")
    assert inherited_sidecars(series) == []
    (tmp_path / "x_dsc.json").write_text("{}")
    assert inherited_sidecars(series) == [tmp_path / "x_dsc.json"]


def test_source_datasets_never_name_a_folder(tmp_path):
    from perfusion.batch.engine import dataset_description

    src = tmp_path / "DOE_JOHN" / "ds"
    src.mkdir(parents=True)
    (src / "dataset_description.json").write_text(json.dumps({"Name": "x", "DatasetDOI": "10.18112/openneuro.ds1"}))
    desc = dataset_description(tmp_path / "elsewhere" / "out", src)
    assert desc["SourceDatasets"] == [{"DOI": "doi:10.18112/openneuro.ds1"}]
    assert desc["DatasetLinks"] == {"raw": "doi:10.18112/openneuro.ds1"}
    (src / "dataset_description.json").write_text(json.dumps({"Name": "x"}))
    desc = dataset_description(tmp_path / "elsewhere" / "out", src)
    assert desc["SourceDatasets"] == [{"URL": "bids:raw:"}] and "DatasetLinks" not in desc
    assert "DOE_JOHN" not in json.dumps(desc) and str(tmp_path) not in json.dumps(desc)
    desc = dataset_description(src / "derivatives" / "perfusion", src)
    assert desc["SourceDatasets"] == [{"URL": "../.."}]


def test_eta_text():
    from perfusion.cli.batch import eta_text

    assert eta_text(10.0, 1, 4) == "ETA 30 s"
    assert eta_text(40.0, 2, 8) == "ETA 2 min 0 s"
    assert eta_text(5.0, 0, 3) == "ETA unknown" and eta_text(5.0, 3, 3) == "done"


def test_bids_anat_discovery_prefers_post_contrast(small_ds, tmp_path):
    from perfusion.batch.discovery import discover

    root = tmp_path / "ds"
    shutil.copytree(small_ds, root)
    anat = root / "sub-01" / "ses-1" / "anat"
    anat.mkdir()
    for name in ("sub-01_ses-1_T1w.nii.gz", "sub-01_ses-1_ce-gadolinium_T1w.nii.gz"):
        (anat / name).write_bytes(b"x")
    _, cases = discover(root)
    by_id = {c.case_id: c for c in cases}
    assert by_id["sub-01_ses-1_run-1"].anat == anat / "sub-01_ses-1_ce-gadolinium_T1w.nii.gz"
    assert by_id["sub-01_ses-1_run-2"].anat == anat / "sub-01_ses-1_ce-gadolinium_T1w.nii.gz"
    assert by_id["sub-01_ses-2_run-1"].anat is None and by_id["sub-02_ses-1_run-1"].anat is None
    _, cases = discover(root, anat_glob="sub-{sub}/ses-{ses}/anat/*_T1w.nii.gz")
    assert "2 anatomical images" in {c.case_id: c for c in cases}["sub-01_ses-1_run-1"].problem


def test_terminal_progress_bar_shows_an_eta(small_ds, tmp_path):
    """On a terminal (a pseudo-terminal here) the cases' progress is a bar with the count and an ETA."""
    import pty

    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "COLUMNS": "150",
           "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "perfusion", "bids", str(small_ds), str(tmp_path / "out"),
                             "participant", "--participant-label", "01", "--session-label", "2", "--no-html"],
                            stdout=child_fd, stderr=child_fd, env=env)
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "cases" in screen and "2/2" in screen and "ETA" in screen, screen[-2000:]
    assert "done 2, failed 0, remaining 0" in screen
    assert "case sub-01_ses-2_run-1: ok" not in screen  # a bar, not the log lines
