#!/usr/bin/env python
"""Every GPU check of the lab in one call: `python scripts/gpu_check.py [--smoke]` (see labkit.gpu_check)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo copy, installed or not

from labkit.gpu_check import main  # noqa: E402 - after the path line above

if __name__ == "__main__":
    raise SystemExit(main())
