"""Multi-echo DSC (issue 18): echoes.combine_echoes and `perfusion analyze ECHO1 ECHO2 ...`.

- The formulas on real patient curves: the Barrow (OSIPI LCB-BNI) dual-echo ROI curves, whose README
  gives the dual-echo tumour peak 12.75 1/s; our combination reproduces the README's formula at every
  frame within 2e-3 1/s (the combined signal is stored as float32: 1e-4 of the peak).
- The log-linear fit of three or more echoes recovers R2* exactly on mono-exponential decays, and for two
  echoes equals the ratio formula.
- Where the last echo sits at its noise floor (an artery at the bolus peak), R2* comes from the first echo.
- The command line: echoes in any order give the same maps; mismatched echoes (grid, frames, timing,
  missing or equal TE) and --te / a DICOM folder among echoes are clean one-line errors with nothing written.
"""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.io

from conftest import shared_dir
from perfusion.quantify import echoes
from perfusion.cli.app import main
from perfusion.io import Series, sidecar_path_for, write_nifti

TE1, TE2 = 0.008, 0.030


def _series(signal, te, name="e.nii.gz", tr=1.5):
    return Series(data=np.asarray(signal, np.float32).reshape(1, 1, 1, -1), affine=np.eye(4), path=Path(name), te=te,
                  tr=tr, te_source="test", tr_source="test")


def _dr2s(series, n_base):
    d = series.data[0, 0, 0].astype(np.float64)
    return -np.log(d / d[:n_base].mean()) / series.te


def test_barrow_dual_echo_curves_match_the_published_formula():
    """Real patient curves (no truth): the README's dual-echo formula, frames 0-39 as baseline; the
    tumour's dual-echo peak is 12.75 1/s (README), its single TE2 peak 1.58 1/s (T1 leakage hides it)."""
    m = scipy.io.loadmat(shared_dir("osipi-lcb-bni-dual-echo") / "data.mat")
    te1, te2 = float(m["TE1"].item()), float(m["TE2"].item())
    for key in ("tumor_SIt", "NAWM_SIt", "AIF_SIt"):
        s = m[key].astype(np.float64)
        combined = echoes.combine_echoes([_series(s[1], te2, "e2.nii.gz"), _series(s[0], te1, "e1.nii.gz")])
        assert combined.te == pytest.approx(te2 - te1) and combined.echo_combination == echoes.DUAL
        assert [e.te for e in combined.echoes] == [te1, te2]  # ordered by TE whatever the order given
        published = np.log((s[0] / s[0, :40].mean()) / (s[1] / s[1, :40].mean())) / (te2 - te1)
        np.testing.assert_allclose(_dr2s(combined, 40), published, atol=2e-3, err_msg=key)
        if key == "tumor_SIt":
            assert _dr2s(combined, 40).max() == pytest.approx(12.75, abs=0.01)
            single = -np.log(s[1] / s[1, :40].mean()) / te2
            assert single.max() == pytest.approx(1.58, abs=0.01)


def test_log_linear_fit_recovers_r2star_and_reduces_to_the_ratio():
    rng = np.random.default_rng(0)
    r2s = 20 + 60 * rng.random((5, 30))  # 1/s
    tes = np.array([0.005, 0.015, 0.030, 0.045])
    logs = np.stack([np.log(900.0) - te * r2s for te in tes])
    np.testing.assert_allclose(echoes.r2star(logs, tes), r2s, rtol=1e-12)
    two = np.stack([np.log(1000.0) - TE1 * r2s, np.log(800.0) - TE2 * r2s])
    np.testing.assert_allclose(echoes.r2star(two, np.array([TE1, TE2])),
                               (two[0] - two[1]) / (TE2 - TE1), rtol=1e-12)


def test_a_late_echo_at_the_noise_floor_takes_the_first_echo():
    """An artery whose TE2 signal falls to zero at the peak (noise only): the echo ratio would read the
    noise; the first echo's delta R2* is used there, and a note says how many voxel-frames."""
    rng = np.random.default_rng(1)
    n = 60
    t = np.arange(n) * 1.5
    dr2s = 250.0 * np.exp(-0.5 * ((t - 30) / 3.0) ** 2)  # 1/s: an arterial first pass (TE2 keeps 0.03 %)
    s1 = 1000 * np.exp(-TE1 * (20 + dr2s)) + rng.normal(0, 2, n)
    s2 = np.abs(1000 * np.exp(-TE2 * (20 + dr2s)) + rng.normal(0, 2, n))  # Rician-like floor near zero
    combined = echoes.combine_echoes([_series(s1, TE1), _series(s2, TE2, "e2.nii.gz")])
    got = _dr2s(combined, 10)
    assert combined.echo_notes and "noise floor" in combined.echo_notes[0]
    peak = int(np.argmax(dr2s))
    assert got[peak] == pytest.approx(dr2s[peak], rel=0.1)  # the plain ratio reads it far too low
    plain = np.log((s1 / s1[:10].mean()) / (s2 / s2[:10].mean())) / (TE2 - TE1)
    assert plain[peak] < 0.7 * dr2s[peak]


# ------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def dual_echo_case(tmp_path_factory):
    """The default phantom as two echoes (TE 8 and 30 ms) of one run: each echo's signal from the
    phantom's delta R2* (S0_TE exp(-TE delta R2*)), with independent noise, and its sidecar."""
    from perfusion.cli.phantom import run_phantom

    root = tmp_path_factory.mktemp("echoes")
    paths = run_phantom(out=root / "phantom", quiet=True)
    img = nib.load(paths["dsc"])
    side = json.loads(sidecar_path_for(paths["dsc"]).read_text())
    s = np.asarray(img.dataobj, np.float64)
    s0 = s[..., :8].mean(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        dr2s = np.where(s0 > 0, -np.log(np.maximum(s, 1e-3) / np.where(s0 > 0, s0, 1)) / side["EchoTime"], 0.0)
    rng = np.random.default_rng(2)
    case = root / "case"
    case.mkdir()
    out = {}
    for i, (te, scale) in enumerate(((TE1, 1.3), (TE2, 1.0)), start=1):
        sig = scale * s0 * np.exp(-(te - side["EchoTime"]) * 25.0) * np.exp(-te * dr2s)
        sig = np.abs(sig + rng.normal(0, 0.004 * float(np.median(s0[s0 > 0])), sig.shape))
        p = case / f"sub-01_echo-{i}_dsc.nii.gz"
        write_nifti(p, sig.astype(np.float32), img.affine, tr=side["RepetitionTime"])
        sidecar_path_for(p).write_text(json.dumps({**side, "EchoTime": te}))
        out[f"e{i}"] = p
    for k in ("brain", "aif", "nawm", "lesion_hyper", "lesion_hypo"):
        out[k] = paths[k]
    return out


def _analyze(case, out, *echo_paths, extra=()):
    return main(["analyze", *map(str, echo_paths), "--out", str(out), "--mask", str(case["brain"]),
                 "--aif", str(case["aif"]), "--reference", str(case["nawm"]), "--roi", str(case["lesion_hyper"]),
                 "--roi", str(case["lesion_hypo"]), "--method", "osvd", "--leakage", "none", "--motion-correct", "off",
                 "--no-html", "-q", *extra])


def test_analyze_two_echoes_in_either_order(dual_echo_case, tmp_path):
    c = dual_echo_case
    assert _analyze(c, tmp_path / "a", c["e1"], c["e2"]) == 0
    assert _analyze(c, tmp_path / "b", c["e2"], c["e1"]) == 0
    ra = json.loads((tmp_path / "a" / "report.json").read_text())
    rb = json.loads((tmp_path / "b" / "report.json").read_text())
    acq = ra["acquisition"]
    assert [e["te_s"] for e in acq["echoes"]] == [TE1, TE2] and acq["te"] == pytest.approx(TE2 - TE1)
    assert acq["echo_combination"] == echoes.DUAL
    assert [e["file"] for e in acq["echoes"]] == ["sub-01_echo-1_dsc.nii.gz", "sub-01_echo-2_dsc.nii.gz"]
    assert {"dsc", "dsc_echo-2", "dsc_sidecar", "dsc_echo-2_sidecar"} <= set(ra["inputs"])
    for name in ("cbv.nii.gz", "rcbv.nii.gz"):
        np.testing.assert_array_equal(nib.load(tmp_path / "a" / name).get_fdata(), nib.load(tmp_path / "b" / name).get_fdata())
    verdicts = {r["name"]: (r["verdict"], r["rcbv_median"]) for r in ra["rois"]}
    assert verdicts["roi-lesion_hyper"][0] == "likely_recurrence" and verdicts["roi-lesion_hyper"][1] == pytest.approx(3.0, rel=0.15)
    assert verdicts["roi-lesion_hypo"][0] == "likely_treatment_effect" and verdicts["roi-lesion_hypo"][1] == pytest.approx(0.6, rel=0.15)
    assert rb["acquisition"]["echoes"] == acq["echoes"]


def _mismatch(c, tmp_path, kind):
    """A copy of echo 2 made not to match echo 1 in one way; returns its path."""
    p = tmp_path / "bad" / "sub-01_echo-2_dsc.nii.gz"
    p.parent.mkdir(exist_ok=True)
    img = nib.load(c["e2"])
    data = np.asarray(img.dataobj)
    side = json.loads(sidecar_path_for(c["e2"]).read_text())
    affine = img.affine.copy()
    if kind == "grid":
        data = data[:-2]
    elif kind == "frames":
        data = data[..., :-5]
    elif kind == "affine":
        affine[:3, 3] += 4.0
    elif kind == "timing":
        side["RepetitionTime"] = side["RepetitionTime"] * 2
    elif kind == "equal_te":
        side["EchoTime"] = TE1
    elif kind == "missing_te":
        del side["EchoTime"]
    write_nifti(p, data, affine, tr=side.get("RepetitionTime"))
    sidecar_path_for(p).write_text(json.dumps(side))
    return p


@pytest.mark.parametrize("kind, words", [("grid", "grid"), ("frames", "frames"), ("affine", "position or orientation"),
                                         ("timing", "frame time"), ("equal_te", "EchoTime"), ("missing_te", "")])
def test_mismatched_echoes_are_one_line_errors(kind, words, dual_echo_case, tmp_path, capsys):
    bad = _mismatch(dual_echo_case, tmp_path, kind)
    out = tmp_path / "out"
    assert _analyze(dual_echo_case, out, dual_echo_case["e1"], bad) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and words in err[0] and "Traceback" not in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("extra, words", [(("--te", "0.03"), "--te"), ((), "given twice")])
def test_echo_options_that_do_not_fit_are_usage_errors(extra, words, dual_echo_case, tmp_path, capsys):
    c = dual_echo_case
    second = c["e1"] if words == "given twice" else c["e2"]
    out = tmp_path / "out"
    assert _analyze(c, out, c["e1"], second, extra=extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_a_dicom_folder_among_echoes_is_refused(dual_echo_case, tmp_path, capsys):
    folder = tmp_path / "dicom"
    folder.mkdir()
    shutil.copy(dual_echo_case["e1"], folder / "x.dcm")
    assert _analyze(dual_echo_case, tmp_path / "out", dual_echo_case["e1"], folder) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DICOM folder" in err[0], err


# ------------------------------------------------------------------------------------- issue 18 target


def test_dual_echo_realistic_head_meets_the_target_the_long_echo_alone_misses(tmp_path):
    """Issue 18's target on the dual-echo realistic head (TE 8 / 30 ms, flip 60 without preload: the leakiest
    protocol; SNR 30, seed 0), everything through the command line with its defaults (automatic AIF and
    reference; --leakage auto is BSW for multi-echo): every lesion's median rCBV within 15 % of its truth and
    every verdict one a correct analysis may give. The 30 ms echo alone, read by the same command (its
    default, the bidirectional model), is measurably worse. Measured here: dual echo largest error 11.6 %,
    mean 7.5 %; the long echo alone largest 17.4 % (treatment_t2s), mean 10.9 %. Over SNR 30/50 x seeds 0-1
    (28 lesion runs) BSW on the dual echo kept 27 within 15 % (the 28th 15.1 %: the mixed lesion, whose
    truth is a median over a random field), the bidirectional model 23 (config.DEFAULT_LEAKAGE_MULTI_ECHO)."""
    ph = tmp_path / "head"
    assert main(["phantom", str(ph), "--realistic", "--echoes", "2", "--snr", "30", "--seed", "0"]) == 0
    truth = json.loads((ph / "truth.json").read_text())["lesions"]
    rois = [a for name in sorted(truth) for a in ("--roi", str(ph / f"roi-{name}.nii.gz"))]
    echo1, echo2 = ph / "sub-realistic_echo-1_dsc.nii.gz", ph / "sub-realistic_echo-2_dsc.nii.gz"
    assert main(["analyze", str(echo2), str(echo1), "--out", str(tmp_path / "dual"), *rois, "--no-html", "-q"]) == 0
    assert main(["analyze", str(echo2), "--out", str(tmp_path / "single"), *rois, "--no-html", "-q"]) == 0
    errors = {}
    for kind in ("dual", "single"):
        rep = json.loads((tmp_path / kind / "report.json").read_text())
        assert rep["parameters"]["leakage"] == ("bsw" if kind == "dual" else "bidirectional")
        errors[kind] = {}
        for r in rep["rois"]:
            name = r["name"].removeprefix("roi-")
            errors[kind][name] = r["rcbv_median"] / truth[name]["rcbv_median"] - 1
            if kind == "dual":
                assert r["verdict"] in truth[name]["expected_verdicts"], (name, r["verdict"], r["rcbv_median"])
    assert len(errors["dual"]) == 7
    assert max(abs(e) for e in errors["dual"].values()) <= 0.15, errors["dual"]
    mean = {k: float(np.mean([abs(e) for e in v.values()])) for k, v in errors.items()}
    assert mean["single"] >= mean["dual"] + 0.02, mean  # measured 10.9 % against 7.5 %


def test_the_acquisition_panel_says_dual_echo_and_checks_the_long_echo():
    """report.html's acquisition checks: a multi-echo report gets an "Echoes" row, and the consensus TE
    (20-35 ms at 3 T) is checked on the long echo, not on the effective TE (TE2 - TE1)."""
    from perfusion.report.html import check_acquisition

    rep = {"acquisition": {"te": TE2 - TE1, "tr": 1.5, "field_strength_t": 3.0, "flip_angle_deg": 60,
                           "echoes": [{"te_s": TE1, "file": "a"}, {"te_s": TE2, "file": "b"}]}, "baseline": {}}
    rows = {r["name"]: r for r in check_acquisition(rep)}
    assert rows["Echoes"]["value"].startswith("dual echo (TE 8, 30 ms)") and rows["Echoes"]["status"] == "ok"
    assert rows["TE"]["value"] == "30 ms" and rows["TE"]["status"] == "ok"
    single = {r["name"]: r for r in check_acquisition({**rep, "acquisition": {**rep["acquisition"], "echoes": None,
                                                                                "te": 0.03}})}
    assert "Echoes" not in single and single["TE"]["value"] == "30 ms"
