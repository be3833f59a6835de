"""Where things live and which profile runs: one place for environment variables."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

Profile = Literal["ci", "full"]
_PROFILES = ("ci", "full")


def labkit_home() -> Path:
    """Cache directory for written models and measurements (`LABKIT_HOME`, default ~/.cache/labkit)."""
    home = os.environ.get("LABKIT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "labkit")
    return Path(home)


def profile() -> Profile:
    """`LABKIT_PROFILE`: "ci" (small and fast, what CI runs) or "full" (the real lesson; default)."""
    value = os.environ.get("LABKIT_PROFILE", "full").strip().lower()
    if value not in _PROFILES:
        raise ValueError(f"LABKIT_PROFILE={value!r} is not one of {_PROFILES}")
    return value  # type: ignore[return-value]


_strict_override: bool | None = None


def strict() -> bool:
    """Whether a failed or missing exercise answer stops the notebook (raises `ExerciseIncomplete`).

    On in the student edition (its first cell calls `set_strict(True)`) and wherever
    `LABKIT_STRICT=1` (CI runs the instructor edition so, to catch a wrong solution or a drifted
    expectation). Off otherwise: a check prints its verdict and the notebook goes on.
    """
    if _strict_override is not None:
        return _strict_override
    value = os.environ.get("LABKIT_STRICT", "0").strip().lower()
    if value not in ("0", "1", "true", "false", ""):
        raise ValueError(f"LABKIT_STRICT={value!r}: use 1 (checks stop the notebook) or 0")
    return value in ("1", "true")


def set_strict(on: bool | None) -> None:
    """Overrides `LABKIT_STRICT` in this process (None: back to the environment variable)."""
    global _strict_override
    _strict_override = on


def repo_root() -> Path:
    """The checkout that holds this package (the lab always installs editable)."""
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The project's shipped data files (datasheets, workload presets)."""
    return repo_root() / "data"


def shared_data_dir() -> Path | None:
    """Public traces beside the checkout (../shared/data), when present; never committed."""
    for cand in (os.environ.get("LABKIT_SHARED_DATA"), repo_root().parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None
