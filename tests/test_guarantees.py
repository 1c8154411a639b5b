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
from perfusion.cli import main


def _analyze_in_process(case, out: Path, threads: int) -> None:
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "perfusion", "analyze", str(case["dsc"]), "--out", str(out),
                           "--roi", str(case["lesion_hyper"]), "--roi", str(case["lesion_hypo"]), "-q", "--no-html"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


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
    import perfusion.pipeline as pipeline

    out = tmp_path / "out"
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "-q", "--no-html",
                 "--motion-correct", "off"]) == 0
    before = folder_digest(out)
    real = pipeline.write_result

    def write_then_interrupt(result, inputs, folder, **kw):
        real(result, inputs, folder, **kw)
        assert (Path(folder) / "cbv.nii.gz").is_file()  # the staging folder is half full
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_result", write_then_interrupt)
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
    sidecar = json.loads(case["dsc"].with_name(case["dsc"].name.replace(".nii.gz", ".json")).read_text())
    dsc = tmp / "sub-bad_dsc.nii.gz"
    extra: list[str] = []
    named = dsc

    def save(arr, *, meta=sidecar):
        nib.save(nib.Nifti1Image(arr, img.affine), str(dsc))
        if meta is not None:
            dsc.with_name("sub-bad_dsc.json").write_text(json.dumps(meta))

    if kind == "not_nifti":
        dsc.write_text("this is not an image")
    elif kind == "truncated_gzip":
        save(data)
        dsc.write_bytes(dsc.read_bytes()[:5000])
    elif kind == "three_d":
        save(data[..., 0])
    elif kind == "few_frames":
        save(data[..., :10])
    elif kind == "nan":
        data[3, 3, 1, 5] = np.nan
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
    elif kind == "empty_roi":
        save(data)
        named = tmp / "roi.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(data.shape[:3], np.uint8), img.affine), str(named))
        extra = ["--roi", str(named)]
    else:  # pragma: no cover
        raise ValueError(kind)
    return [str(dsc), *extra], named


BAD = ["not_nifti", "truncated_gzip", "three_d", "few_frames", "nan", "all_zero", "negative", "no_te", "te_ms",
       "tr_zero", "no_contrast", "mask_shape", "mask_affine", "empty_roi"]


@pytest.mark.parametrize("kind", ["all_zero", "negative", "no_contrast"])
def test_bad_input_prints_one_line_in_a_real_process(kind, phantom_case, tmp_path):
    """The same through the console entry in its own process, where nothing captures Python warnings:
    stderr holds the one error line and nothing else (no "Mean of empty slice" from numpy)."""
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
    assert "Traceback" not in err
    assert not out.exists()
    assert folder_digest(src) == before
