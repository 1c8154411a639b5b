"""Issue 9's guarantees, end to end through the command line on real files:

- results are deterministic: the same maps, to the last bit, on 1 and on 2 numba threads and from one
  run to the next;
- an internal error (a bug) ends in one line and exit code 1, with no traceback and nothing of the
  failing code's local variables (they can hold patient data);
- inputs are opened read-only and never modified (checked here, and around every test that uses the
  shared phantom case by an autouse fixture in conftest.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import folder_digest
from perfusion.cli.app import main
from perfusion.io import sidecar_path_for


def _analyze_in_process(case, out: Path, threads: int) -> None:
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "perfusion", "analyze", str(case["dsc"]), "--out", str(out),
                           "--roi", str(case["lesion_hyper"]), "--roi", str(case["lesion_hypo"]), "-q", "--no-html"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def _mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj) > 0


def _maps(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(out.glob("*.nii.gz"))}


def test_maps_are_identical_on_one_and_two_threads_and_run_to_run(phantom_case, tmp_path):
    before = folder_digest(phantom_case["dsc"].parent)
    runs = {}
    for label, threads in (("1a", 1), ("2a", 2), ("2b", 2)):
        _analyze_in_process(phantom_case, tmp_path / label, threads)
        runs[label] = tmp_path / label
    ref = _maps(runs["1a"])
    assert len(ref) >= 15 and "cbv.nii.gz" in ref and "rcbv.nii.gz" in ref
    for label in ("2a", "2b"):
        other = _maps(runs[label])
        assert sorted(other) == sorted(ref)
        for name, arr in ref.items():
            np.testing.assert_array_equal(other[name], arr, err_msg=f"{name}: run {label} differs from 1 thread")
        rep = json.loads((runs[label] / "report.json").read_text())
        rep1 = json.loads((runs["1a"] / "report.json").read_text())
        assert rep["rois"] == rep1["rois"] and rep["reference"] == rep1["reference"]
        assert rep["aif"]["n_voxels"] == rep1["aif"]["n_voxels"]
    assert folder_digest(phantom_case["dsc"].parent) == before  # inputs untouched


def test_internal_error_is_one_line_without_locals(phantom_case, tmp_path, monkeypatch, capsys):
    """A bug deep in the pipeline: exit 1, one line that asks for a report, no traceback, no local values."""
    import perfusion.pipeline as pipeline

    def broken(inputs, config):
        patient_name = "DOE^JANE"  # a local a rich traceback would print
        raise RuntimeError("index out of range" if patient_name else "")

    monkeypatch.setattr(pipeline, "_analyze", broken)
    out = tmp_path / "out"
    code = main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "-q"])
    captured = capsys.readouterr()
    assert code == 1
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "internal error" in err and "please report it" in err
    assert "DOE^JANE" not in captured.err + captured.out and "Traceback" not in captured.err
    assert not out.exists()  # nothing written


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_ctrl_c_during_the_analysis_leaves_no_output(phantom_case, tmp_path, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) in the middle of the analysis: exit 130, one line, no output folder."""
    import perfusion.pipeline as pipeline

    def interrupted(inputs, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_analyze", interrupted)
    out = tmp_path / "out"
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "-q"]) == 130
    assert "interrupted" in _one_line(capsys.readouterr().err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_ctrl_c_while_writing_keeps_the_earlier_results(phantom_case, tmp_path, monkeypatch, capsys):
    """Ctrl-C after some maps are written (into the staging folder): the folder of an earlier run is left
    exactly as it was and no staging folder remains."""
    import perfusion.report.outputs as outputs

    out = tmp_path / "out"
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "-q", "--no-html",
                 "--motion-correct", "off"]) == 0
    before = folder_digest(out)
    real = outputs.write_result

    def write_then_interrupt(result, inputs, folder, **kw):
        real(result, inputs, folder, **kw)
        assert (Path(folder) / "cbv.nii.gz").is_file()  # the staging folder is half full
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "write_result", write_then_interrupt)
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "-q", "--force", "--method", "csvd",
                 "--motion-correct", "off"]) == 130
    _one_line(capsys.readouterr().err)
    assert folder_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .out.partial-* left


def test_disk_full_while_writing_is_exit_5_and_removes_its_temporary_files(phantom_case, tmp_path, monkeypatch,
                                                                           capsys):
    """A write that fails for want of space (ENOSPC) after the first maps: exit 5, one line naming the
    folder and saying to check free space, the staging folder removed, no output folder created."""
    import errno

    calls = {"n": 0}
    real = Path.write_bytes

    def write_bytes(self, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    out = tmp_path / "results" / "case"
    code = main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "-q", "--motion-correct", "off"])
    line = _one_line(capsys.readouterr().err)
    assert code == 5 and calls["n"] > 3
    assert str(out) in line and "free space" in line
    assert list(tmp_path.iterdir()) == []  # the created parents are removed again too


def test_a_file_too_large_for_the_disk_fails_cleanly(phantom_case, tmp_path, monkeypatch, capsys):
    """The operating system itself refuses a write part-way through a map: the process may not write a
    file past 32 KiB (RLIMIT_FSIZE, set only while the results are written), so the first map that grows
    beyond it fails mid-file with EFBIG, as a disk that fills up fails with ENOSPC. Exit 5, one line, the
    staging folder and its half-written file removed, no output folder. (The ENOSPC test above
    simulates the error; here it comes from the kernel.)"""
    import errno
    import resource

    import perfusion.report.outputs as outputs

    real = outputs.write_result
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    seen = {}

    def write_under_a_limit(result, inputs, folder, **kw):
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, hard))  # Python ignores SIGXFSZ: writes raise
        try:
            real(result, inputs, folder, **kw)
        except OSError as exc:
            seen["errno"] = exc.errno
            raise
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(outputs, "write_result", write_under_a_limit)
    out = tmp_path / "results" / "case"
    code = main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "-q", "--motion-correct", "off"])
    line = _one_line(capsys.readouterr().err)
    assert code == 5, line
    assert str(out) in line and "File too large" in line and "free space" in line
    # the kernel refused a write part-way through a file (io.atomic_write removed its temporary file)
    assert seen.get("errno") == errno.EFBIG, seen
    assert list(tmp_path.iterdir()) == []  # staging folder, half-written file and created parents gone


def _without_root_file_override() -> None:
    """In the child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the capability bounding
    set, so that root, too, must obey a folder's permission bits (prctl PR_CAPBSET_DROP)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h)
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_output_folder_without_write_permission_fails_before_the_analysis(phantom_case, tmp_path):
    """An output folder the user may not write into (mode 0555): exit 5 at once, before minutes of
    analysis, one line naming it, nothing created. In a real process; when the tests run as root (who may
    write anywhere) the process gives up root's power to override file permissions first."""
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    out = locked / "results" / "case"
    try:
        proc = subprocess.run([sys.executable, "-m", "perfusion", "analyze", str(phantom_case["dsc"]), "--out",
                               str(out), "-q"], capture_output=True, text=True, timeout=120,
                              preexec_fn=_without_root_file_override if os.geteuid() == 0 else None)
        assert proc.returncode == 5, proc.stderr
        line = _one_line(proc.stderr)
        assert str(out) in line and "permission denied" in line
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(locked, 0o755)


def test_integer_series_with_a_scale_slope_and_intercept_is_read_scaled(phantom_case, tmp_path):
    """An int16 series with scl_slope 0.25 and scl_inter 100 (as scanners export) gives exactly the maps
    of the same values stored as float32. The intercept matters: delta R2* is blind to a pure slope
    but not to an offset, so a loader that ignored the scaling would give other maps."""
    import gzip

    img = nib.load(phantom_case["dsc"])
    data = np.asarray(img.dataobj).astype(np.float64)
    stored = np.clip(np.round((data - 100.0) / 0.25), -32768, 32767).astype(np.int16)
    values = (stored.astype(np.float32) * np.float32(0.25) + np.float32(100.0)).astype(np.float32)
    sidecar = sidecar_path_for(phantom_case["dsc"]).read_text()
    cases = {}
    for label in ("scaled", "float"):
        folder = tmp_path / label
        folder.mkdir()
        dsc = folder / f"sub-{label}_dsc.nii.gz"
        if label == "float":
            nib.save(nib.Nifti1Image(values, img.affine), str(dsc))
        else:  # the header's scaling fields written as a scanner does, not by nibabel's own rescaling
            im = nib.Nifti1Image(stored, img.affine)
            im.header.set_data_dtype(np.int16)
            raw = bytearray(im.header.binaryblock + b"\0" * 4 + stored.tobytes(order="F"))
            raw[112:120] = np.array([0.25, 100.0], dtype=im.header.endianness + "f4").tobytes()
            raw[108:112] = np.array([352.0], dtype=im.header.endianness + "f4").tobytes()  # vox_offset
            dsc.write_bytes(gzip.compress(bytes(raw)))
            assert (nib.load(dsc).dataobj.slope, nib.load(dsc).dataobj.inter) == (0.25, 100.0)
        sidecar_path_for(dsc).write_text(sidecar)
        assert main(["analyze", str(dsc), "--out", str(folder / "out"), "--roi", str(phantom_case["lesion_hyper"]),
                     "-q", "--no-html", "--motion-correct", "off"]) == 0
        cases[label] = folder / "out"
    from perfusion.quantify.signal import to_delta_r2s

    lesion = _mask(phantom_case["lesion_hyper"])
    unscaled, _ = to_delta_r2s(stored[lesion].astype(np.float64), te=0.025, baseline=slice(2, 10))
    scaled_right, _ = to_delta_r2s(values[lesion].astype(np.float64), te=0.025, baseline=slice(2, 10))
    # ignoring the intercept would change delta R2* by about 10 % here
    assert np.nanmax(np.abs(unscaled - scaled_right)) > 0.05 * np.nanmax(np.abs(scaled_right))
    scaled, flt = _maps(cases["scaled"]), _maps(cases["float"])
    assert sorted(scaled) == sorted(flt) and "rcbv.nii.gz" in scaled
    for name, arr in flt.items():
        np.testing.assert_array_equal(scaled[name], arr, err_msg=name)
    reports = [json.loads((cases[k] / "report.json").read_text()) for k in ("scaled", "float")]
    assert reports[0]["rois"] == reports[1]["rois"]


def test_header_tr_disagreeing_with_the_sidecar_is_a_warning_and_the_sidecar_wins(phantom_case, tmp_path, capsys):
    """BIDS makes the sidecar authoritative: a header pixdim[4] of 2 s against RepetitionTime 1.5 s runs
    with 1.5 s (exit 0), says so once in the summary and in report.json, and prints no raw Python warning."""
    img = nib.load(phantom_case["dsc"])
    folder = tmp_path / "in"
    folder.mkdir()
    dsc = folder / "sub-tr_dsc.nii.gz"
    im = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    im.header.set_zooms(img.header.get_zooms()[:3] + (2.0,))
    im.header.set_xyzt_units("mm", "sec")
    nib.save(im, str(dsc))
    sidecar_path_for(dsc).write_text(sidecar_path_for(phantom_case["dsc"]).read_text())
    out = tmp_path / "out"
    assert main(["analyze", str(dsc), "--out", str(out), "--no-html", "--motion-correct", "off"]) == 0
    captured = capsys.readouterr()
    said = f"{dsc}: header TR 2 s differs from the TR used (1.5 s, sidecar sub-tr_dsc.json RepetitionTime)"
    # printed once, among the warnings after the summary, as report.json words it (issue 21)
    assert captured.out.count(said.replace(str(dsc), dsc.name)) == 1 and captured.err == ""
    report = json.loads((out / "report.json").read_text())
    assert report["acquisition"]["tr"] == 1.5 and "sidecar" in report["acquisition"]["tr_source"]
    assert said.replace(str(dsc), dsc.name) in report["warnings"]  # the outputs name no folder (issue 17)


def test_output_under_a_file_is_exit_5(phantom_case, tmp_path, capsys):
    """--out inside a path that is a file (an unwritable place even for root): exit 5, one line, nothing made."""
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("not a folder")
    out = blocker / "out"
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "-q"]) == 5
    assert str(out) in _one_line(capsys.readouterr().err)
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["blocker.txt"]


def test_output_into_the_input_folder_is_refused(case_copy, capsys):
    folder = case_copy["dsc"].parent
    before = folder_digest(folder)
    assert main(["analyze", str(case_copy["dsc"]), "--out", str(folder), "--force", "-q"]) == 5
    assert "input series" in _one_line(capsys.readouterr().err)
    assert folder_digest(folder) == before


# --- bad inputs through the command line: exit 4, one line naming the file, no output folder


def _bad_case(kind: str, case, tmp: Path) -> tuple[list[str], Path]:
    """Write a broken variant of the phantom case into ``tmp``; return the analyze arguments and the file
    the message must name."""
    img = nib.load(case["dsc"])
    data = np.asarray(img.dataobj).astype(np.float32)
    sidecar = json.loads(sidecar_path_for(case["dsc"]).read_text())
    dsc = tmp / "sub-bad_dsc.nii.gz"
    extra: list[str] = []
    named = dsc

    def save(arr, *, meta=sidecar):
        nib.save(nib.Nifti1Image(arr, img.affine), str(dsc))
        if meta is not None:
            sidecar_path_for(dsc).write_text(json.dumps(meta))

    if kind == "not_nifti":
        dsc.write_text("this is not an image")
    elif kind == "truncated_gzip":
        save(data)
        dsc.write_bytes(dsc.read_bytes()[:5000])
    elif kind == "corrupt_gzip":  # whole length, bytes in the middle of the deflate stream overwritten
        save(data)
        raw = bytearray(dsc.read_bytes())
        raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(range(64))
        dsc.write_bytes(bytes(raw))
    elif kind == "unknown_datatype":  # header datatype code 16384: nibabel logs, then raises
        import gzip

        save(data)
        raw = bytearray(gzip.decompress(dsc.read_bytes()))
        raw[70:72] = np.array([16384], img.header.endianness + "i2").tobytes()
        dsc.write_bytes(gzip.compress(bytes(raw)))
    elif kind == "three_d":
        save(data[..., 0])
    elif kind == "few_frames":
        save(data[..., :10])
    elif kind == "nan":
        data[3, 3, 1, 5] = np.nan
        save(data)
    elif kind == "inf":
        data[30, 30, 2, 40] = np.inf
        save(data)
    elif kind == "all_zero":
        save(np.zeros_like(data))
    elif kind == "negative":
        save(-data)
    elif kind == "no_te":
        save(data, meta={"RepetitionTime": sidecar["RepetitionTime"]})
    elif kind == "te_ms":
        save(data, meta={**sidecar, "EchoTime": 25.0})
    elif kind == "tr_zero":
        save(data, meta={**sidecar, "RepetitionTime": 0.0})
    elif kind == "tr_ms":
        save(data, meta={**sidecar, "RepetitionTime": 1500})
    elif kind == "tr_negative":
        save(data, meta={**sidecar, "RepetitionTime": -1.5})
    elif kind == "tr_missing":  # no RepetitionTime and a header without a time unit
        save(data, meta={"EchoTime": sidecar["EchoTime"]})
    elif kind == "te_zero":
        save(data, meta={**sidecar, "EchoTime": 0})
    elif kind == "te_negative":
        save(data, meta={**sidecar, "EchoTime": -0.025})
    elif kind in ("ends_at_bolus_peak", "ends_during_first_pass"):
        brain = _mask(case["brain"])
        peak = int(np.argmin(data[brain].mean(axis=0)))  # frame 19 of 80: the whole-brain signal minimum
        save(data[..., : peak + (1 if kind == "ends_at_bolus_peak" else 5)])
    elif kind == "no_arterial_voxel":
        # every voxel's bolus saturates (the signal falls to the noise floor: a dose far too high for the
        # TE): no clean, unsaturated arterial curve is left for the automatic selection
        base = data[..., 2:10].mean(axis=-1, keepdims=True)
        save((base * np.clip(data / np.maximum(base, 1e-6), 1e-6, None) ** 25).astype(np.float32))
        extra = ["--mask", str(case["brain"])]
    elif kind == "aif_mask_without_bolus":  # drawn on the background outside the head: noise only
        save(data)
        named = tmp / "aif.nii.gz"
        brain = _mask(case["brain"])
        nib.save(nib.Nifti1Image((~brain & (np.indices(brain.shape)[0] < 3)).astype(np.uint8), img.affine), str(named))
        extra = ["--aif", str(named)]
    elif kind == "roi_outside_brain":
        save(data)
        named = tmp / "roi.nii.gz"
        brain = _mask(case["brain"])
        nib.save(nib.Nifti1Image((~brain & (np.indices(brain.shape)[0] < 5)).astype(np.uint8), img.affine), str(named))
        extra = ["--roi", str(named), "--roi", str(case["lesion_hyper"])]
    elif kind == "reference_overlaps_roi":
        save(data)
        named = tmp / "reference.nii.gz"
        lesion, ref = _mask(case["lesion_hyper"]), _mask(case["nawm"])
        nib.save(nib.Nifti1Image((ref | lesion).astype(np.uint8), img.affine), str(named))
        extra = ["--reference", str(named), "--roi", str(case["lesion_hyper"])]
    elif kind == "no_contrast":
        save(np.repeat(data[..., :1], data.shape[3], axis=3))
    elif kind == "mask_shape":
        save(data)
        named = tmp / "mask.nii.gz"
        nib.save(nib.Nifti1Image(np.ones(data.shape[:3][:2] + (2,), np.uint8), img.affine), str(named))
        extra = ["--mask", str(named)]
    elif kind == "mask_affine":
        save(data)
        named = tmp / "mask.nii.gz"
        moved = img.affine.copy()
        moved[0, 3] += 7.0
        nib.save(nib.Nifti1Image(np.ones(data.shape[:3], np.uint8), moved), str(named))
        extra = ["--mask", str(named)]
    elif kind == "empty_brain_mask":
        save(data)
        named = tmp / "brain.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(data.shape[:3], np.uint8), img.affine), str(named))
        extra = ["--mask", str(named)]
    elif kind == "empty_roi":
        save(data)
        named = tmp / "roi.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(data.shape[:3], np.uint8), img.affine), str(named))
        extra = ["--roi", str(named)]
    else:  # pragma: no cover
        raise ValueError(kind)
    return [str(dsc), *extra], named


BAD = ["not_nifti", "truncated_gzip", "corrupt_gzip", "unknown_datatype", "three_d", "few_frames", "nan", "inf", "all_zero", "negative", "no_te", "te_ms",
       "te_zero", "te_negative", "tr_zero", "tr_negative", "tr_ms", "tr_missing", "no_contrast", "ends_at_bolus_peak",
       "ends_during_first_pass", "no_arterial_voxel", "aif_mask_without_bolus", "mask_shape", "mask_affine",
       "empty_brain_mask", "empty_roi", "roi_outside_brain", "reference_overlaps_roi"]

#: what each message must say (besides the file's name): the problem, in the tool's words
SAYS = {"corrupt_gzip": "not a readable NIfTI file", "empty_brain_mask": "is empty", "inf": "NaN or Inf", "te_zero": "must be positive", "te_negative": "must be positive",
        "tr_negative": "must be positive", "tr_ms": "looks like milliseconds", "tr_missing": "repetition time unknown",
        "ends_at_bolus_peak": "ends at the bolus peak", "ends_during_first_pass": "before the first pass is over",
        "no_arterial_voxel": "no voxel has a clean, unsaturated bolus",
        "aif_mask_without_bolus": "shows a contrast bolus", "roi_outside_brain": "wholly outside the brain",
        "reference_overlaps_roi": "overlaps ROI"}


@pytest.mark.parametrize("kind", ["all_zero", "negative", "no_contrast", "unknown_datatype"])
def test_bad_input_prints_one_line_in_a_real_process(kind, phantom_case, tmp_path):
    """The same through the console entry in its own process, where nothing captures Python warnings:
    stderr holds the one error line and nothing else (no "Mean of empty slice" from numpy, no "data code
    16384 not recognized" from nibabel's logger)."""
    src = tmp_path / "in"
    src.mkdir()
    args, named = _bad_case(kind, phantom_case, src)
    proc = subprocess.run([sys.executable, "-m", "perfusion", "analyze", *args, "--out", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 4
    assert str(named) in _one_line(proc.stderr) and proc.stdout == ""


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_exit_4_with_one_line_and_no_output(kind, phantom_case, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    args, named = _bad_case(kind, phantom_case, src)
    before = folder_digest(src)
    out = tmp_path / "out"
    code = main(["analyze", *args, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    line = _one_line(err)
    assert code == 4, err
    assert str(named) in line, line
    assert SAYS.get(kind, "") in line, line
    assert "Traceback" not in err
    assert not out.exists()
    assert folder_digest(src) == before
