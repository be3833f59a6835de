"""Notebook 05's exercises: goodput from per-request records (build-it, then the lab scores its sweep
with it), which mode keeps the lower p99 inter-token latency under load (predict, then measure), why
the winner changes with the SLO (explain, as a multiple choice graded on a measured run), and where
short prompts stop favouring mono (read the chart of the committed run)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from labkit.bench.metrics import SLO, RequestRecord, summarize
from labkit.bench.repeats import Interval
from labkit.check import CheckResult, check_choice, check_close, fmt, verdict
from labkit.exercises.core import Example, exercise
from labkit.exercises.suite import Case, run_suite

# --- Exercise 1 · goodput from per-request records (build-it) --------------------------------


def _rec(ttft: float, gaps: Sequence[float], ok: bool = True) -> RequestRecord:
    r = RequestRecord(0, 100, len(gaps) + 1, ok=ok)
    if ok:
        r.ttft_s, r.itl_s, r.output_tokens = ttft, list(gaps), len(gaps) + 1
        r.e2e_s = ttft + sum(gaps)
    else:
        r.error = "HTTP 503"
    return r


def _hand_cases() -> list[tuple[str, list[RequestRecord], SLO, float, float]]:
    """(label, records, SLO, duration_s, goodput written by hand) with known answers."""
    smooth = [0.1] * 4
    return [
        ("every request meets a TTFT bound", [_rec(0.5, smooth), _rec(0.8, smooth)], SLO(ttft_s=1.0), 2.0, 1.0),
        ("a failed request is never good", [_rec(0.5, smooth), _rec(0.5, smooth, ok=False)], SLO(ttft_s=1.0), 2.0, 0.5),
        ("exactly at the TTFT bound meets it", [_rec(0.5, smooth), _rec(1.0, smooth)], SLO(ttft_s=0.5), 4.0, 0.25),
        ("TPOT over its bound", [_rec(0.2, [0.3] * 4), _rec(0.2, smooth)], SLO(tpot_s=0.2), 1.0, 1.0),
        (
            "one long gap breaks an ITL bound, though TPOT is fine",
            [_rec(0.2, [0.05] * 9 + [0.6]), _rec(0.2, [0.1] * 10)],
            SLO(tpot_s=0.2, itl_s=0.5),
            2.0,
            0.5,
        ),
        ("a gap exactly at the ITL bound meets it", [_rec(0.2, [0.1, 0.25, 0.1])], SLO(itl_s=0.25), 1.0, 1.0),
        ("bounds left unset are not checked", [_rec(9.0, [3.0, 3.0]), _rec(0.1, smooth, ok=False)], SLO(), 3.0, 1 / 3),
        ("a one-token answer (no gaps, TPOT 0)", [_rec(0.3, [])], SLO(ttft_s=0.5, tpot_s=0.01, itl_s=0.01), 0.5, 2.0),
        ("an end-to-end bound", [_rec(0.2, [0.2] * 5), _rec(0.2, [0.1] * 5)], SLO(e2e_s=1.0), 2.0, 0.5),
        ("no requests at all", [], SLO(ttft_s=1.0), 1.0, 0.0),
    ]


def _goodput_cases(runs: Sequence[Any], slos: Mapping[str, SLO]) -> Iterator[Case]:
    for label, recs, slo, dur, by_hand in _hand_cases():
        lab = summarize(recs, dur, slo).goodput_rps
        if not math.isclose(lab, by_hand, rel_tol=1e-12, abs_tol=1e-12):  # the two sources must agree
            raise RuntimeError(f"goodput case {label!r}: labkit.bench.metrics says {lab}, the hand count {by_hand}")
        yield Case(f"{label} ({slo.describe()})", (recs, slo, dur), by_hand, rtol=1e-9, unit="req/s")
    for name, slo in slos.items():
        for res in runs:
            expected = summarize(res.records, res.summary.duration_s, slo).goodput_rps
            yield Case(
                f"{res.meta.get('label') or 'a run'}: {len(res.records)} real requests, {name}",
                (res.records, slo, res.summary.duration_s),
                expected,
                rtol=1e-9,
                unit="req/s",
            )


def reference_goodput(records: Sequence[RequestRecord], slo: SLO, duration_s: float) -> float:
    """The function the learner writes (the tests' right answer, never an expected value)."""

    def met(r: RequestRecord) -> bool:
        return r.ok and all(
            bound is None or value <= bound
            for value, bound in (
                (r.ttft_s, slo.ttft_s),
                (r.tpot_s, slo.tpot_s),
                (max(r.itl_s, default=0.0), slo.itl_s),
                (r.e2e_s, slo.e2e_s),
            )
        )

    return sum(met(r) for r in records) / duration_s


def _goodput_examples() -> list[Example]:
    def strict_less(recs, slo, dur):
        return (
            sum(
                r.ok
                and (slo.ttft_s is None or r.ttft_s < slo.ttft_s)
                and (slo.itl_s is None or max(r.itl_s, default=0) < slo.itl_s)
                and (slo.tpot_s is None or r.tpot_s < slo.tpot_s)
                and (slo.e2e_s is None or r.e2e_s < slo.e2e_s)
                for r in recs
            )
            / dur
        )

    def a_count(recs, slo, dur):
        return reference_goodput(recs, slo, 1.0)

    def counts_failed(recs, slo, dur):
        return sum(not r.ok or (slo.ttft_s is None or r.ttft_s <= slo.ttft_s) for r in recs) / dur

    def mean_gap_only(recs, slo, dur):
        return reference_goodput(recs, SLO(slo.ttft_s, slo.tpot_s, None, slo.e2e_s), dur)

    def share(recs, slo, dur):
        return reference_goodput(recs, slo, dur) * dur / max(1, len(recs))

    return [Example(right=reference_goodput, wrong=[strict_less, counts_failed, mean_gap_only, share, a_count])]


@exercise(
    "05",
    1,
    "goodput from per-request records",
    kind="build-it",
    hint="count the requests with ok=True whose ttft_s, tpot_s, every gap in itl_s and e2e_s are each <= the "
    "SLO's bound (a bound that is None is not checked), then divide by duration_s",
    examples=_goodput_examples,
)
def check_goodput(
    fn: Callable[[Sequence[RequestRecord], SLO, float], float],
    *,
    runs: Sequence[Any] = (),
    slos: Mapping[str, SLO] | None = None,
) -> CheckResult:
    """Runs the learner's `goodput(records, slo, duration_s)` on ten hand-built runs whose answers were
    counted by hand (errors, a request exactly at a bound, one long gap under an ITL bound, unset
    bounds, a one-token answer, an empty run), then on `runs` (BenchResults of the notebook's sweep)
    under each of `slos`. Expected: `labkit.bench.metrics.summarize`'s goodput, another code path
    (it also agrees with every hand count, or the suite stops)."""
    return run_suite("goodput", fn, _goodput_cases(runs, slos or {}), hint=check_goodput.hint)


# --- Exercise 2 · the lower p99 inter-token latency under load (predict, then measure) ------


def _itl_examples() -> list[Example]:
    from labkit import reference

    out = [
        Example(
            right="1p1d",
            wrong=["mono", "vllm"],
            label="made up: 1p1d clearly lower",
            context={"p99_itl_ms": {"mono": Interval(900, 700, 1300, ()), "1p1d": Interval(200, 180, 260, ())}},
        ),
        Example(
            right="mono",
            wrong=["nobody", 3],
            label="made up: overlapping intervals accept either",
            context={"p99_itl_ms": {"mono": Interval(200, 150, 260, ()), "1p1d": Interval(230, 170, 300, ())}},
        ),
    ]
    gains = reference.gains()
    if gains is not None:
        conv = gains.workloads["conversation"]
        top = max(r.rate_rps for r in conv.rows)
        out.append(
            Example(
                right="1p1d",
                wrong=["mono"],
                label="the committed 2-core run, highest rate",
                context={
                    "p99_itl_ms": {
                        r.mode: Interval(r.itl_p99_ms, r.itl_p99_ms, r.itl_p99_ms, ())
                        for r in conv.rows
                        if r.rate_rps == top
                    }
                },
            )
        )
    return out


@exercise(
    "05",
    2,
    "the lower p99 inter-token latency under load",
    kind="predict-then-measure",
    hint="in mono every prompt that arrives is computed in the same engine as the running decodes: each "
    "stalls them all once; in 1P1D prompts run in the prefill worker",
    examples=_itl_examples,
)
def check_itl_guess(answer: Any, *, p99_itl_ms: Mapping[str, Interval]) -> CheckResult:
    """The mode the learner named before the sweep, against the pooled p99 ITL measured per mode at the
    highest rate (with bootstrap intervals): right when it is the lowest, or its interval overlaps the
    lowest one's (the run cannot tell them apart)."""
    lowest = min(p99_itl_ms, key=lambda m: p99_itl_ms[m].value)
    ok_modes = [m for m, iv in p99_itl_ms.items() if m == lowest or iv.overlaps(p99_itl_ms[lowest])]
    where = ", ".join(f"{m} {fmt(iv.value, 'ms')} [{iv.lo:,.0f}, {iv.hi:,.0f}]" for m, iv in p99_itl_ms.items())
    guess = answer.strip().lower() if isinstance(answer, str) else answer
    expected = guess if guess in ok_modes else lowest
    return check_choice(f"lowest p99 ITL at the highest rate ({where})", guess, expected, hint=check_itl_guess.hint)


# --- Exercise 3 · why the winner changes with the SLO (explain, as a multiple choice) --------

FLIP_OPTIONS = {
    "a": (
        "Mono computes each prompt on all the cores, so its first tokens come sooner; but every prompt it "
        "computes stalls all of its running decodes, so its requests break an inter-token bound that 1P1D's keep."
    ),
    "b": "1P1D makes every token faster than mono, so it wins whatever the SLO.",
    "c": "Both modes space their tokens alike; 1P1D only pays for a later first token (the KV transfer).",
}


def flip_options(
    stats: Mapping[str, Mapping[str, float]], baseline: str = "mono", contender: str = "1p1d"
) -> dict[str, bool]:
    """Which of FLIP_OPTIONS a run supports, from per-mode `ttft_p50_ms`, `itl_p99_ms`, `tpot_p50_ms` at one rate."""
    b, c = stats[baseline], stats[contender]
    stall = b["itl_p99_ms"] / c["itl_p99_ms"]
    return {
        "a": b["ttft_p50_ms"] < c["ttft_p50_ms"] and stall > 1.5,
        "b": c["tpot_p50_ms"] < 0.8 * b["tpot_p50_ms"] and c["ttft_p50_ms"] < b["ttft_p50_ms"],
        "c": 1 / 1.5 <= stall <= 1.5,
    }


def reference_flip_stats() -> dict[str, dict[str, float]] | None:
    """Per mode, at the committed 2-core run's lowest conversation rate: TTFT p50, p99 ITL, TPOT p50 (ms)."""
    from labkit import reference

    gains = reference.gains()
    if gains is None:
        return None
    rows = gains.workloads["conversation"].rows
    low = min(r.rate_rps for r in rows)
    return {
        r.mode: {"ttft_p50_ms": r.ttft_p50_ms, "itl_p99_ms": r.itl_p99_ms, "tpot_p50_ms": r.tpot_p50_ms}
        for r in rows
        if r.rate_rps == low
    }


def _flip_examples() -> list[Example]:
    mine = {
        "mono": {"ttft_p50_ms": 300.0, "itl_p99_ms": 300.0, "tpot_p50_ms": 60.0},
        "1p1d": {"ttft_p50_ms": 700.0, "itl_p99_ms": 90.0, "tpot_p50_ms": 70.0},
    }
    return [
        Example(right="a", wrong=["b", "c"], context={"reference": reference_flip_stats()}),
        Example(
            right="a",
            wrong=["b", "c"],
            context={"reference": reference_flip_stats(), "mine": mine},
            label="with a run of one's own",
        ),
    ]


@exercise(
    "05",
    3,
    "why the winner changes with the SLO",
    kind="multiple-choice",
    hint="compare the two modes' TTFT p50 and p99 ITL at the lowest rate: which bound does each break?",
    examples=_flip_examples,
)
def check_flip_explanation(
    answer: Any,
    *,
    reference: Mapping[str, Mapping[str, float]] | None,
    mine: Mapping[str, Mapping[str, float]] | None = None,
) -> CheckResult:
    """The sentence the committed 2-core run supports, picked by evaluating each option on its data (TTFT
    p50, p99 ITL, TPOT p50 per mode at the lowest rate); fails loudly if that data no longer singles out
    one option. `mine`: the same figures from the learner's run, said beside (it may differ on a GPU)."""
    if reference is None:
        return verdict(True, "⚠️ the committed gains run is not in this checkout: exercise 3 is not checked.")
    truth = [k for k, ok in flip_options(reference).items() if ok]
    if len(truth) != 1:
        raise RuntimeError(
            f"the committed gains run supports options {truth}, not exactly one: exercise 3 needs new options"
        )
    if mine is not None:
        yours = [k for k, ok in flip_options(mine).items() if ok]
        print(
            f"Your own run supports {', '.join(yours) if yours else 'none of the options'} "
            f"(the committed 2-core run: {truth[0]})."
        )
    guess = answer.strip().lower()[:1] if isinstance(answer, str) else answer
    return check_choice("the explanation the committed run supports", guess, truth[0], hint=check_flip_explanation.hint)


# --- Exercise 4 · where short prompts stop favouring mono (read the chart) -------------------


def first_load_where_contender_wins(
    rows: Sequence[Any], fractions: Sequence[float], *, baseline: str = "mono", contender: str = "1p1d"
) -> float | None:
    """The lowest load (a multiple of mono's one-at-a-time rate, `fractions` in rate order) at which
    the contender's goodput is above the baseline's, in serving rows; None when it never is."""
    rates = sorted({r.rate_rps for r in rows})
    if len(rates) != len(fractions):
        raise ValueError(f"{len(rates)} rates but {len(fractions)} load fractions")
    good = {(r.mode, r.rate_rps): r.goodput_rps for r in rows}
    for rate, frac in zip(rates, sorted(fractions)):
        if good[(contender, rate)] > good[(baseline, rate)]:
            return float(frac)
    return None


def _crossing_examples() -> list[Example]:
    from labkit import reference

    gains = reference.gains()
    ctx = {
        "rows": gains.workloads["short_prompt"].rows if gains else (),
        "fractions": gains.rate_fractions if gains else (),
    }
    return [Example(right=1.0, wrong=[0.5, 1.5, "never"], context=ctx, label="the committed short-prompt run")]


@exercise(
    "05",
    4,
    "where short prompts stop favouring mono",
    kind="read-the-chart",
    hint="on the reference chart of short prompts, follow both goodput lines from the left: where is 1P1D's "
    "first above mono's? Give that load (a multiple of mono's one-at-a-time rate)",
    examples=_crossing_examples,
)
def check_short_crossing(answer: Any, *, rows: Sequence[Any], fractions: Sequence[float]) -> CheckResult:
    """A load read off the committed short-prompt chart, against the first swept load at which 1P1D's
    goodput is above mono's in that run's rows (within 10%: the loads are far apart)."""
    if not rows:
        return verdict(True, "⚠️ the committed gains run is not in this checkout: exercise 4 is not checked.")
    truth = first_load_where_contender_wins(rows, fractions)
    if truth is None:
        raise RuntimeError("in the committed short-prompt run 1P1D never beats mono: exercise 4 needs a new question")
    return check_close(
        "the lowest load at which 1P1D serves more goodput than mono (short prompts)",
        answer,
        truth,
        rtol=0.1,
        unit="x",
        hint=check_short_crossing.hint,
    )
