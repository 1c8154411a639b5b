"""Case discovery for ``perfusion batch`` (perfusion.batch.discovery) on real folder trees in tmp_path.

Discovery reads file names only, so most files are empty placeholders; the DSC series and one mask per
tree are real NIfTI files written with nibabel, as a dataset would hold. Nothing here reads images.
"""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from perfusion.batch.discovery import Case, discover
from perfusion.errors import InputError, UsageError


def _nifti(path: Path, shape=(3, 3, 2, 16)) -> Path:
    """A tiny real NIfTI (4-D for series, pass a 3-D shape for masks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.float32), np.eye(4)), str(path))
    return path


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _sidecar(dsc: Path) -> Path:
    name = dsc.name.removesuffix(".gz").removesuffix(".nii")
    return _touch(dsc.with_name(name + ".json"), json.dumps({"EchoTime": 0.03, "RepetitionTime": 1.5}))


def _by_id(cases: list[Case]) -> dict[str, Case]:
    return {c.case_id: c for c in cases}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime, to show discovery writes nothing."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------------------ BIDS


@pytest.fixture
def bids(tmp_path):
    """Two subjects: sub-01 with sessions 01 and 02, sub-02 without sessions but with runs 1 and 2.

    derivatives/lesions holds per-session brain, nawm, tumor, edema masks for sub-01, one
    session-less AIF mask (applies to both sessions), a run-1 tumor mask for sub-02 (not run 2) and a
    run-less brain mask for sub-02 (both runs); each mask has a JSON sidecar, which is no mask.
    """
    root = tmp_path / "ds"
    _touch(root / "dataset_description.json", json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    _touch(root / "participants.tsv", "participant_id\nsub-01\nsub-02\n")
    s1 = _nifti(root / "sub-01/ses-01/perf/sub-01_ses-01_dsc.nii.gz")
    _sidecar(s1)
    _nifti(root / "sub-01/ses-02/perf/sub-01_ses-02_dsc.nii.gz")  # no sidecar
    _touch(root / "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz")
    for run in (1, 2):
        _sidecar(_touch(root / f"sub-02/perf/sub-02_run-{run}_dsc.nii.gz"))
    d = root / "derivatives/lesions"
    _touch(d / "dataset_description.json", "{}")
    for ses in ("01", "02"):
        base = d / f"sub-01/ses-{ses}/perf"
        for label in ("brain", "nawm", "tumor") + (("edema",) if ses == "02" else ()):
            path = base / f"sub-01_ses-{ses}_label-{label}_mask.nii.gz"
            _nifti(path, (3, 3, 2)) if label == "brain" else _touch(path)
            _touch(path.with_name(path.name.replace(".nii.gz", ".json")), "{}")
    _touch(d / "sub-01/perf/sub-01_label-aif_mask.nii.gz")
    _touch(d / "sub-02/perf/sub-02_run-1_label-tumor_mask.nii.gz")
    _touch(d / "sub-02/perf/sub-02_label-brain_mask.nii.gz")
    _touch(d / "sub-02/perf/sub-02_desc-x_mask.nii.gz")  # no label: not a mask of ours
    return root


def test_bids_cases_and_masks_by_entities(bids):
    before = _tree(bids)
    layout, cases = discover(bids)
    assert _tree(bids) == before  # nothing written, nothing touched
    assert layout == "bids"
    assert [c.case_id for c in cases] == ["sub-01_ses-01", "sub-01_ses-02", "sub-02_run-1", "sub-02_run-2"]
    c = _by_id(cases)
    root = bids.absolute()
    d = root / "derivatives/lesions"

    s1 = c["sub-01_ses-01"]
    assert s1.problem is None
    assert s1.dsc == root / "sub-01/ses-01/perf/sub-01_ses-01_dsc.nii.gz"
    assert s1.sidecar == root / "sub-01/ses-01/perf/sub-01_ses-01_dsc.json"
    assert s1.out_rel == Path("sub-01/ses-01/perf")
    assert s1.prefix == "sub-01_ses-01"
    assert s1.brain == d / "sub-01/ses-01/perf/sub-01_ses-01_label-brain_mask.nii.gz"
    assert s1.reference == d / "sub-01/ses-01/perf/sub-01_ses-01_label-nawm_mask.nii.gz"
    assert s1.aif == d / "sub-01/perf/sub-01_label-aif_mask.nii.gz"  # session-less: every session
    assert s1.rois == (d / "sub-01/ses-01/perf/sub-01_ses-01_label-tumor_mask.nii.gz",)

    s2 = c["sub-01_ses-02"]
    assert s2.problem is None and s2.sidecar is None  # a missing sidecar is no discovery problem
    assert s2.brain == d / "sub-01/ses-02/perf/sub-01_ses-02_label-brain_mask.nii.gz"
    assert s2.aif == s1.aif
    assert [p.name for p in s2.rois] == ["sub-01_ses-02_label-edema_mask.nii.gz",
                                         "sub-01_ses-02_label-tumor_mask.nii.gz"]

    r1, r2 = c["sub-02_run-1"], c["sub-02_run-2"]
    assert r1.out_rel == r2.out_rel == Path("sub-02/perf")  # one folder, as in the raw tree; the prefixes differ
    assert (r1.prefix, r2.prefix) == ("sub-02_run-1", "sub-02_run-2")
    assert r1.brain == r2.brain == d / "sub-02/perf/sub-02_label-brain_mask.nii.gz"  # run-less: every run
    assert r1.rois == (d / "sub-02/perf/sub-02_run-1_label-tumor_mask.nii.gz",)
    assert r2.rois == ()  # the run-1 mask is not given to run 2
    assert r2.problem is None and any("no lesion mask" in n for n in r2.notes)
    assert r1.reference is None and r1.aif is None


def test_bids_session_mask_not_given_to_session_less_series(tmp_path):
    root = tmp_path / "ds"
    _touch(root / "sub-01/perf/sub-01_dsc.nii.gz")
    _touch(root / "derivatives/p/sub-01/ses-01/perf/sub-01_ses-01_label-tumor_mask.nii.gz")
    _touch(root / "derivatives/p/sub-01/perf/sub-01_acq-hi_label-brain_mask.nii.gz")  # DSC has no acq-
    layout, [case] = discover(root)  # auto: a sub-* folder makes it BIDS
    assert layout == "bids"
    assert case.rois == () and case.brain is None and case.problem is None


def test_bids_two_masks_of_a_unique_kind_is_a_problem(bids):
    other = bids / "derivatives/other/sub-01/ses-01/perf/sub-01_ses-01_label-brain_mask.nii.gz"
    _touch(other)
    _, cases = discover(bids)
    c = _by_id(cases)
    problem = c["sub-01_ses-01"].problem
    assert problem is not None and "2 brain masks" in problem and str(other.absolute()) in problem
    assert "\n" not in problem
    assert c["sub-01_ses-01"].brain is None
    assert c["sub-01_ses-02"].problem is None  # other cases are untouched


def test_bids_same_roi_name_from_two_pipelines_is_a_problem(bids):
    _touch(bids / "derivatives/other/sub-01/ses-02/perf/sub-01_ses-02_label-tumor_mask.nii.gz")
    _, cases = discover(bids)
    problem = _by_id(cases)["sub-01_ses-02"].problem
    assert problem is not None and "two ROIs named 'sub-01_ses-02_label-tumor_mask'" in problem


def test_bids_file_name_must_agree_with_folders(tmp_path):
    root = tmp_path / "ds"
    _touch(root / "dataset_description.json", "{}")
    _touch(root / "sub-01/ses-01/perf/sub-02_ses-01_dsc.nii.gz")
    _touch(root / "sub-03/ses-01/perf/sub-03_dsc.nii.gz")
    _, cases = discover(root)
    c = _by_id(cases)
    assert "differs from its folder sub-01" in c["sub-02_ses-01"].problem
    assert "session (no ses-) differs from its folder (ses-01)" in c["sub-03"].problem
    assert c["sub-03"].out_rel == Path("sub-03/ses-01/perf")


def test_bids_duplicate_case_ids_get_a_problem_each(tmp_path):
    root = tmp_path / "ds"
    _touch(root / "dataset_description.json", "{}")
    a = _touch(root / "sub-01/perf/sub-01_dsc.nii")
    b = _touch(root / "sub-01/perf/sub-01_dsc.nii.gz")
    _touch(root / "sub-02/perf/sub-02_dsc.nii.gz")
    _, cases = discover(root)
    assert [c.case_id for c in cases] == ["sub-01", "sub-01", "sub-02"]  # never renamed
    first, second = cases[0], cases[1]
    assert {first.dsc, second.dsc} == {a.absolute(), b.absolute()}
    for case, other in ((first, second), (second, first)):
        assert case.problem is not None and "case id 'sub-01'" in case.problem and str(other.dsc) in case.problem
    assert cases[2].problem is None


def test_plain_case_ids_equal_up_to_letter_case_are_a_problem(tmp_path):
    _touch(tmp_path / "Case1/dsc.nii.gz")
    _touch(tmp_path / "case1/dsc.nii.gz")
    if len(list(tmp_path.iterdir())) < 2:
        pytest.skip("case-insensitive file system: one folder")
    _, cases = discover(tmp_path)
    assert all(c.problem and "case id" in c.problem for c in cases)


def test_bids_skips_hidden_derivatives_sourcedata_and_outside_symlinks(bids, tmp_path):
    for folder in ("derivatives/x", "sourcedata", ".hidden", "code", "stimuli"):
        _touch(bids / folder / "sub-09/perf/sub-09_dsc.nii.gz")
    _touch(bids / "sub-08/perf/.sub-08_dsc.nii.gz")  # hidden file
    _touch(bids / ".sub-07/perf/sub-07_dsc.nii.gz")  # hidden folder
    # a subject folder that is a symlink to outside the dataset: skipped, with a warning
    outside = tmp_path / "elsewhere"
    _touch(outside / "sub-05/perf/sub-05_dsc.nii.gz")
    (bids / "sub-05").symlink_to(outside / "sub-05", target_is_directory=True)
    # a subject folder that is a symlink inside the dataset: kept
    _touch(bids / "sourcedata/staged/sub-04/perf/sub-04_dsc.nii.gz")
    (bids / "sub-04").symlink_to(bids / "sourcedata/staged/sub-04", target_is_directory=True)
    # a mask that is a symlink to outside: not used
    _touch(outside / "sub-04_label-tumor_mask.nii.gz")
    link = bids / "derivatives/lesions/sub-04/perf/sub-04_label-tumor_mask.nii.gz"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside / "sub-04_label-tumor_mask.nii.gz")
    # a mask that is a symlink inside: used
    inside = _touch(bids / "derivatives/lesions/store/brain.nii.gz")
    (link.parent / "sub-04_label-brain_mask.nii.gz").symlink_to(inside)

    with pytest.warns(UserWarning, match="outside") as record:
        _, cases = discover(bids)
    warned = " ".join(str(w.message) for w in record)
    assert "sub-05" in warned and "sub-04_label-tumor_mask" in warned
    ids = [c.case_id for c in cases]
    assert ids == ["sub-01_ses-01", "sub-01_ses-02", "sub-02_run-1", "sub-02_run-2", "sub-04"]
    sub04 = _by_id(cases)["sub-04"]
    assert sub04.dsc == bids.absolute() / "sub-04/perf/sub-04_dsc.nii.gz"  # the path as found, not resolved
    assert sub04.rois == () and sub04.brain == link.parent.absolute() / "sub-04_label-brain_mask.nii.gz"


def test_bids_explicit_derivatives_folder_outside_root(bids, tmp_path):
    ext = tmp_path / "external-derivs"
    ext_mask = _touch(ext / "seg/sub-02/perf/sub-02_run-2_label-necrosis_mask.nii.gz")
    _, cases = discover(bids, derivatives=ext)
    c = _by_id(cases)
    assert c["sub-02_run-2"].rois == (ext_mask.absolute(),)
    assert c["sub-01_ses-01"].brain is None  # root/derivatives is replaced, not added
    with pytest.raises(InputError, match="derivatives folder not found"):
        discover(bids, derivatives=tmp_path / "nope")


def test_broken_symlink_dsc_is_a_case_with_a_problem(tmp_path):
    root = tmp_path / "ds"
    perf = root / "sub-01/perf"
    perf.mkdir(parents=True)
    (perf / "sub-01_dsc.nii.gz").symlink_to(root / ".git/annex/objects/XX/missing")
    _, [case] = discover(root)
    assert case.dsc is not None and "missing file" in case.problem and "fetch" in case.problem


# ----------------------------------------------------------------------------------------- plain


@pytest.fixture
def plain(tmp_path):
    root = tmp_path / "cases"
    good = root / "good"
    _sidecar(_nifti(good / "perf_series.nii.gz"))
    _nifti(good / "roi-tumor.nii.gz", (3, 3, 2))
    _touch(good / "roi-edema.nii")
    _touch(good / "mask-brain.nii.gz")
    _touch(good / "mask-reference.nii.gz")
    _touch(good / "Mask-AIF.nii.gz")  # case-insensitive
    _touch(good / "notes.txt")
    _touch(root / "two/dsc_a.nii.gz")
    _touch(root / "two/dsc_b.nii")
    _touch(root / "two/roi-x.nii.gz")
    _touch(root / "unknown/dsc.nii.gz")
    _touch(root / "unknown/mask-xyz.nii.gz")
    (root / "empty").mkdir()
    _touch(root / "docs/readme.md")
    _touch(root / ".cache/dsc.nii.gz")
    _touch(root / "derivatives/dsc.nii.gz")
    _touch(root / "sourcedata/dsc.nii.gz")
    _touch(root / "loose_file.nii.gz")
    return root


def test_plain_layout(plain):
    before = _tree(plain)
    layout, cases = discover(plain)
    assert _tree(plain) == before
    assert layout == "plain"
    assert [c.case_id for c in cases] == ["good", "two", "unknown"]
    good, two, unknown = cases
    g = plain.absolute() / "good"
    assert good.problem is None
    assert good.dsc == g / "perf_series.nii.gz" and good.sidecar == g / "perf_series.json"
    assert good.rois == (g / "roi-edema.nii", g / "roi-tumor.nii.gz")
    assert (good.brain, good.reference, good.aif) == (g / "mask-brain.nii.gz", g / "mask-reference.nii.gz",
                                                     g / "Mask-AIF.nii.gz")
    assert good.out_rel == Path("good") and good.prefix is None

    assert two.dsc is None
    assert "2 DSC candidates (dsc_a.nii.gz, dsc_b.nii)" in two.problem and str(plain.absolute() / "two") in two.problem
    assert two.rois == (plain.absolute() / "two/roi-x.nii.gz",)

    assert unknown.dsc == plain.absolute() / "unknown/dsc.nii.gz" and unknown.sidecar is None
    assert "mask-xyz.nii.gz: unknown mask kind" in unknown.problem
    assert "mask-brain, mask-reference or mask-aif" in unknown.problem
    assert "no lesion ROI" in unknown.notes[0]
    assert all("\n" not in (c.problem or "") for c in cases)


def test_plain_folder_with_only_masks_has_no_dsc(tmp_path):
    _touch(tmp_path / "a/roi-x.nii.gz")
    _, [case] = discover(tmp_path, layout="plain")
    assert case.dsc is None and "no DSC series" in case.problem


def test_plain_forced_on_a_bids_looking_tree(tmp_path):
    _touch(tmp_path / "sub-01/dsc.nii.gz")
    with pytest.raises(InputError, match="plain layout"):
        discover(tmp_path)  # auto picks BIDS (sub-* folder), which has no perf/*_dsc
    layout, [case] = discover(tmp_path, layout="plain")
    assert layout == "plain" and case.case_id == "sub-01" and case.problem is None


def test_plain_outside_symlinks(tmp_path):
    root, outside = tmp_path / "cases", tmp_path / "outside"
    _touch(outside / "c9/dsc.nii.gz")
    _touch(outside / "roi-far.nii.gz")
    _touch(root / "c1/dsc.nii.gz")
    (root / "c1/roi-far.nii.gz").symlink_to(outside / "roi-far.nii.gz")
    (root / "c1/roi-near.nii.gz").symlink_to(root / "c1/dsc.nii.gz")  # inside: kept (odd but allowed)
    (root / "c9").symlink_to(outside / "c9", target_is_directory=True)
    with pytest.warns(UserWarning, match="outside"):
        _, cases = discover(root)
    [case] = cases
    assert case.rois == (root.absolute() / "c1/roi-near.nii.gz",)


# -------------------------------------------------------------------------------------- patterns


def test_bids_patterns_with_sub_and_ses(bids):
    lesions = bids / "derivatives/manual"
    _touch(lesions / "sub-01/ses-01/t1_tumor.nii.gz")
    _touch(lesions / "sub-01/ses-02/t1_tumor.nii.gz")
    _touch(lesions / "sub-01/ses-02/t2_tumor.nii.gz")
    _touch(lesions / "sub-01/ses-02/t2_tumor.json")  # not NIfTI: ignored
    _, cases = discover(bids, roi_globs=("derivatives/manual/sub-{sub}/ses-{ses}/*_tumor.nii.gz",),
                        aif_glob="derivatives/**/sub-{sub}_run-{run}_label-tumor_mask.nii.gz")
    c = _by_id(cases)
    m = bids.absolute() / "derivatives/manual/sub-01"
    assert c["sub-01_ses-01"].rois == (m / "ses-01/t1_tumor.nii.gz",)
    assert c["sub-01_ses-02"].rois == (m / "ses-02/t1_tumor.nii.gz", m / "ses-02/t2_tumor.nii.gz")
    # the other kinds still come from derivatives
    assert c["sub-01_ses-01"].brain.name == "sub-01_ses-01_label-brain_mask.nii.gz"
    assert c["sub-01_ses-01"].reference.name == "sub-01_ses-01_label-nawm_mask.nii.gz"
    # sub-01 has no run: the AIF pattern cannot be filled, a problem naming the pattern
    assert "needs {run}" in c["sub-01_ses-01"].problem and c["sub-01_ses-01"].aif is None
    # sub-02 has no session: the ROI pattern cannot be filled; run-1's AIF pattern found a file via **
    assert "needs {ses}" in c["sub-02_run-1"].problem
    assert c["sub-02_run-1"].aif.name == "sub-02_run-1_label-tumor_mask.nii.gz"
    assert any("matched no NIfTI" in n for n in c["sub-02_run-2"].notes)  # no run-2 file: a note


def test_plain_patterns_with_case_placeholder(tmp_path):
    root = tmp_path / "cases"
    for name in ("p1", "p2"):
        _touch(root / name / "series.nii.gz")
        _touch(root / name / f"{name}_brain.nii.gz")  # would be a 2nd DSC candidate without the pattern
        _touch(root / name / "lesions" / "a.nii.gz")
        _touch(root / name / "lesions" / "b.nii.gz")
    _, cases = discover(root, roi_globs=("lesions/*.nii.gz",), brain_glob="{case}_brain.nii*")
    for case in cases:
        d = root.absolute() / case.case_id
        assert case.problem is None
        assert case.dsc == d / "series.nii.gz"
        assert case.brain == d / f"{case.case_id}_brain.nii.gz"
        assert case.rois == (d / "lesions/a.nii.gz", d / "lesions/b.nii.gz")


def test_brain_pattern_with_two_matches_is_a_problem(tmp_path):
    _touch(tmp_path / "c/series.nii.gz")
    _touch(tmp_path / "c/brain1.nii.gz")
    _touch(tmp_path / "c/brain2.nii.gz")
    _, [case] = discover(tmp_path, brain_glob="brain*.nii.gz")
    assert "2 brain masks" in case.problem and case.dsc.name == "series.nii.gz"


@pytest.mark.parametrize("kwargs, match", [
    ({"roi_globs": ("/abs/*.nii.gz",)}, "relative"),
    ({"roi_globs": ("../x/*.nii.gz",)}, r"'\.\.'"),
    ({"brain_glob": "sub-{subject}/*.nii.gz"}, r"unknown placeholder \{subject\}"),
    ({"layout": "plain", "brain_glob": "{sub}.nii.gz"}, r"use \{case\}"),
    ({"layout": "plain", "derivatives": Path("d")}, "BIDS layout only"),
    ({"layout": "flat"}, "choose one of auto, bids, plain"),
])
def test_bad_options_are_usage_errors(bids, kwargs, match):
    with pytest.raises(UsageError, match=match):
        discover(bids, **kwargs)


# ---------------------------------------------------------------------------------------- errors


def _input_error(root, **kw) -> str:
    with pytest.raises(InputError) as info:
        discover(root, **kw)
    msg = str(info.value)
    assert "\n" not in msg and str(root) in msg
    return msg


def test_root_errors(tmp_path):
    assert "not found" in _input_error(tmp_path / "missing")
    assert "is not a folder" in _input_error(_touch(tmp_path / "file.nii.gz"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no case found" in _input_error(empty)
    (empty / "only").mkdir()  # a sub-folder without NIfTI is no case
    _touch(empty / "only" / "readme.txt")
    assert "no case found" in _input_error(empty)
    assert "no DSC series found" in _input_error(empty, layout="bids")
    loose = tmp_path / "loose"
    _touch(loose / "dsc.nii.gz")
    assert "own sub-folder" in _input_error(loose)


def test_bids_tissue_class_masks_are_not_scored_as_lesions(bids):
    """label-WM / label-CSF / label-vein masks (segmentation outputs beside the lesion masks) are not
    lesion ROIs: a WM mask would be scored (rCBV near 1, a verdict). Each gets a note naming it."""
    d = bids / "derivatives/seg/sub-01/ses-01/perf"
    for label in ("WM", "csf", "vein"):
        _touch(d / f"sub-01_ses-01_label-{label}_mask.nii.gz")
    _, cases = discover(bids)
    s1 = _by_id(cases)["sub-01_ses-01"]
    assert s1.rois == (bids / "derivatives/lesions/sub-01/ses-01/perf/sub-01_ses-01_label-tumor_mask.nii.gz",)
    assert s1.problem is None
    said = [n for n in s1.notes if "not a lesion" in n]
    assert len(said) == 3 and any("label WM is white matter" in n for n in said)
    assert "sub-01_ses-02" in _by_id(cases) and not [n for n in _by_id(cases)["sub-01_ses-02"].notes
                                                      if "not a lesion" in n]
