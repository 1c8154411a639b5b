"""Frames that are not images of the patient, and short baselines, end to end through the command line
on a small phantom (32 x 32 x 5, 60 frames, TR 1.5 s, SNR 150; bolus arrival at frame 14, peak at 19):

- a dropped (all-zero) frame at the bolus peak, in the tail or in the baseline, a duplicated frame and
  a spiking frame (or slice) are interpolated in time, named in a warning and in report.json
  "frames_repaired", and the verdicts are those of the clean series;
- two adjacent bad frames, or more than 5 % of the frames, are refused: exit 4, one line naming the file;
- bright frames before the steady state followed by a short baseline: the bright frames stay out of S0,
  the short baseline is a warning with its frame count, a baseline too short to use is exit 4;
- the tool's own ``perfusion phantom --tr 5`` series runs.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import folder_digest
from perfusion.cli.app import main
from perfusion.io import sidecar_path_for

PEAK, TAIL, BASE = 19, 45, 6  # frames of the small phantom: bolus peak, tail, baseline

#: rCBV of a repaired series against the clean one. A frame interpolated at the bolus peak cuts the
#: AIF's and the tissue's peaks by different amounts: measured here, the lesions' median rCBV moves by up
#: to 5.5 % (hypo 0.620 -> 0.654, truth 0.6); on the 64 x 64 phantom by 0.8 %. Elsewhere by < 1 %.
RCBV_RTOL = 0.1


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    from perfusion.tools.phantom import PhantomSpec, make_phantom, write_phantom

    out = tmp_path_factory.mktemp("small") / "case"
    out.mkdir()
    return write_phantom(make_phantom(PhantomSpec(matrix=32, block=2, n_frames=60)), out)


def _args(case, dsc: Path, out: Path) -> list[str]:
    return ["analyze", str(dsc), "--out", str(out), "-q", "--no-html", "--aif", str(case["aif"]),
            "--mask", str(case["brain"]), "--reference", str(case["nawm"]),
            "--roi", str(case["lesion_hyper"]), "--roi", str(case["lesion_hypo"])]


def _write(case, folder: Path, data: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    img = nib.load(case["dsc"])
    dsc = folder / "sub-x_dsc.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine), str(dsc))
    sidecar_path_for(dsc).write_text(sidecar_path_for(case["dsc"]).read_text())
    return dsc


def _data(case) -> np.ndarray:
    return np.asarray(nib.load(case["dsc"]).dataobj).astype(np.float32)


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def clean(small_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    assert main(_args(small_case, small_case["dsc"], out)) == 0
    rep = _report(out)
    assert rep["frames_repaired"] == [] and not any("frame" in w and "interpolat" in w for w in rep["warnings"])
    return rep


def _rois(rep: dict) -> dict:
    return {r["name"]: (r["rcbv_median"], r["verdict"]) for r in rep["rois"]}


def _zero(d, k):
    d[..., k] = 0.0


def _duplicate(d, k):
    d[..., k] = d[..., k - 1]


def _spike_up(d, k):
    d[..., k] *= 1.5


def _spike_down(d, k):
    d[..., k] *= 0.6


def _slice_dropped(d, k):
    d[:, :, 2, k] = 0.0


CASES = {  # name: (frame, change, kind, slices)
    "zero_at_peak": (PEAK, _zero, "dropped", "all"),
    "zero_in_tail": (TAIL, _zero, "dropped", "all"),
    "zero_in_baseline": (BASE, _zero, "dropped", "all"),
    "duplicated_at_bolus": (PEAK - 1, _duplicate, "duplicated", "all"),
    "spike_in_tail": (TAIL, _spike_up, "spike", "all"),
    "spike_at_peak": (PEAK, _spike_up, "spike", "all"),
    "dark_frame_in_baseline": (BASE, _spike_down, "spike", "all"),
    "one_slice_dropped_at_peak": (PEAK, _slice_dropped, "dropped", [2]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_frame_is_repaired_named_and_the_verdict_holds(name, small_case, clean, tmp_path, capsys):
    frame, change, kind, slices = CASES[name]
    d = _data(small_case)
    change(d, frame)
    dsc = _write(small_case, tmp_path / "in", d)
    before = folder_digest(dsc.parent)
    out = tmp_path / "out"
    code = main(_args(small_case, dsc, out))
    assert code == 0, capsys.readouterr().err
    rep = _report(out)
    assert rep["frames_repaired"] == [{"frame": frame, "kind": kind, "slices": slices}]
    said = [w for w in rep["warnings"] if f"frame {frame} ({kind}" in w]
    assert len(said) == 1 and "interpolation" in said[0], rep["warnings"]
    assert not any("head motion not assessed" in w for w in rep["warnings"]), rep["warnings"]
    for roi, (rcbv, verdict) in _rois(clean).items():
        got, got_verdict = _rois(rep)[roi]
        assert got_verdict == verdict, (roi, got, rcbv)
        np.testing.assert_allclose(got, rcbv, rtol=RCBV_RTOL, err_msg=roi)
    assert folder_digest(dsc.parent) == before  # the input is not repaired in place


def test_the_repair_is_on_the_terminal(small_case, tmp_path, capsys):
    d = _data(small_case)
    d[..., TAIL] = 0.0
    dsc = _write(small_case, tmp_path / "in", d)
    args = [a for a in _args(small_case, dsc, tmp_path / "out") if a != "-q"]
    assert main(args) == 0
    assert f"warning: frame {TAIL} (dropped) (0-based) replaced by linear interpolation" in capsys.readouterr().out


def _adjacent(d):
    d[..., PEAK] = 0.0
    d[..., PEAK + 1] = 0.0


def _adjacent_dropped_and_duplicated(d):
    d[..., TAIL] = 0.0
    d[..., TAIL + 1] = d[..., TAIL]


def _too_many(d):
    for k in (8, 25, 35, 45):  # 4 of 60 frames: at most 3 (5 %) are repaired
        d[..., k] = 0.0


REFUSED = {"two_adjacent_at_peak": (_adjacent, "two adjacent bad frames"),
           "adjacent_dropped_then_duplicated": (_adjacent_dropped_and_duplicated, "two adjacent bad frames"),
           "too_many": (_too_many, "at most 3 can be repaired")}


@pytest.mark.parametrize("name", list(REFUSED))
def test_bad_frames_that_cannot_be_repaired_are_exit_4(name, small_case, tmp_path, capsys):
    change, says = REFUSED[name]
    d = _data(small_case)
    change(d)
    dsc = _write(small_case, tmp_path / "in", d)
    before = folder_digest(dsc.parent)
    out = tmp_path / "out"
    code = main(_args(small_case, dsc, out))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 4, err
    assert len(lines) == 1 and str(dsc) in lines[0] and says in lines[0] and "re-export" in lines[0], err
    assert "Traceback" not in err and not out.exists()
    assert folder_digest(dsc.parent) == before


# --- the baseline: frames before the steady state, then a short baseline


def _short_baseline(case, n_bright: int, n_steady: int) -> np.ndarray:
    """``n_bright`` frames still approaching the steady state (30, 10, 4 % brighter), then ``n_steady``
    steady frames, then the phantom's bolus (its steady frames 2-13 cut to the last ``n_steady``)."""
    d = _data(case)
    rest = d[..., 14 - n_steady:]
    bright = [rest[..., i] * b for i, b in enumerate((1.3, 1.1, 1.04)[:n_bright])]
    return np.concatenate([np.stack(bright, axis=3), rest], axis=3) if bright else rest


@pytest.mark.parametrize("n_bright", [1, 2, 3])
def test_bright_frames_then_a_short_baseline(n_bright, small_case, clean, tmp_path):
    """2 bright frames and 4 steady ones made the reference CBV 9 times too high (the bright frames were
    in S0); now they are skipped, the baseline warns with its frame count, and the verdicts hold."""
    dsc = _write(small_case, tmp_path / "in", _short_baseline(small_case, n_bright, 4))
    out = tmp_path / "out"
    assert main(_args(small_case, dsc, out)) == 0
    rep = _report(out)
    base = rep["baseline"]
    assert base["start_frame"] == n_bright, base
    n = base["n_frames"]
    assert n < 6
    assert any(f"the baseline has only {n} frames" in w for w in rep["warnings"]), rep["warnings"]
    np.testing.assert_allclose(rep["reference"]["cbv_median"], clean["reference"]["cbv_median"], rtol=0.15)
    for roi, (rcbv, verdict) in _rois(clean).items():
        got, got_verdict = _rois(rep)[roi]
        assert got_verdict == verdict, (roi, got, rcbv)
        np.testing.assert_allclose(got, rcbv, rtol=0.1, err_msg=roi)


def test_a_baseline_too_short_to_use_is_exit_4(small_case, tmp_path, capsys):
    dsc = _write(small_case, tmp_path / "in", _short_baseline(small_case, 2, 1))
    out = tmp_path / "out"
    code = main(_args(small_case, dsc, out))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 4, err
    assert len(lines) == 1 and str(dsc) in lines[0] and "steady pre-bolus frames are needed" in lines[0], err
    assert not out.exists()


def test_the_phantom_at_tr_5_s_runs_end_to_end(tmp_path, capsys):
    """``perfusion phantom --tr 5``: 2 bright frames, 3 steady ones, the bolus. It was refused with a false
    reason (the first pass "not over": the bright frames raised the baseline by 5 %)."""
    case = tmp_path / "case"
    assert main(["phantom", str(case), "--tr", "5", "--frames", "30"]) == 0
    dsc = next(case.glob("*_dsc.nii.gz"))
    out = tmp_path / "out"
    code = main(["analyze", str(dsc), "--out", str(out), "-q", "--no-html", "--aif", str(case / "mask-aif.nii.gz"),
                 "--mask", str(case / "mask-brain.nii.gz"), "--reference", str(case / "mask-reference.nii.gz"),
                 "--roi", str(case / "roi-lesion_hyper.nii.gz"), "--roi", str(case / "roi-lesion_hypo.nii.gz")])
    assert code == 0, capsys.readouterr().err
    rep = _report(out)
    assert rep["baseline"]["start_frame"] == 2 and rep["frames_repaired"] == []
    assert any(f"the baseline has only {rep['baseline']['n_frames']} frames" in w for w in rep["warnings"])
    truth = json.loads((case / "truth.json").read_text())["lesions"]
    for r in rep["rois"]:  # TR 5 s samples the first pass coarsely: rCBV within 20 % of the truth
        np.testing.assert_allclose(r["rcbv_median"], truth[r["name"].removeprefix("roi-")]["rcbv"], rtol=0.2)
