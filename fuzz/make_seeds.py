"""Write the committed seed corpus fuzz/corpus/: small inputs of fuzz/target.py, one per kind of
outcome (a loaded series, each kind of InputError, masks and volumes loaded or refused), chosen from
seeded random bytes so that the seeds are the same on every machine.

    .venv/bin/python fuzz/make_seeds.py    (replaces the files in fuzz/corpus/)
"""

import hashlib
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import target  # noqa: E402

#: Inputs tried, and seeds kept at most; inputs are at most MAX_LEN bytes.
TRIES, MAX_SEEDS, MAX_LEN = 4000, 48, 256


def kind(outcome: str) -> str:
    """An outcome without its numbers, values and paths: "ok series; ok mask", "/dsc.nii: only # frames..."."""
    outcome = re.sub(r"\(.*?\)", "(...)", outcome.replace(".nii.gz", ".nii"))
    outcome = re.sub(r"(TE|TR|Time) (\S+) from", r"\1 # from", outcome)
    return re.sub(r"-?\d[\d.e+-]*", "#", outcome)[:120]


def main() -> None:
    rng = np.random.default_rng(20240909)
    seeds = {kind(target.run_input(b"")): b""}
    for _ in range(TRIES):
        if len(seeds) >= MAX_SEEDS:
            break
        data = rng.integers(0, 256, int(rng.integers(1, MAX_LEN))).astype(np.uint8).tobytes()
        seeds.setdefault(kind(target.run_input(data)), data)
    corpus = HERE / "corpus"
    corpus.mkdir(exist_ok=True)
    for old in corpus.iterdir():
        old.unlink()
    for outcome, data in seeds.items():
        (corpus / f"seed-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)
    print(f"{len(seeds)} seeds in {corpus}:")
    for outcome in seeds:
        print(f"  {outcome}")


if __name__ == "__main__":
    main()
