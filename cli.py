#!/usr/bin/env python3
"""Run the perfusion command line from a checkout: ``python cli.py analyze ...``.

The installed console script ``perfusion`` runs the same app (src/perfusion/cli/app.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from perfusion.cli.app import entry  # noqa: E402

if __name__ == "__main__":
    entry()
