"""Head motion on thin slabs (issue 16): one to three slices, where a still head must not be flagged.

An in-vivo series of two 128 x 128 slices (50 frames, TR 2 s) had 8-10 still frames, the bolus peak
among them, flagged and realigned. Here, on slabs of 1, 2 and 3 slices with the bolus:

- the realistic head (phantom_realistic: scalp, skull gap, orbits, ventricles, grey matter -30 %,
  arteries -96 %, every leaky lesion), TR 2 s, 50 frames, seeds 0-2, SNR 30 and 50;
- the textured phantom of test_motion.py (TE 0.1 s: high-CBV blocks -60 %, arteries -100 %), with its
  leaky slice, seeds 0-2, SNR 30 and 50; the slabs include slices 1-2, where the screen read a still
  bolus frame 1.82 mm before the fix (README "Head motion");

no still frame may be flagged (framewise displacement above 0.5 mm) or realigned (motion.tsv's
``flagged`` and ``corrected``, from motion.correct_series with --motion-correct auto), and frames moved
in-plane by 1.5 mm or 1.5 deg (the motion a thin slab can show) must be realigned.
"""

from functools import cache
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from perfusion.quantify import motion

from perfusion.quantify import register
from perfusion.io import Series
from perfusion.tools.phantom import PhantomSpec, make_phantom
from perfusion.tools.phantom_realistic import RealisticSpec, make_realistic_phantom
from test_motion import TE, _texture, _true_matrix

SEEDS, SNRS = (0, 1, 2), (30.0, 50.0)
#: (first slice, slices) of the realistic head (6 slices: lesions on 1-4, orbits on 0).
REALISTIC_SLABS = {1: 2, 2: 1, 3: 2}
#: Of the textured phantom (6 slices with the leaky one, z = 5): the leaky slice alone, slices 1-2 (the
#: screen's worst slab before the fix), slices 3-5 (the leaky one with the lesions' slice).
TEXTURED_SLABS = {1: 5, 2: 1, 3: 3}
#: Injected in-plane motion, frame: (rotation about the slice axis, deg; translation x, y, mm): a
#: baseline frame, the bolus's arrival and peak, the tail.
MOVES = {5: (0.0, (1.5, 0.0)), 13: (1.5, (0.0, 0.0)), 16: (0.0, (0.0, -1.5)), 30: (-1.5, (0.0, 0.0))}


@cache
def _realistic(seed: int, snr: float):
    return make_realistic_phantom(RealisticSpec(seed=seed, snr=snr, tr=2.0, n_frames=50))


@cache
def _textured(seed: int):
    """The textured phantom with leaky lesions, noise-free, blurred as in test_motion.py."""
    ph = make_phantom(PhantomSpec(te=TE, snr=1e6, seed=seed, leaky_lesions=True))
    full = ph.signal.astype(np.float32) * _texture(ph.signal.shape[:3], seed=7 + seed)[..., None].astype(np.float32)
    return ph, ndimage.gaussian_filter(full, sigma=(0.8, 0.8, 0.4, 0))


def _slab_affine(affine: np.ndarray, z0: int) -> np.ndarray:
    aff = np.array(affine, dtype=np.float64)
    aff[:3, 3] = (affine @ np.r_[0, 0, z0, 1])[:3]
    return aff


def _move_in_plane(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``data`` (x, y, z, t) with the frames of MOVES moved in-plane (each slice resampled in 2-D, cubic)."""
    out = data.copy()
    centre = motion.grid_centre(affine, data.shape)
    for f, (rot_z, (tx, ty)) in MOVES.items():
        vox = np.linalg.inv(affine) @ np.linalg.inv(_true_matrix((0, 0, rot_z), (tx, ty, 0), centre)) @ affine
        assert np.allclose(vox[2], [0, 0, 1, 0]) and np.allclose(vox[:2, 2], 0)  # in-plane only
        for z in range(data.shape[2]):
            out[:, :, z, f] = ndimage.affine_transform(data[:, :, z, f].astype(np.float64), vox[:2, :2], vox[:2, 3],
                                                       order=3, mode="nearest")
    return out


def _rician(clean: np.ndarray, snr: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sigma = 1000.0 / snr  # the textured phantom's S0
    return np.hypot(clean + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape))


def _series(data: np.ndarray, affine: np.ndarray, *, te: float, tr: float) -> Series:
    return Series(data=np.asarray(data, dtype=np.float32), affine=affine, path=Path("thin.nii.gz"), te=te, tr=tr,
                  te_source="test", tr_source="test")


def realistic_series(seed: int, snr: float, n_slices: int, *, moved: bool = False) -> Series:
    ph = _realistic(seed, snr)
    z0 = REALISTIC_SLABS[n_slices]
    aff = _slab_affine(ph.affine, z0)
    data = ph.signal[:, :, z0:z0 + n_slices].astype(np.float32)
    if moved:
        data = _move_in_plane(data, aff)
    return _series(data, aff, te=ph.spec.te, tr=ph.spec.tr)


def textured_series(seed: int, snr: float, n_slices: int, *, moved: bool = False) -> Series:
    ph, full = _textured(seed)
    z0 = TEXTURED_SLABS[n_slices]
    aff = _slab_affine(ph.affine, z0)
    clean = full[:, :, z0:z0 + n_slices]
    if moved:
        clean = _move_in_plane(clean, aff)
    return _series(_rician(clean, snr, seed), aff, te=TE, tr=ph.spec.tr)


def _flags(series: Series) -> tuple[dict, dict]:
    _, info, _ = motion.correct_series(series, mode="auto")
    assert info["assessed"] and info["parameters_estimated"].startswith("in-plane only")
    return info, info["timeseries"]


@pytest.mark.parametrize("snr", SNRS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_slices", (1, 2, 3))
@pytest.mark.parametrize("make", (realistic_series, textured_series), ids=("realistic", "textured"))
def test_still_thin_slab_is_not_flagged(make, n_slices, seed, snr):
    info, ts = _flags(make(seed, snr, n_slices))
    print(f"{make.__name__} {n_slices} slice(s) seed {seed} SNR {snr:g}: max FD {ts['fd_mm'].max():.2f} mm, "
          f"max displacement {ts['displacement_mm'].max():.2f} mm, registered {info['frames_registered']}")
    assert not ts["flagged"].any() and not ts["corrected"].any()
    assert not info["applied"] and info["n_frames_above_threshold"] == 0


@pytest.mark.parametrize("n_slices", (1, 2, 3))
@pytest.mark.parametrize("make", (realistic_series, textured_series), ids=("realistic", "textured"))
def test_in_plane_motion_is_still_caught(make, n_slices):
    info, ts = _flags(make(0, 30.0, n_slices, moved=True))
    print(f"{make.__name__} {n_slices} slice(s): displacement of the moved frames "
          f"{np.round(ts['displacement_mm'][sorted(MOVES)], 2).tolist()} mm")
    assert np.flatnonzero(ts["corrected"]).tolist() == sorted(MOVES)
    assert set(np.flatnonzero(ts["flagged"])) >= set(MOVES)
    for f, (rot_z, (tx, ty)) in MOVES.items():
        assert abs(ts["rot_z_deg"][f] - rot_z) < 0.3
        assert abs(ts["trans_x_mm"][f] - tx) < 0.3 and abs(ts["trans_y_mm"][f] - ty) < 0.3


def test_registration_alone_does_not_move_a_thin_slab(monkeypatch):
    """The in-vivo failure, forced: the screen sends a still frame to registration (read 0.3 mm), and the
    registration reads it 0.8 mm (a bolus frame misread). On a thin slab the frame keeps the screen's
    reading and is neither realigned nor flagged; on a thick slab the registration's reading stands."""
    series = realistic_series(0, 50.0, 1)
    n = series.data.shape[3]
    peak = 13
    real_screen = motion.screen_frames

    def screen(*args, **kwargs):
        sc = real_screen(*args, **kwargs)
        trans = sc.translation_mm.copy()
        trans[peak] = (0.3, 0.0, 0.0)
        return motion.Screen(rotation_deg=sc.rotation_deg, translation_mm=trans, moved=np.arange(n) == peak,
                             passes=sc.passes)

    def misread(self, frame, *, refine, start=None):
        centre = np.asarray(self._centre_lps) * [-1, -1, 1]  # back to RAS
        m = motion.rigid_matrix((0.0, 0.0, 0.0), (0.8, 0.0, 0.0), centre)
        return register.Rigid.from_matrix(m)

    monkeypatch.setattr(motion, "screen_frames", screen)
    monkeypatch.setattr(register.FrameRegistration, "register", misread)
    est = motion.estimate_motion(series.data, series.affine, tr=series.tr)
    assert not est.through_plane and est.registered[peak]
    assert est.translation_mm[peak, 0] == pytest.approx(0.3) and not est.refined[peak]
    assert not motion.frames_to_correct(est, "auto").any() and not (est.fd_mm > motion.FD_THRESHOLD_MM).any()

    monkeypatch.setattr(motion, "MIN_SLAB_MM", 1.0)  # the same series taken as a thick slab
    est = motion.estimate_motion(series.data, series.affine, tr=series.tr)
    assert est.through_plane and est.translation_mm[peak, 0] == pytest.approx(0.8)
    assert motion.frames_to_correct(est, "auto")[peak]
