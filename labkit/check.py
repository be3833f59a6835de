"""Auto-checks for the notebooks' exercises: one line that says what is right or wrong."""
from __future__ import annotations

import math
from typing import Any


class CheckResult:
    """Truthy when the answer passed; its repr is the one-line verdict (shows in notebooks)."""

    def __init__(self, ok: bool, message: str) -> None:
        self.ok = ok
        self.message = message

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return self.message

    def _ipython_display_(self) -> None:
        """The verdict was printed already; a notebook shows nothing more."""


def check_close(name: str, got: Any, expected: float, *, rtol: float = 0.02, hint: str = "", unit: str = "") -> CheckResult:
    """Passes when `got` is a number within `rtol` (relative) of `expected`."""
    u = f" {unit}" if unit else ""
    if got is None or got is ...:
        return _say(False, f"❌ {name}: no answer yet; replace the ... with your value." + (f" Hint: {hint}" if hint else ""))
    try:
        g = float(got)
    except (TypeError, ValueError):
        return _say(False, f"❌ {name}: expected a number, got {type(got).__name__} {got!r}.")
    if math.isclose(g, expected, rel_tol=rtol, abs_tol=0.0 if expected else 1e-12):
        return _say(True, f"✅ {name}: {g:,.4g}{u} is right (expected {expected:,.4g}{u}).")
    direction = "too high" if g > expected else "too low"
    ratio = g / expected if expected else float("inf")
    msg = f"❌ {name}: {g:,.4g}{u} is {direction} ({ratio:.3g}x the expected value)."
    return _say(False, msg + (f" Hint: {hint}" if hint else ""))


def check_true(name: str, condition: bool, *, why: str = "", hint: str = "") -> CheckResult:
    """Passes when `condition` holds; `why` says what was checked."""
    if condition:
        return _say(True, f"✅ {name}" + (f": {why}" if why else ""))
    return _say(False, f"❌ {name}" + (f": {why}" if why else "") + (f". Hint: {hint}" if hint else ""))


def check_choice(name: str, got: Any, expected: Any, *, hint: str = "") -> CheckResult:
    """Passes when `got == expected` (strings compared case-insensitively)."""
    norm = lambda x: x.strip().lower() if isinstance(x, str) else x  # noqa: E731
    if got is ... or got is None:
        return _say(False, f"❌ {name}: no answer yet.")
    if norm(got) == norm(expected):
        return _say(True, f"✅ {name}: {got!r} is right.")
    return _say(False, f"❌ {name}: {got!r} is not it." + (f" Hint: {hint}" if hint else ""))


def _say(ok: bool, message: str) -> CheckResult:
    print(message)
    return CheckResult(ok, message)
