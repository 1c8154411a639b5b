#!/usr/bin/env bash
# Creates benchmarks/.venv-osipy: a Python 3.12 venv holding osipy (the peer compared against in
# benchmarks/peers/bench_peers.py). osipy needs Python >= 3.12 while perfusion supports 3.11, so it
# lives in its own venv and is never a dependency of the package. Idempotent: a stamp file records
# the pinned set; re-running with the same pins does nothing.
#
#   benchmarks/peers/setup_osipy.sh            # uses python3.12 on PATH, else pyenv's 3.12
#   PYTHON312=/path/to/python3.12 benchmarks/peers/setup_osipy.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$(cd "$here/.." && pwd)/.venv-osipy"
stamp="$venv/.osipy-stamp"

# Pinned: osipy 0.1.4 (Requires-Python >= 3.12; numpy >= 2, nibabel >= 5.2, pydantic, pyyaml, pydicom,
# matplotlib, dcm2niix come with it). numpy and nibabel pinned too so that re-measurements use the
# same array library.
pins=(osipy==0.1.4 numpy==2.5.5 nibabel==5.4.2)

find_python312() {
    if [[ -n "${PYTHON312:-}" ]]; then
        command -v "$PYTHON312" 2>/dev/null && return 0
        echo "setup_osipy.sh: PYTHON312=$PYTHON312 is not an executable" >&2
        return 1
    fi
    local cand
    if cand="$(command -v python3.12 2>/dev/null)" && "$cand" -c 'import sys' 2>/dev/null; then
        echo "$cand"; return 0
    fi
    for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
        if [[ -x "$cand" ]]; then
            echo "$cand"; return 0
        fi
    done
    return 1
}

if [[ -f "$stamp" && "$(head -n 1 "$stamp")" == "${pins[*]}" && -x "$venv/bin/python" ]]; then
    echo "osipy venv up to date: $venv"
    exit 0
fi

if ! py="$(find_python312)"; then
    echo "setup_osipy.sh: no Python 3.12 found (tried PYTHON312, python3.12 on PATH," >&2
    echo "  \$PYENV_ROOT/versions/3.12*/bin/python3.12, /root/.pyenv/versions/3.12*/bin/python3.12)." >&2
    echo "  Install one (e.g. 'pyenv install 3.12') or set PYTHON312=/path/to/python3.12." >&2
    exit 2
fi
if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)'; then
    echo "setup_osipy.sh: $py is not Python 3.12 ($("$py" --version 2>&1))" >&2
    exit 2
fi

echo "creating $venv with $py ($("$py" --version 2>&1))"
rm -rf "$venv"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
"$venv/bin/python" -c 'import osipy, numpy, nibabel; print("osipy", osipy.__version__, "numpy", numpy.__version__, "nibabel", nibabel.__version__)'
{ echo "${pins[*]}"; "$venv/bin/python" -m pip freeze --disable-pip-version-check; } > "$stamp"
echo "done: $venv"
