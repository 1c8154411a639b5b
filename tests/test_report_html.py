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
from perfusion.report.quality import all_warnings, analysis_rows, quality_warnings

#: A ROI name with every character HTML gives a meaning to, including a script tag.
NASTY = 'roi-<script>&"x'

#: Thresholds other than the defaults (1.0, 1.75), to show the page uses the report's values.
LOW, HIGH = 0.9, 2.0

#: Figures expected with 3 ROIs: one rCBV slice per ROI on the first screen (3), the rCBV overlay,
#: CBV/CBF/MTT/TTP/Tmax/K2/FTB montages (7), AIF, and per ROI the curves and the histogram (2 x 3).
MIN_FIGURES = 3 + 1 + 7 + 1 + 2 * 3

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


# ------------------------------------------------------------------- the first screen (issue 21)


def _first_screen(page: str) -> str:
    """The page's first section: what a reader sees first and what prints on page 1."""
    start = page.index('<section class="first">')
    return page[start:page.index("</section>", start)]


def test_first_screen_holds_what_is_needed_to_act(page, folder):
    rep = json.loads((folder / "report.json").read_text())
    first = _first_screen(page)
    assert rep["case"] == {"label": None, "scan_date": None}
    assert report_html.NO_LABEL in first and report_html.NO_SCAN_DATE in first
    dsc = rep["inputs"]["dsc"]["file"]
    assert dsc.endswith("_dsc.nii.gz") and dsc not in first and dsc.removesuffix(".nii.gz") not in first
    assert first.count("<img ") == len(rep["rois"]) == 3  # one rCBV slice per lesion
    for r in rep["rois"]:
        name = report_html.esc(r["name"])
        assert f'alt="rCBV slice {name}"' in first
        assert f"{name}: <span" in first and report_html.VERDICT_WORDS[r["verdict"]] in first
        assert f"<b>[{r['rcbv_ci_low']:.2f}, {r['rcbv_ci_high']:.2f}]</b>" in first
        assert f"<b>Next step:</b> {report_html.esc(r['next_step'])}" in first
        assert f"mixed lesion: <b>{'yes' if r['mixed'] else 'no'}</b>" in first
    # the quality warnings, the same list as report.json's, before the verdicts
    assert rep["warnings"] and first.index("Quality warnings") < first.index("Verdict per ROI")
    assert f"Quality warnings ({len(rep['warnings'])})" in first
    for w in rep["warnings"]:
        assert f"<li>{report_html.esc(w)}</li>" in first
    # the details, figures and quality tables come after it
    assert page.index("</section>") < page.index("Lesion details") < page.index("Maps, all slices") < page.index(
        "<h2>Quality</h2>")


def test_case_label_and_scan_date_come_from_report_json(folder, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(folder, copy)
    rep = json.loads((copy / "report.json").read_text())
    rep["case"] = {"label": "case <7>", "scan_date": "2026-11-30"}
    (copy / "report.json").write_text(json.dumps(rep))
    first = _first_screen(report_html.build_html(copy))
    assert "<b>case &lt;7&gt;</b>" in first and "scan date 2026-11-30" in first
    assert report_html.NO_LABEL not in first and report_html.NO_SCAN_DATE not in first


def test_maps_include_ttp_and_ftb(page):
    assert 'alt="TTP montage"' in page and 'alt="FTB montage"' in page
    assert page.index('alt="CBV montage"') < page.index('alt="TTP montage"') < page.index('alt="FTB montage"')
    assert "TTP (s, scale " in page and "FTB (rCBV classes: blue &lt; 0.9, amber 0.9-2, red &gt; 2" in page


def test_print_rules(page):
    """A4 pages; the first screen on a page of its own; figures, cards and table rows never cut."""
    assert "@page{size:A4" in page and "@media print{" in page
    assert ".first{break-after:page" in page
    assert "tr,img,.fig,.verdict,.warnbox{break-inside:avoid" in page


# ------------------------------------------------------------------ figures: outlines, slices, labels


def test_largest_slice_and_reference_outline():
    mask = np.zeros((6, 6, 4), bool)
    mask[1:3, 1:3, 0] = True  # 4 voxels
    mask[1:4, 1:4, 2] = True  # 9 voxels: the largest
    mask[0, 0, 3] = True
    assert report_html.largest_slice(mask) == 2
    assert report_html.largest_slice(mask[..., ::-1]) == 1
    # scattered reference voxels, 2 apart: one region, holding every voxel; a lone voxel far off dropped
    ref = np.zeros((20, 20), bool)
    ref[4:11:2, 4:11:2] = True  # 16 voxels
    ref[18, 18] = True
    region = report_html.reference_outline(ref)
    from scipy import ndimage

    assert ndimage.label(ref)[1] == 17 and ndimage.label(region)[1] == 1
    assert region[4:11:2, 4:11:2].all() and not region[18, 18] and region[5, 5]
    assert not region[0].any() and not region[:, 0].any()
    assert not report_html.reference_outline(np.zeros((5, 5), bool)).any()


def test_roi_label_position_stays_on_the_panel():
    img = np.zeros((40, 40))
    img[10:14, 30:38] = 1  # right third: the name ends at the ROI's right edge
    assert report_html.roi_label_position(img) == (37.0, 14.5, "right", "bottom")
    img = np.zeros((40, 40))
    img[36:40, 1:5] = 1  # top-left corner: below it, from its left edge
    assert report_html.roi_label_position(img) == (1.0, 34.5, "left", "top")
    img = np.zeros((40, 40))
    img[10:12, 18:22] = 1
    assert report_html.roi_label_position(img) == (19.5, 12.5, "center", "bottom")


def test_lesion_slice_outlines_and_names_the_lesion(folder, monkeypatch):
    """The first screen's picture of a lesion: its slice of largest area, the lesion's outline drawn
    twice (black under white) and its name on the image; the reference dashed over black."""
    import nibabel as nib

    from figrecord import record
    from perfusion.io import display_grid

    rep = json.loads((folder / "report.json").read_text())
    hyper = next(r for r in rep["rois"] if r["name"] == "roi-lesion_hyper")
    img = nib.load(folder / hyper["mask_file"])
    mask = np.asarray(img.dataobj) != 0
    rcbv = np.asarray(nib.load(folder / "rcbv.nii.gz").dataobj, dtype=np.float64)
    ref = np.asarray(nib.load(folder / "reference_mask.nii.gz").dataobj) != 0
    calls = record(monkeypatch)
    report_html.fig_lesion_slice(rcbv, np.nan_to_num(rcbv), "roi-lesion_hyper", mask, ref, affine=img.affine)
    grid = display_grid(img.affine, mask.shape)
    z = grid.display_slice(report_html.largest_slice(mask))
    shown = grid.apply(mask)[:, :, z].T.astype(float)
    contours = [(x, calls[i + 1][1]) for i, (k, x) in enumerate(calls) if k == "contour"]
    lesion = [style for x, style in contours if np.array_equal(x, shown)]
    assert lesion == ["colors=['black'] linewidths=3.0 linestyles=None", "colors=['white'] linewidths=1.4 linestyles=None"]
    dashed = [style for x, style in contours if not np.array_equal(x, shown)]
    assert dashed == ["colors=['black'] linewidths=1.8 linestyles=None",
                      "colors=['#e0e0e0'] linewidths=0.9 linestyles=[(0, (3, 2))]"]
    texts = [x.split(" ", 2)[2] for k, x in calls if k == "text"]
    assert "roi-lesion_hyper" in texts
    assert [x for k, x in calls if k == "title"] == [grid.position_label(z)]


# ---------------------------------------------------------- quality warnings: one source of truth


def test_report_json_warnings_hold_the_quality_panels(folder, page):
    """Every row the quality panel marks "warning" is in report.json "warnings" (the terminal prints
    that list) and on the first screen; the phantom's baseline (bolus at frame 15, fewer than the
    consensus's 20 frames) is one."""
    rep = json.loads((folder / "report.json").read_text())
    arrival = rep["baseline"]["bolus_arrival_frame"]
    assert arrival < 20
    flagged = [r["name"] for r in check_acquisition(rep) if r["status"] == "warning"]
    flagged += [r[0] for r in analysis_rows(rep) if r[3] == "warning"]
    assert "Baseline frames" in flagged
    said = quality_warnings(rep)
    assert [w.split(":")[0] for w in said] == flagged
    assert all(w in rep["warnings"] for w in said)
    baseline = next(w for w in rep["warnings"] if w.startswith("Baseline frames: "))
    assert baseline.startswith(f"Baseline frames: {arrival} before the bolus") and "at least 20" in baseline
    assert all_warnings(rep) == rep["warnings"]  # nothing left to add: the page shows report.json's list
    assert '<td>Baseline frames</td>' in page and page.count('class="warning">warning</td>') == len(flagged)


GOOD = {
    "acquisition": {"te": 0.025, "tr": 1.5, "n_frames": 80, "flip_angle_deg": 60, "field_strength_t": 3},
    "baseline": {"start_frame": 2, "stop_frame": 25, "bolus_arrival_frame": 25},
    "aif": {"quality_score": 0.9, "absolute_quantification": True, "n_voxels": 20, "source": "automatic"},
    "fit": {"unusable_fraction": 0.01},
    "motion": {"assessed": True, "fd_max_mm": 0.1, "fd_mean_mm": 0.02, "n_frames_above_threshold": 0},
    "leakage": {"method": "bsw"},
    "warnings": [],
}


def _with(**parts):
    rep = json.loads(json.dumps(GOOD))
    for key, value in parts.items():
        rep[key] = {**rep[key], **value} if isinstance(value, dict) else value
    return rep


def test_quality_warnings_one_per_problem():
    assert quality_warnings(GOOD) == [] and all_warnings(GOOD) == []
    cases = {
        "Baseline frames: 10 before the bolus (8 used); expected tens of frames (at least 20)":
            _with(baseline={"start_frame": 2, "stop_frame": 10, "bolus_arrival_frame": 10}),
        "AIF quality score (0-1): 0.30; expected >= 0.5": _with(aif={"quality_score": 0.3}),
        "AIF absolute quantification: no;": _with(aif={"absolute_quantification": False, "quality_score": 0.45}),
        "Head motion: max FD 2.00 mm, mean 0.300 mm; expected framewise displacement <= 0.5 mm; 3 frame(s)":
            _with(motion={"fd_max_mm": 2.0, "fd_mean_mm": 0.3, "n_frames_above_threshold": 3}),
        "Head motion: not assessed;": _with(motion={"assessed": False}),
        "Brain voxels with unusable fits: 20.0 %; expected small": _with(fit={"unusable_fraction": 0.2}),
        "Leakage correction: none;": _with(leakage={"method": "none"}),
        "TR (temporal resolution): 2.5 s; expected about 1-1.5 s": _with(acquisition={"tr": 2.5}),
    }
    for start, rep in cases.items():
        said = quality_warnings(rep)
        assert any(w.startswith(start) for w in said), (start, said)
    # the absolute-quantification row flags the score row too (capped below the bar): both said
    assert len(quality_warnings(cases["AIF absolute quantification: no;"])) == 2


def test_quality_warnings_said_by_the_analysis_are_not_repeated():
    from perfusion.quantify.aif import NOT_QUANTITATIVE

    own = {
        "AIF quality score": _with(aif={"quality_score": 0.3},
                                   warnings=["AIF quality score 0.30 is poor (ok from 0.5); check the arterial voxels"]),
        "AIF absolute quantification": _with(aif={"absolute_quantification": False, "quality_score": 0.6},
                                             warnings=[f"{NOT_QUANTITATIVE} (...): tail too high"]),
        "Head motion": _with(motion={"n_frames_above_threshold": 3},
                             warnings=["head motion: 3 frame(s) with framewise displacement above 0.5 mm"]),
        "Baseline frames": _with(baseline={"start_frame": 0, "stop_frame": 4, "bolus_arrival_frame": 5},
                                 warnings=["the baseline has only 4 frames (6 s, ...)"]),
    }
    for item, rep in own.items():
        assert not any(w.startswith(item) for w in quality_warnings(rep)), item
        assert all_warnings(rep) == rep["warnings"] + quality_warnings(rep)
    # an older report.json without the quality checks' sentences gets them on the page, once each
    old = _with(leakage={"method": "none"}, warnings=["an analysis warning"])
    assert all_warnings(old) == ["an analysis warning", quality_warnings(old)[0]]
    assert all_warnings({**old, "warnings": all_warnings(old)}) == all_warnings(old)


def test_first_screen_shows_failed_gates_and_the_mixed_flag(folder, tmp_path):
    """A lesion that is not assessable shows the gates that failed and its own next step; a mixed one
    says so (report.json as an analysis with those outcomes writes it)."""
    copy = tmp_path / "out"
    shutil.copytree(folder, copy)
    rep = json.loads((copy / "report.json").read_text())
    gated, mixed = rep["rois"][0], rep["rois"][1]
    gated.update(verdict="not_assessable", gates_failed=["too few valid voxels (12 < 20)"],
                 next_step="Redraw the ROI on the enhancing lesion.")
    mixed.update(verdict="indeterminate", mixed=True)
    (copy / "report.json").write_text(json.dumps(rep))
    first = _first_screen(report_html.build_html(copy))
    assert "Gates failed: too few valid voxels (12 &lt; 20)" in first
    assert "<b>Next step:</b> Redraw the ROI on the enhancing lesion." in first
    assert first.count("mixed lesion: <b>yes</b>") == 1
    assert report_html.VERDICT_COLOUR["not_assessable"] in first and report_html.VERDICT_COLOUR["indeterminate"] in first
