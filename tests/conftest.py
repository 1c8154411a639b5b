"""Shared fixtures. Tolerances used across the suite, each named once with its reason:

- KERNEL_RTOL 1e-10: a numba kernel against its numpy twin; only summation order differs.
- Phantom tolerances are set in test_phantom.py beside the numbers they guard.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

KERNEL_RTOL = 1e-10
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference-data"
DATA = Path(__file__).resolve().parents[1] / "src" / "perfusion" / "data"  # package data (OSIPI CSV)


@pytest.fixture(scope="session")
def phantom_case(tmp_path_factory):
    """The default phantom (SNR 150, TR 1.5 s, seed 0) written once as a case folder."""
    from perfusion.cli.phantom import run_phantom

    out = tmp_path_factory.mktemp("phantom") / "case"
    paths = run_phantom(out=out, quiet=True)
    return paths


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``, by relative path."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _shared_case_is_never_modified(request):
    """Every test that uses the shared phantom case (all the CLI runs on it) must leave its files as
    they were: inputs are opened read-only (issue 9). Checked by content hash before and after."""
    if "phantom_case" not in request.fixturenames:
        yield
        return
    folder = request.getfixturevalue("phantom_case")["dsc"].parent
    before = folder_digest(folder)
    yield
    assert folder_digest(folder) == before, f"a test or the command it ran modified the input case {folder}"


@pytest.fixture
def case_copy(phantom_case, tmp_path):
    """A private copy of the phantom case folder, for tests that alter files."""
    src = phantom_case["dsc"].parent
    dst = tmp_path / "case"
    shutil.copytree(src, dst)
    return {k: dst / Path(v).relative_to(src) for k, v in phantom_case.items()}


def shared_dir(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"reference data {path} not present (it lives in ../shared/reference-data)")
    return path


def blob_texture(shape) -> "np.ndarray":
    """1 plus four smooth blobs centred on different slices (x, y, z as fractions of the grid, in-plane
    radius, amplitude): a time-constant, asymmetric intensity pattern for the registration tests
    (test_motion, test_anat). The phantom is a cylinder whose baseline is a uniform disk: only structure
    that changes from slice to slice fixes the tilt, and no rotation about its axis shows without it."""
    import numpy as np

    x, y, z = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    nx, ny, nz = shape
    t = np.ones(shape)
    for cx, cy, cz, r, a in ((0.30, 0.65, 0.1, 0.10, 0.6), (0.70, 0.30, 0.9, 0.08, 0.5),
                             (0.62, 0.72, 0.5, 0.06, -0.4), (0.40, 0.25, 0.3, 0.07, 0.5)):
        t += a * np.exp(-((x - cx * nx) ** 2 + (y - cy * ny) ** 2) / (2 * (r * nx) ** 2)
                        - (z - cz * (nz - 1)) ** 2 / (2 * 0.8 ** 2))
    return t
