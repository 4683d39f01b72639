"""Rebuild the digits mini-benchmark (PIE-Bench format) in ddim_lab/assets/digits-pie.

Usage: python scripts/build_digits_pie.py [OUT_DIR]   (deterministic; see ddim_lab/data/digits_pie.py)
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from ddim_lab.data.digits_pie import build

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "ddim_lab" / "assets" / "digits-pie"


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(argv[0]) if argv else DEFAULT_OUT
    if out.exists():
        shutil.rmtree(out)
    build(out)


if __name__ == "__main__":
    main(sys.argv[1:])
