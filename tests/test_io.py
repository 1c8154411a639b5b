"""io.py on real NIfTI files written with nibabel: timing and its units, input checks, masks,
map writing and the staged output folder."""

import gzip
import io
import json
import os
import stat
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from perfusion.errors import InputError, OutputError
from perfusion.io import MIN_FRAMES, atomic_write, load_mask, load_series, staged_output, write_map

SHAPE = (4, 5, 3)
N_T = 20
#: An affine whose entries are exact in float32, as the NIfTI header stores them.
AFFINE = np.array(
    [
        [2.0, 0.0, 0.0, -10.0],
        [0.0, 2.5, 0.0, -20.5],
        [0.0, 0.0, 3.0, 4.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
#: TE and TR go through float() only (sidecar) or a float32 pixdim (header): float32 rounding is
#: at most 6e-8 relative, so 1e-6 covers the header and sidecar values are exact.
TIME_RTOL = 1e-6


def _signal(shape=SHAPE, n_t=N_T, seed=0):
    rng = np.random.default_rng(seed)
    return (1000.0 + rng.normal(0.0, 10.0, shape + (n_t,))).astype(np.float32)


def _write_nifti(path, data, *, affine=AFFINE, time_unit=None, pixdim4=None):
    img = nib.Nifti1Image(np.asarray(data), affine)
    if time_unit is not None:
        img.header.set_xyzt_units("mm", time_unit)
    if pixdim4 is not None:
        zooms = list(img.header.get_zooms())
        zooms[3] = pixdim4
        img.header.set_zooms(zooms)
    nib.save(img, str(path))
    return Path(path)


def _write_series(tmp_path, name="dsc", *, sidecar=None, data=None, **kw):
    """A 4-D series ``name``.nii.gz, with ``name``.json beside it when ``sidecar`` is a dict."""
    path = _write_nifti(tmp_path / f"{name}.nii.gz", _signal() if data is None else data, **kw)
    if sidecar is not None:
        (tmp_path / f"{name}.json").write_text(json.dumps(sidecar), encoding="utf-8")
    return path


def _input_error(fn, *args, **kw) -> str:
    """Call ``fn`` expecting InputError; check the message is a single line and return it."""
    with pytest.raises(InputError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------ load_series


def test_timing_from_sidecar(tmp_path):
    path = _write_series(tmp_path, sidecar={"EchoTime": 0.03, "RepetitionTime": 1.5})
    s = load_series(path)
    assert_allclose([s.te, s.tr], [0.03, 1.5], rtol=TIME_RTOL)
    assert "dsc.json" in s.te_source and "sidecar" in s.te_source and "EchoTime" in s.te_source
    assert "dsc.json" in s.tr_source and "sidecar" in s.tr_source and "RepetitionTime" in s.tr_source
    assert s.sidecar_path == tmp_path / "dsc.json"
    assert s.sidecar["EchoTime"] == 0.03
    assert s.data.shape == SHAPE + (N_T,) and s.data.dtype == np.float32
    assert s.n_frames == N_T and s.shape3d == SHAPE
    # float32 data read back through float32: exact.
    assert_array_equal(s.data, _signal())
    assert_allclose(s.affine, AFFINE, rtol=0, atol=0)  # AFFINE is exact in float32
    # |det| = 2 * 2.5 * 3 mm^3 = 15 mm^3 = 0.015 mL; float64 determinant of exact entries.
    assert_allclose(s.voxel_volume_ml, 0.015, rtol=1e-12)


def test_keyword_overrides_win(tmp_path):
    path = _write_series(tmp_path, sidecar={"EchoTime": 0.03, "RepetitionTime": 1.5})
    s = load_series(path, te=0.025, tr=2.0)
    assert_allclose([s.te, s.tr], [0.025, 2.0], rtol=TIME_RTOL)
    assert "--te" in s.te_source and "--tr" in s.tr_source
    assert "sidecar" not in s.te_source and "sidecar" not in s.tr_source


def test_keyword_overrides_without_sidecar(tmp_path):
    path = _write_series(tmp_path)
    s = load_series(path, te=0.03, tr=1.2)
    assert_allclose([s.te, s.tr], [0.03, 1.2], rtol=TIME_RTOL)
    assert s.sidecar_path is None and s.sidecar == {}


def test_tr_from_header_msec(tmp_path):
    path = _write_series(tmp_path, sidecar={"EchoTime": 0.03}, time_unit="msec", pixdim4=1500.0)
    s = load_series(path)
    assert_allclose(s.tr, 1.5, rtol=TIME_RTOL)
    assert "header" in s.tr_source


def test_tr_from_header_sec(tmp_path):
    path = _write_series(tmp_path, sidecar={"EchoTime": 0.03}, time_unit="sec", pixdim4=1.25)
    s = load_series(path)
    assert_allclose(s.tr, 1.25, rtol=TIME_RTOL)
    assert "header" in s.tr_source


def test_sidecar_tr_beats_header_and_warns_on_disagreement(tmp_path):
    path = _write_series(
        tmp_path, sidecar={"EchoTime": 0.03, "RepetitionTime": 1.5}, time_unit="sec", pixdim4=2.0
    )
    with pytest.warns(UserWarning, match="header TR"):
        s = load_series(path)
    assert_allclose(s.tr, 1.5, rtol=TIME_RTOL)


def test_agreeing_header_tr_does_not_warn(tmp_path):
    path = _write_series(
        tmp_path, sidecar={"EchoTime": 0.03, "RepetitionTime": 1.5}, time_unit="msec", pixdim4=1500.0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_series(path)


def test_unknown_header_time_unit_and_no_sidecar_tr(tmp_path):
    # pixdim[4] is set but its unit is unknown: the header cannot give TR.
    path = _write_series(tmp_path, sidecar={"EchoTime": 0.03}, time_unit="unknown", pixdim4=1.5)
    assert "--tr" in _input_error(load_series, path)


def test_missing_te(tmp_path):
    path = _write_series(tmp_path, time_unit="sec", pixdim4=1.5)
    msg = _input_error(load_series, path)
    assert str(path) in msg and "--te" in msg


def test_missing_te_in_sidecar(tmp_path):
    path = _write_series(tmp_path, sidecar={"RepetitionTime": 1.5})
    msg = _input_error(load_series, path)
    assert str(path) in msg and "--te" in msg and "EchoTime" in msg


def test_echo_time_in_milliseconds(tmp_path):
    path = _write_series(tmp_path, sidecar={"EchoTime": 30, "RepetitionTime": 1.5})
    msg = _input_error(load_series, path)
    assert "milliseconds" in msg and "--te" in msg


def test_repetition_time_in_milliseconds(tmp_path):
    path = _write_series(tmp_path, sidecar={"EchoTime": 0.03, "RepetitionTime": 1500})
    msg = _input_error(load_series, path)
    assert "milliseconds" in msg and "--tr" in msg


def test_te_keyword_in_milliseconds(tmp_path):
    path = _write_series(tmp_path, sidecar={"EchoTime": 0.03, "RepetitionTime": 1.5})
    assert "milliseconds" in _input_error(load_series, path, te=30)


@pytest.mark.parametrize("bad", [0, -0.03, "abc", None])
def test_bad_echo_time_values(tmp_path, bad):
    path = _write_series(tmp_path, sidecar={"EchoTime": bad, "RepetitionTime": 1.5})
    assert "--te" in _input_error(load_series, path)


def test_3d_file(tmp_path):
    path = _write_nifti(tmp_path / "dsc.nii.gz", _signal()[..., 0])
    assert "4-D" in _input_error(load_series, path, te=0.03, tr=1.5)


def test_too_few_frames(tmp_path):
    path = _write_series(tmp_path, data=_signal(n_t=10))
    msg = _input_error(load_series, path, te=0.03, tr=1.5)
    assert "frames" in msg and "10" in msg


def test_min_frames_accepted(tmp_path):
    path = _write_series(tmp_path, data=_signal(n_t=MIN_FRAMES))
    assert load_series(path, te=0.03, tr=1.5).n_frames == MIN_FRAMES


def test_nan_in_data(tmp_path):
    data = _signal()
    data[1, 2, 0, 5] = np.nan
    path = _write_series(tmp_path, data=data)
    assert "NaN" in _input_error(load_series, path, te=0.03, tr=1.5)


def test_text_file_named_nifti(tmp_path):
    path = tmp_path / "x.nii.gz"
    path.write_text("this is not an image\nsecond line\n", encoding="utf-8")
    msg = _input_error(load_series, path, te=0.03, tr=1.5)
    assert "not a readable NIfTI" in msg and str(path) in msg


def test_txt_path(tmp_path):
    path = tmp_path / "series.txt"
    path.write_text("1 2 3\n", encoding="utf-8")
    msg = _input_error(load_series, path, te=0.03, tr=1.5)
    assert str(path) in msg and "NIfTI" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nothing.nii.gz"
    msg = _input_error(load_series, path, te=0.03, tr=1.5)
    assert str(path) in msg and "not found" in msg


def test_invalid_sidecar_json(tmp_path):
    path = _write_series(tmp_path)
    (tmp_path / "dsc.json").write_text("{not json", encoding="utf-8")
    assert "dsc.json" in _input_error(load_series, path)


def test_integer_data_with_scl_slope(tmp_path):
    raw = np.arange(np.prod(SHAPE) * N_T, dtype=np.int16).reshape(SHAPE + (N_T,))
    img = nib.Nifti1Image(raw, AFFINE)
    img.header.set_slope_inter(2.0, 0.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    # The file really holds the int16 values with a slope of 2 (so the test exercises scaling).
    on_disk = nib.load(str(path))
    assert on_disk.get_data_dtype() == np.int16
    assert on_disk.dataobj.slope == 2.0
    assert_array_equal(on_disk.dataobj.get_unscaled(), raw)

    s = load_series(path, te=0.03, tr=1.5)
    assert s.data.dtype == np.float32
    # raw * 2 is an integer below 2**24: exact in float32.
    assert_array_equal(s.data, raw.astype(np.float64) * 2.0)


# -------------------------------------------------------------------------------------- load_mask


@pytest.fixture
def series(tmp_path):
    return load_series(_write_series(tmp_path, name="dsc"), te=0.03, tr=1.5)


def _mask_data(shape=SHAPE):
    m = np.zeros(shape, dtype=np.uint8)
    m[1:3, 1:4, 1] = 1
    return m


def test_mask_loads_as_bool(tmp_path, series):
    path = _write_nifti(tmp_path / "roi.nii.gz", _mask_data())
    m = load_mask(path, series, what="ROI")
    assert m.dtype == bool and m.shape == SHAPE
    assert_array_equal(m, _mask_data() != 0)


def test_mask_shape_mismatch(tmp_path, series):
    path = _write_nifti(tmp_path / "roi.nii.gz", _mask_data((4, 5, 2)))
    msg = _input_error(load_mask, path, series, what="ROI")
    assert str(path) in msg and series.path.name in msg and "shape" in msg


def test_mask_affine_mismatch(tmp_path, series):
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0  # 1 mm shift: far above AFFINE_ATOL_MM
    path = _write_nifti(tmp_path / "roi.nii.gz", _mask_data(), affine=shifted)
    msg = _input_error(load_mask, path, series, what="ROI")
    assert str(path) in msg and series.path.name in msg and "affine" in msg


def test_mask_empty(tmp_path, series):
    path = _write_nifti(tmp_path / "roi.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    msg = _input_error(load_mask, path, series, what="ROI")
    assert "empty" in msg and str(path) in msg


def test_mask_4d_with_last_dim_1(tmp_path, series):
    path = _write_nifti(tmp_path / "roi.nii.gz", _mask_data()[..., None])
    m = load_mask(path, series, what="ROI")
    assert m.shape == SHAPE
    assert_array_equal(m, _mask_data() != 0)


def test_mask_4d_with_several_volumes_is_refused(tmp_path, series):
    path = _write_nifti(tmp_path / "roi.nii.gz", np.stack([_mask_data()] * 2, axis=-1))
    assert str(path) in _input_error(load_mask, path, series, what="ROI")


# -------------------------------------------------------------------------------------- write_map


def test_write_map(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.uniform(0.0, 10.0, SHAPE)
    out = write_map(tmp_path, "cbv", data, AFFINE, units="mL/100 g", description="cerebral blood volume",
                    parameters={"kh": 0.73})
    assert out == tmp_path / "cbv.nii.gz"
    assert out.is_file() and (tmp_path / "cbv.json").is_file()
    sidecar = json.loads((tmp_path / "cbv.json").read_text(encoding="utf-8"))
    assert sidecar["Units"] == "mL/100 g"
    assert sidecar["Description"] == "cerebral blood volume"
    assert sidecar["Parameters"] == {"kh": 0.73}
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.float32
    # Stored as float32 without scaling: the reload equals the float32 cast exactly.
    assert_array_equal(np.asarray(img.dataobj), data.astype(np.float32))
    assert_allclose(img.affine, AFFINE, rtol=0, atol=0)  # AFFINE is exact in float32


# ---------------------------------------------------------------------------------- staged_output


def _partials(*folders):
    return [p for f in folders if f.is_dir() for p in f.iterdir() if ".partial-" in p.name]


class _Boom(RuntimeError):
    pass


def test_failed_run_leaves_missing_target_missing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(_Boom):
        with staged_output(out, force=False) as stage:
            (stage / "cbv.nii.gz").write_bytes(b"half")
            raise _Boom()
    assert not out.exists()
    assert _partials(tmp_path) == []


def test_failed_run_leaves_existing_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old", encoding="utf-8")
    with pytest.raises(_Boom):
        with staged_output(out, force=True) as stage:
            (stage / "keep.txt").write_text("new", encoding="utf-8")
            (stage / "cbv.nii.gz").write_bytes(b"half")
            raise _Boom()
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text(encoding="utf-8") == "old"
    assert _partials(tmp_path, out) == []


def test_successful_run_moves_files_in(tmp_path):
    out = tmp_path / "out"
    with staged_output(out, force=False) as stage:
        assert stage != out and not out.exists()  # nothing visible until the run succeeds
        (stage / "a.json").write_text("{}", encoding="utf-8")
        (stage / "sub").mkdir()
        (stage / "sub" / "b.tsv").write_text("x\n", encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "sub"]
    assert (out / "sub" / "b.tsv").read_text(encoding="utf-8") == "x\n"
    assert _partials(tmp_path, out) == []


def test_successful_run_into_existing_empty_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with staged_output(out, force=False) as stage:
        (stage / "a.json").write_text("{}", encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["a.json"]


def test_non_empty_target_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(OutputError) as info:
        with staged_output(out, force=False):
            pytest.fail("the body must not run")
    msg = str(info.value)
    assert "--force" in msg and str(out) in msg and "\n" not in msg
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert _partials(tmp_path, out) == []


def test_force_writes_and_keeps_unrelated_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old", encoding="utf-8")
    (out / "cbv.json").write_text("stale", encoding="utf-8")
    with staged_output(out, force=True) as stage:
        (stage / "cbv.json").write_text("fresh", encoding="utf-8")
        (stage / "cbf.json").write_text("{}", encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["cbf.json", "cbv.json", "old.txt"]
    assert (out / "old.txt").read_text(encoding="utf-8") == "old"
    assert (out / "cbv.json").read_text(encoding="utf-8") == "fresh"
    assert _partials(tmp_path, out) == []


def test_target_that_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("x", encoding="utf-8")
    with pytest.raises(OutputError, match="not a folder"):
        with staged_output(out, force=True):
            pytest.fail("the body must not run")


def test_staged_output_failure_removes_parents_it_made(tmp_path):
    """A failed run into a/b/out leaves no a/ behind (nothing lost, nothing added)."""
    from perfusion.io import staged_output

    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with staged_output(target, force=False) as stage:
            (stage / "x.txt").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()


# --- the loader's fast path: ISA-L gzip, voxel-major float32


@pytest.mark.parametrize("klass,name,dtype,endian", [
    (nib.Nifti1Image, "s.nii.gz", np.int16, "<"),
    (nib.Nifti1Image, "s.nii", np.float32, "<"),
    (nib.Nifti2Image, "s.nii.gz", np.float64, "<"),
    (nib.Nifti1Image, "s.nii.gz", np.int16, ">"),
])
def test_series_loads_as_nibabel_reads_it_in_voxel_major_order(tmp_path, klass, name, dtype, endian):
    """The series equals nibabel's own get_fdata() (float32), whatever the NIfTI version, byte order,
    compression and data type, and is C-ordered so that each voxel's time course is contiguous."""
    raw = (_signal(n_t=MIN_FRAMES + 3) * (3 if dtype == np.int16 else 1)).astype(np.dtype(dtype).newbyteorder(endian))
    img = klass(raw, AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms(img.header.get_zooms()[:3] + (1.5,))
    path = tmp_path / name
    nib.save(img, str(path))
    ref = nib.load(str(path)).get_fdata(dtype=np.float32)
    s = load_series(path, te=0.03, tr=1.5)
    assert s.data.dtype == np.float32 and s.data.flags["C_CONTIGUOUS"]
    assert_array_equal(s.data, ref)
    assert_array_equal(s.affine, AFFINE)
    assert s.data.reshape(-1, s.n_frames).base is not None  # a view, not a copy


def test_voxel_major_copy_of_a_fortran_array():
    from perfusion.io import voxel_major_float32

    raw = np.asfortranarray(np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5))
    out = voxel_major_float32(raw)
    assert out.flags["C_CONTIGUOUS"] and out.dtype == np.float32
    assert_array_equal(out, raw)
    assert_array_equal(voxel_major_float32(raw[..., 0]), raw[..., 0])  # 3-D: a plain float32 copy


# --- inputs the loader's fuzzer found (fuzz/regressions/ holds the fuzz inputs themselves)


def _edit_header(path, **fields):
    """Set NIfTI-1 header fields of ``path`` (.nii or .nii.gz) in place, past nibabel's checks."""
    import gzip

    path = Path(path)
    gz = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    hdr = np.frombuffer(raw, nib.nifti1.header_dtype, count=1)  # a writable view of the first 348 bytes
    for name, value in fields.items():
        hdr[name] = value
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    return path


@pytest.mark.parametrize("name", ["dsc.nii", "dsc.nii.gz"])
def test_header_promising_more_data_than_the_file_holds(tmp_path, name):
    """A 1.6 kB file whose header claims 32767 x 1000 x 2 x 20 int16 (2.6 GB) is refused before
    nibabel allocates the 2.6 GB it would read into."""
    import tracemalloc

    path = _edit_header(_write_nifti(tmp_path / name, _signal().astype(np.int16)), dim=[4, 32767, 1000, 2, 20, 1, 1, 1])
    tracemalloc.start()
    try:
        msg = _input_error(load_series, path, te=0.03, tr=1.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in msg and "promises 2621360352 bytes" in msg
    assert peak < 50e6


@pytest.mark.parametrize("dtype,label", [(np.complex64, "complex64"),
                                         (np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]), "RGB")])
def test_complex_and_rgb_data_are_refused(tmp_path, series, dtype, label):
    """Not silently cast (complex lost its imaginary part with a ComplexWarning) nor a TypeError."""
    data = np.zeros(SHAPE + (N_T,), dtype)
    msg = _input_error(load_series, _write_nifti(tmp_path / "c.nii.gz", data), te=0.03, tr=1.5)
    assert label in msg and "not real numbers" in msg
    mask = np.zeros(SHAPE, dtype)
    msg = _input_error(load_mask, _write_nifti(tmp_path / "m.nii.gz", mask), series, what="ROI")
    assert label in msg and "m.nii.gz" in msg


def test_undefined_time_unit_code_means_no_header_tr(tmp_path):
    """xyzt_units 2 + 56: mm and a time code NIfTI does not define (nibabel raised KeyError)."""
    path = _edit_header(_write_series(tmp_path, sidecar={"EchoTime": 0.03}, time_unit="sec", pixdim4=1.5), xyzt_units=58)
    assert "repetition time unknown" in _input_error(load_series, path)
    assert load_series(path, tr=1.5).tr == 1.5


@pytest.mark.parametrize("srow_x", [[np.nan, 0, 0, 0], [np.inf, 0, 0, 0], [0, 0, 0, 0]])
def test_affine_not_finite_or_singular(tmp_path, srow_x):
    """A NaN, Inf or singular sform loaded and failed only when the maps were written (HeaderDataError)."""
    from perfusion.io import load_volume

    path = _edit_header(_write_series(tmp_path), sform_code=1, srow_x=srow_x)
    assert "affine" in _input_error(load_series, path, te=0.03, tr=1.5)
    vol = _edit_header(_write_nifti(tmp_path / "t1.nii", _signal()[..., 0]), sform_code=1, srow_x=srow_x)
    assert "affine" in _input_error(load_volume, vol, what="anatomical image")


@pytest.mark.parametrize("dim", [[4, 4, 5, 0, 20, 1, 1, 1], [3, -5, 5, 3, 1, 1, 1, 1], [0, 4, 5, 3, 20, 1, 1, 1]])
def test_header_shape_without_voxels(tmp_path, series, dim):
    from perfusion.io import load_volume

    path = _edit_header(_write_nifti(tmp_path / "x.nii.gz", _signal()), dim=dim)
    assert "no voxels" in _input_error(load_series, path, te=0.03, tr=1.5)
    assert "no voxels" in _input_error(load_mask, path, series, what="ROI")
    assert "no voxels" in _input_error(load_volume, path, what="anatomical image")


@pytest.mark.parametrize("text,expected", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"EchoTime": ' + "1" * 5000 + "}", "4300 digits"),
    ('{"EchoTime": 1' + "0" * 400 + ', "RepetitionTime": 1.5}', "EchoTime from sidecar dsc.json is too large"),
])
def test_sidecar_beyond_json_limits(tmp_path, text, expected):
    """RecursionError, ValueError and OverflowError escaped the sidecar reading."""
    path = _write_series(tmp_path)
    (tmp_path / "dsc.json").write_text(text, encoding="utf-8")
    msg = _input_error(load_series, path)
    assert expected in msg and "dsc.json" in msg


def test_volume_of_zeros_and_inf_is_refused(tmp_path):
    from perfusion.io import load_volume

    data = np.zeros(SHAPE, np.float32)
    data[0] = np.inf
    path = _write_nifti(tmp_path / "t1.nii.gz", data)
    assert "no non-zero finite value" in _input_error(load_volume, path, what="anatomical image")


@pytest.mark.parametrize("value", [True, "1.5", "1_5", [1.5], None])
def test_sidecar_time_must_be_a_json_number(tmp_path, value):
    """float(True) is 1 and float("1_5") is 15: a TR that is not a JSON number is refused, not guessed."""
    path = _write_series(tmp_path, sidecar={"EchoTime": 0.03, "RepetitionTime": value})
    msg = _input_error(load_series, path)
    assert "is not a number" in msg and "--tr" in msg


def test_sidecar_with_a_byte_order_mark_is_read(tmp_path):
    """A UTF-8 byte-order mark (written by some Windows editors) is not an error."""
    path = _write_series(tmp_path)
    (tmp_path / "dsc.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"EchoTime": 0.03, "RepetitionTime": 1.5}).encode())
    s = load_series(path)
    assert (s.te, s.tr) == (0.03, 1.5)


def test_nibabel_header_notes_do_not_reach_stderr(tmp_path):
    """nibabel logs the header fixes it makes (here a zero voxel size set to 1) straight to stderr; a command's
    stderr must hold at most its one error line, so the loader silences them. In a real process: nibabel's
    log handler holds the stderr of the moment it was imported, which pytest's capture cannot see."""
    import subprocess
    import sys

    path = _write_series(tmp_path, sidecar={"EchoTime": 0.03, "RepetitionTime": 1.5})
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[80:84] = np.zeros(1, nib.load(path).header.endianness + "f4").tobytes()  # pixdim[1]: a voxel size of 0
    path.write_bytes(gzip.compress(bytes(raw)))

    def stderr_of(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stderr

    assert "pixdim[1,2,3] should be non-zero" in stderr_of("import sys, nibabel; nibabel.load(sys.argv[1]).get_fdata()")
    assert stderr_of("import sys; from perfusion.io import load_series; load_series(sys.argv[1])") == ""


def test_gzip_stream_that_inflates_past_the_image_costs_no_more_than_the_image(tmp_path):
    """A "gzip bomb": the header promises a 4 x 4 x 5 x 20 float32 series (6.4 kB of data), and the
    gzip stream goes on for 1 GiB of zeros after it (16 members, 1 MB on disk). The loader decodes only
    what the header describes: the series loads with the right values, and the traced peak memory stays
    far below the 1 GiB a whole-stream decoder would allocate."""
    import tracemalloc

    path = _write_series(tmp_path, sidecar={"EchoTime": 0.03, "RepetitionTime": 1.5})
    expected = load_series(path).data
    chunk = 64 * 2**20
    zeros = gzip.compress(bytes(chunk), compresslevel=9)
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + bytes(chunk), compresslevel=9)
                     + zeros * 15)
    assert path.stat().st_size < 2 * 2**20
    tracemalloc.start()
    try:
        s = load_series(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(s.data, expected)
    assert peak < 32 * 2**20, peak


def test_header_promising_more_than_the_machine_holds_is_refused_before_decoding(tmp_path):
    """dim 32767 x 32767 x 32767 x 20 int16 (70 TB) in a 200-byte .nii.gz: refused from the header."""
    path = _write_series(tmp_path, sidecar={"EchoTime": 0.03, "RepetitionTime": 1.5})
    raw = bytearray(gzip.decompress(path.read_bytes()))
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))
    raw[40:56] = np.array([4, 32767, 32767, 32767, 20, 1, 1, 1], hdr.endianness + "i2").tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))
    msg = _input_error(load_series, path)
    assert "more than this machine's" in msg and "memory" in msg


# ------------------------------------------------------------------------------ atomic_write


def test_atomic_write_text_bytes_and_function(tmp_path):
    atomic_write(tmp_path / "a.txt", "é\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "é\n"
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "c.txt", lambda p: p.write_text("x"))
    assert (tmp_path / "c.txt").read_text() == "x"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.txt"]


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "t.json"
    target.write_text("old")
    def boom(p):
        p.write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OutputError, match=r"t\.json: cannot write \(No space left on device\); free it"):
        atomic_write(target, boom, fix="free it")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]
