"""Rewrites the generated sections of docs/instructor-guide.md from docs/results/ (the timing table, the
key figures per notebook, the counter-evidence line). `--check`: exit 1 when the guide is out of date.
Same as `labkit notebooks guide`."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["notebooks", "guide", *sys.argv[1:]]))
