"""Property tests (hypothesis) over physiological parameter ranges (issue 9):

- CBV scales linearly with the tissue curve's amplitude;
- the maps do not change when the signal is multiplied by a constant (delta R2* = -ln(S/S0)/TE);
- shifting the tissue curve later by whole frames moves Tmax by that time and leaves CBV unchanged
  for the delay-insensitive circulant methods (block-circulant SVD and the model fit).

Ranges: CBF 10-80 mL/100 g/min, MTT 2-12 s (3-8 s for the shift, so that the exponential residue has
decayed before the series ends), shifts of 1-3 frames at TR 1.5 s. Tolerances are stated beside each
assertion with their reason.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from perfusion.quantify import deconvolution

from perfusion.quantify import maps

from perfusion.quantify import modelfit

from perfusion.tools import phantom

from perfusion.quantify import signal
TR = 1.5
N_T = 80
_PH = phantom.make_phantom(phantom.PhantomSpec(n_frames=N_T))
AIF = _PH.aif  # 1/s, sampled at TR

cbf_values = st.floats(10, 80)
mtt_values = st.floats(2, 12)


#: A first-pass-only AIF (gamma variate, no recirculation or plateau): curves made with it return to
#: baseline well before the last frame, so a shift by a few frames truncates nothing of their area.
CLEAN_AIF = 100.0 * phantom.gamma_variate(np.arange(N_T) * TR, t0=20.0, alpha=3.0, beta=1.5)
CLEAN_AIF /= CLEAN_AIF.max() / 100.0


def _tissue(cbf, mtt, delay=0.0, lam=1.0, aif=AIF):
    """Model curve of the model fit (exact for a piecewise-linear AIF), flow F = CBF in 1/s units."""
    return cbf / 6000.0 * modelfit.model_curves(aif, tr=TR, mtt=mtt, lam=lam, tau=delay)


@settings(max_examples=40, deadline=None)
@given(cbf=cbf_values, mtt=mtt_values, k=st.floats(0.05, 20))
def test_cbv_is_linear_in_the_tissue_amplitude(cbf, mtt, k):
    c = _tissue(cbf, mtt)[None]
    # rtol 1e-12: the trapezoid is linear; only rounding differs
    np.testing.assert_allclose(maps.cbv(k * c, AIF, tr=TR), k * maps.cbv(c, AIF, tr=TR), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(cbf=cbf_values, mtt=mtt_values, scale=st.floats(0.01, 1000))
def test_delta_r2s_and_cbv_ignore_a_constant_signal_scale(cbf, mtt, scale):
    te = 0.03
    c = _tissue(cbf, mtt)
    s = 1000.0 * np.exp(-te * c)[None]
    d1, _ = signal.to_delta_r2s(s, te=te, baseline=slice(0, 10))
    d2, _ = signal.to_delta_r2s(scale * s, te=te, baseline=slice(0, 10))
    # atol 1e-9 1/s: log(scale) cancels exactly in exact arithmetic; rounding of ln at 1e-16 relative
    np.testing.assert_allclose(d2, d1, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(maps.cbv(d2, AIF, tr=TR), maps.cbv(d1, AIF, tr=TR), rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(cbf=cbf_values, mtt=st.floats(3, 8), shift=st.integers(1, 3))
def test_a_later_tissue_curve_moves_tmax_not_cbv(cbf, mtt, shift):
    """Shifting the tissue curve by whole frames (first-pass AIF, so nothing is cut at the end): CBV is
    unchanged; circulant SVD's Tmax moves by the shift exactly and its CBF stays within 1 % (the
    residue is the same, circularly shifted); the model fit's delay moves by the shift within 0.1 s
    and its CBF within 3 % (its grid and refinement steps are not shift-invariant)."""
    c = _tissue(cbf, mtt, delay=0.5, aif=CLEAN_AIF)
    assert c[-shift - 1:].max() < 1e-4 * c.max()  # back near baseline: the shift truncates almost nothing
    later = np.concatenate([np.zeros(shift), c[:-shift]])
    cc = np.stack([c, later])
    v = maps.cbv(cc, CLEAN_AIF, tr=TR)
    assert abs(v[1] / v[0] - 1) < 1e-5  # the area of a curve that starts at zero and ends near it
    op = deconvolution.prepare(CLEAN_AIF, tr=TR, method="csvd")
    res = deconvolution.deconvolve(op, cc).residue
    t = maps.tmax(res, tr=TR, n_t=N_T)
    assert abs((t[1] - t[0]) - shift * TR) < 1e-9
    f = maps.cbf(res)
    assert abs(f[1] / f[0] - 1) < 0.01
    fit = modelfit.fit(modelfit.prepare(CLEAN_AIF, tr=TR), cc)
    assert fit.valid.all()
    assert abs((fit.delay[1] - fit.delay[0]) - shift * TR) < 0.1
    assert abs(fit.flow[1] / fit.flow[0] - 1) < 0.03
