"""Notebook 03's exercises: what the running decodes wait for (predict, then measure), the chunked-prefill
step budget (build-it, against the engine's scheduler), the steps a long prompt takes (predict, then
count them in the engine's step log), and what the reference machine's stall chart says (read the chart)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from labkit.check import CheckResult, check_choice, check_close, check_ratio, verdict
from labkit.exercises.core import Example, exercise
from labkit.exercises.suite import Case, run_suite

# --- Exercise 1 · what the decodes wait for (predict, then measure) -------------------------

STALL_OPTIONS = {
    "a": "a few decode steps at most: the engine slips the prompt in between them",
    "b": "about as long as the long prompt's whole prefill (its time to first token)",
    "c": "much more than a decode step, but well under the prefill: the prompt is cut into pieces",
}
# The edges between the options, chosen far from what any run of the lab shows: a monolithic
# prefill stalls the decodes for 0.9-1.0 of its TTFT (the committed 2-core run: 1.01), chunked
# prefill for 0.16 of it, and 1P1D's worst gap is 1.5x a decode step (2-core CPU, 2026-11-26; on
# this busy box the tiny model gave 1.03, 0.09-0.45 and 2.1, 2026-12-01).
STALL_OF_PREFILL = 0.5  # worst stall / long TTFT from which "b"
STALL_OF_STEPS = 3.0  # worst stall / mean decode gap up to which "a"


def stall_option(stats: Mapping[str, float]) -> str:
    """Which option a run's `InterferenceResult.stats()` matches (see STALL_OPTIONS)."""
    stall, ttft, itl = stats["decode_stall_max_ms"], stats["long_ttft_ms"], stats["decode_itl_mean_ms"]
    if stall >= STALL_OF_PREFILL * ttft and stall > STALL_OF_STEPS * itl:
        return "b"
    return "a" if stall <= STALL_OF_STEPS * itl else "c"


def _stall_examples() -> list[Example]:
    from labkit import reference

    ref = reference.serve_interference()
    mono = (
        ref.stats["mono"]
        if ref
        else {"decode_itl_mean_ms": 428.0, "decode_stall_max_ms": 34240.0, "long_ttft_ms": 33887.0}
    )
    out = [Example(right="b", wrong=["a", "c"], context={"stats": mono}, label="the committed 2-core CPU, mono")]
    if ref:
        out += [
            Example(
                right="c",
                wrong=["a", "b"],
                context={"stats": ref.stats["mono-chunked"]},
                label="the committed 2-core CPU, chunked prefill",
            ),
            Example(
                right="a",
                wrong=["b", "c"],
                context={"stats": ref.stats["1p1d"]},
                label="the committed 2-core CPU, 1P1D",
            ),
        ]
    return out


@exercise(
    "03",
    1,
    "what the decodes wait for",
    kind="predict-then-measure",
    hint="a monolithic engine runs one step at a time, and without chunking the long prompt's whole "
    "prefill is one step: compare the worst stall with the long prompt's TTFT",
    examples=_stall_examples,
)
def check_stall_guess(answer: Any, *, stats: Mapping[str, float]) -> CheckResult:
    """The learner's guess (a, b or c, made before the run) against the run just measured: the worst
    decode gap during the long prompt against its TTFT and against the mean decode gap
    (`stall_option`, edges far from every run the lab has made)."""
    guess = answer.strip().lower()[:1] if isinstance(answer, str) else answer
    return check_choice(
        f"worst stall {stats['decode_stall_max_ms']:,.0f} ms, long-prompt TTFT "
        f"{stats['long_ttft_ms']:,.0f} ms, a decode step {stats['decode_itl_mean_ms']:,.0f} ms",
        guess,
        stall_option(stats),
        hint=check_stall_guess.hint,
    )


# --- Exercise 2 · the chunked-prefill step budget (build-it) --------------------------------


def scheduler_chunks(num_decodes: int, prompts_left: Sequence[int], budget: int) -> list[int]:
    """The prompt chunks the lab engine's own scheduler (`labkit.engine.scheduler`, policy "chunked")
    puts in the next step: `num_decodes` running requests, waiting prompts with `prompts_left` tokens
    still to compute (arrival order; a prompt with some computed already is partly prefilled), a
    step budget of `budget` tokens. Built from real Sequences and a real block pool, no model."""
    from labkit.engine.config import EngineConfig, SamplingParams
    from labkit.engine.kv_cache import BlockPool
    from labkit.engine.scheduler import Scheduler
    from labkit.engine.sequence import Sequence as Seq

    bs = 16
    done_before = [0 if i % 2 == 0 else 3 * bs for i in range(len(prompts_left))]  # every other one partly prefilled
    need = num_decodes * 4 + sum(-(-(n + d) // bs) + 1 for n, d in zip(prompts_left, done_before))
    cfg = EngineConfig(
        policy="chunked",
        max_num_batched_tokens=budget,
        block_size=bs,
        enable_prefix_caching=False,
        max_num_seqs=num_decodes + len(prompts_left) + 1,
    )
    pool = BlockPool(need + 8, bs, enable_prefix_caching=False)
    sched = Scheduler(cfg, pool)
    sp = SamplingParams(max_tokens=64)
    for i in range(num_decodes):
        seq = Seq(f"decode-{i}", [1 + i % 200] * 20, sp, token_ids=[1 + i % 200] * 20 + [7])
        seq.num_computed_tokens = 20
        pool.grow(seq, 20)
        sched.add_running(seq)
    for i, (left, done) in enumerate(zip(prompts_left, done_before)):
        seq = Seq(f"prompt-{i}", [2 + i % 200] * (left + done), sp)
        if done:
            pool.grow(seq, done)
            seq.num_computed_tokens = done
        sched.add(seq)
    batch = sched.schedule()
    if len(batch.decodes) != min(num_decodes, budget):
        raise RuntimeError(
            f"the scheduler ran {len(batch.decodes)} decodes, not {min(num_decodes, budget)}: "
            "the exercise's harness no longer matches labkit.engine.scheduler"
        )
    return [n for _, n in batch.chunks]


def _chunk_judge(got: Any, case: Case) -> tuple[bool, str]:
    try:
        chunks = [int(n) for n in got]
    except (TypeError, ValueError):
        return False, f"returned {got!r}, expected a list of chunk sizes (ints)"
    if chunks == list(case.expected):
        return True, f"{chunks}"
    return False, f"{chunks}, the engine's scheduler puts {list(case.expected)} in the step"


def _chunk_cases() -> Iterator[Case]:
    # (running decodes, tokens left per waiting prompt, budget): the notebook's case first, then the edges.
    for decodes, prompts, budget, what in (
        (4, [1536], 256, "the long prompt among 4 decodes"),
        (0, [1536], 512, "no decode running"),
        (4, [24], 256, "the last, short chunk"),
        (4, [100, 300], 256, "two prompts: the second gets what the first leaves"),
        (2, [10, 20, 30], 512, "three short prompts all fit"),
        (4, [252], 256, "a prompt that fills the budget exactly"),
        (255, [40], 256, "decodes leave one token"),
        (300, [40], 256, "more decodes than the budget"),
    ):
        yield Case(
            f"{what}: {decodes} decodes, prompts {prompts}, budget {budget}",
            (decodes, prompts, budget),
            scheduler_chunks(decodes, prompts, budget),
            judge=_chunk_judge,
        )


def reference_chunked_step(num_decodes: int, prompts_left: Sequence[int], budget: int) -> list[int]:
    """The function the learner writes (the tests' right answer, never an expected value)."""
    left = budget - min(num_decodes, budget)
    chunks = []
    for n in prompts_left:
        if left <= 0:
            break
        chunks.append(min(n, left))
        left -= chunks[-1]
    return chunks


def _chunk_examples() -> list[Example]:
    def prompts_first(d: int, p: Sequence[int], b: int) -> list[int]:  # the budget goes to prompts, as if no decode ran
        return reference_chunked_step(0, p, b)

    def first_prompt_only(d: int, p: Sequence[int], b: int) -> list[int]:
        return reference_chunked_step(d, p[:1], b)

    def whole_prompts(d: int, p: Sequence[int], b: int) -> list[int]:  # prefill_first: no chunking at all
        return list(p)

    def decodes_unbounded(d: int, p: Sequence[int], b: int) -> list[int]:  # a negative budget left "wraps"
        left, out = b - d, []
        for n in p:
            out.append(max(0, min(n, left)))
            left -= out[-1]
        return out

    return [
        Example(
            right=reference_chunked_step, wrong=[prompts_first, first_prompt_only, whole_prompts, decodes_unbounded]
        )
    ]


@exercise(
    "03",
    2,
    "the chunked-prefill step budget",
    kind="build-it",
    hint="decodes first: each takes one token of the budget (as many as fit); then the waiting prompts in "
    "arrival order, each taking min(its tokens left, the budget left), until nothing is left",
    examples=_chunk_examples,
)
def check_chunked_step(fn: Callable[[int, Sequence[int], int], Sequence[int]]) -> CheckResult:
    """Runs the learner's `chunked_step(num_decodes, prompts_left, budget)` on eight states. Expected:
    the chunks `labkit.engine.scheduler.Scheduler.schedule()` puts in the step for the same state
    (real sequences and block pool, policy "chunked")."""
    return run_suite("chunked_step", fn, _chunk_cases(), hint=check_chunked_step.hint)


# --- Exercise 3 · the long prompt's steps (predict, then count them in the step log) --------


def _steps_context(num_decodes: int, prompt_tokens: int, budget: int) -> dict[str, Any]:
    """A step log as the worker writes it, for the tests: the engine's scheduler, step after step."""
    steps = [{"phase": "prefill", "prefill_tokens": 16 * num_decodes, "decode_seqs": 0}]
    steps += [{"phase": "decode", "prefill_tokens": 0, "decode_seqs": num_decodes}] * 3
    left = prompt_tokens
    while left > 0:
        (n,) = scheduler_chunks(num_decodes, [left], budget)
        steps.append({"phase": "mixed" if num_decodes else "prefill", "prefill_tokens": n, "decode_seqs": num_decodes})
        left -= n
    steps += [{"phase": "decode", "prefill_tokens": 0, "decode_seqs": num_decodes + 1}] * 3
    return {"steps": steps}


def _steps_examples() -> list[Example]:
    # ceil(1536 / 252) = 7 steps; the budget without the decodes would give 6, rounding down 6 too.
    return [
        Example(
            right=7,
            wrong=[6, 1536 // 252, 8, 1536],
            context=_steps_context(4, 1536, 256),
            label="tiny, 1,536-token prompt, 4 decodes, budget 256",
        ),
        Example(right=9, wrong=[8], context=_steps_context(4, 2048, 256), label="small, 2,048 tokens"),
    ]


@exercise(
    "03",
    3,
    "steps of the long prompt",
    kind="predict-then-measure",
    hint="each step spends one token per running decode; the rest of the budget goes to the prompt; "
    "the last step takes what is left",
    examples=_steps_examples,
)
def check_prefill_steps(answer: Any, *, steps: Sequence[Mapping[str, Any]]) -> CheckResult:
    """The learner's count of the steps that compute the long prompt, against the steps the chunked
    server's engine really ran: its `--step-log`, the last run of steps with prompt tokens
    (`labkit.bench.chunking.long_prompt_steps`). Exact: step counts do not depend on load."""
    from labkit.bench.chunking import long_prompt_steps

    logged = long_prompt_steps(steps)
    if not logged:
        raise ValueError("the step log holds no step with prompt tokens: was the server started with --step-log?")
    return check_close(
        "engine steps that computed the long prompt", answer, len(logged), rtol=0.0, hint=check_prefill_steps.hint
    )


# --- Exercise 4 · the reference machine's stalls (read the chart) ---------------------------

# The committed 2-core CPU run's worst stalls (docs/results/serve_interference-2026-11-26-cpu-2core.json), for
# the tests when that file is missing.
_REFERENCE_STALLS_MS = {"mono": 34240.0, "mono-chunked": 5607.5, "1p1d": 445.4}


def reference_stall_ratio(stats: Mapping[str, Mapping[str, float]]) -> float:
    """Worst decode stall with chunked prefill / with 1P1D, from a run's stats by mode."""
    return stats["mono-chunked"]["decode_stall_max_ms"] / stats["1p1d"]["decode_stall_max_ms"]


def _reference_examples() -> list[Example]:
    from labkit import reference

    ref = reference.serve_interference()
    stats = ref.stats if ref else {m: {"decode_stall_max_ms": v} for m, v in _REFERENCE_STALLS_MS.items()}
    ratio = reference_stall_ratio(stats)
    mono = stats["mono"]["decode_stall_max_ms"] / stats["1p1d"]["decode_stall_max_ms"]
    return [
        Example(
            right=round(ratio),
            wrong=[round(mono), 1 / ratio, 1.0],
            context={"stats": stats},
            label="the committed 2-core CPU",
        )
    ]


@exercise(
    "03",
    4,
    "chunking against disaggregation on the reference machine",
    kind="read-the-chart",
    hint="divide the worst-stall bar of mono-chunked by the worst-stall bar of 1p1d, in the reference panel",
    examples=_reference_examples,
)
def check_reference_stall_ratio(answer: Any, *, stats: Mapping[str, Mapping[str, float]] | None) -> CheckResult:
    """How many times shorter the worst decode stall was with 1P1D than with chunked prefill on the
    committed 2-core CPU run (`stats`: `labkit.reference.serve_interference().stats`), read off its
    panel: within -25%/+33% of the run's numbers."""
    if stats is None:
        return verdict(True, "⚠️ the committed interference run is not in this checkout: exercise 4 is not checked.")
    return check_ratio(
        "reference machine: worst stall, chunked prefill / 1P1D",
        answer,
        reference_stall_ratio(stats),
        lo=0.75,
        hi=1.33,
        what="reading / run",
        unit="x",
        hint=check_reference_stall_ratio.hint,
    )
