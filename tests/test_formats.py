"""Codes, messages and formats through the command line (issue 17): numeric options checked before any
work, strict JSON in every JSON output, ROI names that curves.tsv and file names can hold, and series
whose values overflow float32 arithmetic. All on the session phantom (64 x 64 x 5 x 80); the analyses
use csvd without leakage correction or motion estimate (about 2 s each)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import folder_digest

from perfusion.cli.app import main
from perfusion.report.quality import quality_warnings

FAST = ["--method", "csvd", "--leakage", "none", "--motion-correct", "off", "--no-html", "-q"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _strict(text: str):
    """json.loads that refuses the bare NaN / Infinity / -Infinity that json.dumps writes by default."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------------------- 1 options

BAD_OPTIONS = [
    ("analyze", "--threshold", "nan"), ("analyze", "--threshold", "5"), ("analyze", "--threshold", "0"),
    ("analyze", "--threshold", "inf"), ("analyze", "--oi-target", "-0.1"), ("analyze", "--oi-target", "nan"),
    ("analyze", "--te", "0"), ("analyze", "--te", "nan"), ("analyze", "--te", "30"), ("analyze", "--tr", "-1.5"),
    ("analyze", "--tr", "1500"), ("analyze", "--tr", "inf"), ("analyze", "--rcbv-low", "-1"),
    ("analyze", "--rcbv-low", "nan"), ("analyze", "--rcbv-high", "nan"), ("analyze", "--rcbv-high", "inf"),
    ("analyze", "--aif-voxels", "0"), ("analyze", "--weeks-since-radiation", "-5"),
    ("analyze", "--weeks-since-radiation", "nan"), ("analyze", "--weeks-since-radiation", "inf"),
    ("batch", "--jobs", "0"), ("batch", "--te", "-inf"), ("batch", "--tr", "0"), ("batch", "--rcbv-low", "nan"),
    ("batch", "--rcbv-high", "-2"), ("batch", "--weeks-since-radiation", "-1"),
    ("phantom", "--snr", "0"), ("phantom", "--snr", "nan"), ("phantom", "--snr", "inf"), ("phantom", "--seed", "-1"),
    ("phantom", "--tr", "0"), ("phantom", "--tr", "nan"), ("phantom", "--te", "inf"), ("phantom", "--te", "-0.03"),
    ("phantom", "--frames", "10"), ("phantom", "--frames", "100000"),
    ("bench", "--repeats", "0"),
]


@pytest.mark.parametrize("command,flag,value", BAD_OPTIONS, ids=[f"{c}{f}={v}" for c, f, v in BAD_OPTIONS])
def test_bad_option_is_exit_2_naming_it_before_any_work(command, flag, value, phantom_case, tmp_path, capsys):
    out = tmp_path / "out"
    args = {"analyze": [command, str(phantom_case["dsc"]), "--out", str(out), "--roi", str(phantom_case["lesion_hyper"])],
            "batch": [command, str(phantom_case["dsc"].parent.parent), str(out)],
            "phantom": [command, str(out)],
            "bench": [command, "--quick", "--cache", str(out / "cache"), "--json", str(out / "bench.json")]}[command]
    code = main([*args, flag, value, *(["-q"] if command in ("analyze", "batch") else [])])
    err = capsys.readouterr().err
    assert code == 2, err
    line = _one_line(err)
    assert f"{flag} {value}" in line and "must be" in line, line
    assert "Traceback" not in err
    assert not out.exists()  # nothing written; the input case is hashed by conftest's autouse fixture


def test_every_range_is_in_the_help():
    from perfusion.cli.options import _RANGES, _range_text

    texts = {cmd: subprocess.run([sys.executable, "-m", "perfusion", cmd, "--help"], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": SRC, "COLUMNS": "400"}).stdout
             for cmd in ("analyze", "phantom", "batch", "bench")}
    for flag in _RANGES:
        helps = [" ".join(t.split()) for t in texts.values() if flag in t]
        assert helps, flag
        rng = _range_text(flag).replace("in ", "").replace(" s", "").replace(" weeks", "")
        shown = {"--frames": "30 to 1000", "--rcbv-high": "> --rcbv-low"}.get(flag, rng)
        assert all(shown in h for h in helps), (flag, shown)


# ------------------------------------------------------------------------------------ 2 strict JSON


@pytest.fixture(scope="module")
def nan_outputs(tmp_path_factory, phantom_case):
    """An analysis whose report holds NaN values (no leakage correction: no K2, no leakage fit), a
    second one, their comparison and a one-case batch."""
    base = tmp_path_factory.mktemp("strict")
    outs = {}
    for name in ("prior", "current"):
        outs[name] = base / name
        assert main(["analyze", str(phantom_case["dsc"]), "--out", str(outs[name]),
                     "--roi", str(phantom_case["lesion_hyper"]), *FAST]) == 0
    assert main(["report", str(outs["current"]), "-q"]) == 0
    outs["compare"] = base / "compare"
    assert main(["compare", str(outs["prior"]), str(outs["current"]), "--out", str(outs["compare"]), "-q"]) == 0
    cases = base / "cases"
    (cases / "case-1").mkdir(parents=True)
    for key in ("dsc", "lesion_hyper"):
        shutil.copy(phantom_case[key], cases / "case-1" / Path(phantom_case[key]).name)
    shutil.copy(phantom_case["dsc"].with_name(phantom_case["dsc"].name.replace(".nii.gz", ".json")),
                cases / "case-1")
    outs["batch"] = base / "batch"
    assert main(["batch", str(cases), str(outs["batch"]), "--roi-glob", "roi-lesion_hyper.nii.gz",
                 "--leakage", "none", "--method", "csvd", "--motion-correct", "off", "-q"]) == 0
    return outs


def test_every_json_output_is_strict_json(nan_outputs):
    files = [p for out in nan_outputs.values() for p in sorted(out.rglob("*.json"))]
    assert len(files) > 20
    for p in files:
        _strict(p.read_text(encoding="utf-8"))  # raises on NaN / Infinity
    rep = _strict((nan_outputs["current"] / "report.json").read_text())
    roi = rep["rois"][0]
    assert roi["k2_median_per_s"] is None and roi["leakage_cbv_change"] is None  # NaN -> null
    assert np.isfinite(roi["rcbv_median"])
    assert (nan_outputs["current"] / "report.html").is_file()  # the report reads the nulls back


def test_json_writer_turns_every_non_finite_number_into_null(tmp_path):
    from perfusion.io import write_json

    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [np.float32("inf"), -np.inf, 1.5],
                                     "c": np.array([np.nan, 2.0]), "d": (np.int64(3), np.bool_(True)),
                                     np.int64(4): Path("p")})
    assert _strict((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, None, 1.5], "c": [None, 2.0],
                                                          "d": [3, True], "4": "p"}


# ------------------------------------------------------------------------------------- 3 ROI names

BAD_NAMES = {"tab": "les\tion", "newline": "les\nion", "carriage_return": "les\rion", "escape": "les\x1bion",
             "line_separator": "les\u2028ion", "backslash": "les\\ion", "not_utf8": os.fsdecode(b"les\xffion"),
             "empty": "", "too_long": "x" * 201}


@pytest.mark.parametrize("kind", BAD_NAMES)
def test_unusable_roi_name_is_exit_2_before_the_work(kind, phantom_case, tmp_path, capsys):
    rois = tmp_path / "rois"
    rois.mkdir()
    roi = rois / f"{BAD_NAMES[kind]}.nii.gz"
    shutil.copy(phantom_case["lesion_hyper"], roi)
    before = folder_digest(rois)
    out = tmp_path / "out"
    code = main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "--roi", str(roi), *FAST])
    err = capsys.readouterr().err
    assert code == 2, err
    line = _one_line(err)  # a tab or newline in the name is escaped, not printed
    assert repr(str(roi)) in line and "rename the file" in line, line
    assert "Traceback" not in err and not out.exists() and folder_digest(rois) == before


@pytest.mark.parametrize("order", ["base_first", "suffixed_first"])
def test_roi_names_colliding_in_curves_tsv_are_exit_2_naming_both(order, phantom_case, tmp_path, capsys):
    rois = tmp_path / "rois"
    rois.mkdir()
    a, b = rois / "a.nii.gz", rois / "a_uncorrected.nii.gz"
    shutil.copy(phantom_case["lesion_hyper"], a)
    shutil.copy(phantom_case["lesion_hypo"], b)
    pair = [a, b] if order == "base_first" else [b, a]
    out = tmp_path / "out"
    code = main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "--roi", str(pair[0]), "--roi", str(pair[1]),
                 *FAST])
    err = capsys.readouterr().err
    assert code == 2, err
    line = _one_line(err)
    assert str(a) in line and str(b) in line and "curves.tsv" in line, line
    assert not out.exists()


def test_roi_names_give_distinct_curve_columns(phantom_case, tmp_path):
    """Names that only look alike (a suffix elsewhere, odd but printable characters) are analysed, and
    each ROI gets its own two curves.tsv columns."""
    rois = tmp_path / "rois"
    rois.mkdir()
    names = ["a", "a_uncorrected_b", "roi:a", "b <é> & 'q'"]
    paths = []
    for i, n in enumerate(names):
        paths.append(rois / f"{n}.nii.gz")
        shutil.copy(phantom_case["lesion_hyper" if i % 2 else "lesion_hypo"], paths[-1])
    out = tmp_path / "out"
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out),
                 *[x for p in paths for x in ("--roi", str(p))], *FAST]) == 0
    header = (out / "curves.tsv").read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert len(header) == len(set(header)) == 4 + 2 * len(names)
    assert {f"roi:{n}" for n in names} <= set(header)


# ------------------------------------------------------------------------------ 4 float32 overflow


def _scaled_series(phantom_case, folder: Path, name: str, factor: float, dtype) -> Path:
    img = nib.load(phantom_case["dsc"])
    data = (np.asarray(img.dataobj, dtype=np.float64) * factor).astype(dtype)
    out = nib.Nifti1Image(data, img.affine)
    out.header.set_xyzt_units("mm", "sec")
    out.header["pixdim"][4] = img.header["pixdim"][4]
    path = folder / f"{name}_dsc.nii.gz"
    nib.save(out, path)
    shutil.copy(phantom_case["dsc"].with_name(phantom_case["dsc"].name.replace(".nii.gz", ".json")),
                folder / f"{name}_dsc.json")
    return path


@pytest.fixture(scope="module")
def plain_rcbv(phantom_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "out"
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "--roi", str(phantom_case["lesion_hyper"]),
                 *FAST]) == 0
    return json.loads((out / "report.json").read_text())["rois"][0]["rcbv_median"]


# the phantom's largest value is 1225: 2**114 puts it at 2.5e37, 2**116 at 1.0e38 (float32 holds 3.4e38)
HUGE = {"float32_3e37": (2.0 ** 114, np.float32), "float32_1e38": (2.0 ** 116, np.float32),
        "float64_1e300": (1e300 / 1225, np.float64)}


@pytest.mark.parametrize("kind", HUGE)
def test_huge_signal_values_are_scaled_and_give_the_same_maps(kind, phantom_case, plain_rcbv, tmp_path, capsys):
    factor, dtype = HUGE[kind]
    src = tmp_path / "in"
    src.mkdir()
    dsc = _scaled_series(phantom_case, src, "big", factor, dtype)
    before = folder_digest(src)
    out = tmp_path / "out"
    assert main(["analyze", str(dsc), "--out", str(out), "--roi", str(phantom_case["lesion_hyper"]), *FAST]) == 0
    assert capsys.readouterr().err == ""
    rep = _strict((out / "report.json").read_text())
    own = [w for w in rep["warnings"] if w not in quality_warnings(rep)]  # the quality panel's rows aside
    assert len(own) == 1 and "scaled by 2^-" in own[0], rep["warnings"]
    # power-of-two scaling is exact for float32 input; float64 1e300 / 1225 rounds once per value
    np.testing.assert_allclose(rep["rois"][0]["rcbv_median"], plain_rcbv, rtol=1e-6)
    assert folder_digest(src) == before


def test_huge_values_print_no_raw_numpy_warning_in_a_real_process(phantom_case, tmp_path):
    """In a process of its own (no pytest warning capture): stderr stays empty without -q too, and
    stdout holds the tool's sentence, not numpy's "overflow encountered"."""
    dsc = _scaled_series(phantom_case, tmp_path, "big", 2.0 ** 114, np.float32)
    proc = subprocess.run([sys.executable, "-m", "perfusion", "analyze", str(dsc), "--out", str(tmp_path / "out"),
                           "--roi", str(phantom_case["lesion_hyper"]), *FAST[:-1]],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "scaled by 2^-" in proc.stdout and "encountered" not in proc.stdout


def test_numpy_warnings_do_not_reach_report_json(phantom_case, tmp_path):
    """The capture keeps the tool's own warnings only."""
    import warnings

    from perfusion.case import own_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.float32(3e38) * np.float32(10)
        np.mean(np.array([]))
        warnings.warn("the tool's own sentence")
    assert own_warnings(caught) == ["the tool's own sentence"]
