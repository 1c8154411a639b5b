"""The default `model` deconvolution on data unlike its model (issue 16): fits on a bound or in the tails
of weak priors are fitted again with the priors (MTT and delay off the bounds where the data cannot
decide), voxels the model still does not fit fall back to oSVD, and the report counts those as unusable.

Targets (issue 16), on the realistic head (phantom_realistic.py: log-normal residues, quadratic blood
relaxation, partial-volume AIF chosen automatically, a territory 4 s late), brain tissue: the brain minus
CSF and minus the arteries, their partial-volume rings and the vein (no tissue truth there; an artery
upstream of the chosen AIF rightly leads it, Tmax < -1 s):
- FIT_TARGET 0.02: voxels whose model fit sits on a bound or failed (their values are oSVD's), or whose
  CBF, MTT or Tmax is not finite. Before the priors: 0.1-20 % at the MTT bound (TR 2 s, SNR 20-30).
- TMAX_TARGET 0.02: voxels with Tmax < -1 s (before: 9-21 %).
Measured after (README, method step 5): bound or failed 0-0.12 %, Tmax < -1 s 0-0.09 %, none non-finite.
"""

import json

import numpy as np
import pytest

from conftest import shared_dir
from perfusion.quantify import deconvolution
from perfusion.quantify import maps
from perfusion.quantify import modelfit
from perfusion import pipeline
from perfusion.tools.phantom_realistic import RealisticSpec, make_realistic_phantom
from perfusion.config import Config
from perfusion.pipeline import analyze
from perfusion.report.outputs import write_result
from perfusion.tools.validate import realistic_inputs

FIT_TARGET = 0.02
TMAX_TARGET = 0.02


def _analyze_with_status(ph, monkeypatch, config=None):
    """analyze() of a realistic phantom, and the fit_status of every analysed voxel (x y z, NaN outside)."""
    captured = []
    original = pipeline.quantify

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        captured.append(out["fit_status"])
        return out

    monkeypatch.setattr(pipeline, "quantify", spy)
    inputs = realistic_inputs(ph)
    result = analyze(inputs, config or Config(motion_correct="off", leakage="none"))
    analysed = inputs.brain | inputs.reference
    status = np.full(analysed.shape, np.nan)
    status[analysed] = np.concatenate(captured)  # the pipeline's voxel order is ravel order
    return result, status


@pytest.mark.parametrize("tr, n_frames, seed", [(1.5, 60, 0), (1.5, 45, 1), (2.0, 45, 0), (2.0, 45, 1),
                                                (2.0, 45, 2)])
def test_realistic_head_off_bounds(tr, n_frames, seed, monkeypatch):
    ph = make_realistic_phantom(RealisticSpec(tr=tr, n_frames=n_frames, snr=30.0, seed=seed, delayed_territory=True,
                                              matrix=64, lesions=()))
    result, status = _analyze_with_status(ph, monkeypatch)
    tissue = ph.masks["brain"] & ~ph.masks["csf"] & np.isfinite(ph.truth["delay"])
    st = status[tissue]
    finite = np.ones(st.size, bool)
    for k in ("cbf", "mtt", "tmax"):
        finite &= np.isfinite(result.maps[k][tissue])
    off = (st == modelfit.STATUS_BOUND) | (st == modelfit.STATUS_INVALID) | ~finite
    tmax_early = np.mean(result.maps["tmax"][tissue] < -1.0)
    assert off.mean() < FIT_TARGET, (off.mean(), np.unique(st, return_counts=True))
    assert tmax_early < TMAX_TARGET
    # the maps themselves: no MTT on a bound (the fallback's MTT is CBV / CBF), no delay at -3 s
    mtt = result.maps["mtt"][tissue]
    assert np.mean(np.isclose(mtt, 1.0, rtol=1e-6) | np.isclose(mtt, 40.0, rtol=1e-6)) < FIT_TARGET
    # the delayed territory stays late: its median Tmax is well above the rest's
    late = tissue & (ph.truth["delay"] > 3)
    if late.any():
        assert np.nanmedian(result.maps["tmax"][late]) > np.nanmedian(result.maps["tmax"][tissue & ~late]) + 2.0
    # report.json's counts agree with the per-voxel status over the pipeline's brain mask
    fit = result.fit
    brain_st = status[result.brain]
    assert fit["model_at_bound"] == int(np.sum(brain_st == modelfit.STATUS_BOUND))
    assert fit["fallback_osvd"] == int(np.sum(brain_st != modelfit.STATUS_MODEL))
    assert fit["unusable"] >= fit["fallback_osvd"]


def test_fallback_takes_osvd_where_the_model_sits_on_a_bound():
    """A tissue curve 6 s ahead of the AIF (beyond the -3 s delay bound) falls back to oSVD's values;
    a model-shaped curve keeps the model's."""
    tr = 1.5
    t = np.arange(60) * tr
    aif = np.where(t > 12, 50 * ((t - 12) / 4.5) ** 3 * np.exp(-(t - 12 - 4.5) / 1.5), 0.0) + 0.3 * (t > 12)
    good = 0.004 * modelfit.model_curves(aif, tr=tr, mtt=7.0, lam=4.0, tau=2.25)
    early = 0.01 * modelfit.model_curves(np.interp(t + 6.0, t, aif), tr=tr, mtt=4.0, lam=2.0, tau=0.0)
    c = np.stack([good, early])
    config = Config(method="model")
    op = pipeline.prepare_operator(aif, tr=tr, config=config)
    out = pipeline.quantify(op, c, aif, tr=tr, config=config)
    fit = modelfit.fit(op, c)
    assert list(out["fit_status"]) == [modelfit.STATUS_MODEL, modelfit.STATUS_BOUND]
    assert modelfit.at_bound(fit)[1] and fit.delay[1] == modelfit.DELAY_BOUNDS_S[0]
    res = deconvolution.deconvolve(op.fallback, c)
    svd_cbf = maps.cbf(res.residue, kh=config.kh, rho=config.rho)
    assert out["cbf"][1] == pytest.approx(svd_cbf[1], rel=1e-12)
    assert out["mtt"][1] == pytest.approx(maps.mtt(out["cbv"], svd_cbf)[1], rel=1e-12)
    assert out["cbf"][0] == pytest.approx(fit.flow[0] * pipeline.cbf_scale(config.kh, config.rho), rel=1e-12)
    assert out["tmax"][0] == pytest.approx(fit.delay[0], abs=1e-12)


def test_residual_sse_matches_the_explicit_product():
    """deconvolution.residual_sse against c - (dt A b)[:N] with the circulant matrix written out."""
    rng = np.random.default_rng(3)
    tr = 1.5
    aif = np.abs(rng.standard_normal(30)) * 10
    c = np.abs(rng.standard_normal((5, 30)))
    op = deconvolution.prepare(aif, tr=tr, method="osvd")
    res = deconvolution.deconvolve(op, c)
    a = deconvolution.aif_matrix(aif, tr=tr, method="osvd")
    ref = np.sum((c - (res.residue @ a.T)[:, :30]) ** 2, axis=1)
    np.testing.assert_allclose(deconvolution.residual_sse(op, c, res.residue), ref, rtol=1e-9)


def test_report_counts_fits_at_bounds_as_unusable(tmp_path, monkeypatch):
    """Through report.json and report.html: with MTT bounds narrowed to 4-6 s many fits sit on them;
    the report's unusable count holds them though their maps are finite (oSVD's values)."""
    from perfusion.report import html as report_html
    monkeypatch.setattr(modelfit, "MTT_BOUNDS_S", (4.0, 6.0))
    ph = make_realistic_phantom(RealisticSpec(tr=1.5, n_frames=60, snr=30.0, seed=0, matrix=64,
                                              lesions=("recurrence_t1",)))
    inputs = realistic_inputs(ph)
    result = analyze(inputs, Config(motion_correct="off"))
    out = tmp_path / "out"
    out.mkdir()
    write_result(result, inputs, out)
    rep = json.loads((out / "report.json").read_text())
    fit = rep["fit"]
    n_brain = int(result.brain.sum())
    assert fit["brain_voxels"] == n_brain
    assert fit["model_at_bound"] > 0.1 * n_brain
    nan_frac = report_html.unusable_fraction(result.brain, [result.maps[k] for k in ("cbv", "cbf", "mtt")])
    assert nan_frac < 0.05  # the maps are filled: counting NaN alone would hide the bounds
    assert fit["unusable"] >= fit["model_at_bound"]
    assert fit["unusable_fraction"] == pytest.approx(fit["unusable"] / n_brain)
    assert fit["unusable_fraction"] > nan_frac + 0.1
    html = report_html.build_html(out)
    assert f"{100 * fit['unusable_fraction']:.1f} %" in html
    assert "at a bound" in html


def test_osvd_method_report_has_no_model_counts():
    ph = make_realistic_phantom(RealisticSpec(snr=30.0, seed=0, matrix=64, lesions=()))
    result = analyze(realistic_inputs(ph), Config(motion_correct="off", method="osvd", leakage="none"))
    assert "fallback_osvd" not in result.fit and result.fit["unusable"] == result.fit["non_finite"]


def _osipi_curves():
    import scipy.io

    m = scipy.io.loadmat(shared_dir("osipi-lcb-bni-dual-echo") / "data.mat")
    te1, te2 = float(m["TE1"].item()), float(m["TE2"].item())

    def dr2s(s, echo):
        s = s.astype(float)
        return -np.log(s[echo] / s[echo, :40].mean()) / (te1, te2)[echo]  # the README's 40 baseline frames

    return dr2s(m["AIF_SIt"], 0), dr2s(m["NAWM_SIt"], 1), float(m["TR"].item())


@pytest.mark.parametrize("step", [1, 2])
def test_real_nawm_curve_with_noise_stays_off_bounds(step):
    """Real NAWM (TE2) and AIF (TE1) curves of the OSIPI LCB-BNI case (no truth), 400 noisy copies at peak
    SNR 15, at TR 1.5 s and subsampled to 3 s. Before the priors 1.5 % (TR 3 s) of the fits sat on the
    MTT bound and 1.5-2.2 % had a delay below -1 s; after, none on a bound and none with Tmax below -1 s
    (the least-squares delay, kept for flow and MTT, stays below -1 s in 0.75 %: measured)."""
    aif, nawm, tr = _osipi_curves()
    aif, nawm = aif[::step], nawm[::step]
    rng = np.random.default_rng(0)
    c = nawm[None] + nawm.max() / 15 * rng.standard_normal((400, nawm.size))
    fit = modelfit.fit(modelfit.prepare(aif, tr=tr * step), c)
    assert fit.valid.all()
    assert modelfit.at_bound(fit).mean() < 0.005
    assert np.mean(fit.tmax < -1.0) < 0.005


def test_an_early_delay_alone_changes_tmax_not_flow(monkeypatch):
    """Where only the least-squares delay lies in the delay prior's early tail (tau < -1 s, MTT and delay
    off the bounds), flow, MTT and shape stay the plain least-squares fit's and only Tmax takes the delay
    of the fit with the priors: refitting those voxels whole raised flow in one half of a symmetric delay
    scatter (Bezier DRO gamma residue CBF error 6.7 -> 17.0 %, modelfit.PRIOR_REFIT_PENALTY)."""
    aif, nawm, tr = _osipi_curves()
    rng = np.random.default_rng(0)
    c = nawm[None] + nawm.max() / 15 * rng.standard_normal((2000, nawm.size))
    op = modelfit.prepare(aif, tr=tr, fallback=False)
    fit = modelfit.fit(op, c)
    monkeypatch.setattr(modelfit, "PRIOR_WEIGHT", 0.0)
    plain = modelfit.fit(op, c)
    with np.errstate(invalid="ignore"):
        early = (plain.delay < -1.0) & ~modelfit.at_bound(plain) & (plain.mtt > 1.5)
    assert early.sum() >= 5, early.sum()  # the case exists in this sample
    for name in ("flow", "mtt", "lam", "delay"):
        np.testing.assert_array_equal(getattr(fit, name)[early], getattr(plain, name)[early])
    assert np.all(fit.tmax[early] >= plain.delay[early])  # pulled towards the prior's 0 s, never away
    assert np.median(fit.tmax[early] - plain.delay[early]) > 0.3
    rest = ~early & ~modelfit.at_bound(plain) & (plain.mtt > 1.5) & (plain.delay > -1.0)
    np.testing.assert_array_equal(fit.tmax[rest], plain.delay[rest])  # elsewhere Tmax is the delay
