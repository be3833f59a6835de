"""Notebook 04's exercises: which worker streams what (predict, then measure), the router's prefill
choice (build-it, then a live router runs it), what disaggregation does to the worst decode stall
(multiple choice, graded on the run), and how long a request waits for its KV over a link
(predict, then measure)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from labkit.check import CheckResult, check_choice, check_close, check_ratio, verdict
from labkit.exercises.core import Example, exercise
from labkit.exercises.suite import Case, run_suite
from labkit.serve.routing import PrefillCandidate

# --- Exercise 1 · how many tokens the decode worker streams (predict, then measure) -----------


def _decode_tokens_examples() -> list[Example]:
    return [
        Example(
            right=15,
            wrong=[16, 0, 17],
            context={"max_tokens": 16, "streamed_by_decode": 15},
            label="a request of 16 tokens",
        )
    ]


@exercise(
    "04",
    1,
    "tokens the decode worker streams",
    kind="predict-then-measure",
    hint="the prefill worker runs the prompt and already samples one token from its last position; "
    "the decode worker makes the others",
    examples=_decode_tokens_examples,
)
def check_decode_tokens(answer: Any, *, max_tokens: int, streamed_by_decode: int) -> CheckResult:
    """The learner's count, predicted before the request is sent, against the tokens the decode worker
    really streamed for a request of `max_tokens` (counted from its NDJSON stream)."""
    return check_close(
        f"tokens streamed by the decode worker for max_tokens={max_tokens}",
        answer,
        streamed_by_decode,
        rtol=0.0,
        hint=check_decode_tokens.hint,
    )


# --- Exercise 2 · the router's prefill choice (build-it) ------------------------------------


def reference_choose_prefill(block_hashes: Sequence[bytes], candidates: Sequence[PrefillCandidate]) -> PrefillCandidate:
    """The rule the learner writes (the tests' right answer, never an expected value)."""
    return min(candidates, key=lambda c: (-c.matched_blocks, c.in_flight))


def _cand(name: str, matched: int, in_flight: int, free: int = 500, total: int = 1000) -> PrefillCandidate:
    return PrefillCandidate(name, matched, in_flight, free, total)


def _describe(c: PrefillCandidate) -> str:
    blocks = "block" if c.matched_blocks == 1 else "blocks"
    return f"{c.name} ({c.matched_blocks} {blocks} cached, {c.in_flight} in flight)"


def _same_choice(expected: PrefillCandidate) -> Callable[[Any, Case], tuple[bool, str]]:
    """A choice is right when it is one of the candidates with the expected (cached blocks, load):
    the rule says nothing about candidates equal on both."""

    def judge(got: Any, case: Case) -> tuple[bool, str]:
        candidates = case.args[1]
        if not any(got is c or got == c for c in candidates):
            return False, f"returned {got!r}: return one of the candidates (the object itself, not its name)"
        if (got.matched_blocks, got.in_flight) == (expected.matched_blocks, expected.in_flight):
            return True, _describe(got)
        return False, f"{_describe(got)}, expected {_describe(expected)}"

    return judge


def _hashes(n: int, rng: random.Random) -> list[bytes]:
    from labkit.serve.prefix_index import block_hashes

    return block_hashes([rng.randrange(256) for _ in range(16 * n)], 16)


def _routing_cases(random_cases: int = 16, seed: int = 4) -> Iterator[Case]:
    from labkit.serve.routing import load_policy

    rng = random.Random(seed)
    hashes = _hashes(6, rng)
    hand = [  # known answers, written by hand: (label, candidates, the right one's index)
        ("one worker", [_cand("prefill0", 0, 3)], 0),
        ("nothing cached anywhere: the least loaded", [_cand("prefill0", 0, 3), _cand("prefill1", 0, 1)], 1),
        ("a cached prefix beats a lighter load", [_cand("prefill0", 0, 0), _cand("prefill1", 4, 2)], 1),
        (
            "the longest cached prefix wins",
            [_cand("prefill0", 2, 0), _cand("prefill1", 5, 3), _cand("prefill2", 3, 0)],
            1,
        ),
        (
            "equal prefixes: the least loaded",
            [_cand("prefill0", 3, 2), _cand("prefill1", 3, 1), _cand("prefill2", 1, 0)],
            1,
        ),
        ("a partial match still counts", [_cand("prefill0", 1, 4), _cand("prefill1", 0, 0)], 0),
    ]
    for label, cands, right in hand:
        yield Case(label, (hashes, cands), cands[right].name, judge=_same_choice(cands[right]))
    # Random cases against the lab's registered policy: another code path, and it breaks exact ties its own way.
    policy = load_policy("prefix-then-load")
    for i in range(random_cases):
        n = rng.randint(2, 5)
        depth = rng.randint(1, len(hashes))
        cands = [
            _cand(
                f"prefill{k}",
                rng.choice([0, 0, depth // 2, depth, depth]),
                rng.randint(0, 4),
                rng.randint(0, 1000),
                1000,
            )
            for k in range(n)
        ]
        expected = policy(hashes[:depth], cands)
        yield Case(
            f"random case {i + 1}: {n} workers", (hashes[:depth], cands), expected.name, judge=_same_choice(expected)
        )


def _routing_examples() -> list[Example]:
    load_only = lambda h, cs: min(cs, key=lambda c: c.in_flight)
    first = lambda h, cs: cs[0]
    shortest = lambda h, cs: min(cs, key=lambda c: (c.matched_blocks, c.in_flight))
    by_name = lambda h, cs: reference_choose_prefill(h, cs).name
    busiest_tie = lambda h, cs: min(cs, key=lambda c: (-c.matched_blocks, -c.in_flight))
    most_free = lambda h, cs: max(cs, key=lambda c: c.free_kv_blocks)
    return [
        Example(right=reference_choose_prefill, wrong=[load_only, first, shortest, by_name, busiest_tie, most_free])
    ]


@exercise(
    "04",
    2,
    "the router's prefill choice",
    kind="build-it",
    hint="pick the candidate with the most matched_blocks; among those, the fewest in_flight; return the "
    "candidate itself",
    examples=_routing_examples,
)
def check_choose_prefill(
    fn: Callable[[Sequence[bytes], Sequence[PrefillCandidate]], PrefillCandidate],
    *,
    live: Any = None,
    cacheable_tokens: int | None = None,
) -> CheckResult:
    """Runs the learner's `choose_prefill(block_hashes, candidates)` on six hand-built cases with known
    answers, then on 16 random ones against the lab's registered `prefix-then-load` policy (another code
    path: `labkit.serve.routing`). Candidates equal in cached blocks and load are all accepted.

    With `live` (a `labkit.bench.prefix_routing.PrefixRoutingRun` of a router that ran `fn`): instead,
    the prompt tokens the prefill workers' engines did not compute (their prefix caches served them)
    against `cacheable_tokens`, the most a cache could serve for those requests: equal when every
    follow-up went to the worker that held its document.
    """
    if live is not None:
        if cacheable_tokens is None:
            raise ValueError("a live run is checked against cacheable_tokens")
        return check_close(
            f"{live.label}: prompt tokens the prefill caches served ({live.ok} requests)",
            live.cached_tokens,
            cacheable_tokens,
            rtol=0.0,
            unit="tokens",
            hint=check_choose_prefill.hint,
        )
    return run_suite("choose_prefill", fn, _routing_cases(), hint=check_choose_prefill.hint)


# --- Exercise 3 · the worst decode stall, disaggregated (multiple choice) --------------------

STALL_OPTIONS = {
    "a": "about as long as mono's (within a factor of two either way): the decode worker still waits for the long prompt",
    "b": "less than half of mono's: the long prompt is computed elsewhere",
    "c": "more than twice mono's: adopting the long prompt's KV blocks the decode loop longer than the prefill did",
}


def stall_option(mono_stall_ms: float, disagg_stall_ms: float) -> str:
    """Which option a measured pair of worst decode stalls matches."""
    ratio = mono_stall_ms / disagg_stall_ms
    return "b" if ratio >= 2 else ("c" if ratio <= 0.5 else "a")


def _stall_examples() -> list[Example]:
    from labkit import reference

    out = []
    for variant in (None, "quick"):
        run = reference.serve_interference(variant=variant)
        if run is not None:
            s = run.stats
            out.append(
                Example(
                    right="b",
                    wrong=["a", "c"],
                    label=f"the committed run {run.file.tag}",
                    context={
                        "mono_stall_ms": s["mono"]["decode_stall_max_ms"],
                        "disagg_stall_ms": s["1p1d"]["decode_stall_max_ms"],
                    },
                )
            )
    out.append(
        Example(
            right="a",
            wrong=["b", "c"],
            context={"mono_stall_ms": 900.0, "disagg_stall_ms": 700.0},
            label="made up: a stall that did not go away",
        )
    )
    return out


@exercise(
    "04",
    3,
    "the worst decode stall, disaggregated",
    kind="multiple-choice",
    hint="in 1P1D the long prompt's prefill runs in the prefill worker's process, on its own core; the "
    "decode worker only adopts a finished KV cache",
    examples=_stall_examples,
)
def check_stall_guess(answer: Any, *, mono_stall_ms: float, disagg_stall_ms: float) -> CheckResult:
    """The learner's guess (a, b or c, made before the rerun) against the worst decode gaps the two runs
    measured: the option their ratio falls in. On the committed 2-core runs mono's worst stall was 20 to
    77 times 1P1D's, far from the 2x edge."""
    guess = answer.strip().lower()[:1] if isinstance(answer, str) else answer
    return check_choice(
        f"1P1D's worst stall ({disagg_stall_ms:,.0f} ms) against mono's ({mono_stall_ms:,.0f} ms)",
        guess,
        stall_option(mono_stall_ms, disagg_stall_ms),
        hint=check_stall_guess.hint,
    )


# --- Exercise 4 · the KV wait over a link (predict, then measure) ----------------------------

# Measured wait / (bytes / line rate) on the committed 2-core runs (benchmarks/kv_stream.py): 1.06-1.09
# at 1 Gbps; an emulated link paces every byte, so it cannot be below 1. The band's top leaves room
# for the fixed costs (export, ack) that weigh more on a small KV, and for a busy machine.
KV_WAIT_BAND = (0.9, 3.0)


def _kv_wait_examples() -> list[Example]:
    kv_bytes, gbps = 33_554_432, 1.0  # small, 2,048 tokens, fp32 (benchmarks/kv_stream.py rows)
    right = kv_bytes * 8 / (gbps * 1e9)
    return [
        Example(
            right=right,
            wrong=[kv_bytes / (gbps * 1e9), right * 1e3, right / 8, 0.0],
            context={"measured_wait_s": 0.2883, "kv_bytes": kv_bytes, "link_gbps": gbps},
            label="the committed kv_stream run: small, 2,048 tokens, 1 Gbps",
        )
    ]


@exercise(
    "04",
    4,
    "the KV wait over a link",
    kind="predict-then-measure",
    hint="the whole KV leaves after the prefill: its bytes x 8 bits / (the link's Gbit/s x 1e9), in seconds",
    examples=_kv_wait_examples,
)
def check_kv_wait(answer: Any, *, measured_wait_s: float, kv_bytes: int, link_gbps: float) -> CheckResult:
    """The learner's predicted wait (s) for the whole KV after the prefill, against the wait measured
    (`kv_acked_s - prefill_s`): measured / predicted within KV_WAIT_BAND."""
    name = f"the whole-KV wait, {kv_bytes / 1e6:,.1f} MB at {link_gbps:g} Gbps"
    if isinstance(answer, bool) or not isinstance(answer, (int, float)) or not answer > 0:
        return verdict(
            False, f"❌ {name}: expected a positive number of seconds, got {answer!r}. Hint: {check_kv_wait.hint}"
        )
    return check_ratio(
        f"{name}: measured",
        measured_wait_s,
        float(answer),
        lo=KV_WAIT_BAND[0],
        hi=KV_WAIT_BAND[1],
        what="measured / predicted",
        unit="s",
        hint=check_kv_wait.hint,
    )
