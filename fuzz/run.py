"""The atheris driver of fuzz/target.py: coverage-guided fuzzing of the NIfTI and sidecar loader.

    python fuzz/run.py [libFuzzer flags] WORK_CORPUS SEED_DIR...

``make fuzz`` passes the flags (time, memory and per-input limits, fuzz/crashes/ for crash inputs) and
the folders: new inputs go to the first (gitignored), the committed seeds and regressions are read.
perfusion, nibabel and the target itself are instrumented for coverage; numpy and the standard
library are not (they are fuzzed only through them). Needs ``pip install -e '.[fuzz]'``.
"""

import sys
from pathlib import Path

import atheris

import numpy  # noqa: F401  imported before the hook: not instrumented

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["perfusion", "nibabel", "target"]):
    import target


def main() -> None:
    atheris.Setup(sys.argv, target.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
