"""Run the whole benchmark suite on this machine and write benchmarks/RESULTS.md and PNG plots.

    .venv/bin/python benchmarks/run.py [--threads 2] [--suites classify,train,...]

The same as ``pvt bench --out benchmarks``; see ``pvt.bench`` (one module per suite) for what is measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pvt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--out", str(Path(__file__).resolve().parent), *sys.argv[1:]]))
