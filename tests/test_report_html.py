"""report.html from a real analyze output folder: content, self-containment, escaping, the CLI command,
and the small data functions behind the figures."""

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest

from perfusion import DISCLAIMER

from perfusion.report import html as report_html
from perfusion.cli.app import main
from perfusion.report.html import check_acquisition, histogram_data, slices_with_roi

#: A ROI name with every character HTML gives a meaning to, including a script tag.
NASTY = 'roi-<script>&"x'

#: Thresholds other than the defaults (1.0, 1.75), to show the page uses the report's values.
LOW, HIGH = 0.9, 2.0

#: Figures expected with 3 ROIs: rCBV overlay, CBV/CBF/MTT/Tmax/K2 montages (5), AIF, and per ROI the
#: curves and the histogram (2 x 3).
MIN_FIGURES = 1 + 5 + 1 + 2 * 3

IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from perfusion.cli.phantom import run_phantom

    base = tmp_path_factory.mktemp("report_html")
    case = run_phantom(out=base / "case", quiet=True)
    nasty = base / "rois" / f"{NASTY}.nii.gz"
    nasty.parent.mkdir()
    shutil.copy(case["lesion_hyper"], nasty)
    out = base / "out"
    code = main(["analyze", str(case["dsc"]), "--out", str(out), "--roi", str(case["lesion_hyper"]),
                 "--roi", str(case["lesion_hypo"]), "--roi", str(nasty), "--rcbv-low", str(LOW),
                 "--rcbv-high", str(HIGH), "-q"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def page(folder):
    return report_html.build_html(folder)


def test_verdicts_and_disclaimer(page, folder):
    rep = json.loads((folder / "report.json").read_text())
    assert page.count(DISCLAIMER) >= 1
    assert len(rep["rois"]) == 3
    for r in rep["rois"]:
        assert report_html.VERDICT_WORDS[r["verdict"]] in page
        assert r["next_step"] in page
    verdicts = {r["name"]: r["verdict"] for r in rep["rois"]}
    assert verdicts["roi-lesion_hyper"] == "likely_recurrence"
    assert verdicts["roi-lesion_hypo"] == "likely_treatment_effect"
    assert "Boxerman" in page and "AIF quality score" in page


def test_self_contained(page):
    assert len(IMG_RE.findall(page)) >= MIN_FIGURES
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:|//)', page, flags=re.I)
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page.lower() and "@import" not in page and "@font-face" not in page


def test_every_png_decodes_and_is_not_blank(page):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    pngs = IMG_RE.findall(page)
    assert pngs
    for data in pngs:
        raw = base64.b64decode(data, validate=True)
        assert raw.startswith(report_html.PNG_SIGNATURE)
        pixels = plt.imread(io.BytesIO(raw), format="png")
        assert pixels.ndim == 3 and pixels.std() > 0


def test_names_from_files_are_escaped(page):
    assert NASTY not in page
    assert "roi-&lt;script&gt;&amp;&quot;x" in page


def test_cli_report_writes_the_page(folder):
    target = folder / "report.html"
    target.unlink(missing_ok=True)
    assert main(["report", str(folder), "-q"]) == 0
    text = target.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not [p for p in folder.iterdir() if p.name.startswith(".report.html.")]  # no temp file left


def test_cli_report_without_report_json(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "report.json" in err and "Traceback" not in err


def test_histograms_use_the_reports_thresholds(folder, monkeypatch):
    seen = []
    real = report_html.fig_histogram
    monkeypatch.setattr(report_html, "fig_histogram", lambda h, name="": seen.append(h["lines"]) or real(h, name))
    report_html.build_html(folder)
    assert seen == [[LOW, HIGH]] * 3


def test_missing_roi_file_is_noted(folder, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(folder, copy)
    rep = json.loads((copy / "report.json").read_text())
    # a report of an earlier version: inputs by path; the input mask was moved since
    rep["inputs"] = {str(folder.parent / v["file"]).replace("roi-lesion_hypo", "roi-lesion_hypo_moved"): v["sha256"]
                     for v in rep["inputs"].values()}
    (copy / "report.json").write_text(json.dumps(rep))
    # the folder's own copy of the mask is found first, so the moved input does not matter ...
    assert "ROI roi-lesion_hypo: mask file not found" not in report_html.build_html(copy)
    # ... and only without the copy is the missing mask noted
    hypo = next(r for r in rep["rois"] if r["name"] == "roi-lesion_hypo")
    (copy / hypo["mask_file"]).unlink()
    page = report_html.build_html(copy)
    assert "ROI roi-lesion_hypo: mask file not found" in page
    assert report_html.VERDICT_WORDS["likely_treatment_effect"] in page  # the verdict is still shown


def test_roi_mask_copies_have_portable_names(folder):
    """Each ROI mask is copied into the output folder under a portable name recorded in report.json,
    with the input's voxels."""
    import nibabel as nib

    rep = json.loads((folder / "report.json").read_text())
    names = {r["name"]: r["mask_file"] for r in rep["rois"]}
    assert names[NASTY] == "mask-roi-_script___x.nii.gz"
    assert names["roi-lesion_hyper"] == "mask-roi-lesion_hyper.nii.gz"
    for name, f in names.items():
        copy = np.asarray(nib.load(str(folder / f)).dataobj)
        src = rep["inputs"][f"roi:{name}"]["file"]
        assert src == f"{name}.nii.gz"
        np.testing.assert_array_equal(copy != 0, np.asarray(nib.load(folder.parent / ("rois" if name == NASTY else "case") / src).dataobj) != 0)
        assert json.loads((folder / f.replace(".nii.gz", ".json")).read_text())["Units"] == "mask"


def test_slices_with_roi():
    mask = np.zeros((4, 5, 6), bool)
    assert slices_with_roi(mask) == []
    mask[1, 2, 1] = True
    mask[0:2, 0:2, 4] = True
    assert slices_with_roi(mask) == [1, 4]
    assert slices_with_roi(mask.astype(np.uint8)) == [1, 4]


def test_histogram_data():
    values = np.array([0.5, 1.2, 1.3, 3.0, 7.0, -1.0, np.nan])
    h = histogram_data(values, 1.0, 1.75, bins=10, value_range=(0.0, 5.0))
    assert h["lines"] == [1.0, 1.75]
    assert h["n"] == 6 and h["n_clipped"] == 2  # NaN dropped; 7.0 and -1.0 lie outside 0-5
    assert h["counts"].sum() == 6 and len(h["edges"]) == 11
    # bins of 0.5: -1 -> [0, 0.5), 0.5 -> [0.5, 1), 1.2 and 1.3 -> [1, 1.5), 3.0 -> [3, 3.5), 7 -> last bin
    np.testing.assert_array_equal(h["counts"], [1, 1, 2, 0, 0, 0, 1, 0, 0, 1])
    assert h["median"] == pytest.approx(1.25)


def _acq(**kw):
    acq = {"te": 0.025, "tr": 1.5, "n_frames": 80, "flip_angle_deg": 60, "field_strength_t": 3}
    acq.update(kw)
    return {"acquisition": acq, "baseline": {"start_frame": 2, "stop_frame": 25, "bolus_arrival_frame": 25}}


def _status(rep):
    return {r["name"]: r["status"] for r in check_acquisition(rep)}


def test_acquisition_consensus():
    assert set(_status(_acq()).values()) == {"ok"}
    s = _status(_acq(te=0.025, field_strength_t=1.5))
    assert s["TE"] == "warning" and s["Field strength"] == "ok"  # 25 ms is short for 1.5 T (40-50 ms)
    assert _status(_acq(te=0.045, field_strength_t=1.5))["TE"] == "ok"
    assert _status(_acq(flip_angle_deg=90))["Flip angle"] == "warning"
    assert _status(_acq(flip_angle_deg=30))["Flip angle"] == "ok"
    assert _status(_acq(tr=2.5))["TR (temporal resolution)"] == "warning"
    s = _status(_acq(field_strength_t=None, flip_angle_deg=None))
    assert s["Field strength"] == s["TE"] == s["Flip angle"] == "warning"
    short = _acq()
    short["baseline"]["bolus_arrival_frame"] = 10
    assert _status(short)["Baseline frames"] == "warning"


def test_k2_scale_ignores_the_brain_edge():
    brain = np.zeros((9, 9, 2), bool)
    brain[1:8, 1:8, :] = True
    k2 = np.where(brain, 1e-4, np.nan)
    k2[1, :, :] = 1e-2  # an edge row of outliers, as partial-volume fits give
    assert report_html.k2_limit(k2, brain) == pytest.approx(1e-4)
    assert report_html.k2_limit(np.zeros((3, 3, 1)), np.ones((3, 3, 1), bool)) > 0  # flat map: non-zero width
