"""Where things live and which profile runs: one place for environment variables."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

Profile = Literal["ci", "full", "gpu"]
_PROFILES = ("ci", "full", "gpu")


def labkit_home() -> Path:
    """Cache directory for written models and measurements (`LABKIT_HOME`, default ~/.cache/labkit)."""
    home = os.environ.get("LABKIT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "labkit")
    return Path(home)


def profile() -> Profile:
    """`LABKIT_PROFILE`: "ci" (small and fast, what CI runs), "full" (the real lesson on a CPU) or
    "gpu" (the real shapes on a CUDA GPU). Unset: "gpu" where CUDA works, else "full"."""
    value = os.environ.get("LABKIT_PROFILE", "").strip().lower()
    if not value:
        return "gpu" if cuda_available() else "full"
    if value not in _PROFILES:
        raise ValueError(f"LABKIT_PROFILE={value!r} is not one of {_PROFILES}")
    return value  # type: ignore[return-value]  # checked against _PROFILES just above


def cuda_available() -> bool:
    """True when torch is installed with CUDA and sees a GPU (False without torch: nothing imported twice)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


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
