"""Config (config.py) and the typed results (results.py), issue 19: every choice list exists once (the
Literal types) and agrees with the stage modules that implement the choices; an invalid option is
refused when the Config is made, with the command line's message; the report entries write exactly
the dicts of earlier versions; a Result cannot be changed after it is made."""

import dataclasses

import numpy as np
import pytest

from perfusion import config
from perfusion.config import Config
from perfusion.errors import UsageError
from perfusion.results import Leakage, Motion, Reference, Standardized, VenousOutput


def test_choice_lists_agree_with_the_stage_modules():
    from perfusion.quantify import deconvolution, leakage, motion

    assert config.METHODS == (*deconvolution.METHODS, "model")
    assert set(config.LEAKAGE_METHODS) == {"none", *leakage.METHODS}
    assert config.LEAKAGE_CHOICES == ("auto", *config.LEAKAGE_METHODS)
    assert config.MOTION_MODES == motion.MODES
    assert config.VOF_WITHOUT_FILE == ("none", "guarded", "auto")
    assert config.DEFAULT_LEAKAGE_SINGLE in config.LEAKAGE_METHODS
    assert config.DEFAULT_LEAKAGE_MULTI_ECHO in config.LEAKAGE_METHODS


@pytest.mark.parametrize("option, message", [
    ({"method": "svd"}, "--method svd: choose one of osvd, csvd, ssvd, tikhonov, model"),
    ({"leakage": "x"}, "--leakage x: choose auto or one of none, bsw, bidirectional, residue"),
    ({"leakage_gate": "x"}, "--leakage-gate x: choose one of lesion, voxel, none"),
    ({"rcbv_low": 2.0, "rcbv_high": 1.0}, "rCBV thresholds must satisfy 0 < low < high, got 2.0 and 1.0"),
    ({"aif_selection": "x"}, "--aif-selection x: choose cluster or rank"),
    ({"vof": "x"}, "--vof x: choose none, guarded, auto or a mask file"),
    ({"recirculation": "x"}, "--recirculation x: choose keep or remove"),
    ({"aif_voxels": 0}, "--aif-voxels must be at least 1"),
    ({"motion_correct": "x"}, "--motion-correct x: choose auto, on or off"),
    ({"leakage_plausible": ("x",)}, "leakage_plausible x: choose from none, bsw, bsw_gated, residue, bidirectional"),
    ({"mixed_fraction": 0.0}, "mixed_fraction must lie in (0, 1], got 0.0"),
])
def test_an_invalid_option_is_refused_when_the_config_is_made(option, message):
    with pytest.raises(UsageError) as err:
        Config(**option)
    assert str(err.value) == message
    with pytest.raises(UsageError):  # a Config changed by replace is validated again
        dataclasses.replace(Config(), **option)


def test_resolve_leakage_makes_auto_concrete():
    class Series:
        echoes = ()

    class MultiEcho:
        echoes = ("e1", "e2")

    assert config.resolve_leakage(Config(), Series()).leakage == config.DEFAULT_LEAKAGE_SINGLE
    assert config.resolve_leakage(Config(), MultiEcho()).leakage == config.DEFAULT_LEAKAGE_MULTI_ECHO
    assert config.resolve_leakage(Config(leakage="none"), MultiEcho()).leakage == "none"


def test_the_public_config_is_this_one():
    import perfusion

    assert perfusion.Config is Config


def test_entries_write_the_dicts_of_earlier_versions():
    """Key order included: "guarded" lists the measurements before "applied", the other modes after it;
    optional fields that are None are left out; a non-optional None (the reference's fallback) is kept."""
    assert VenousOutput(source="none").as_report() == {"source": "none"}
    guarded = VenousOutput(source="automatic", mode="guarded", applied=False, n_voxels=3, scale_factor=1.0,
                           vof_area_ratio=9.0, why="w")
    assert list(guarded.as_report()) == ["source", "mode", "n_voxels", "scale_factor", "vof_area_ratio", "applied", "why"]
    forced = VenousOutput(source="automatic", mode="auto", applied=True, n_voxels=3, scale_factor=1.2)
    assert list(forced.as_report()) == ["source", "mode", "applied", "n_voxels", "scale_factor"]
    assert Leakage(method="none", gate="lesion").as_report() == {"method": "none", "gate": "lesion"}
    ref = Reference(source="mask.nii.gz", automatic=False, side="left", fallback=None, hemispheres={}, n_voxels=12,
                    cbv_median=2.0, cbv_iqr=(1.5, 2.5), plausibility={"problem": None},
                    standardized=Standardized(landmarks=None, rois={}, why_not="flat"))
    assert ref.as_report() == {"source": "mask.nii.gz", "automatic": False, "side": "left", "fallback": None,
                               "hemispheres": {}, "n_voxels": 12, "cbv_median": 2.0, "cbv_iqr": [1.5, 2.5],
                               "plausibility": {"problem": None},
                               "standardized": {"landmarks": None, "rois": {}, "why_not": "flat"}}
    assert ref.problem == ""
    assert dataclasses.fields(Reference)[[f.name for f in dataclasses.fields(Reference)].index("cbv_median")] \
        .metadata["units"] == "mL/100 g"


def test_motion_keeps_every_key_of_its_entry():
    entry = {"assessed": False, "correction": "auto", "applied": False, "reason": "too few frames"}
    assert Motion.of(entry).as_report() == entry
    full = Motion.of({"assessed": True, "correction": "on", "applied": True, "frames_corrected": [3, 4],
                      "timeseries": {"fd_mm": np.zeros(3)}})
    assert full.as_report() == {"assessed": True, "correction": "on", "applied": True, "frames_corrected": [3, 4]}
    with pytest.raises(TypeError):  # a key report.json would lose
        Motion.of({**entry, "new_key": 1})


def test_a_result_cannot_be_changed(phantom_case):
    import perfusion

    case = perfusion.load_case(phantom_case["dsc"])
    result = perfusion.analyze(case, Config(method="osvd", motion_correct="off", leakage="none"))
    for obj, name in ((result, "warnings"), (result.aif, "source"), (result.reference, "cbv_median"),
                      (result.leakage, "method"), (result.motion, "applied")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)
    assert result.leakage.as_report() == {"method": "none", "gate": "lesion"}
