"""perfusion batch: plain and BIDS datasets of phantom cases, a corrupt case, resume, changed inputs and
parameters, a real Dask scheduler with two workers on 127.0.0.1, a local Dask cluster (--jobs 2), and a
batch killed with SIGKILL then re-run.

Cases are 48 x 48 phantoms (seeds 1, 2, ...) written with perfusion.tools.phantom; truth: lesion_hyper rCBV
3.0, lesion_hypo 0.6. RCBV_TOL 0.10 is test_phantom.py's tolerance for a lesion's median rCBV.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from perfusion.batch.engine import COLUMNS, MARKER, thread_env
from perfusion.cli.app import main

MATRIX = 48
RCBV_TOL = 0.10
TRUTH = {"hyper": 3.0, "hypo": 0.6}
BIN = Path(sys.executable).parent


def _phantom(folder: Path, seed: int) -> dict:
    from perfusion.io import staged_output
    from perfusion.tools.phantom import PhantomSpec, make_phantom, write_phantom

    ph = make_phantom(PhantomSpec(matrix=MATRIX, seed=seed))
    with staged_output(folder, force=False) as stage:
        paths = write_phantom(ph, stage)
    return {k: folder / v.relative_to(stage) for k, v in paths.items()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three phantom case folders (plain layout as written by the phantom) to copy from."""
    base = tmp_path_factory.mktemp("batch_sources")
    return [_phantom(base / f"case{i}", seed=i) for i in (1, 2, 3)]


def _plain(root: Path, sources, n: int = 2, corrupt: bool = True) -> Path:
    root.mkdir(parents=True)
    for i, src in enumerate(sources[:n], start=1):
        d = root / f"case{i}"
        d.mkdir()
        for key in ("dsc", "lesion_hyper", "lesion_hypo", "brain"):
            shutil.copy(src[key], d / src[key].name)
        shutil.copy(src["dsc"].with_name("sub-phantom_dsc.json"), d / "sub-phantom_dsc.json")
    if corrupt:
        (root / "broken").mkdir()
        (root / "broken" / "sub-x_dsc.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return root


def _summary(out: Path) -> list[dict]:
    lines = (out / "summary.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, ln.split("\t"))) for ln in lines[1:]]


def _marker_times(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.rglob(MARKER)}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, sources):
    base = tmp_path_factory.mktemp("batch_plain")
    root = _plain(base / "in", sources)
    out = base / "out"
    code = main(["batch", str(root), str(out), "-q"])
    return {"root": root, "out": out, "code": code}


def test_corrupt_case_is_recorded_and_the_batch_goes_on(plain_run):
    assert plain_run["code"] == 3
    rows = _summary(plain_run["out"])
    assert list(rows[0]) == list(COLUMNS)
    broken = [r for r in rows if r["case"] == "broken"]
    assert len(broken) == 1 and broken[0]["status"] == "failed"
    assert "sub-x_dsc.nii.gz" in broken[0]["error"] and "re-export" in broken[0]["error"]
    assert not (plain_run["out"] / "broken").exists()  # nothing half-written for the failed case
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["case"] for r in ok} == {"case1", "case2"} and len(ok) == 4
    for r in ok:
        kind = "hyper" if r["roi"].endswith("hyper") else "hypo"
        assert abs(float(r["rcbv_median"]) - TRUTH[kind]) <= RCBV_TOL * TRUTH[kind], r
        assert r["verdict"] == ("likely_recurrence" if kind == "hyper" else "likely_treatment_effect")
        assert float(r["rcbv_ci_low"]) <= float(r["rcbv_median"]) <= float(r["rcbv_ci_high"])
        assert r["mixed"] == "False"
        assert (plain_run["out"] / r["report"]).is_file()


def test_summary_json_and_index(plain_run):
    out = plain_run["out"]
    s = json.loads((out / "summary.json").read_text())
    assert s["n_cases"] == 3 and s["n_failed"] == 1 and s["layout"] == "plain"
    assert s["units"]["rcbv_median"] == "ratio" and "not a medical device" in s["disclaimer"]
    assert s["units"]["rcbv_ci_low"] == s["units"]["rcbv_ci_high"] == "ratio" and s["units"]["ftb_high"] == "fraction"
    assert len(s["rows"]) == 5 and set(s["rows"][0]) == set(COLUMNS)
    # plain case folders carry no BIDS entity: participant_id and session_id are BIDS's n/a
    assert {(r["participant_id"], r["session_id"]) for r in s["rows"]} == {("n/a", "n/a")}
    page = (out / "index.html").read_text()
    assert page.count('href="case1/report.html"') == 2 and "<script" not in page
    assert "http" not in page


def test_each_case_holds_the_analyze_contract(plain_run):
    case = plain_run["out"] / "case1"
    for name in ("cbv.nii.gz", "cbv.json", "rcbv.nii.gz", "report.json", "report.html", "curves.tsv", MARKER):
        assert (case / name).is_file(), name
    assert json.loads((case / "cbv.json").read_text())["Units"] == "mL/100 g"
    marker = json.loads((case / MARKER).read_text())
    fp = marker["fingerprint"]
    assert fp["software_version"] and fp["parameters"]["method"] == "model"
    assert len(fp["inputs"]) == 5 and all(len(h) == 64 for h in fp["inputs"].values())


def test_resume_skips_done_cases_and_recomputes_changed_ones(tmp_path, sources, capsys):
    root = _plain(tmp_path / "in", sources, corrupt=False)
    out = tmp_path / "out"
    assert main(["batch", str(root), str(out), "-q"]) == 0
    first = _marker_times(out)
    assert set(first) == {"case1", "case2"}
    # same command: nothing recomputed
    assert main(["batch", str(root), str(out)]) == 0
    assert _marker_times(out) == first
    assert "2 ok (2 already done)" in capsys.readouterr().out
    # a changed input recomputes only its case
    roi = root / "case2" / "roi-lesion_hyper.nii.gz"
    img = nib.load(str(roi))
    data = np.asarray(img.dataobj).copy()
    data[np.argwhere(data)[0][0], np.argwhere(data)[0][1], np.argwhere(data)[0][2]] = 0  # one voxel fewer
    nib.save(nib.Nifti1Image(data, img.affine), str(roi))
    assert main(["batch", str(root), str(out), "-q"]) == 0
    second = _marker_times(out)
    assert second["case1"] == first["case1"] and second["case2"] != first["case2"]
    # a changed parameter recomputes everything
    assert main(["batch", str(root), str(out), "-q", "--rcbv-high", "2.0"]) == 0
    third = _marker_times(out)
    assert all(third[c] != second[c] for c in third)
    rep = json.loads((out / "case1" / "report.json").read_text())
    assert rep["thresholds"]["rcbv_high"] == 2.0


def _bids(root: Path, sources) -> Path:
    """sub-01 with two sessions (phantom seeds 1 and 2), sub-02 without sessions (seed 3), sub-03 corrupt;
    masks in derivatives/masks with BIDS label names; a symlinked subject pointing outside the root."""
    (root / "derivatives" / "masks").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    layout = [("01", "1", sources[0]), ("01", "2", sources[1]), ("02", None, sources[2])]
    for sub, ses, src in layout:
        rel = Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "") / "perf"
        prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        (root / rel).mkdir(parents=True)
        shutil.copy(src["dsc"], root / rel / f"{prefix}_dsc.nii.gz")
        shutil.copy(src["dsc"].with_name("sub-phantom_dsc.json"), root / rel / f"{prefix}_dsc.json")
        der = root / "derivatives" / "masks" / rel
        der.mkdir(parents=True)
        for key, label in (("lesion_hyper", "tumor"), ("brain", "brain")):
            shutil.copy(src[key], der / f"{prefix}_label-{label}_mask.nii.gz")
    bad = root / "sub-03" / "perf"
    bad.mkdir(parents=True)
    (bad / "sub-03_dsc.nii.gz").write_bytes(b"truncated")
    outside = root.parent / "elsewhere" / "sub-04" / "perf"
    outside.mkdir(parents=True)
    shutil.copy(sources[0]["dsc"], outside / "sub-04_dsc.nii.gz")
    os.symlink(outside.parent, root / "sub-04")
    return root


@pytest.fixture(scope="module")
def bids_run(tmp_path_factory, sources):
    base = tmp_path_factory.mktemp("batch_bids")
    root = _bids(base / "ds", sources)
    out = root / "derivatives" / "perfusion"
    code = main(["batch", str(root), str(out), "-q"])
    return {"root": root, "out": out, "code": code}


def test_bids_derivative_names_and_description(bids_run):
    out = bids_run["out"]
    assert bids_run["code"] == 3  # sub-03 is corrupt
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "perfusion"
    perf = out / "sub-01" / "ses-1" / "perf"
    for name in ("sub-01_ses-1_cbv.nii.gz", "sub-01_ses-1_cbv.json", "sub-01_ses-1_rcbv.nii.gz",
                 "sub-01_ses-1_desc-brain_mask.nii.gz", "sub-01_ses-1_label-tumor_mask.nii.gz",
                 "sub-01_ses-1_report.json", "sub-01_ses-1_report.html", "sub-01_ses-1_desc-curves_timeseries.tsv"):
        assert (perf / name).is_file(), name
    assert (out / "sub-02" / "perf" / "sub-02_report.html").is_file()
    rows = _summary(out)
    assert {r["case"] for r in rows} == {"sub-01_ses-1", "sub-01_ses-2", "sub-02", "sub-03"}  # not sub-04
    tumor = [r for r in rows if r["roi"] == "tumor"]
    assert len(tumor) == 3 and all(abs(float(r["rcbv_median"]) - 3.0) <= RCBV_TOL * 3.0 for r in tumor)
    rep = json.loads((perf / "sub-01_ses-1_report.json").read_text())
    assert rep["brain"]["source"].endswith("sub-01_ses-1_label-brain_mask.nii.gz")


def test_rerun_into_derivatives_ignores_its_own_mask_copies(bids_run, capsys):
    """The outputs' ROI mask copies carry BIDS mask names under INPUT/derivatives/: a second run must
    not take them for input masks (it would find two ROIs per label), and skips every done case."""
    before = _marker_times(bids_run["out"])
    assert main(["batch", str(bids_run["root"]), str(bids_run["out"])]) == 3
    out = capsys.readouterr().out
    assert "3 ok (3 already done), 1 failed" in out
    assert _marker_times(bids_run["out"]) == before


def test_bids_outputs_feed_report_and_compare(bids_run, tmp_path):
    perf1 = bids_run["out"] / "sub-01" / "ses-1" / "perf"
    perf2 = bids_run["out"] / "sub-01" / "ses-2" / "perf"
    (perf1 / "sub-01_ses-1_report.html").unlink()
    assert main(["report", str(perf1), "-q"]) == 0
    assert (perf1 / "sub-01_ses-1_report.html").is_file() and not (perf1 / "report.html").exists()
    assert main(["compare", str(perf1), str(perf2), "--out", str(tmp_path / "cmp"), "-q"]) == 0
    comp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["name"] for r in comp["rois"]] == ["tumor"]


def test_output_inside_the_input_is_refused(tmp_path, sources, capsys):
    root = _plain(tmp_path / "in", sources, n=1, corrupt=False)
    assert main(["batch", str(root), str(root / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "inside the input" in err[0]


def test_thread_env_bounds_threads():
    for workers, cores in ((1, 2), (2, 2), (3, 2), (4, 16)):
        env = thread_env(workers, cores)
        assert workers * int(env["NUMBA_NUM_THREADS"]) <= max(cores, workers)
        assert env["OMP_NUM_THREADS"] == env["NUMBA_NUM_THREADS"]
    assert "perfusion" in thread_env(2, 2)["NUMBA_CACHE_DIR"]


# ----------------------------------------------------------------------------- Dask, for real


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dask_cluster(tmp_path):
    """`dask scheduler` and two `dask worker` processes (one thread each) on 127.0.0.1."""
    sched_file = tmp_path / "scheduler.json"
    port = _free_port()
    env = {**os.environ, **thread_env(2)}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0", "--scheduler-file", str(sched_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    deadline = time.monotonic() + 60
    while not sched_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sched_file.is_file(), "dask scheduler did not start"
    for i in range(2):
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                                       "--nworkers", "1", "--name", f"w{i}", "--no-dashboard",
                                       "--local-directory", str(tmp_path / f"w{i}")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    from distributed import Client

    with Client(scheduler_file=str(sched_file), timeout="30s") as c:
        c.wait_for_workers(2, timeout=60)
    yield {"file": sched_file, "address": f"tcp://127.0.0.1:{port}"}
    for p in procs[::-1]:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def test_batch_on_a_running_dask_scheduler(dask_cluster, tmp_path, sources, plain_run):
    from distributed import Client

    root = _plain(tmp_path / "in", sources, n=2, corrupt=True)
    out = tmp_path / "out"
    code = main(["batch", str(root), str(out), "--scheduler", dask_cluster["address"], "-q"])
    assert code == 3
    rows = {(r["case"], r["roi"]): r for r in _summary(out)}
    local = {(r["case"], r["roi"]): r for r in _summary(plain_run["out"])}
    assert rows.keys() == local.keys()
    for key, r in rows.items():  # same cases as the in-process run: same numbers
        assert r["status"] == local[key]["status"]
        if r["status"] == "ok":
            np.testing.assert_allclose(float(r["rcbv_median"]), float(local[key]["rcbv_median"]), rtol=1e-6)
    with Client(scheduler_file=str(dask_cluster["file"]), timeout="30s") as c:
        assert len(c.scheduler_info()["workers"]) == 2  # both workers still alive after the corrupt case


def test_local_cluster_jobs_2(tmp_path, sources):
    root = _plain(tmp_path / "in", sources, n=2, corrupt=False)
    out = tmp_path / "out"
    assert main(["batch", str(root), str(out), "--jobs", "2", "-q"]) == 0
    assert {r["status"] for r in _summary(out)} == {"ok"}


# --------------------------------------------------------------------------- SIGKILL and resume


def _snapshot(out: Path) -> dict[str, set[str]]:
    return {d.name: {p.name for p in d.iterdir()} for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")}


def test_sigkill_then_rerun_completes_without_corrupt_cases(tmp_path, sources):
    root = _plain(tmp_path / "in", sources, n=3, corrupt=False)
    out = tmp_path / "out"
    cmd = [str(BIN / "perfusion"), "batch", str(root), str(out), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(out.glob(f"*/{MARKER}")) and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.7)  # into the next case's analysis or its writing
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed while running, not after it ended
    done_before = {p.parent.name for p in out.glob(f"*/{MARKER}")}
    assert done_before and len(done_before) < 3, done_before  # killed between the first and the last case
    print(f"killed after {sorted(done_before)}; hidden leftovers: "
          f"{sorted(p.name for p in out.iterdir() if p.name.startswith('.'))}")
    # every visible case folder is complete (it has its marker); leftovers are hidden staging folders
    for name, files in _snapshot(out).items():
        assert MARKER in files, f"{name} is visible without its done-marker: {sorted(files)}"
    marks = {c: (out / c / MARKER).stat().st_mtime_ns for c in done_before}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    resumed = [c for c in done_before if (out / c / MARKER).stat().st_mtime_ns == marks[c]]
    assert sorted(resumed) == sorted(done_before)  # the cases done before the kill were not redone
    snap = _snapshot(out)
    assert set(snap) == {"case1", "case2", "case3"}
    reference = snap["case1"]
    assert all(files == reference for files in snap.values())  # the same complete file set everywhere
    assert not [p for p in out.iterdir() if p.name.startswith(".perfusion-")]  # leftovers removed
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert all(r["status"] == "ok" for r in rows)


def test_quality_flags_join_the_warnings_and_the_aif_checks():
    from perfusion.batch.engine import quality_flags

    rep = {"warnings": ["short baseline: 4 frames"], "aif": {"quality_score": 0.31, "absolute_quantification": False}}
    assert quality_flags(rep) == ["short baseline: 4 frames", "AIF quality score 0.31 < 0.5",
                                  "AIF not valid for absolute CBV/CBF (relative values and rCBV only)"]
    said = {"warnings": ["AIF quality score 0.31 is poor", "CBF is not quantitative"],
            "aif": {"quality_score": 0.31, "absolute_quantification": False}}
    assert quality_flags(said) == said["warnings"]  # not said twice
    assert quality_flags({"aif": {"quality_score": 0.8, "absolute_quantification": True}}) == []
