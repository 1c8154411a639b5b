"""The realistic phantom (phantom_realistic.py) and what issue 15 asks of the analysis on it.

The phantom's physics differs on purpose from the methods' models (quadratic blood relaxation,
log-normal residues, leakage driven by the capillary concentration with back-flux and SPGR T1
effects), so these are the measurements the defaults were chosen by, over several seeds and SNRs.
Tolerances and their sources:

- signal drops at the bolus peak: grey matter 25-35 %, white matter 10-20 %, arteries > 90 % at
  TE 30 ms (../shared/DOMAIN.md "Realistic ranges": GM 25-40 %, WM 10-20 %, arteries to the noise floor);
- T1-dominant lesions at flip 60 without preload end 10-20 % above baseline, with a preload or at
  flip 30 several times less (DOMAIN.md; Boxerman 2020);
- leakage-corrected rCBV within 30 % of the truth at flip 60 without preload and within 20 % at
  flip 30 or with a preload, T2*-dominant lesion within 20 % (issue 15's targets);
- the default correction moves grey- and white-matter CBV of a brain without leakage, delayed
  territory included, by less than 5 % (issue 15 and 16);
- verdicts: each lesion's in phantom_realistic.expected_verdicts (a mixed lesion never "likely
  treatment effect").
"""

import json

import numpy as np
import pytest

from perfusion.quantify import maps

from perfusion.quantify import signal
from perfusion.tools.phantom_realistic import (PROTOCOLS, RealisticSpec, drops, expected_verdicts, make_realistic_phantom,
                                         write_realistic)
from perfusion.config import Config
from perfusion.pipeline import analyze
from perfusion.tools.validate import realistic_inputs, validate_realistic

SEEDS = (0, 1, 2)
SNRS = (30.0, 50.0)


def test_signal_drops_are_those_of_patients():
    d = drops(RealisticSpec())
    assert 0.25 <= d["gm"] <= 0.35, d
    assert 0.10 <= d["wm"] <= 0.20, d
    assert d["artery"] > 0.90, d


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_leakage_strength_per_protocol(protocol):
    """Noise-free late signal of the T1-dominant recurrence: 10-20 % above baseline at flip 60 without
    preload; within 5 % of baseline with a preload or at flip 30 (the consensus protocols)."""
    ph = make_realistic_phantom(RealisticSpec(protocol=protocol, snr=1e6, lesions=("recurrence_t1", "treatment_t2s")))
    s = ph.signal.astype(np.float64)

    def late_over_base(name):
        c = s[ph.masks[name]].mean(axis=0)
        return c[-10:].mean() / c[3:12].mean()

    late = late_over_base("recurrence_t1")
    if protocol == "flip60_no_preload":
        assert 1.10 <= late <= 1.20, late
    else:
        assert abs(late - 1) < 0.05, late
    assert late_over_base("treatment_t2s") < 0.95  # T2*-dominant: ends below baseline
    assert ph.lesions["treatment_t2s"]["leakage"] == "T2*"


def test_truth_is_the_area_ratio_without_leakage():
    """Without leakage and noise, the area ratio of the measured delta R2* gives every lesion's true
    median rCBV within 1 % (the phantom's truth is what its signal holds)."""
    import perfusion.tools.phantom_realistic as pr

    spec = RealisticSpec(snr=1e6, lesions=("recurrence_t1", "treatment_t1", "indeterminate"))
    saved = dict(pr.LESIONS)
    try:
        for k in spec.lesions:
            pr.LESIONS[k] = {**pr.LESIONS[k], "ktrans": 0.0}
        ph = make_realistic_phantom(spec)
    finally:
        pr.LESIONS.clear()
        pr.LESIONS.update(saved)
    d, _ = signal.to_delta_r2s(ph.signal[..., 2:].reshape(-1, ph.signal.shape[-1] - 2).astype(np.float64),
                               te=spec.te, baseline=slice(0, 10))
    area = maps.trapezoid(d, dx=spec.tr, axis=1).reshape(ph.signal.shape[:3])
    nawm = np.median(area[ph.masks["nawm"]])
    for name in spec.lesions:
        est = np.median(area[ph.masks[name]]) / nawm
        np.testing.assert_allclose(est, ph.lesions[name]["rcbv_median"], rtol=0.01, err_msg=name)


def test_expected_verdicts():
    assert expected_verdicts(np.full(50, 3.0)) == ("likely_recurrence", "possible_recurrence_or_pseudoprogression")
    assert expected_verdicts(np.full(50, 0.6)) == ("likely_treatment_effect",)
    mixed = np.r_[np.full(55, 0.6), np.full(45, 3.2)]
    assert "likely_treatment_effect" not in expected_verdicts(mixed)


def test_mixed_lesion_is_mixed_in_truth():
    """The mixed lesion holds recurrence-like and treatment-like voxels in every seed (each at least a
    quarter), so the median alone cannot describe it."""
    for seed in SEEDS:
        t = make_realistic_phantom(RealisticSpec(seed=seed, lesions=("mixed",))).lesions["mixed"]
        assert t["ftb_high"] >= 0.25 and t["ftb_low"] >= 0.25, (seed, t)
        assert "likely_treatment_effect" not in t["expected_verdicts"]


@pytest.fixture(scope="module")
def realistic_rows():
    return validate_realistic(seeds=SEEDS, snrs=SNRS)


def test_every_verdict_right_on_the_realistic_phantom(realistic_rows):
    wrong = [(r["protocol"], r["snr"], r["seed"], r["lesion"], r["verdict"], r["gates_failed"])
             for r in realistic_rows if not r["verdict_ok"]]
    assert not wrong, wrong
    mixed = [r for r in realistic_rows if r["lesion"] == "mixed"]
    assert mixed and all(r["verdict"] != "likely_treatment_effect" for r in mixed)


def test_rcbv_within_the_targets(realistic_rows):
    """Every lesion but the mixed one (whose median sits between two populations: its verdict is what
    counts): within 30 % at flip 60 without preload, 20 % otherwise; the T2*-dominant one within 20 %."""
    for r in realistic_rows:
        if r["lesion"] == "mixed":
            continue
        bound = 0.30 if r["protocol"] == "flip60_no_preload" else 0.20
        if r["lesion"] == "treatment_t2s":
            bound = 0.20
        assert abs(r["rel_error"]) <= bound, (r["protocol"], r["snr"], r["seed"], r["lesion"], r["rel_error"])


def test_interval_and_sensitivity_reported(realistic_rows):
    for r in realistic_rows:
        lo, hi = r["rcbv_ci"]
        assert lo <= r["rcbv_median"] <= hi, r
        assert set(r["rcbv_by_leakage"]) == {"none", "bsw", "bsw_gated", "residue", "bidirectional"}


def test_default_correction_leaves_normal_tissue_alone(realistic_rows):
    """The maps' grey and white matter of the lesion phantom: the correction moved them by < 5 %."""
    for r in realistic_rows:
        for tissue, change in r["normal_tissue_cbv_change"].items():
            assert abs(change) < 0.05, (r["protocol"], r["snr"], r["seed"], tissue, change)


@pytest.mark.parametrize("seed", (0, 1))
def test_no_leakage_brain_with_delayed_territory(seed):
    """A brain without leakage whose right MCA territory arrives 4 s late and dispersed: the default
    correction changes grey matter, white matter and the delayed territory's CBV by less than 5 %;
    published (ungated) BSW reads the delay as leakage (more than 20 %), which is why the default is
    gated outside the lesions."""
    ph = make_realistic_phantom(RealisticSpec(seed=seed, snr=50.0, lesions=(), delayed_territory=True))
    inputs = realistic_inputs(ph)
    delayed = ph.truth["delay"] > 0
    regions = {"gm": ph.masks["gm"] & ~delayed, "wm": ph.masks["nawm"], "delayed_wm": ph.masks["wm"] & delayed,
               "delayed_gm": ph.masks["gm"] & delayed}
    for cfg, bound, compare in ((Config(motion_correct="off"), 0.05, np.less),
                                (Config(motion_correct="off", leakage="bsw", leakage_gate="none"), 0.20, np.greater)):
        res = analyze(inputs, cfg)
        change = {k: np.nanmedian(res.maps["cbv"][m]) / np.nanmedian(res.maps["cbv_uncorrected"][m]) - 1
                  for k, m in regions.items()}
        if compare is np.less:
            assert all(abs(v) < bound for v in change.values()), change
        else:
            assert abs(change["delayed_wm"]) > bound, change


def test_phantom_command_writes_the_realistic_case(tmp_path):
    from perfusion.cli.phantom import run_phantom

    paths = run_phantom(out=tmp_path / "case", realistic=True, protocol="flip30_no_preload", quiet=True)
    truth = json.loads(paths["truth_json"].read_text())
    assert truth["kind"] == "realistic" and truth["protocol"]["flip_angle"] == 30.0
    assert set(truth["lesions"]) == set(RealisticSpec().lesions)
    side = json.loads((paths["dsc"].parent / "sub-realistic_dsc.json").read_text())
    assert side["EchoTime"] == 0.03 and side["FlipAngle"] == 30.0
    for key in ("truth_cbv", "truth_rcbv"):
        assert json.loads(paths[key].with_name(paths[key].name.replace(".nii.gz", ".json")).read_text())["Units"]


def test_write_realistic_reference_is_contralateral(tmp_path):
    import nibabel as nib

    ph = make_realistic_phantom(RealisticSpec(lesions=("recurrence_t1",)))
    paths = write_realistic(ph, tmp_path)
    ref = np.asarray(nib.load(paths["nawm"]).dataobj).astype(bool)
    x = np.nonzero(ref)[0]
    les = np.nonzero(ph.masks["recurrence_t1"])[0]
    assert ref.any() and x.min() > les.max()  # all on the other side (RAS: larger x, the patient's right)


def test_not_assessable_cases_on_the_realistic_head():
    """Gates met through the whole pipeline on the realistic head, each with its reason (the others,
    K2 out of range and most voxels unfittable, are exercised in tests/test_verdict.py): too few voxels
    (5), an ROI mostly on the scalp (84 % outside the brain; its curves are not the leakage model's
    either), an ROI on the arteries given as the AIF, no leakage correction at flip 60 without preload
    (negative median rCBV, and the corrections disagreeing), and an "AIF" drawn in white matter."""
    from dataclasses import replace

    from scipy import ndimage

    ph = make_realistic_phantom(RealisticSpec(seed=0, lesions=("recurrence_t1", "treatment_t1", "indeterminate")))
    inputs = realistic_inputs(ph)
    rec = ph.masks["recurrence_t1"]
    tiny = np.zeros_like(rec)
    tiny[tuple(np.argwhere(rec)[:5].T)] = True
    edge = ph.masks["brain"] & ~ndimage.binary_erosion(ph.masks["brain"], np.ones((3, 3, 1), bool))
    scalp = np.zeros_like(rec)
    scalp[..., 3] = ((ph.masks["head"] & ~ph.masks["brain"]) | edge)[..., 3]
    scalp[:, 48:, 3] = False
    rois = dict(inputs.rois, tiny=tiny, scalp=scalp, artery=ph.masks["aif"])
    res = analyze(replace(inputs, rois=rois, aif=ph.masks["aif"]), Config(motion_correct="off"))
    got = {r.name: r for r in res.rois}
    assert "too_few_voxels" in got["tiny"].gates_failed
    assert "outside_brain" in got["scalp"].gates_failed
    assert "on_vessel" in got["artery"].gates_failed
    for name in ("tiny", "scalp", "artery"):
        assert got[name].verdict == "not_assessable" and got[name].next_step, name
    for name in ("recurrence_t1", "treatment_t1", "indeterminate"):  # the lesions beside them are unaffected
        assert got[name].verdict in ph.lesions[name]["expected_verdicts"], (name, got[name].verdict)

    none = {r.name: r for r in analyze(inputs, Config(motion_correct="off", leakage="none")).rois}
    assert "negative_rcbv" in none["treatment_t1"].gates_failed and none["treatment_t1"].rcbv_median < 0
    assert "leakage_disagreement" in none["indeterminate"].gates_failed

    white = ph.masks["nawm"].copy()
    white[: white.shape[0] // 2] = False
    wm_aif = np.zeros_like(white)
    wm_aif[tuple(np.argwhere(white)[:30].T)] = True
    bad = analyze(replace(inputs, aif=wm_aif), Config(motion_correct="off"))
    assert bad.aif.quality_score < 0.2
    assert all(r.gates_failed == ("unusable_aif",) for r in bad.rois)


def test_automatic_reference_and_high_snr():
    """Everything automatic (AIF and reference), another seed, SNR 150 and 30: every verdict right, the
    same rCBV targets, and every lesion's reasons say the reference was chosen automatically."""
    rows = validate_realistic(seeds=(3,), snrs=(150.0, 30.0), reference="auto")
    assert all(r["verdict_ok"] for r in rows), [(r["protocol"], r["snr"], r["lesion"], r["verdict"]) for r in rows
                                                 if not r["verdict_ok"]]
    for r in rows:
        if r["lesion"] != "mixed":
            bound = 0.30 if r["protocol"] == "flip60_no_preload" else 0.20
            assert abs(r["rel_error"]) <= bound, (r["protocol"], r["snr"], r["lesion"], r["rel_error"])
    ph = make_realistic_phantom(RealisticSpec(seed=3, lesions=("treatment_t1",)))
    res = analyze(realistic_inputs(ph, reference="auto"), Config(motion_correct="off"))
    assert res.reference.automatic and res.reference.side == "right"
    assert 0 <= res.reference.regional_spread < 0.1
    assert any("chosen automatically" in x for x in res.rois[0].reasons)
