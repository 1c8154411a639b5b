"""Leakage correction in the pipeline, on the leaky phantom (issue 4).

Targets and tolerances:
- RCBV_TOL 0.20: with the default correction every leaky lesion's median rCBV is within 20 % of truth
  and every verdict is right; all automatic (AIF, reference), as a user would run it. Issue 4 asked
  15 % of the residue-domain default, whose model is this phantom's own (Tofts leakage of the AIF);
  the default is now chosen on the realistic phantom (tests/test_realistic.py, issue 15), and the
  bidirectional model reads this phantom's T1 treatment lesion 18 % high.
- With --leakage none at least one verdict is wrong (the correction is what makes them right).
- NONLEAKY_PP 0.01 (issue 4): on the non-leaky sweep blocks of the default phantom the median CBV
  error with the correction on stays within 1 percentage point of the error with it off.
"""

import json

import nibabel as nib
import numpy as np
import pytest

from perfusion.cli.app import main
from perfusion.case import load_inputs
from perfusion.cli.phantom import run_phantom
from perfusion import config
from perfusion.config import Config
from perfusion.pipeline import analyze

RCBV_TOL = 0.20
NONLEAKY_PP = 0.01
LEAKY = ("leaky_recurrence_t1", "leaky_treatment_t1", "leaky_indeterminate", "leaky_treatment_t2s")


@pytest.fixture(scope="module")
def leaky_case(tmp_path_factory):
    out = tmp_path_factory.mktemp("leaky") / "case"
    paths = run_phantom(out=out, leaky_lesions=True, quiet=True)
    truth = json.loads(paths["truth_json"].read_text())
    return paths, truth


def _run(paths, tmp, *extra):
    out = tmp / ("o" + "_".join(extra).replace("-", ""))
    rois = [a for name in LEAKY for a in ("--roi", str(paths["dsc"].parent / f"roi-{name}.nii.gz"))]
    assert main(["analyze", str(paths["dsc"]), "--out", str(out), "-q", *rois, *extra]) == 0
    return out, {r["name"]: r for r in json.loads((out / "report.json").read_text())["rois"]}


def test_default_correction_gets_every_verdict_right(leaky_case, tmp_path, capsys):
    paths, truth = leaky_case
    out, rois = _run(paths, tmp_path)
    lines = []
    for name in LEAKY:
        r, t = rois[f"roi-{name}"], truth["leaky_lesions"][name]
        lines.append(f"{name}: rCBV {r['rcbv_median']:.3f} truth {t['rcbv']:.3f} verdict {r['verdict']} "
                     f"(expected {t['expected_verdict']}), K2 median {r['k2_median_per_s']:.2e} 1/s")
        assert abs(r["rcbv_median"] / t["rcbv"] - 1) <= RCBV_TOL, name
        assert r["verdict"] == t["expected_verdict"], name
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    rep = json.loads((out / "report.json").read_text())
    assert rep["parameters"]["leakage"] == "bidirectional" and rep["parameters"]["leakage_gate"] == "lesion"
    assert rep["leakage"]["method"] == "bidirectional" and 0 < rep["leakage"]["fit_r2_median"] <= 1
    # strong leakage is flagged in the reasons of the lesions whose CBV the correction changed by > 30 %
    assert any("strong contrast leakage" in x for x in rois["roi-leaky_treatment_t1"]["reasons"])
    assert (out / "cbv_uncorrected.nii.gz").is_file()
    k2 = nib.load(out / "k2.nii.gz")
    assert json.loads((out / "k2.json").read_text())["Units"] == "1/s"
    k2 = np.asarray(k2.dataobj)
    mask = lambda n: np.asarray(nib.load(paths["dsc"].parent / f"roi-{n}.nii.gz").dataobj) > 0  # noqa: E731
    assert np.nanmedian(k2[mask("leaky_recurrence_t1")]) > 0  # T1-dominant: signal rises, K2 > 0
    assert np.nanmedian(k2[mask("leaky_treatment_t2s")]) < 0  # T2*-dominant


def test_without_correction_a_verdict_is_wrong(leaky_case, tmp_path):
    paths, truth = leaky_case
    _, rois = _run(paths, tmp_path, "--leakage", "none")
    wrong = [n for n in LEAKY if rois[f"roi-{n}"]["verdict"] != truth["leaky_lesions"][n]["expected_verdict"]]
    assert wrong, "leakage does not change any verdict: the phantom would not test the correction"


@pytest.mark.parametrize("method", ["residue", "bidirectional"])
def test_a_per_voxel_gate_with_any_method_scores_the_lesions(leaky_case, tmp_path, method):
    """--leakage-gate voxel with a correction other than BSW once ended in an internal error
    (KeyError 'residue_gated'): the lesions' fit R^2 was looked up under the gated key, which the
    sensitivity does not compute. The R^2 is the method's own fit's; every lesion gets a verdict."""
    paths, _ = leaky_case
    out, rois = _run(paths, tmp_path, "--leakage", method, "--leakage-gate", "voxel")
    rep = json.loads((out / "report.json").read_text())
    assert rep["leakage"]["method"] == method and rep["parameters"]["leakage_gate"] == "voxel"
    for name in LEAKY:
        r = rois[f"roi-{name}"]
        assert r["verdict"] in ("likely_recurrence", "likely_treatment_effect", "indeterminate"), (name, r["verdict"])
        assert 0 < r["fit_r2_median"] <= 1, (name, r["fit_r2_median"])


def test_correction_does_not_damage_non_leaky_tissue(phantom_case):
    truth = json.loads(phantom_case["truth_json"].read_text())
    inputs = load_inputs(dsc=phantom_case["dsc"], mask=None, aif=str(phantom_case["aif"]),
                         reference=phantom_case["nawm"], rois=[], te=None, tr=None)[0]
    errs = {}
    for leak in ("none", config.DEFAULT_LEAKAGE_SINGLE):
        res = analyze(inputs, Config(leakage=leak))
        errs[leak] = np.median([abs(np.median(res.maps["cbv"][(slice(*b["x"]), slice(*b["y"]), b["slice"])]) / b["cbv"] - 1)
                                for b in truth["blocks"]])
    assert abs(errs[config.DEFAULT_LEAKAGE_SINGLE] - errs["none"]) <= NONLEAKY_PP, errs
