"""Build-it suites: run the learner's function on a few cases, one line per case (tiny-llm style).

A suite is a generator of `Case`s, each holding the arguments and an expected value computed
INDEPENDENTLY of the formula the learner writes (real tensors, a measurement, another code path
of labkit). `run_suite` calls the learner's function on every case and prints one line each:

    ✅ llama-3.1-8b, bfloat16: 131,072 B
    ❌ llama-3.1-70b, bfloat16: 655,360 B, expected 327,680 B (2x)

A generator is lazy: when the learner's stub still raises NotImplementedError, the suite stops
at the first case, before computing the other cases' expected values (so put a cheap case first).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from labkit.check import CheckResult, fmt, missing, verdict

Judge = Callable[[Any, "Case"], tuple[bool, str]]


@dataclass(frozen=True)
class Case:
    """One call of the learner's function and what it must return.

    judge: (got, case) -> (ok, detail); default: a number within `rtol` of `expected`.
    """

    label: str
    args: tuple[Any, ...]
    expected: Any
    rtol: float = 0.0
    unit: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    judge: Judge | None = None


def close(got: Any, case: Case) -> tuple[bool, str]:
    """The default judge: `got` is a real number within case.rtol of case.expected."""
    if isinstance(got, bool) or not isinstance(got, numbers.Real):
        return False, f"returned {type(got).__name__} {got!r}, expected a number"
    g, e = float(got), float(case.expected)
    if math.isclose(g, e, rel_tol=case.rtol, abs_tol=0.0 if e else 1e-12):
        return True, fmt(g, case.unit)
    ratio = f" ({g / e:.3g}x)" if e else ""
    return False, f"{fmt(g, case.unit)}, expected {fmt(e, case.unit)}{ratio}"


def band_judge(
    ratio: Callable[[float], float],
    band: tuple[float, float],
    describe: Callable[[float, float], str],
    *,
    below: str,
    above: str,
) -> Judge:
    """A judge for a positive number (seconds, say) held to a measurement: `ratio(got)` must land in `band`.

    describe(got, r) writes the verdict's detail; `below`/`above` are added when r falls under or over the band.
    """

    def judge(got: Any, case: Case) -> tuple[bool, str]:
        if isinstance(got, bool) or not isinstance(got, (int, float)) or not got > 0:
            return False, f"returned {got!r}, expected seconds (a positive number)"
        r = ratio(float(got))
        text = describe(float(got), r)
        lo, hi = band
        if lo <= r <= hi:
            return True, text
        return False, text + (below if r < lo else above)

    return judge


def run_suite(fn_name: str, fn: Any, cases: Iterable[Case], *, hint: str = "") -> CheckResult:
    """Calls `fn` on every case, prints one line per case, returns the suite's verdict.

    A case whose call raises counts as failed (the exception is shown); NotImplementedError
    means the function is not written yet: the suite stops and says so.
    """
    if fn is None or fn is ...:
        return missing(fn_name, hint)
    if not callable(fn):
        return verdict(False, f"❌ {fn_name}: expected a function, got {type(fn).__name__}.")
    failed: list[str] = []
    total = 0
    for case in cases:
        total += 1
        try:
            got = fn(*case.args, **case.kwargs)
        except NotImplementedError:
            return missing(fn_name, hint, todo="write the function's body (it still raises NotImplementedError)")
        except Exception as e:  # noqa: BLE001 - the learner's code: any error is a failed case, shown
            ok, detail = False, f"raised {type(e).__name__}: {e}"
        else:
            ok, detail = (case.judge or close)(got, case)
        if total == 1:
            print(f"{fn_name}:")  # after the first call: a stub stops the suite with one line only
        print(f"  {'✅' if ok else '❌'} {case.label}: {detail}")
        if not ok:
            failed.append(f"{case.label}: {detail}")
    if not total:
        raise ValueError(f"suite {fn_name!r} has no cases")
    if not failed:
        return verdict(True, f"✅ {fn_name}: all {total} cases pass.")
    return verdict(
        False,
        f"❌ {fn_name}: {len(failed)} of {total} cases fail (first: {failed[0]})." + (f" Hint: {hint}" if hint else ""),
    )
