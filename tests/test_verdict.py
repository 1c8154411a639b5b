"""The verdict (issue 15): the rCBV distribution inside the lesion, its bootstrap interval, the gates
that make a lesion not assessable, the leakage sensitivity, the pseudoprogression window and drugs.

Provenance of the numbers:
- Synthetic lesions: rCBV values drawn from a fixed-seed generator around stated levels (the mixed
  lesion of the issue: 55 % of the voxels at 0.6, 45 % at 3.2, SD 0.1), the reference CBV around
  2.0 mL/100 g (SD 0.2, 400 voxels). Each assertion states which figure of the rule it exercises.
- The default phantom (PhantomSpec(): SNR 150, seed 0; lesion_hyper rCBV 3.0, lesion_hypo 0.6 against
  the NAWM) run through the CLI with its NAWM mask: the verdicts and an interval that holds the truth.
"""

import json

import numpy as np
import pytest

from perfusion.quantify import roi
from perfusion.cli.app import main
from perfusion.config import DEFAULT_LEAKAGE_SINGLE, Config

GEN = np.random.default_rng(7)
REF = GEN.normal(2.0, 0.2, 400)  # reference CBV, mL/100 g


def _score(rcbv, *, ref=REF, **ctx):
    """score_roi with a bootstrap interval against REF (one correction, the context's)."""
    rcbv = np.asarray(rcbv, dtype=float)
    return roi.score_roi("lesion", rcbv, voxel_volume_ml=0.01, n_voxels=rcbv.size, ref_cbv=ref,
                         context=roi.Context(**ctx))


def _levels(*parts, sd=0.1, seed=1):
    """rCBV values: (n, level) parts with Gaussian noise of SD ``sd``."""
    g = np.random.default_rng(seed)
    return np.concatenate([g.normal(level, sd, n) for n, level in parts])


# --- the rule


def test_mixed_lesion_is_never_treatment_effect():
    r = _levels((110, 0.6), (90, 3.2))  # 55 % at 0.6, 45 % at 3.2
    # the old rule (median alone) calls it treatment effect: that is the bug
    assert roi.verdict_for(float(np.median(r))) == "likely_treatment_effect"
    s = _score(r)
    assert s.verdict == "indeterminate"
    assert s.mixed and s.ftb_high == pytest.approx(0.45, abs=0.01)
    assert any(x.startswith("mixed lesion") for x in s.reasons)
    assert s.ftb_high_ci[0] < 0.45 < s.ftb_high_ci[1]  # the FTB-high interval is reported and holds it


@pytest.mark.parametrize("high_share", [0.20, 0.30, 0.45, 0.60])
def test_substantial_high_fraction_never_gives_treatment_effect(high_share):
    n_high = int(200 * high_share)
    s = _score(_levels((200 - n_high, 0.5), (n_high, 3.0), seed=n_high))
    assert s.verdict in ("indeterminate", "likely_recurrence")


def test_small_hotspot_blocks_treatment_effect():
    # 12 % of the voxels at 2.5: FTB-high below the mixed fraction, but the 90th percentile is above 1.75
    s = _score(_levels((176, 0.6), (24, 2.5)))
    assert not s.mixed and s.rcbv_p90 > roi.RCBV_HIGH
    assert s.verdict == "indeterminate" and any("hotspot" in x for x in s.reasons)


def test_clear_lesions_get_their_verdicts_with_an_interval():
    hi = _score(_levels((200, 3.0), sd=0.3))
    lo = _score(_levels((200, 0.6), sd=0.15))
    assert hi.verdict == "likely_recurrence" and lo.verdict == "likely_treatment_effect"
    assert hi.rcbv_ci_low > roi.RCBV_HIGH and lo.rcbv_ci_high < roi.RCBV_LOW
    assert hi.next_step == roi.NEXT_STEP["likely_recurrence"] and "tumour board" in hi.next_step
    assert "6-8 weeks" in lo.next_step


def test_interval_crossing_a_threshold_is_at_most_indeterminate():
    # median 1.9 (> 1.75) of 15 voxels spread evenly over 1.0-2.8: the interval reaches below 1.75
    s = _score(np.linspace(1.0, 2.8, 15))
    assert s.rcbv_median > roi.RCBV_HIGH and s.rcbv_ci_low < roi.RCBV_HIGH
    assert s.verdict == "indeterminate"
    assert any("crosses 1.75" in x for x in s.reasons)
    lo = _score(np.linspace(0.3, 1.5, 15))  # median 0.9 < 1.0, interval above 1.0
    assert lo.rcbv_median < roi.RCBV_LOW < lo.rcbv_ci_high and lo.verdict == "indeterminate"


def test_without_an_interval_nothing_is_likely():
    r = _levels((200, 3.0))
    s = roi.decide("x", r, voxel_volume_ml=0.01, n_voxels=200)
    assert s.verdict == "indeterminate" and any("no confidence interval" in x for x in s.reasons)


def test_bootstrap_is_deterministic_and_seeded():
    r = _levels((110, 0.6), (90, 3.2)) * 2.0
    a = roi.rcbv_interval({"residue": r}, {"residue": roi.resample_reference(REF)})
    b = roi.rcbv_interval({"residue": r}, {"residue": roi.resample_reference(REF)})
    assert a == b  # bit-identical, every figure
    c = roi.rcbv_interval({"residue": r}, {"residue": roi.resample_reference(REF, seed=1)}, seed=1)
    assert c.median != a.median  # the seed is what fixes it
    assert a.n_resamples == roi.N_BOOTSTRAP


def test_interval_pools_the_corrections_and_holds_the_reference_spread():
    ref_boot = roi.resample_reference(REF)
    # the reference median's own spread: SD 0.2 / sqrt(400) * 1.25 (median) ~ 0.0125 mL/100 g, ~0.6 %
    assert np.std(ref_boot) / 2.0 == pytest.approx(0.00625, rel=0.35)
    lesion = np.full(200, 4.0)  # noise-free lesion: the whole interval is the reference's
    iv = roi.rcbv_interval({"a": lesion}, {"a": ref_boot})
    t = 4.0 / np.median(REF)  # the sample's rCBV (about 2.0)
    assert iv.median[0] < t < iv.median[1] and iv.median[1] - iv.median[0] < 0.1
    # two corrections 20 % apart: the pooled interval spans both
    iv2 = roi.rcbv_interval({"a": lesion, "b": lesion * 1.2}, {"a": ref_boot, "b": ref_boot})
    assert iv2.median[0] < t and iv2.median[1] > 1.15 * t and set(iv2.by_method) == {"a", "b"}


# --- gates: each one alone makes the lesion not assessable, with its reason and next step


def _gate(rcbv, code, **ctx):
    s = _score(rcbv, **ctx)
    assert s.verdict == "not_assessable", s.reasons
    assert code in s.gates_failed, s.gates_failed
    assert s.next_step.startswith(roi.GATE_NEXT_STEP[code][:40])
    assert any(x.startswith("not assessable") for x in s.reasons)
    return s


HIGH = _levels((200, 3.0), sd=0.3)


def test_gate_negative_median():
    _gate(_levels((200, -0.3), sd=0.2), "negative_rcbv")


def test_gate_poor_leakage_fit():
    s = _gate(HIGH, "poor_leakage_fit", leakage="residue", fit_r2_curve=0.3)
    assert "0.30" in " ".join(s.reasons)
    assert _score(HIGH, leakage="residue", fit_r2_curve=0.9).verdict == "likely_recurrence"


def test_gate_k2_out_of_range():
    _gate(HIGH, "k2_out_of_range", leakage="residue", k2_median_per_s=0.02)
    _gate(HIGH, "k2_out_of_range", leakage="bsw", k2_median_per_s=-0.5)
    # the phantom's most leaking lesion (BSW K2 0.013 1/s) is inside the range
    assert _score(HIGH, leakage="bsw", k2_median_per_s=0.013).verdict == "likely_recurrence"


def test_gate_leakage_disagreement():
    lesion = _levels((200, 0.7), sd=0.1) * 2.0  # CBV under the residue correction: rCBV 0.7
    ref_boot = roi.resample_reference(REF)
    cbv = {"residue": lesion, "bsw": lesion * 1.6}  # BSW reads 1.12: another band
    iv = roi.rcbv_interval(cbv, {"residue": ref_boot, "bsw": ref_boot})
    ref_med = float(np.median(REF))
    by = {k: {"rcbv_median": float(np.median(v)) / ref_med} for k, v in cbv.items()}
    assert iv.by_method["residue"][1] < iv.by_method["bsw"][0]  # disjoint intervals
    s = roi.decide("x", lesion / ref_med, voxel_volume_ml=0.01, n_voxels=200, interval=iv, by_leakage=by,
                   context=roi.Context(leakage="residue"))
    assert s.verdict == "not_assessable" and s.gates_failed == ("leakage_disagreement",)
    # corrections 5 % apart in the same band: no gate
    cbv_ok = {"residue": lesion, "bsw": lesion * 1.05}
    iv_ok = roi.rcbv_interval(cbv_ok, {"residue": ref_boot, "bsw": ref_boot})
    by_ok = {k: {"rcbv_median": float(np.median(v)) / ref_med} for k, v in cbv_ok.items()}
    ok = roi.decide("x", lesion / ref_med, voxel_volume_ml=0.01, n_voxels=200, interval=iv_ok, by_leakage=by_ok,
                    context=roi.Context(leakage="residue"))
    assert ok.verdict == "likely_treatment_effect"


def test_gate_mostly_unfittable():
    r = HIGH.copy()
    r[:120] = np.nan  # 60 % without a valid CBV
    _gate(r, "unfittable")
    r2 = HIGH.copy()
    r2[:60] = np.nan  # 30 %: a note, not a gate
    s = _score(r2)
    assert s.verdict == "likely_recurrence" and any("60 of 200 voxels" in x for x in s.reasons)


def test_gate_too_few_voxels():
    _gate(np.array([3.0, 3.1, 2.9, 3.2, 3.05]), "too_few_voxels")


def test_gate_mostly_outside_brain():
    _gate(HIGH, "outside_brain", outside_brain=120)
    assert _score(HIGH, outside_brain=20).verdict == "likely_recurrence"


def test_gate_on_a_vessel():
    _gate(HIGH, "on_vessel", on_vessel=150)


def test_gate_unusable_aif_and_poor_aif_note():
    _gate(HIGH, "unusable_aif", aif_quality=0.1)
    s = _score(HIGH, aif_quality=0.35)  # poor but usable: a note only
    assert s.verdict == "likely_recurrence" and any("poor arterial input" in x for x in s.reasons)


def test_size_of_the_correction_alone_is_no_gate():
    s = _score(HIGH, leakage="residue", leakage_cbv_change=2.5, fit_r2_curve=0.95, k2_median_per_s=4e-4)
    assert s.verdict == "likely_recurrence" and any("strong contrast leakage" in x for x in s.reasons)


# --- timing and drugs


def test_pseudoprogression_window():
    s = _score(HIGH, weeks_since_radiation=8)
    assert s.verdict == "possible_recurrence_or_pseudoprogression"
    assert "confirm at short interval" in " ".join(s.reasons).lower() and "short interval" in s.next_step
    assert _score(HIGH, weeks_since_radiation=20).verdict == "likely_recurrence"
    unknown = _score(HIGH)
    assert unknown.verdict == "likely_recurrence"
    assert any("time since radiation unknown" in x and "12 weeks" in x for x in unknown.reasons)


@pytest.mark.parametrize("drug", ["bevacizumab", "steroids"])
def test_drugs_make_a_low_rcbv_indeterminate(drug):
    low = _levels((200, 0.6), sd=0.15)
    assert _score(low).verdict == "likely_treatment_effect"
    s = _score(low, **{drug: True})
    assert s.verdict == "indeterminate" and any(drug in x and "lower" in x for x in s.reasons)
    assert _score(HIGH, **{drug: True}).verdict == "likely_recurrence"


def test_every_verdict_has_words_and_a_next_step():
    from perfusion.batch import engine as batch
    from perfusion.report import build as report
    from perfusion.report import html as report_html
    for v in roi.VERDICTS:
        assert v in roi.NEXT_STEP and v in report.VERDICT_LABEL and v in report_html.VERDICT_WORDS
        assert v in report_html.VERDICT_COLOUR and v in batch.VERDICT_WORDS


# --- the whole pipeline on the default phantom with its NAWM mask


TRUTH = {"roi-lesion_hyper": (3.0, "likely_recurrence"), "roi-lesion_hypo": (0.6, "likely_treatment_effect")}


@pytest.fixture(scope="module")
def phantom_report(tmp_path_factory):
    from perfusion.cli.phantom import run_phantom

    case = run_phantom(out=tmp_path_factory.mktemp("vph") / "case", quiet=True)
    out = tmp_path_factory.mktemp("vout") / "o"
    args = ["analyze", str(case["dsc"]), "--out", str(out), "-q", "--reference", str(case["nawm"]),
            "--roi", str(case["lesion_hyper"]), "--roi", str(case["lesion_hypo"])]
    assert main(args) == 0
    return case, out, json.loads((out / "report.json").read_text())


def test_phantom_verdicts_intervals_and_sensitivity(phantom_report):
    _, out, rep = phantom_report
    rois = {r["name"]: r for r in rep["rois"]}
    for name, (truth, verdict) in TRUTH.items():
        r = rois[name]
        assert r["verdict"] == verdict, r["reasons"]
        assert r["rcbv_ci_low"] <= truth <= r["rcbv_ci_high"], (name, r["rcbv_ci_low"], r["rcbv_ci_high"])
        assert r["rcbv_ci_high"] - r["rcbv_ci_low"] < 0.25 * truth  # informative, not a blanket
        assert set(r["rcbv_by_leakage"]) == set(roi.SENSITIVITY_METHODS)
        for m, v in r["rcbv_by_leakage"].items():
            # no leakage in these lesions: every correction within 10 % of the truth, same band
            assert abs(v["rcbv_median"] / truth - 1) < 0.10, (name, m, v)
            assert v["verdict"] == verdict
        default = DEFAULT_LEAKAGE_SINGLE  # the analysis's own correction is the sensitivity's entry of that name
        assert r["rcbv_by_leakage"][default]["rcbv_median"] == pytest.approx(r["rcbv_median"], rel=1e-6)
        assert r["ci_methods"] == list(dict.fromkeys((default, *roi.PLAUSIBLE_LEAKAGE)))
        assert r["mixed"] is False and r["gates_failed"] == []
        assert len(r["ftb_high_ci"]) == 2 and len(r["rcbv_p90_ci"]) == 2
    assert rep["parameters"]["bevacizumab"] is False and rep["parameters"]["steroids"] is False
    assert rep["thresholds"]["mixed_fraction"] == roi.MIXED_FTB_HIGH
    assert "not_assessable_by_reason" in rep["next_steps"]
    page = (out / "report.html").read_text()
    assert "95 % interval" in page and "bsw_gated" in page and "leakage correction" in page


def test_phantom_outputs_are_bit_identical_run_to_run(phantom_report, tmp_path):
    case, _, rep = phantom_report
    out = tmp_path / "again"
    assert main(["analyze", str(case["dsc"]), "--out", str(out), "-q", "--reference", str(case["nawm"]),
                 "--roi", str(case["lesion_hyper"]), "--roi", str(case["lesion_hypo"]), "--no-html"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["rois"] == rep["rois"]


def test_cli_drug_and_timing_options(phantom_report, tmp_path):
    case, _, _ = phantom_report
    out = tmp_path / "drug"
    assert main(["analyze", str(case["dsc"]), "--out", str(out), "-q", "--reference", str(case["nawm"]),
                 "--roi", str(case["lesion_hyper"]), "--roi", str(case["lesion_hypo"]), "--no-html",
                 "--bevacizumab", "--weeks-since-radiation", "6"]) == 0
    rep = json.loads((out / "report.json").read_text())
    rois = {r["name"]: r for r in rep["rois"]}
    assert rep["parameters"]["bevacizumab"] is True and rep["parameters"]["weeks_since_radiation"] == 6
    assert rois["roi-lesion_hypo"]["verdict"] == "indeterminate"
    assert rois["roi-lesion_hyper"]["verdict"] == "possible_recurrence_or_pseudoprogression"


def test_pipeline_roi_on_the_arterial_voxels_is_not_assessable(phantom_report):
    from perfusion.case import load_inputs
    from perfusion.pipeline import analyze
    import dataclasses

    case, _, _ = phantom_report
    inputs, _ = load_inputs(dsc=case["dsc"], mask=None, aif=str(case["aif"]), reference=case["nawm"],
                            rois=[case["lesion_hyper"]], te=None, tr=None)
    inputs = dataclasses.replace(inputs, rois={"on_artery": inputs.aif.copy()})
    res = analyze(inputs, Config())
    (s,) = res.rois
    assert s.verdict == "not_assessable" and "on_vessel" in s.gates_failed
