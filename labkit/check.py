"""One-line verdicts for the notebooks' exercises: what is right, what is not, and a hint.

Each `check_*` prints one line (✅ or ❌) and returns a `CheckResult` (truthy when it passed).
They never raise: whether a failed check stops the notebook is the exercise's business
(`labkit.exercises`), which raises `ExerciseIncomplete` in strict mode (the student edition,
or `LABKIT_STRICT=1`).
"""

from __future__ import annotations

import math
from typing import Any

MISSING_HINT = "replace the ... with your answer"


class ExerciseIncomplete(AssertionError):
    """An exercise is unsolved or wrong, in strict mode: "Run All" stops here.

    Its message names the exercise ("01 · Exercise 2 · predict a decode step: ...") and gives the hint.
    """


class CheckResult:
    """Truthy when the answer passed; its repr is the one-line verdict (shows in notebooks)."""

    def __init__(self, ok: bool, message: str, *, missing: bool = False) -> None:
        self.ok = ok
        self.message = message
        self.missing = missing  # no answer given yet (`...`, None, a stub that raises NotImplementedError)

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return self.message

    def _ipython_display_(self) -> None:
        """The verdict was printed already; a notebook shows nothing more."""


def fmt(x: float, unit: str = "") -> str:
    """A number as verdicts print it: whole numbers with thousands separators, else 4 significant
    digits; seconds under one as milliseconds."""
    x = float(x)
    if unit == "s" and 0 < abs(x) < 1:
        return f"{x * 1e3:,.4g} ms"
    text = f"{int(x):,}" if x.is_integer() and abs(x) < 1e18 else f"{x:,.4g}"
    return text + (f" {unit}" if unit else "")


def is_missing(answer: Any) -> bool:
    """True for the placeholders of the student edition: `...` and None."""
    return answer is None or answer is ...


def missing(name: str, hint: str = "", *, todo: str = MISSING_HINT) -> CheckResult:
    """The verdict for an answer not given yet; `todo` says what to do."""
    return verdict(False, f"❌ {name}: no answer yet; {todo}." + _hint(hint), missing=True)


def check_close(
    name: str, got: Any, expected: float, *, rtol: float = 0.02, hint: str = "", unit: str = ""
) -> CheckResult:
    """Passes when `got` is a number within `rtol` (relative) of `expected`."""
    g = _number(name, got, hint)
    if isinstance(g, CheckResult):
        return g
    if math.isclose(g, expected, rel_tol=rtol, abs_tol=0.0 if expected else 1e-12):
        return verdict(True, f"✅ {name}: {fmt(g, unit)} is right (expected {fmt(expected, unit)}).")
    direction = "too high" if g > expected else "too low"
    ratio = g / expected if expected else float("inf")
    return verdict(False, f"❌ {name}: {fmt(g, unit)} is {direction} ({ratio:.3g}x the expected value)." + _hint(hint))


def check_ratio(
    name: str, got: Any, reference: float, *, lo: float, hi: float, what: str = "ratio", hint: str = "", unit: str = ""
) -> CheckResult:
    """Passes when lo <= got / reference <= hi: for bounds (a prediction below a measurement) and
    for readings off a chart. `what` names the ratio in the verdict (e.g. "MBU")."""
    g = _number(name, got, hint)
    if isinstance(g, CheckResult):
        return g
    if not reference > 0:
        raise ValueError(f"reference must be > 0, got {reference!r}")
    r = g / reference
    span = f"{lo:.3g}..{hi:.3g}"
    head = f"{name}: {fmt(g, unit)} against {fmt(reference, unit)}: {what} {r:.3g}"
    if lo <= r <= hi:
        return verdict(True, f"✅ {head} (sane: {span}).")
    return verdict(False, f"❌ {head} is {'too high' if r > hi else 'too low'} (sane: {span})." + _hint(hint))


def check_true(name: str, condition: bool, *, why: str = "", hint: str = "") -> CheckResult:
    """Passes when `condition` holds; `why` says what was checked."""
    if condition:
        return verdict(True, f"✅ {name}" + (f": {why}" if why else ""))
    return verdict(False, f"❌ {name}" + (f": {why}" if why else "") + "." + _hint(hint))


def check_choice(name: str, got: Any, expected: Any, *, hint: str = "") -> CheckResult:
    """Passes when `got == expected` (strings compared case-insensitively, stripped)."""
    norm = lambda x: x.strip().lower() if isinstance(x, str) else x
    if is_missing(got):
        return missing(name, hint)
    if norm(got) == norm(expected):
        return verdict(True, f"✅ {name}: {got!r} is right.")
    return verdict(False, f"❌ {name}: {got!r} is not it." + _hint(hint))


def _number(name: str, got: Any, hint: str) -> float | CheckResult:
    """The answer as a float, or the failed verdict when it is missing or not a number."""
    if is_missing(got):
        return missing(name, hint)
    try:
        return float(got)
    except (TypeError, ValueError):
        return verdict(False, f"❌ {name}: expected a number, got {type(got).__name__} {got!r}." + _hint(hint))


def _hint(hint: str) -> str:
    return f" Hint: {hint}" if hint else ""


def verdict(ok: bool, message: str, *, missing: bool = False) -> CheckResult:
    """Prints `message` (the one-line verdict) and returns it as a CheckResult."""
    print(message)
    return CheckResult(ok, message, missing=missing)
