"""Tikhonov deconvolution with a per-voxel GCV choice of mu: kernel against its numpy twin,
delay insensitivity, noise-free recovery, and CBF on noisy data within OSIPI's tolerances."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from conftest import KERNEL_RTOL
from naive import tikhonov_gcv
from perfusion._kernels import deconv as _kernels
from perfusion.quantify import deconvolution
from perfusion.quantify import maps
from perfusion.quantify.deconvolution import aif_matrix
from test_deconvolution import N, TR, _aif, _osipi_rows, _tissue

#: Whole-frame delays: the circulant Tikhonov solution b = (A^T A + mu^2 I)^-1 A^T c commutes with a
#: cyclic shift, and the GCV score does not change, so only rounding separates the shifted residues.
SHIFT_RTOL = 1e-9

#: Noise-free data made by the solver's own model: what is lost is the part of the residue filtered
#: by the smallest grid mu (1e-3 s_max); measured 0.2 %, asserted with room at 5 %.
NOISE_FREE_CBF_RTOL = 0.05


def _operator(n=40, tr=1.5):
    t = np.arange(n) * tr
    aif = np.where(t > 10, (t - 10) ** 3 * np.exp(-(t - 10) / 1.5), 0.0)
    u, s, vt = np.linalg.svd(aif_matrix(aif, tr=tr, method="csvd"))
    return u, s, vt


def _run(x, s, vt, mus):
    out_b = np.empty((x.shape[0], x.shape[1]))
    out_mu = np.empty(x.shape[0])
    _kernels._tikhonov_gcv(x, s, vt, mus, out_b, out_mu)
    return out_b, out_mu


def _noisy_projections(u, seed, n_vox=25, sigma=0.02):
    rng = np.random.default_rng(seed)
    t = np.arange(u.shape[0])
    tissue = np.exp(-((t - 20) / 6.0) ** 2)[None, :] * rng.uniform(0.1, 2, (n_vox, 1))
    tissue = tissue + sigma * rng.standard_normal(tissue.shape)
    tissue[:, u.shape[0] // 2:] = 0.0  # zero-padded, as deconvolve does
    return tissue @ u


# --- kernel against twin (KERNEL_RTOL: only summation order differs)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sigma", [0.002, 0.02, 0.2])
def test_tikhonov_gcv_matches_numpy_on_random_curves(seed, sigma):
    u, s, vt = _operator()
    x = _noisy_projections(u, seed, sigma=sigma)
    mus = np.geomspace(1e-3, 1, 40) * s[0]
    b, mu = _run(x, s, vt, mus)
    b_ref, mu_ref = tikhonov_gcv(x, s, vt, mus)
    assert_array_equal(mu, mu_ref)
    assert_allclose(b, b_ref, rtol=KERNEL_RTOL, atol=KERNEL_RTOL * np.abs(b_ref).max())
    assert np.all(np.isin(mu, mus))


def test_tikhonov_gcv_picks_more_regularisation_for_more_noise():
    """GCV's point: the same curve shape with more noise gets a larger mu (median over voxels)."""
    u, s, vt = _operator()
    mus = np.geomspace(1e-3, 1, 40) * s[0]
    medians = [np.median(_run(_noisy_projections(u, 5, sigma=sigma), s, vt, mus)[1]) for sigma in (0.002, 0.02, 0.2)]
    assert medians[0] < medians[1] < medians[2], medians


def test_tikhonov_gcv_edge_cases():
    """NaN or inf row -> NaN residue and mu; all-zero row -> zero residue and, every GCV being 0 (a
    tie), the first grid mu; a single voxel; float32 input; exact zeros in s (filter factor 0)."""
    u, s, vt = _operator()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 80)) * 0.1
    x[1, 7] = np.nan
    x[2] = 0.0
    x[4, 3] = np.inf
    mus = np.geomspace(1e-3, 1, 40) * s[0]
    b, mu = _run(x, s, vt, mus)
    b_ref, mu_ref = tikhonov_gcv(x, s, vt, mus)
    for v in (1, 4):
        assert np.all(np.isnan(b[v])) and np.isnan(mu[v])
    assert_array_equal(b[2], 0.0)
    assert mu[2] == mus[0]
    assert_array_equal(mu, mu_ref)
    assert_allclose(b, b_ref, rtol=KERNEL_RTOL, atol=1e-14)

    b1, mu1 = _run(x[:1].copy(), s, vt, mus)
    assert_allclose(b1, b_ref[:1], rtol=KERNEL_RTOL, atol=1e-14)
    assert mu1[0] == mu_ref[0]

    x32 = x[[0, 3]].astype(np.float32)
    b32, mu32 = _run(x32, s, vt, mus)
    b32_ref, mu32_ref = tikhonov_gcv(x32, s, vt, mus)
    assert_array_equal(mu32, mu32_ref)
    assert_allclose(b32, b32_ref, rtol=KERNEL_RTOL, atol=1e-14)

    s0 = s.copy()
    s0[-6:] = 0.0  # a rank-deficient matrix: those components are filtered out entirely
    b0, mu0 = _run(x, s0, vt, mus)
    b0_ref, mu0_ref = tikhonov_gcv(x, s0, vt, mus)
    assert np.all(np.isfinite(b0[[0, 2, 3]]))
    assert_array_equal(mu0, mu0_ref)
    assert_allclose(b0, b0_ref, rtol=KERNEL_RTOL, atol=1e-14)


# --- the public wrapper


def test_prepare_and_deconvolve_tikhonov():
    aif = _aif()
    op = deconvolution.prepare(aif, tr=TR, method="tikhonov")
    assert op.length == 2 * N
    assert op.mus.shape == (deconvolution.TIKHONOV_N_MU,)
    assert_allclose(op.mus[[0, -1]] / op.s[0], deconvolution.TIKHONOV_MU_RANGE)
    curves = np.stack([_tissue(aif, cbf_per_s=0.01, mtt=4.0)[0], np.full(N, np.nan)])
    res = deconvolution.deconvolve(op, curves)
    assert res.residue.shape == (2, 2 * N)
    assert np.all(np.isnan(res.residue[1])) and np.isnan(res.mu[1]) and res.k[1] == 0
    assert res.k[0] == np.count_nonzero(op.s >= res.mu[0])
    assert deconvolution.deconvolve(deconvolution.prepare(aif, tr=TR, method="csvd"), curves[:1]).mu is None

    custom = deconvolution.prepare(aif, tr=TR, method="tikhonov", mu_grid=[0.5, 0.01])
    assert_allclose(custom.mus, [0.01 * op.s[0], 0.5 * op.s[0]])
    for bad in ([], [0.1, 0.0], [np.nan], [[0.1]]):
        with pytest.raises(ValueError):
            deconvolution.prepare(aif, tr=TR, method="tikhonov", mu_grid=bad)


def test_tikhonov_is_delay_insensitive():
    """As test_circulant_methods_are_delay_insensitive: a whole-frame delay shifts the residue, keeps
    its maximum (to SHIFT_RTOL) and GCV's choice of mu."""
    aif = _aif()
    op = deconvolution.prepare(aif, tr=TR, method="tikhonov")
    curves = np.stack([_tissue(aif, cbf_per_s=0.01, mtt=4.0, shift=d)[0] for d in (0, 2, 4)])
    # the same noisy curve delayed: noise (seeded) on all but the last 4 frames, so that no sample
    # is cut off by the delay and the padded curves are exact cyclic shifts of each other
    noise = 0.02 * curves.max() * np.random.default_rng(7).standard_normal(N)
    noise[-4:] = 0.0
    c0 = curves[0] + noise
    noisy = np.stack([np.concatenate([np.zeros(d), c0[: N - d]]) for d in (0, 2, 4)])
    for c in (curves, noisy):
        res = deconvolution.deconvolve(op, c)
        peaks = res.residue.max(axis=1)
        assert_allclose(peaks[1:], peaks[0], rtol=SHIFT_RTOL)
        assert_array_equal(res.mu, res.mu[0])
        tmax = maps.tmax(res.residue, tr=TR, n_t=N)
        assert_allclose(tmax - tmax[0], [0, 2 * TR, 4 * TR])


@pytest.mark.parametrize("mtt", [2.0, 4.0, 6.0, 12.0])
def test_noise_free_recovery_picks_small_mu(mtt):
    """Data made exactly by the solver's model: the residual vanishes as mu does, so GCV picks the
    low end of the grid (measured: its lowest value, 1e-3 s_max; asserted <= 1e-2 s_max) and the
    maximum of the residue, CBF, comes back within NOISE_FREE_CBF_RTOL."""
    aif = _aif()
    c, b = _tissue(aif, cbf_per_s=0.01, mtt=mtt)
    op = deconvolution.prepare(aif, tr=TR, method="tikhonov")
    res = deconvolution.deconvolve(op, c[None])
    assert res.mu[0] <= 1e-2 * op.s[0]
    assert_allclose(res.residue[0].max(), b.max(), rtol=NOISE_FREE_CBF_RTOL)


def test_osipi_dsc_reference_tikhonov(capsys):
    """OSIPI CodeCollection DSC test (src/perfusion/data/README.md; the simulator's own noise, SNR 200):
    every case's CBF within OSIPI's tolerance |err| <= 15 + 0.1 ref (mL/100 g/min), kH = rho = 1.
    Measured: the worst case is CBV 4 CBF 70 at -18.1 against 22; Tikhonov underestimates high flows
    (GCV picks mu 0.04 - 0.2 s_max here, which flattens the residue's peak)."""
    rows = list(_osipi_rows())
    assert len(rows) == 14
    lines = []
    for label, c_tis, c_aif, ref_cbv, ref_cbf, tr in rows:
        op = deconvolution.prepare(c_aif, tr=tr, method="tikhonov")
        res = deconvolution.deconvolve(op, c_tis[None])
        cbf = float(maps.cbf(res.residue, kh=1.0, rho=1.0)[0])
        lines.append(f"tikhonov {label}: CBF {cbf:6.2f} ref {ref_cbf:5.1f} err {cbf - ref_cbf:+6.2f}; "
                     f"mu {res.mu[0] / op.s[0]:.3f} s_max")
        assert abs(cbf - ref_cbf) <= 15 + 0.1 * ref_cbf, label
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_seeded_noise_cbf_within_osipi_tolerance(capsys):
    """Exact-model tissue curves for OSIPI's 14 (CBV, CBF) cases on OSIPI's AIF and TR, plus seeded
    Gaussian noise of sd 0.0015 (the tissue noise of OSIPI's curves, measured on their last 30 frames),
    50 draws per case: the median CBF is within OSIPI's tolerance 15 + 0.1 ref. The median, because a
    single draw at CBF 70 can fall outside it (1 in 50 here, for osvd too); measured worst median error
    -17.0 against 22 at CBF 70."""
    rows = list(_osipi_rows())
    aif, tr = rows[0][2], rows[0][5]
    op = deconvolution.prepare(aif, tr=tr, method="tikhonov")
    rng = np.random.default_rng(0)
    lines = []
    for label, _, c_aif, ref_cbv, ref_cbf, tr_case in rows:
        assert np.array_equal(c_aif, aif) and tr_case == tr  # one AIF for the whole table
        c, _ = _tissue(aif, cbf_per_s=ref_cbf / 6000, mtt=60 * ref_cbv / ref_cbf, tr=tr)
        noisy = c[None] + 0.0015 * rng.standard_normal((50, c.size))
        err = float(np.median(maps.cbf(deconvolution.deconvolve(op, noisy).residue, kh=1.0, rho=1.0))) - ref_cbf
        lines.append(f"tikhonov seeded CBV {ref_cbv:.0f} CBF {ref_cbf:4.0f}: median CBF err {err:+6.2f}")
        assert abs(err) <= 15 + 0.1 * ref_cbf, label
    with capsys.disabled():
        print("\n" + "\n".join(lines))
