"""The loader's fuzz target (fuzz/target.py) without atheris: the committed seeds, every input that
once crashed the loader (fuzz/regressions/) and seeded random bytes must end in a result or a clean
InputError; and the oracle must catch a loader that breaks its promises."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from perfusion.errors import InputError

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
#: Random inputs replayed, and their longest length in bytes (a few ms each).
N_RANDOM, MAX_LEN = 300, 400


def _load_target():
    spec = importlib.util.spec_from_file_location("perfusion_fuzz_target", FUZZ / "target.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


target = _load_target()


def _files(folder):
    return sorted(p for p in (FUZZ / folder).iterdir() if p.is_file())


def test_seed_corpus_and_regressions_are_committed():
    assert len(_files("corpus")) >= 10
    assert _files("regressions")


@pytest.mark.parametrize("path", _files("corpus") + _files("regressions"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_input(path):
    target.one_input(path.read_bytes())


def test_empty_input_is_the_valid_case():
    assert target.run_input(b"") == "ok series"


def test_seeded_random_inputs():
    """Random bytes reach every mutation (header fields, extensions, data, gzip damage, sidecars,
    overrides, masks, volumes); the outcomes include loads and refusals of series, masks and volumes."""
    rng = np.random.default_rng(9)
    outcomes = []
    for _ in range(N_RANDOM):
        data = rng.integers(0, 256, int(rng.integers(0, MAX_LEN))).astype(np.uint8).tobytes()
        outcomes.append(target.run_input(data))
    joined = "\n".join(outcomes)
    for expected in ("ok series", "ok mask", "ok volume", "dsc.json:", "not a readable NIfTI", "mask.nii"):
        assert expected in joined, expected
    assert sum(o.startswith("ok series") for o in outcomes) > N_RANDOM // 10


# ------------------------------------------------------------------------------ the oracle can fail


def test_oracle_lets_other_exceptions_through(monkeypatch):
    def broken(path, **kw):
        raise ValueError("a bug")

    monkeypatch.setattr(target.pio, "load_series", broken)
    with pytest.raises(ValueError, match="a bug"):
        target.one_input(b"")


@pytest.mark.parametrize("message", ["{path}: first line\nsecond line", "no file named here"])
def test_oracle_refuses_unclean_input_errors(monkeypatch, message):
    def refuse(path, **kw):
        raise InputError(message.format(path=path))

    monkeypatch.setattr(target.pio, "load_series", refuse)
    with pytest.raises(AssertionError, match="InputError message"):
        target.one_input(b"")


@pytest.mark.parametrize("spoil", ["nan", "float64", "few_frames", "te_ms", "affine"])
def test_oracle_refuses_broken_results(monkeypatch, spoil):
    load = target.pio.load_series

    def spoiled(path, **kw):
        import dataclasses

        s = load(path, **kw)
        data, changes = s.data.copy(), {}
        if spoil == "nan":
            data[0, 0, 0, 0] = np.nan
        elif spoil == "float64":
            data = data.astype(np.float64)
        elif spoil == "few_frames":
            data = np.ascontiguousarray(data[..., :3])
        elif spoil == "te_ms":
            changes["te"] = 30.0
        else:
            changes["affine"] = np.zeros((4, 4))
        return dataclasses.replace(s, data=data, **changes)

    monkeypatch.setattr(target.pio, "load_series", spoiled)
    with pytest.raises(AssertionError):
        target.one_input(b"")


def test_oracle_refuses_an_empty_mask(monkeypatch):
    monkeypatch.setattr(target.pio, "load_mask", lambda path, like, what, **kw: np.zeros(like.shape3d, bool))
    # the first input in the seeded random run that loads a mask
    rng = np.random.default_rng(9)
    for _ in range(N_RANDOM):
        data = rng.integers(0, 256, int(rng.integers(0, MAX_LEN))).astype(np.uint8).tobytes()
        try:
            target.run_input(data)
        except AssertionError as exc:
            assert "mask" in str(exc)
            return
    pytest.fail("no random input reached load_mask")


def test_complex_data_is_an_error_not_a_warning():
    """The oracle turns numpy's ComplexWarning into an error: complex data must be refused."""
    with target._quiet(), pytest.raises(np.exceptions.ComplexWarning):
        np.zeros(2, np.float32)[:] = np.ones(2, np.complex64)


def test_oracle_refuses_a_loader_that_allocates_what_the_header_claims(monkeypatch):
    peaks = iter([100.0, 100.0 + target.MAX_RSS_GROWTH_MB + 1])
    monkeypatch.setattr(target, "_peak_rss_mb", lambda: next(peaks))
    with pytest.raises(AssertionError, match="peak memory grew"):
        target.one_input(b"")



def test_oracle_refuses_a_loader_that_lets_nibabel_print(monkeypatch):
    """nibabel logs header fixes and some errors to stderr; the loader silences them (a command prints
    one line). With that silencing taken away, committed inputs fail the oracle."""
    import contextlib

    import perfusion.io.nifti as nifti

    monkeypatch.setattr(nifti, "_quiet_nibabel", contextlib.nullcontext)  # where read_image uses it
    assert target.run_input(b"") == "ok series"  # the valid case logs nothing
    failed = 0
    for path in _files("corpus") + _files("regressions"):
        try:
            target.run_input(path.read_bytes())
        except AssertionError as exc:
            assert "nibabel printed" in str(exc)
            failed += 1
    assert failed >= 1
