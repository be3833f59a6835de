"""labkit.bench.chunking: the long prompt's steps in a step log, a step-budget function run step after step,
the trade-off rows and their Pareto front; one real chunked server whose step log matches the scheduler's plan."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from labkit.bench import chunking
from labkit.bench.interference import InterferenceResult, InterferenceScenario, RequestTrace
from labkit.exercises.nb03 import reference_chunked_step, scheduler_chunks


def _step(prefill: int, decodes: int, seconds: float = 0.01) -> dict:
    phase = "mixed" if prefill and decodes else "prefill" if prefill else "decode"
    return {"phase": phase, "prefill_tokens": prefill, "decode_seqs": decodes, "seconds": seconds}


def test_long_prompt_steps_are_the_last_run_of_prompt_steps() -> None:
    log = [_step(64, 0), _step(0, 4), _step(0, 4), _step(252, 4), _step(252, 4), _step(24, 4), _step(0, 5)]
    assert [s["prefill_tokens"] for s in chunking.long_prompt_steps(log)] == [252, 252, 24]
    assert [s["prefill_tokens"] for s in chunking.long_prompt_steps([_step(1536, 0), _step(0, 5)])] == [1536]
    assert chunking.long_prompt_steps([_step(0, 4)]) == [] and chunking.long_prompt_steps([]) == []


@pytest.mark.parametrize("decodes,prompt,budget", [(4, 1536, 256), (0, 1000, 512), (4, 2048, 128), (7, 5, 8)])
def test_plan_long_prompt_follows_the_engines_scheduler(decodes: int, prompt: int, budget: int) -> None:
    plan = chunking.plan_long_prompt(scheduler_chunks, decodes, prompt, budget)
    assert sum(plan) == prompt and all(n == budget - decodes for n in plan[:-1])
    assert len(plan) == math.ceil(prompt / (budget - decodes))
    assert chunking.plan_long_prompt(reference_chunked_step, decodes, prompt, budget) == plan


def test_plan_long_prompt_refuses_a_budget_that_never_finishes() -> None:
    with pytest.raises(ValueError, match="never finish"):
        chunking.plan_long_prompt(lambda d, p, b: [], 4, 100, 256)          # no token for the prompt
    with pytest.raises(ValueError, match="never finish"):
        chunking.plan_long_prompt(lambda d, p, b: [p[0] + 1], 4, 100, 256)  # more than it has left
    with pytest.raises(ValueError, match="not done after 3 steps"):
        chunking.plan_long_prompt(lambda d, p, b: [1], 0, 100, 256, max_steps=3)
    with pytest.raises(ValueError, match="budget"):
        chunking.plan_long_prompt(reference_chunked_step, 4, 100, 0)


def test_pareto_front_keeps_what_nothing_beats_on_both() -> None:
    pts = [(1.0, 10.0), (2.0, 5.0), (3.0, 6.0), (2.0, 5.0), (0.5, 20.0)]
    assert chunking.pareto_front(pts) == [True, True, False, True, True]   # ties both stay
    assert chunking.pareto_front([]) == []


def _result(label: str, stall_s: float, ttft_s: float) -> InterferenceResult:
    sc = InterferenceScenario(num_decodes=2, decode_max_tokens=64, long_after_tokens=2)
    sent = 0.05
    ticks = [0.01 * i for i in range(1, 6)]
    d0 = RequestTrace("decode 0", "decode", 0.0, [*ticks, sent + stall_s, sent + stall_s + 0.01])
    d1 = RequestTrace("decode 1", "decode", 0.0, [t + 0.002 for t in d0.token_s])
    lg = RequestTrace("long prompt", "long", sent, [sent + ttft_s])
    return InterferenceResult(label, sc, [d0, d1, lg])


def test_tradeoff_rows_order_the_runs_and_mark_the_front() -> None:
    runs = [chunking.Run("1p1d", None, _result("1p1d", 0.02, 0.9), []),
            chunking.Run("mono-chunked", 256, _result("mono-chunked 256", 0.3, 0.6), [_step(252, 2), _step(4, 2)]),
            chunking.Run("mono", None, _result("mono", 0.5, 0.5), [_step(600, 0)]),
            chunking.Run("mono-chunked", 128, _result("mono-chunked 128", 0.15, 0.7), [_step(126, 2)] * 5)]
    rows = chunking.tradeoff_rows(runs)
    assert [r["label"] for r in rows] == ["mono", "mono-chunked 128", "mono-chunked 256", "1p1d"]
    assert [r["prefill_steps"] for r in rows] == [1, 5, 2, None]
    assert [r["pareto"] for r in rows] == [True, True, True, True]
    assert rows[0]["stall_max_ms"] == pytest.approx(500.0) and rows[0]["long_ttft_ms"] == pytest.approx(500.0)
    # 12 gaps: ten of 10 ms, one stall of 500 ms per decode: the p99 is the stall, the p50 a decode step
    assert rows[0]["itl_p99_ms"] == pytest.approx(500.0) and rows[1]["itl_p99_ms"] == pytest.approx(150.0)
    assert chunking.itl_percentile_ms(runs[2].result, 50) == pytest.approx(10.0)
    runs.append(chunking.Run("mono-chunked", 64, _result("mono-chunked 64", 0.6, 0.95), []))
    assert not next(r for r in chunking.tradeoff_rows(runs) if r["chunk_tokens"] == 64)["pareto"]


def test_server_spec_refuses_a_chunk_without_chunked_mode() -> None:
    spec = chunking.ServerSpec("tiny")
    for mode, chunk in (("mono", 256), ("mono-chunked", None), ("1p1d", 64), ("disagg", None), ("mono-chunked", 0)):
        with pytest.raises(ValueError):
            spec.launch(mode, chunk_tokens=chunk)


def test_chunking_charts_have_their_axes_and_the_reference_panel() -> None:
    from labkit import reference
    from labkit.plots import serving

    runs = [chunking.Run("mono", None, _result("mono", 0.5, 0.5), [_step(600, 0)]),
            chunking.Run("mono-chunked", 128, _result("mono-chunked 128", 0.15, 0.7), [_step(126, 2)] * 5),
            chunking.Run("1p1d", None, _result("1p1d", 0.02, 0.9), [])]
    ax = serving.chunk_tradeoff(chunking.tradeoff_rows(runs))
    assert "TTFT" in ax.get_xlabel() and "p99" in ax.get_ylabel() and ax.get_xscale() == "log"
    fig = serving.chunk_plan_vs_log([126] * 5, [_step(126, 2)] * 5, decode_step_ms=10.0)
    assert "step time (ms)" in fig.axes[1].get_ylabel()
    ref = reference.serve_interference()
    fig = serving.stall_comparison_with_reference([r.result for r in runs], ref)
    assert len(fig.axes) == (2 if ref else 1)
    if ref:
        assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == list(ref.stats)


@pytest.mark.slow
def test_a_chunked_server_logs_the_steps_the_scheduler_plans(tmp_path) -> None:
    """A real mono server with chunked prefill: the long prompt's steps in its --step-log are the plan
    the engine's scheduler makes step after step, and the server is gone afterwards."""
    from labkit.proc import pid_alive

    sc = InterferenceScenario(num_decodes=2, decode_prompt_tokens=8, long_prompt_tokens=300, long_after_tokens=2,
                              tail_tokens=3, timeout_s=120)
    pids: list[int] = []
    run = chunking.run_experiment(chunking.ServerSpec("tiny", kv_cache_bytes=32 << 20), replace(sc, variant=5),
                                  mode="mono-chunked", chunk_tokens=64, log_dir=tmp_path,
                                  on_server=lambda srv: pids.extend(srv.pids))
    assert pids and not any(pid_alive(p) for p in pids)
    logged = [s["prefill_tokens"] for s in run.long_steps]
    assert logged == chunking.plan_long_prompt(scheduler_chunks, 2, 300, 64) == [62, 62, 62, 62, 52]
    assert all(s["decode_seqs"] == 2 for s in run.long_steps)
    assert run.point()["prefill_steps"] == 5 and run.result.decodes_covered_prefill
    assert (tmp_path / "mono-chunked-64.jsonl").is_file()
