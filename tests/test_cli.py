"""The command line with real files in temp folders: the output contract, --force, bad input.

Each run goes through perfusion.cli.main (the console script's entry) and checks the files
written, the exit code and the one-line message, not only stdout.
"""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from perfusion.cli.app import main

MAPS = {"cbv": "mL/100 g", "cbf": "mL/100 g/min", "mtt": "s", "ttp": "s", "tmax": "s", "rcbv": "ratio",
        "brain_mask": "mask", "aif_mask": "mask", "ftb": "label", "srcbv": "standardized units"}
#: Written with --gamma-maps only (tests/test_gamma_maps.py).
GV_MAPS = {"gv_cbv": "mL/100 g", "gv_peak": "1/s", "gv_ttp": "s", "gv_fwhm": "s", "gv_quality": "ratio"}


def _analyze(case, out, *extra):
    return main(["analyze", str(case["dsc"]), "--out", str(out), "--roi", str(case["lesion_hyper"]),
                 "--roi", str(case["lesion_hypo"]), "--quiet", *extra])


@pytest.fixture(scope="module")
def analyzed(phantom_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    assert _analyze(phantom_case, out) == 0
    return out


def test_output_contract(analyzed, phantom_case):
    for name, unit in MAPS.items():
        img = nib.load(analyzed / f"{name}.nii.gz")
        assert img.shape == phantom_case_shape(phantom_case)
        side = json.loads((analyzed / f"{name}.json").read_text())
        assert side["Units"] == unit and side["Description"]
    assert not any((analyzed / f"{name}.nii.gz").exists() for name in GV_MAPS)
    assert "method" in json.loads((analyzed / "cbv.json").read_text())["Parameters"]
    header, *rows = (analyzed / "aif.tsv").read_text().splitlines()
    assert header.split("\t") == ["time_s", "delta_r2s"]
    assert len(rows) >= 70
    header, *rows = (analyzed / "curves.tsv").read_text().splitlines()
    assert header.split("\t")[:4] == ["time_s", "aif", "reference_uncorrected", "reference"]
    assert "roi:roi-lesion_hyper" in header.split("\t") and len(rows) == 78
    assert json.loads((analyzed / "baseline.json").read_text())["Units"] == "a.u."
    tables = sorted(analyzed.glob("*.tsv"))
    assert {t.name for t in tables} >= {"aif.tsv", "curves.tsv", "motion.tsv"}
    for table in tables:  # every table has a BIDS sidecar: each column with its units and description
        columns = table.read_text().splitlines()[0].split("\t")
        side = json.loads(table.with_suffix(".json").read_text())
        assert list(side) == columns, table.name
        assert all(side[c]["Units"] and side[c]["Description"] for c in columns), table.name
    units = {t.stem: {c: v["Units"] for c, v in json.loads(t.with_suffix(".json").read_text()).items()} for t in tables}
    assert units["aif"] == {"time_s": "s", "delta_r2s": "1/s"}
    assert units["motion"]["rot_x_deg"] == "deg" and units["motion"]["fd_mm"] == "mm"
    assert set(units["curves"].values()) == {"s", "1/s"}
    rep = json.loads((analyzed / "report.json").read_text())
    assert rep["software"]["name"] == "perfusion" and rep["software"]["version"]
    # inputs by role: the file name only (no folder) and the SHA-256 of its bytes
    assert rep["inputs"]["dsc"]["file"] == phantom_case["dsc"].name and len(rep["inputs"]["dsc"]["sha256"]) == 64
    acq = rep["acquisition"]
    assert acq["te"] == pytest.approx(0.025) and acq["tr"] == pytest.approx(1.5) and acq["n_frames"] == 80
    assert "sidecar" in acq["te_source"] and "sidecar" in acq["tr_source"]
    assert rep["parameters"]["method"] == "model"  # the default, chosen by measurement (README)
    assert rep["aif"]["source"] == "automatic (cluster)" and 0 <= rep["aif"]["quality_score"] <= 1
    assert rep["aif"]["n_voxels"] >= 1 and rep["aif"]["peak_time_s"] > 0
    assert rep["reference"]["n_voxels"] > 0 and rep["reference"]["cbv_median"] > 0
    ref = rep["reference"]  # automatic; the phantom's lesions lie on both sides of its midline
    assert ref["automatic"] is True and ref["side"] == "both" and ref["fallback"] is None
    assert ref["roi_sides"] == {"roi-lesion_hyper": "left", "roi-lesion_hypo": "right"}
    std = ref["standardized"]
    assert std["landmarks"]["percentiles"] == [1.0, 50.0, 99.8] and len(std["landmarks"]["cbv"]) == 3
    assert std["rois"]["roi-lesion_hyper"] > 1000 > std["rois"]["roi-lesion_hypo"]  # ranked like rCBV
    assert json.loads((analyzed / "srcbv.json").read_text())["Parameters"]["landmarks"] == std["landmarks"]
    assert "Hu et al. 2012" in rep["thresholds"]["source"]
    rois = {r["name"]: r for r in rep["rois"]}
    assert set(rois) == {"roi-lesion_hyper", "roi-lesion_hypo"}
    for r in rois.values():
        for key in ("n_voxels", "volume_ml", "rcbv_mean", "rcbv_median", "rcbv_p90", "verdict", "reasons",
                    "ftb_low", "ftb_mid", "ftb_high", "psr_percent", "relative_peak_height", "rule",
                    "rcbv_ci_low", "rcbv_ci_high", "ftb_high_ci", "mixed", "gates_failed", "rcbv_by_leakage"):
            assert key in r
        assert 0 <= r["psr_percent"] <= 120 and r["relative_peak_height"] > 0
    assert rois["roi-lesion_hyper"]["verdict"] == "likely_recurrence"
    assert rois["roi-lesion_hypo"]["verdict"] == "likely_treatment_effect"
    assert isinstance(rep["warnings"], list)
    assert "not a medical device" in rep["disclaimer"]
    html = (analyzed / "report.html").read_text()
    assert "likely recurrence" in html.lower() and "not a medical device" in html
    # rcbv.nii.gz is CBV over the reference median
    cbv = np.asarray(nib.load(analyzed / "cbv.nii.gz").dataobj)
    rcbv = np.asarray(nib.load(analyzed / "rcbv.nii.gz").dataobj)
    np.testing.assert_allclose(rcbv, cbv / rep["reference"]["cbv_median"], rtol=1e-6)  # float32 storage


def test_report_json_times_each_stage(analyzed):
    """report.json "timings_s": wall seconds per stage (load, motion and the analysis's own), which
    `perfusion bench` reads; together no more than the run's total."""
    rep = json.loads((analyzed / "report.json").read_text())
    t = rep["timings_s"]
    for stage in ("load", "motion", "delta_r2s", "aif", "leakage", "deconvolution", "gamma_variate"):
        assert t[stage] >= 0, stage
    analysis = sum(v for k, v in t.items() if k not in ("load", "motion", "anat"))
    assert 0 < analysis <= rep["seconds"] * 1.001 + 1e-3
    assert rep["n_voxels_analysed"] > 1000


def test_no_html_and_stale_outputs_of_an_earlier_run(analyzed, phantom_case, tmp_path):
    """--no-html writes no report.html; with --force, the files an earlier run wrote and this run does
    not (its report.html, k2 map, motion table) are removed, other files in the folder kept."""
    import shutil

    out = tmp_path / "again"
    shutil.copytree(analyzed, out)
    (out / "notes.txt").write_text("mine")
    assert (out / "report.html").is_file() and (out / "k2.nii.gz").is_file()
    assert _analyze(phantom_case, out, "--force", "--no-html", "--leakage", "none", "--motion-correct", "off") == 0
    names = {p.name for p in out.iterdir()}
    assert "report.html" not in names and "k2.nii.gz" not in names and "k2.json" not in names
    assert "motion.tsv" not in names and "cbv_uncorrected.nii.gz" not in names
    assert {"cbv.nii.gz", "cbv.json", "report.json", "notes.txt", "mask-roi-lesion_hyper.nii.gz"} <= names
    assert json.loads((out / "report.json").read_text())["parameters"]["leakage"] == "none"


def phantom_case_shape(case):
    return nib.load(case["dsc"]).shape[:3]


def test_terminal_prints_verdicts_and_disclaimer(phantom_case, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "perfusion", "analyze", str(phantom_case["dsc"]), "--out", str(out),
                           "--roi", str(phantom_case["lesion_hyper"])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "likely recurrence" in proc.stdout and "95 % interval" in proc.stdout
    assert "not a medical device" in proc.stdout


def test_refuses_non_empty_folder_without_force(phantom_case, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _analyze(phantom_case, out) == 5
    err = capsys.readouterr().err.strip()
    assert "--force" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert _analyze(phantom_case, out, "--force") == 0
    assert (out / "cbv.nii.gz").is_file() and (out / "keep.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if ".partial-" in p.name]


def test_missing_te_is_a_clear_error(case_copy, tmp_path, capsys):
    sidecar = case_copy["dsc"].with_name("sub-phantom_dsc.json")
    side = json.loads(sidecar.read_text())
    del side["EchoTime"]
    sidecar.write_text(json.dumps(side))
    out = tmp_path / "out"
    assert _analyze(case_copy, out) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(case_copy["dsc"]) in err and "--te" in err
    assert not out.exists()
    assert _analyze(case_copy, out, "--te", "0.025") == 0


def test_te_in_milliseconds_is_refused(phantom_case, tmp_path, capsys):
    assert _analyze(phantom_case, tmp_path / "o", "--te", "25") == 2  # an option out of range: usage
    assert "milliseconds" in capsys.readouterr().err


def test_mask_shape_mismatch_names_both_files(phantom_case, tmp_path, capsys):
    bad = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 5), np.uint8), np.eye(4)), bad)
    out = tmp_path / "o"
    code = main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "--roi", str(bad), "-q"])
    assert code == 4
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and phantom_case["dsc"].name in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_unknown_method_is_usage_error(phantom_case, tmp_path, capsys):
    assert _analyze(phantom_case, tmp_path / "o", "--method", "magic") == 2
    assert "--method" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ssvd", "csvd", "osvd", "tikhonov"])
def test_other_methods_and_given_masks(phantom_case, tmp_path, method):
    out = tmp_path / method
    assert _analyze(phantom_case, out, "--method", method, "--aif", str(phantom_case["aif"]),
                    "--reference", str(phantom_case["nawm"]), "--mask", str(phantom_case["brain"])) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["parameters"]["method"] == method
    assert rep["aif"]["source"] == phantom_case["aif"].name and rep["aif"]["n_voxels"] == 40
    assert rep["reference"]["source"] == phantom_case["nawm"].name
    assert rep["reference"]["automatic"] is False and rep["reference"]["side"] == "both"  # the NAWM mask: whole disc


def test_help_lists_exit_codes():
    proc = subprocess.run([sys.executable, "-m", "perfusion", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "4 bad input" in " ".join(proc.stdout.split())


def test_cli_import_is_light():
    """`perfusion --help` stays fast (measured by `perfusion bench`'s README numbers, not here) because
    the CLI module imports no numeric or imaging library: each command imports what it needs."""
    code = ("import sys, perfusion.cli.app; heavy = ('numpy', 'scipy', 'numba', 'nibabel', 'SimpleITK', 'matplotlib', "
            "'distributed', 'pydicom', 'isal'); print([m for m in heavy if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_recirculation_remove_uses_first_passes(phantom_case, tmp_path):
    """--recirculation remove deconvolves the gamma-variate first passes: its CBV map is the fitted
    first-pass ratio (gv_cbv) wherever the tissue fit is valid, NaN elsewhere; recorded in the report."""
    out = tmp_path / "rr"
    assert _analyze(phantom_case, out, "--recirculation", "remove", "--aif", str(phantom_case["aif"]), "--gamma-maps") == 0
    cbv = np.asarray(nib.load(out / "cbv.nii.gz").dataobj)
    gv = np.asarray(nib.load(out / "gv_cbv.nii.gz").dataobj)
    both = np.isfinite(gv) & np.isfinite(cbv)
    assert both.sum() > 1000
    # trapezoid of the sampled fit vs the closed-form area: the sampling error of the fitted curves
    np.testing.assert_allclose(np.median(cbv[both] / gv[both]), 1.0, rtol=0.02)
    rep = json.loads((out / "report.json").read_text())
    assert rep["parameters"]["recirculation"] == "remove"
    assert rep["aif"]["gamma_variate"]["default_cbv"] == "gamma-variate first pass"


def test_ftb_map_and_weeks_since_radiation(phantom_case, tmp_path):
    out = tmp_path / "w"
    assert _analyze(phantom_case, out, "--weeks-since-radiation", "8") == 0
    ftb = np.asarray(nib.load(out / "ftb.nii.gz").dataobj)
    hyper = np.asarray(nib.load(phantom_case["lesion_hyper"]).dataobj) > 0
    hypo = np.asarray(nib.load(phantom_case["lesion_hypo"]).dataobj) > 0
    assert set(np.unique(ftb[~(hyper | hypo)])) == {0}
    rep = json.loads((out / "report.json").read_text())
    rois = {r["name"]: r for r in rep["rois"]}
    # the map's class fractions are the report's FTB fractions
    for name, m in (("roi-lesion_hyper", hyper), ("roi-lesion_hypo", hypo)):
        valid = ftb[m] > 0
        assert np.mean(ftb[m][valid] == 3) == pytest.approx(rois[name]["ftb_high"])
        assert np.mean(ftb[m][valid] == 1) == pytest.approx(rois[name]["ftb_low"])
        assert any("pseudoprogression" in x for x in rois[name]["reasons"])
    # 8 weeks < 12 (RANO 2.0): the high-rCBV lesion is recurrence or pseudoprogression, to confirm at short interval
    assert rois["roi-lesion_hyper"]["verdict"] == "possible_recurrence_or_pseudoprogression"
    assert rois["roi-lesion_hypo"]["verdict"] == "likely_treatment_effect"
    # relative peak height (ROI median gamma-variate peak / reference median): truth 3.0 and 0.6 in
    # CBV; peaks scale with CBV / MTT-dependent spread, so only the side of 1 is asserted
    assert rois["roi-lesion_hyper"]["relative_peak_height"] > 1.5 > 1 > rois["roi-lesion_hypo"]["relative_peak_height"]


# --- the command line's structure (issue 19): options defined once, one Config, no library import of cli


def _click_params(command: str) -> dict:
    import typer

    from perfusion.cli.app import app

    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


def test_analysis_option_defaults_are_the_configs():
    """analyze and batch give every Config option the Config's own default, and batch's recorded
    parameters keep their names and order (summary.json, each case's done-marker)."""
    import dataclasses

    import perfusion
    from perfusion.cli.options import batch_params

    defaults = {f.name: f.default for f in dataclasses.fields(perfusion.Config)}
    for command in ("analyze", "batch"):
        params = _click_params(command)
        shared = {k: p.default for k, p in params.items() if k in defaults}
        assert shared == {k: defaults[k] for k in shared}, command
    batch = {k: p.default for k, p in _click_params("batch").items()}
    assert list(batch_params(batch)) == ["method", "threshold", "oi_target", "leakage", "leakage_gate", "te", "tr",
                                         "rcbv_low", "rcbv_high", "aif_voxels", "aif_selection", "vof",
                                         "recirculation", "gamma_maps", "weeks_since_radiation", "bevacizumab",
                                         "steroids", "motion_correct", "html"]


def test_shared_options_share_their_help():
    """An option that analyze and batch both take is the same option: same flags, same range, same help
    (one definition in options.py; tests/test_bids.py checks that batch and bids take all of them)."""
    analyze, batch = _click_params("analyze"), _click_params("batch")
    for name in analyze.keys() & batch.keys() - {"out"}:
        assert analyze[name].opts == batch[name].opts, name
        assert analyze[name].help == batch[name].help, name


def test_batch_engine_refuses_unknown_parameters():
    from perfusion.batch.engine import analysis_config
    from perfusion.errors import UsageError

    assert analysis_config({"method": "osvd", "te": 0.03, "tr": None}).method == "osvd"
    with pytest.raises(UsageError, match="methd"):
        analysis_config({"methd": "osvd"})
    with pytest.raises(UsageError, match="--method"):
        analysis_config({"method": "fft"})


def test_no_library_module_imports_the_command_line():
    import ast
    from pathlib import Path

    import perfusion

    root = Path(perfusion.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "cli" in path.relative_to(root).parts or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("perfusion.cli")]
    assert offenders == []


def test_version_flag_prints_the_package_version(capsys):
    """``perfusion --version`` (issue 21) prints what ``perfusion version`` prints, the installed package's
    version, and exits 0; it is a flag of the top command only."""
    from importlib.metadata import version

    assert main(["--version"]) == 0
    flag = capsys.readouterr().out
    assert main(["version"]) == 0
    assert flag == capsys.readouterr().out == f"perfusion {version('dsc-perfusion')}\n"
    assert main(["analyze", "--version"]) == 2
