"""numba kernels against their numpy twins (tests/naive.py) at KERNEL_RTOL."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from conftest import KERNEL_RTOL
from naive import NOJIT, osvd_search, oscillation_index
from perfusion._kernels import deconv as _kernels
from perfusion.quantify.deconvolution import aif_matrix, group_ends


def _operator(n=40, tr=1.5, seed=0):
    t = np.arange(n) * tr
    aif = np.where(t > 10, (t - 10) ** 3 * np.exp(-(t - 10) / 1.5), 0.0)
    u, s, vt = np.linalg.svd(aif_matrix(aif, tr=tr, method="csvd"))
    return u, s, vt


def _run(x, s, vt, k_max, target, ends=None):
    """The kernel on projections x (n_vox, L), given to it one voxel per column as deconvolve does."""
    out_b = np.empty((x.shape[0], x.shape[1]))
    out_k = np.empty(x.shape[0], dtype=np.int64)
    ends = np.ones(s.size, np.uint8) if ends is None else ends
    _kernels._osvd_search(np.ascontiguousarray(x.T), s, vt, ends, k_max, target, out_b, out_k)
    return out_b, out_k


def test_oscillation_index_twin():
    """The twin's OI: sum |second difference| / (L max b), inf where max b <= 0."""
    b = np.array([0.0, 1.0, 0.0, 2.0])
    assert oscillation_index(b) == (2 + 3) / (4 * 2)
    assert oscillation_index(np.zeros(10)) == np.inf
    assert oscillation_index(-np.ones(10)) == np.inf


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("target", [0.01, 0.035, 0.095, 1.0])
def test_osvd_search_matches_numpy_on_random_curves(target, grouped):
    u, s, vt = _operator()
    rng = np.random.default_rng(3)
    t = np.arange(80)
    tissue = np.exp(-((t - 20) / 6.0) ** 2)[None, :] * rng.uniform(0.1, 2, (25, 1))
    tissue = tissue + 0.02 * rng.standard_normal(tissue.shape)
    x = tissue @ u
    k_max = int(np.sum(s >= 0.005 * s[0]))
    ends = group_ends(s) if grouped else None
    b, k = _run(x, s, vt, k_max, target, ends)
    b_ref, k_ref = osvd_search(x, s, vt, k_max, target, ends)
    assert_array_equal(k, k_ref)
    assert_allclose(b, b_ref, rtol=KERNEL_RTOL, atol=KERNEL_RTOL * np.abs(b_ref).max())
    assert np.all((k >= 1) & (k <= k_max))
    if grouped:
        assert np.all(ends[k - 1] == 1)


def _noisy_curves(u, n, seed):
    """Projections U^T c of n noisy gamma-like tissue curves (80 frames) of random amplitude."""
    rng = np.random.default_rng(seed)
    t = np.arange(80)
    tissue = np.exp(-((t - 20) / 6.0) ** 2)[None, :] * rng.uniform(0.1, 2, (n, 1))
    return (tissue + 0.02 * rng.standard_normal(tissue.shape)) @ u


def test_osvd_search_matches_numpy_across_tiles():
    """The kernel searches a tile of voxels at a time (_kernels.deconv._tile_lanes: 128 at L = 160): several
    tiles, the last one partial, voxels that are not finite among them, every voxel as its twin says."""
    u, s, vt = _operator()
    n = 40 if NOJIT else 300
    x = _noisy_curves(u, n, seed=6)
    x[[3, n // 2, n - 1], [7, 0, 79]] = [np.nan, np.inf, -np.inf]
    k_max = int(np.sum(s >= 0.005 * s[0]))
    ends = group_ends(s)
    b, k = _run(x, s, vt, k_max, 0.095, ends)
    b_ref, k_ref = osvd_search(x, s, vt, k_max, 0.095, ends)
    assert_array_equal(k, k_ref)
    assert_array_equal(np.isnan(b), np.isnan(b_ref))
    assert np.all(k[[3, n // 2, n - 1]] == 0) and np.all(np.isnan(b[[3, n // 2, n - 1]]))
    ok = ~np.isnan(b_ref[:, 0])
    assert_allclose(b[ok], b_ref[ok], rtol=KERNEL_RTOL, atol=KERNEL_RTOL * np.abs(b_ref[ok]).max())


def test_osvd_search_groups_of_any_size():
    """Groups of one to four equal singular values (the kernel adds the members before a group's last two
    one by one), a k_max that ends inside a group, and no group end within k_max (k 0, zero residue)."""
    u, s, vt = _operator()
    x = _noisy_curves(u, 30, seed=8)
    ends = np.zeros(s.size, np.uint8)
    last = np.cumsum(np.tile([1, 3, 4, 2], 8))  # groups of 1, 3, 4, 2, 1, 3, ... terms: ends at 1, 4, 8, 10, 11, ...
    ends[last[last <= s.size] - 1] = 1
    for k_max in (35, 38, 1):  # inside a group, at a group's end, the first group only
        b, k = _run(x, s, vt, k_max, 0.035, ends)
        b_ref, k_ref = osvd_search(x, s, vt, k_max, 0.035, ends)
        assert_array_equal(k, k_ref)
        assert_allclose(b, b_ref, rtol=KERNEL_RTOL, atol=KERNEL_RTOL * np.abs(b_ref).max())
    ends[:] = 0
    ends[-1] = 1
    b, k = _run(x, s, vt, 30, 0.095, ends)
    assert np.all(k == 0) and np.all(b == 0.0)
    b_ref, k_ref = osvd_search(x, s, vt, 30, 0.095, ends)
    assert np.all(k_ref == 0) and np.all(b_ref == 0.0)


def test_osvd_result_does_not_depend_on_the_basis_within_degenerate_pairs():
    """The circulant matrix's singular values come in equal pairs; any rotation of a pair's singular
    vectors is an equally valid SVD. Truncating between groups only makes oSVD independent of it
    (truncating inside a pair, as every k did before, changed k and the residue)."""
    u, s, vt = _operator()
    ends = group_ends(s)
    pairs = [k for k in range(1, s.size) if not ends[k - 1]]  # k - 1, k are a pair
    assert len(pairs) > 30
    rot_u, rot_vt = u.copy(), vt.copy()
    rng = np.random.default_rng(5)
    for k in pairs:
        a = rng.uniform(0, 2 * np.pi)
        r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        rot_u[:, k - 1: k + 1] = u[:, k - 1: k + 1] @ r
        rot_vt[k - 1: k + 1] = r.T @ vt[k - 1: k + 1]
    assert_allclose(rot_u * s @ rot_vt, u * s @ vt, atol=1e-12 * s[0])  # still an SVD of the same matrix
    t = np.arange(80)
    tissue = np.exp(-((t - 20) / 6.0) ** 2)[None, :] * rng.uniform(0.1, 2, (40, 1))
    tissue = tissue + 0.02 * rng.standard_normal(tissue.shape)
    k_max = int(np.sum(s >= 0.005 * s[0]))
    b, k = _run(tissue @ u, s, vt, k_max, 0.095, ends)
    b_rot, k_rot = _run(tissue @ rot_u, s, rot_vt, k_max, 0.095, ends)
    assert_array_equal(k, k_rot)
    assert_allclose(b_rot, b, atol=1e-9 * np.abs(b).max())


def test_osvd_search_edge_cases():
    """NaN voxel -> NaN residue and k 0; all-zero voxel -> zero residue (k 1); a single voxel;
    float32 input."""
    u, s, vt = _operator()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 80)) * 0.1
    x[1, 7] = np.nan
    x[2] = 0.0
    k_max = 30
    b, k = _run(x, s, vt, k_max, 0.095)
    b_ref, k_ref = osvd_search(x, s, vt, k_max, 0.095)
    assert np.all(np.isnan(b[1])) and k[1] == 0
    assert_array_equal(b[2], 0.0)
    assert k[2] == 1
    assert_array_equal(k, k_ref)
    assert_allclose(b, b_ref, rtol=KERNEL_RTOL, atol=1e-14)

    b1, k1 = _run(x[:1].copy(), s, vt, k_max, 0.095)
    assert_allclose(b1, b_ref[:1], rtol=KERNEL_RTOL, atol=1e-14)
    assert k1[0] == k_ref[0]

    x32 = x[[0, 3]].astype(np.float32)
    b32, k32 = _run(x32, s, vt, k_max, 0.095)
    b32_ref, k32_ref = osvd_search(x32, s, vt, k_max, 0.095)
    assert_array_equal(k32, k32_ref)
    assert_allclose(b32, b32_ref, rtol=KERNEL_RTOL, atol=1e-14)
