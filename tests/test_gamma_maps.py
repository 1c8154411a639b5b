"""--gamma-maps (issue 20): the voxel-wise gamma-variate maps (gv_*) are opt-in.

Without the flag the tissue fit runs only on the voxels the ROI scores read (the ROIs' and the
reference's: the relative peak height), no gv_* file is written and report.json says so (parameters
"gamma_maps", aif "gamma_variate" "tissue_fitted"); with it all five maps are written with their sidecars
and units. Every other output is the same both ways, bit for bit: the maps, rCBV, the verdicts, the
reference and the ROI scores. Checked with real files through the command line (analyze and batch) and
through the Python API; --recirculation remove, which needs every voxel's fit, works without the flag.
"""

import dataclasses
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import perfusion
from perfusion.cli.app import main
from perfusion.pipeline import GV_MAPS
from perfusion.report.outputs import MAP_UNITS

#: report.json entries that differ between two runs of one case whatever the options (per-run times).
PER_RUN = ("created_utc", "seconds", "timings_s")


def _analyze(case, out, *extra):
    return main(["analyze", str(case["dsc"]), "--out", str(out), "--roi", str(case["lesion_hyper"]),
                 "--roi", str(case["lesion_hypo"]), "--no-html", "-q", *extra])


def _report(folder) -> dict:
    return json.loads((folder / "report.json").read_text())


def _map(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _gv_files(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("gv_*"))


@pytest.fixture(scope="module")
def runs(phantom_case, tmp_path_factory):
    """The sample phantom with its two lesions analysed without and with --gamma-maps."""
    base = tmp_path_factory.mktemp("gamma_maps")
    assert _analyze(phantom_case, base / "default") == 0
    assert _analyze(phantom_case, base / "gamma", "--gamma-maps") == 0
    return base / "default", base / "gamma"


def test_default_writes_no_gamma_map_and_says_so(runs, phantom_case):
    default, _ = runs
    assert _gv_files(default) == []
    rep = _report(default)
    assert rep["parameters"]["gamma_maps"] is False
    assert not [k for k in rep["files"] if k.startswith("gv_")]
    gv = rep["aif"]["gamma_variate"]
    assert gv["tissue_fitted"].startswith("the ROIs' and the reference's voxels") and "--gamma-maps" in gv["tissue_fitted"]
    # tissue_valid_fraction is over the voxels fitted: the ROIs' and the reference's inside the brain
    region = _map(default / "reference_mask.nii.gz") > 0
    for key in ("lesion_hyper", "lesion_hypo"):
        region |= _map(phantom_case[key]) > 0
    assert gv["tissue_fitted_voxels"] == int((region & (_map(default / "brain_mask.nii.gz") > 0)).sum())
    assert 0 < gv["tissue_valid_fraction"] <= 1
    assert all(r["relative_peak_height"] > 0 for r in rep["rois"])


def test_gamma_maps_writes_the_five_maps_with_sidecars_and_units(runs):
    _, gamma = runs
    rep = _report(gamma)
    assert rep["parameters"]["gamma_maps"] is True
    assert _gv_files(gamma) == sorted(f"{n}{ext}" for n in GV_MAPS for ext in (".json", ".nii.gz"))
    for name in GV_MAPS:
        side = json.loads((gamma / f"{name}.json").read_text())
        assert side["Units"] == MAP_UNITS[name][0] and side["Description"] == MAP_UNITS[name][1], name
        assert rep["files"][name] == f"{name}.nii.gz"
        assert np.isfinite(_map(gamma / f"{name}.nii.gz")).sum() > 1000, name
    gv = rep["aif"]["gamma_variate"]
    assert gv["tissue_fitted"] == "every brain voxel (--gamma-maps)"
    assert gv["tissue_fitted_voxels"] == rep["brain"]["n_voxels"]
    # the relative peak height read the same fits as the written map (float32 storage)
    peak, ref = _map(gamma / "gv_peak.nii.gz"), _map(gamma / "reference_mask.nii.gz") > 0
    for r in rep["rois"]:
        roi = _map(gamma / r["mask_file"]) > 0
        assert r["relative_peak_height"] == pytest.approx(np.nanmedian(peak[roi]) / np.nanmedian(peak[ref]), rel=1e-6)


def test_every_other_output_is_the_same_both_ways(runs):
    default, gamma = runs
    names = sorted(p.name for p in default.iterdir())
    assert sorted(p.name for p in gamma.iterdir()) == sorted(names + _gv_files(gamma))
    for name in names:
        if name.endswith(".nii.gz"):
            assert np.array_equal(_map(default / name), _map(gamma / name), equal_nan=True), name
        elif name.endswith(".tsv"):
            assert (default / name).read_bytes() == (gamma / name).read_bytes(), name
    a, b = _report(default), _report(gamma)
    assert a["rois"] == b["rois"] and a["reference"] == b["reference"]  # rCBV, verdicts, intervals, peak heights
    assert [r["verdict"] for r in a["rois"]] == ["likely_recurrence", "likely_treatment_effect"]
    assert {k: v for k, v in a["parameters"].items() if k != "gamma_maps"} \
        == {k: v for k, v in b["parameters"].items() if k != "gamma_maps"}
    assert {k: v for k, v in a["files"].items()} == {k: v for k, v in b["files"].items() if not k.startswith("gv_")}
    tissue = ("tissue_valid_fraction", "tissue_fitted", "tissue_fitted_voxels")
    assert {k: v for k, v in a["aif"]["gamma_variate"].items() if k not in tissue} \
        == {k: v for k, v in b["aif"]["gamma_variate"].items() if k not in tissue}
    assert {k: v for k, v in a["aif"].items() if k != "gamma_variate"} \
        == {k: v for k, v in b["aif"].items() if k != "gamma_variate"}
    assert {k: v for k, v in a["motion"].items() if k != "seconds"} \
        == {k: v for k, v in b["motion"].items() if k != "seconds"}
    for key in a.keys() - {*PER_RUN, "parameters", "files", "aif", "motion"}:
        assert a[key] == b[key], key


def test_the_python_api_both_ways(phantom_case, tmp_path):
    case = perfusion.load_case(phantom_case["dsc"], rois=[phantom_case["lesion_hyper"], phantom_case["lesion_hypo"]])
    config = perfusion.Config(method="osvd", motion_correct="off")
    assert config.gamma_maps is False
    plain = perfusion.analyze(case, config)
    full = perfusion.analyze(case, dataclasses.replace(config, gamma_maps=True))
    assert not set(plain.maps) & set(GV_MAPS) and set(full.maps) - set(plain.maps) == set(GV_MAPS)
    for name, values in plain.maps.items():
        assert np.array_equal(values, full.maps[name], equal_nan=True), name
    assert json.dumps([r.as_dict() for r in plain.rois]) == json.dumps([r.as_dict() for r in full.rois])
    assert plain.reference == full.reference
    perfusion.save(plain, case, tmp_path / "plain", html=False)
    perfusion.save(full, case, tmp_path / "full", html=False)
    assert _gv_files(tmp_path / "plain") == []
    assert [n for n in _gv_files(tmp_path / "full") if n.endswith(".nii.gz")] == sorted(f"{n}.nii.gz" for n in GV_MAPS)


def test_recirculation_remove_works_without_the_flag(phantom_case, tmp_path):
    """--recirculation remove deconvolves every voxel's fitted first pass: the fit runs on every voxel,
    but the gv_* maps are still written only with --gamma-maps."""
    out = tmp_path / "rr"
    assert _analyze(phantom_case, out, "--recirculation", "remove", "--aif", str(phantom_case["aif"])) == 0
    assert _gv_files(out) == []
    rep = _report(out)
    gv = rep["aif"]["gamma_variate"]
    assert gv["default_cbv"] == "gamma-variate first pass"
    assert gv["tissue_fitted"] == "every brain voxel (--recirculation remove)"
    assert gv["tissue_fitted_voxels"] == rep["brain"]["n_voxels"] and 0 < gv["tissue_valid_fraction"] <= 1
    assert np.isfinite(_map(out / "cbv.nii.gz")).sum() > 1000
    assert all(np.isfinite(r["rcbv_median"]) and r["relative_peak_height"] > 0 for r in rep["rois"])


def test_batch_passes_the_flag_through(phantom_case, tmp_path):
    """batch --gamma-maps writes the gv_* maps of every case and records the flag (summary.json, the
    done-marker); a re-run without it recomputes the case (its parameters changed), which then has none."""
    from perfusion.batch.engine import MARKER

    case = tmp_path / "in" / "case1"
    case.mkdir(parents=True)
    for key in ("dsc", "lesion_hyper", "lesion_hypo", "brain"):
        shutil.copy(phantom_case[key], case / phantom_case[key].name)
    sidecar = phantom_case["dsc"].with_name("sub-phantom_dsc.json")
    shutil.copy(sidecar, case / sidecar.name)
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), str(out), "-q", "--gamma-maps"]) == 0
    for name in GV_MAPS:
        assert json.loads((out / "case1" / f"{name}.json").read_text())["Units"] == MAP_UNITS[name][0]
    assert json.loads((out / "summary.json").read_text())["parameters"]["gamma_maps"] is True
    assert json.loads((out / "case1" / MARKER).read_text())["fingerprint"]["parameters"]["gamma_maps"] is True
    assert _report(out / "case1")["parameters"]["gamma_maps"] is True
    assert main(["batch", str(tmp_path / "in"), str(out), "-q"]) == 0
    assert _gv_files(out / "case1") == []
    assert _report(out / "case1")["parameters"]["gamma_maps"] is False
    assert json.loads((out / "summary.json").read_text())["parameters"]["gamma_maps"] is False


def test_without_roi_no_tissue_voxel_is_fitted(phantom_case, tmp_path):
    """Without an ROI nothing reads a tissue fit: none runs, and report.json says so (the share of valid
    fits is null, strict JSON, over 0 voxels)."""
    case = perfusion.load_case(phantom_case["dsc"])
    result = perfusion.analyze(case, perfusion.Config(method="osvd", motion_correct="off"))
    assert not set(result.maps) & set(GV_MAPS)
    perfusion.save(result, case, tmp_path / "out", html=False)
    gv = _report(tmp_path / "out")["aif"]["gamma_variate"]
    assert gv["tissue_fitted"].startswith("none (no ROI") and gv["tissue_fitted_voxels"] == 0
    assert gv["tissue_valid_fraction"] is None and gv["valid"] is True
