"""`perfusion validate`: the accuracy suite runs, writes its JSON, and its numbers guard the targets.

Guards (each fails if a method regresses), measured values in the README table:
- OSIPI DRO (14 curves, package data): every method inside OSIPI's own rule; the model's median
  |CBF error| <= 25 % (measured 13 %: the DRO's left-Riemann convolution biases it up by about
  CBF TR / (2 MTT); the DRO README in ../shared/reference-data explains its left-Riemann convolution).
- Bezier DRO, no delay/dispersion (when ../shared holds it): model median |CBF error| <= 15 %
  (measured 11.7 %, 12.5 % before issue 16) and better than osvd (26.3 %); residue-shape files (lambda 1,
  5, 100): model within 10 % on CBF for each (measured 2.9 / 0.5 / 2.8 %, 3.0 / 0.7 / 2.5 % before);
  the 14 gamma- and boxcar-residue regions (SNR 20): model median |CBF error| <= 10 % and 20 % (measured
  6.7 and 16.7 %, 5.0 and 16.6 % before issue 16; 17.0 and 21.1 % when the voxels with an early delay were
  refitted whole, modelfit.PRIOR_REFIT_PENALTY).
"""

import json

import numpy as np

from conftest import shared_dir
from perfusion.tools import validate
from perfusion.cli.app import main


def _summary(rows):
    return {(e["dataset"], e["group"], e["method"]): e for e in validate.summarize(rows)}


def test_osipi_rows_and_guards():
    rows = validate.validate_osipi(["osvd", "model", "tikhonov"])
    assert len(rows) == 3 * 14
    for r in rows:
        assert abs(r.estimate["cbf"] - r.truth["cbf"]) <= 15 + 0.1 * r.truth["cbf"], (r.method, r.item)
        assert abs(r.estimate["cbv"] - r.truth["cbv"]) <= 1 + 0.1 * r.truth["cbv"], (r.method, r.item)
    s = _summary(rows)
    assert s[("osipi", "all", "model")]["cbf"]["median_abs"] <= 0.25


def test_bezier_guards():
    folder = shared_dir("bezier-dsc-dro")
    rows = validate.validate_bezier(folder, ["osvd", "model"])
    s = _summary(rows)
    clean_model = s[("bezier", "no delay, no dispersion", "model")]["cbf"]["median_abs"]
    clean_osvd = s[("bezier", "no delay, no dispersion", "osvd")]["cbf"]["median_abs"]
    assert clean_model <= 0.15 and clean_model < clean_osvd
    for lam in (1, 5, 100):
        assert s[("bezier", f"residue lambda {lam}", "model")]["cbf"]["median_abs"] <= 0.10, lam
    assert s[("bezier", "gamma residue (lambda 5)", "model")]["cbf"]["median_abs"] <= 0.10
    assert s[("bezier", "boxcar residue", "model")]["cbf"]["median_abs"] <= 0.20
    # no silent failure: every condition has a finite estimate for every method
    for e in s.values():
        assert e["cbf"] is not None and e["cbf"]["n_valid"] == e["n"], e


def test_validate_command_writes_json(tmp_path, capsys):
    out = tmp_path / "v.json"
    code = main(["validate", "--methods", "osvd,model", "--quick", "--json", str(out), "--data", str(tmp_path)])
    assert code == 0
    rep = json.loads(out.read_text())
    assert rep["methods"] == ["osvd", "model"]
    assert any("bezier" in s for s in rep["skipped"])  # tmp_path holds no reference data
    datasets = {e["dataset"] for e in rep["summary"]}
    assert datasets == {"osipi", "phantom"}
    leak = {r["lesion"]: r for r in rep["leakage"]}
    assert len(leak) == 4 and all(r["residue"]["verdict"] == r["truth_verdict"] for r in leak.values())
    assert any(r["none"]["verdict"] != r["truth_verdict"] for r in leak.values())
    printed = capsys.readouterr().out
    assert "leakage" in printed
    # the gate (issue 21): on --quick only the OSIPI rows are judged (no Bezier data here), all pass
    gate = rep["tolerances"]
    assert gate["passed"] is True and gate["datasets_judged"] == ["osipi", "bezier"]
    judged = {(c["method"], c["quantity"]): c for c in gate["checks"]}
    assert set(judged) == {("osvd", "cbf"), ("osvd", "mtt"), ("model", "cbf"), ("model", "mtt")}
    assert judged[("model", "cbf")]["published_percent"] == 14.8
    assert judged[("model", "cbf")]["tolerance_percent"] == 17.8  # 14.8 + 3 points (a fifth is 2.96)
    assert "tolerances: 4 of 4 figures within the stated tolerance" in printed
    note = [line for line in printed.splitlines() if line.startswith("note: --quick")]
    assert len(note) == 1 and "not the README's accuracy table" in note[0]
    measured = [e for e in rep["summary"] if (e["dataset"], e["group"], e["method"]) == ("phantom", "undispersed",
                                                                                         "model")][0]
    assert f"reads CBF {100 * measured['cbf']['median_abs']:.0f} % off (the README's phantom: 4.9 %)" in note[0]
    assert measured["cbf"]["median_abs"] > 0.3  # the small phantom reads far off: why it is not judged

    phantom_model = [e for e in rep["summary"] if e["dataset"] == "phantom" and e["method"] == "model"
                     and e["group"] == "undispersed"][0]
    assert np.isfinite(phantom_model["cbf"]["median_abs"])


def test_validate_rejects_unknown_method(capsys):
    assert main(["validate", "--methods", "magic", "--json", "/dev/null"]) == 2
    assert "--methods" in capsys.readouterr().err


def test_tolerances_state_the_readme_table_and_judge_real_rows():
    """The gate's figures are the README's Accuracy table; the OSIPI rows of the current code pass them,
    and the same rows fail a tolerance scaled down to a tenth."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = re.search(r"^\| osipi \| 14 curves \| (.*) \|$", readme, re.M).group(1)
    figures = [tuple(float(x) for x in re.findall(r"[\d.]+", cell)) for cell in row.split(" | ")]
    published = validate.PUBLISHED_PERCENT[("osipi", "all")]
    assert [published[m] for m in ("model", "osvd", "csvd", "ssvd", "tikhonov")] == figures
    summary = validate.summarize(validate.validate_osipi(["model", "ssvd"]))
    assert all(c["ok"] for c in validate.check_tolerances(summary))
    strict = validate.check_tolerances(summary, scale=0.1)
    assert strict and not any(c["ok"] for c in strict)


def test_validate_exits_3_when_a_method_misses_its_tolerance(tmp_path, capsys):
    out = tmp_path / "sub" / "v.json"
    out.parent.mkdir()
    code = main(["validate", "--methods", "model", "--quick", "--json", str(out), "--data", str(tmp_path),
                 "--tolerance-scale", "0.1", "-q"])
    assert code == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("perfusion: error: validate: 2 figure(s) outside the stated tolerance: model osipi all CBF")
    rep = json.loads(out.read_text())  # written before the exit, where --json said
    assert rep["tolerances"]["passed"] is False and rep["tolerances"]["scale"] == 0.1
    assert not [p for p in out.parent.iterdir() if p != out]  # atomically: no temporary file left


def test_validate_refuses_a_bad_tolerance_scale(capsys):
    assert main(["validate", "--tolerance-scale", "0", "--json", "/dev/null"]) == 2
    assert "--tolerance-scale 0: must be a finite number > 0" in capsys.readouterr().err
