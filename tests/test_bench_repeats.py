"""labkit.bench.repeats and labkit.bench.verdicts: pooled points, bootstrap intervals, winners, and the
sentences a notebook prints, on hand-built records with known answers (and one real repeated sweep)."""
from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from labkit.bench import SLO, synthetic
from labkit.bench.loadgen import BenchResult
from labkit.bench.metrics import RequestRecord, summarize
from labkit.bench.repeats import (
    Interval,
    RepeatedSweep,
    best_separated,
    bootstrap,
    goodput_rps,
    misses,
    run_repeats,
    statistic,
)
from labkit.bench.sweep import ModeSpec, SweepConfig, SweepResult
from labkit.bench.verdicts import claims_text, goodput_winners, plane_text, slo_flip_text, versus, waterfall_text
from labkit.proc import free_port, pid_alive, start_process, wait_http_ok

FAKE = str(Path(__file__).with_name("fake_openai_server.py"))


def rec(i: int, ttft: float, gaps: list[float], ok: bool = True) -> RequestRecord:
    r = RequestRecord(i, 10, len(gaps) + 1, ok=ok, ttft_s=ttft if ok else math.nan, itl_s=list(gaps) if ok else [],
                      output_tokens=len(gaps) + 1 if ok else 0)
    r.e2e_s = ttft + sum(gaps) if ok else math.nan
    return r


def run(records: list[RequestRecord], duration_s: float = 10.0) -> BenchResult:
    return BenchResult(records, summarize(records, duration_s), {})


# Two made-up modes: "mono" answers fast but one gap in each request stalls; "1p1d" answers late, smoothly.
def mono_records(k: int) -> list[RequestRecord]:
    return [rec(i, 0.5 + 0.01 * ((i + k) % 5), [0.1] * 8 + [2.0 + 0.1 * (i % 3)]) for i in range(20)]


def disagg_records(k: int) -> list[RequestRecord]:
    return [rec(i, 3.0 + 0.02 * ((i + k) % 5), [0.1 + 0.001 * (i % 4)] * 9) for i in range(20)]


def repeated(rates: tuple[float, ...] = (1.0,)) -> RepeatedSweep:
    cfg = SweepConfig(synthetic("t", 10, 10), rates_rps=rates, modes=("mono", "1p1d"), n_requests=20, progress=False)
    results = []
    for k in range(3):
        runs = {(m, r): run(mono_records(k) if m == "mono" else disagg_records(k)) for m in ("mono", "1p1d") for r in rates}
        results.append(SweepResult(cfg, [], runs))
    return RepeatedSweep(results)


TTFT_SLO = SLO(ttft_s=1.0, tpot_s=0.5)
ITL_SLO = SLO(ttft_s=10.0, itl_s=1.0)


def test_statistics_pool_every_request_of_every_repeat() -> None:
    a = [rec(0, 0.5, [0.1]), rec(1, 2.0, [0.1]), rec(2, 0.5, [0.1], ok=False)]
    b = [rec(3, 0.5, [0.1, 0.3])]
    runs = [(a, 10.0), (b, 30.0)]
    assert statistic("goodput_rps", runs, slo=SLO(ttft_s=1.0)) == pytest.approx(2 / 40)
    assert statistic("slo_attainment", runs, slo=SLO(ttft_s=1.0)) == pytest.approx(2 / 4)
    assert statistic("output_tps", runs) == pytest.approx((2 + 2 + 3) / 40)
    assert statistic("itl_p100_ms", runs) == pytest.approx(300.0)
    assert statistic("ttft_p50_ms", runs) == pytest.approx(500.0)
    assert math.isnan(statistic("ttft_p99_ms", [([rec(0, 1, [0.1], ok=False)], 1.0)]))
    # goodput counted by another function: the pool weights each run's rate by its duration
    assert statistic("goodput_rps", runs, slo=SLO(), goodput_fn=lambda r, s, d: 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs an SLO"):
        statistic("goodput_rps", runs)
    with pytest.raises(ValueError, match="'ttft_max'"):
        statistic("ttft_max", runs)


def test_misses_count_each_bound_and_a_request_exactly_at_its_bound_is_good() -> None:
    recs = [rec(0, 1.0, [0.25, 0.25]), rec(1, 1.5, [0.1]), rec(2, 0.5, [0.1, 0.9]), rec(3, 0.5, [0.1], ok=False)]
    m = misses(recs, SLO(ttft_s=1.0, itl_s=0.5))
    assert m == {"requests": 4, "error": 1, "ttft": 1, "tpot": 0, "itl": 1, "e2e": 0, "good": 1}
    assert goodput_rps(recs, SLO(ttft_s=1.0, itl_s=0.5), 2.0) == pytest.approx(0.5)


def test_bootstrap_interval_holds_the_value_and_shrinks_to_it_without_spread() -> None:
    same = [rec(i, 1.0, [0.1] * 4) for i in range(10)]
    iv = bootstrap("ttft_p99_ms", [(same, 5.0), (same, 5.0)], n_boot=50)
    assert iv == Interval(1000.0, 1000.0, 1000.0, (1000.0, 1000.0))
    spread = [rec(i, 0.1 * (i + 1), [0.1]) for i in range(20)]
    iv = bootstrap("ttft_p50_ms", [(spread, 5.0)], n_boot=400, seed=1)
    assert iv.lo < iv.value < iv.hi and 600 < iv.hi - iv.lo < 1400
    assert bootstrap("ttft_p50_ms", [(spread, 5.0)], n_boot=400, seed=1) == iv, "seeded: the same interval"
    with pytest.raises(ValueError, match="confidence"):
        bootstrap("ttft_p50_ms", [(spread, 5.0)], confidence=1.5)


def test_winner_needs_separated_intervals() -> None:
    a, b, c = Interval(1.0, 0.9, 1.1, ()), Interval(2.0, 1.5, 2.5, ()), Interval(1.2, 1.05, 1.6, ())
    assert best_separated({"a": a, "b": b}, higher_is_better=True) == "b"
    assert best_separated({"a": a, "b": b}, higher_is_better=False) == "a"
    assert best_separated({"a": a, "b": b, "c": c}, higher_is_better=True) is None, "b overlaps c: a tie"
    rs = repeated()
    assert rs.winner(1.0, "goodput_rps", slo=TTFT_SLO) == "mono"
    assert rs.winner(1.0, "goodput_rps", slo=ITL_SLO) == "1p1d"
    assert rs.winner(1.0, "itl_p99_ms") == "1p1d" and rs.winner(1.0, "ttft_p50_ms") == "mono"


def test_points_carry_value_interval_and_each_repeat() -> None:
    rs = repeated((1.0, 2.0))
    pts = rs.points(("goodput_rps", "itl_p99_ms"), slo=TTFT_SLO, unit_rps=0.5, n_boot=50)
    assert [(p["mode"], p["rate_rps"], p["load_x"]) for p in pts] == [("mono", 1.0, 2.0), ("mono", 2.0, 4.0),
                                                                       ("1p1d", 1.0, 2.0), ("1p1d", 2.0, 4.0)]
    mono = pts[0]
    assert mono["requests"] == 60 and mono["repeats"] == 3
    assert mono["goodput_rps"] == pytest.approx(2.0) and mono["goodput_rps_repeats"] == (2.0, 2.0, 2.0)
    assert mono["itl_p99_ms_lo"] <= mono["itl_p99_ms"] <= mono["itl_p99_ms_hi"]
    assert pts[2]["goodput_rps"] == 0.0, "every 1p1d request is later than the 1 s TTFT bound"
    with pytest.raises(ValueError, match="same modes and rates"):
        RepeatedSweep([rs.results[0], repeated((3.0,)).results[0]])


def test_slo_flip_text_names_the_flip_and_the_bound_each_loser_broke() -> None:
    rs = repeated()
    slos = {"the TTFT SLO": TTFT_SLO, "the ITL SLO": ITL_SLO}
    table = goodput_winners(rs, slos, n_boot=100)
    assert [row["winner"] for row in table] == ["mono", "1p1d"]
    text = slo_flip_text(rs, slos, n_boot=100)
    assert text.startswith("The winner flips at 1 req/s.")
    assert "Under the TTFT SLO (TTFT <= 1000 ms, TPOT <= 500 ms) at 1 req/s, mono serves 2 req/s" in text
    assert "1p1d's requests broke the TTFT bound 60 times out of 60 (its first token came too late), mono's 0 times" in text
    assert "mono's requests broke the inter-token bound 60 times out of 60 (one gap between two tokens was too long)" in text
    assert "p99 ITL: mono" in text
    same = {"a": TTFT_SLO, "b": SLO(ttft_s=1.0)}
    assert "does not flip" in slo_flip_text(rs, same, n_boot=50)
    with pytest.raises(ValueError, match="two SLOs"):
        slo_flip_text(rs, {"a": TTFT_SLO})


def test_versus_and_claims_text() -> None:
    rs = repeated()
    rows = versus(rs, {"ITL": ITL_SLO, "TTFT": TTFT_SLO}, n_boot=50)
    (row,) = rows
    assert row["throughput_ratio"] == pytest.approx(1.0) and row["cost_ratio"] == pytest.approx(1.0)
    assert math.isinf(row["goodput_ratio ITL"]) and row["goodput_ratio TTFT"] == 0.0
    text = claims_text(rows, throughput_gain=(2.0, 6.4), cost_saving_pct=(15, 40))
    assert "Raw output throughput of 1p1d over mono: 1x across the swept rates (0 of 1 inside the claimed 2-6.4x)" in text
    assert "Goodput ratio under ITL: unbounded (the baseline served none within the SLO) (1 of 1 rates at or above 2x)" in text
    assert "Goodput ratio under TTFT: 0x (0 of 1" in text
    assert "+0% to +0% (negative: cheaper; 0 of 1 rates inside the claimed 15-40% saving)" in text


def test_plane_text_places_the_contender_against_the_best_baseline() -> None:
    rs = repeated()
    text = plane_text(rs, 1.0, n_boot=100)
    # mono: TTFT ~0.52 s, one 2-2.2 s stall per request; 1p1d: TTFT ~3.04 s, smooth gaps of 0.100-0.103 s
    assert "1p1d's p99 inter-token latency is 103 ms against the best baseline's 2,200 ms" in text
    assert "(mono); its median TTFT is 3,0" in text and "against the lowest baseline's 52" in text
    assert text.endswith("the choice is a trade-off.")
    # a baseline faster on both axes beats it, and the sentence says so
    fast = [rec(i, 0.2, [0.05] * 9) for i in range(20)]
    cfg = SweepConfig(synthetic("t", 10, 10), rates_rps=(1.0,), modes=("mono-dp", "1p1d"), n_requests=20, progress=False)
    rs2 = RepeatedSweep([SweepResult(cfg, [], {("mono-dp", 1.0): run(fast), ("1p1d", 1.0): run(disagg_records(k))})
                         for k in range(3)])
    assert "mono-dp beats 1p1d on both axes" in plane_text(rs2, 1.0, n_boot=100)
    with pytest.raises(ValueError, match="'2p1d'"):
        plane_text(rs, 1.0, contender="2p1d")


def test_waterfall_text_names_the_largest_part_and_the_kv_share() -> None:
    from labkit.serve.waterfall import PARTS

    def with_wf(i: int, ttft: float, shares: tuple[float, ...]) -> RequestRecord:
        r = rec(i, ttft, [0.1] * 3)
        r.waterfall = {**{p: s * ttft for p, s in zip(PARTS, shares)}, "ttft_s": ttft, "kv_gb_per_s": 2.5}
        return r
    disagg = [with_wf(i, 1.0, (0.05, 0.05, 0.1, 0.5, 0.25, 0.05)) for i in range(20)]
    mono = [with_wf(i, 0.4, (0.05, 0.05, 0.6, 0.25, 0.0, 0.05)) for i in range(20)]
    text = waterfall_text({"mono": mono, "1p1d": disagg, "x": [rec(0, 0.1, [0.1])]})
    assert "mono's median request waited 400 ms for its first token, most of it in queue (240 ms)." in text
    assert "1p1d's median request waited 1,000 ms for its first token, most of it in prefill (500 ms)." in text
    assert "Its KV transfer took 250.0 ms at 2.50 GB/s, 25% of that TTFT." in text
    assert "x: no request carries a waterfall." in text


def test_run_repeats_reseeds_each_repeat_and_restarts_servers(tmp_path: Path) -> None:
    pids: list[int] = []
    seen: list[list[dict]] = []

    @contextlib.contextmanager
    def fake_factory(spec: ModeSpec) -> Iterator[str]:
        port = free_port()
        child = start_process(f"fake-{spec.name}", [sys.executable, FAKE, "--port", str(port), "--ttft-s", "0.01",
                                                    "--itl-s", "0.002"], log_path=tmp_path / f"{spec.name}.log")
        pids.append(child.pid)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http_ok(url + "/health", timeout_s=30, child=child)
            yield url
            seen.append(httpx.get(url + "/debug/requests", trust_env=False).json())
        finally:
            child.stop()

    cfg = SweepConfig(synthetic("t", (20, 60), 4), rates_rps=(50.0,), modes=("mono", "1p1d"), n_requests=5,
                      warmup_requests=0, seed=3, progress=False)
    (rs,) = run_repeats([cfg], fake_factory, repeats=2)
    assert len(pids) == 4 and all(not pid_alive(p) for p in pids), "fresh servers per repeat, all stopped"
    assert [r.config.seed for r in rs.results] == [3, 4]
    assert len(rs.records("mono", 50.0)) == 10 and all(r.ok for r in rs.records("1p1d", 50.0))
    key = lambda reqs: sorted(json.dumps(r["first"]) for r in reqs)
    assert key(seen[0]) == key(seen[1]), "both modes of a repeat get the same prompts"
    assert key(seen[0]) != key(seen[2]), "another repeat, other prompts"
    with pytest.raises(ValueError, match="repeats"):
        run_repeats([cfg], fake_factory, repeats=0)


def test_the_fast_percentile_is_numpys() -> None:
    import numpy as np

    from labkit.bench.repeats import _percentile

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 100, 1601):
        v = rng.random(n)
        for q in (0, 50, 90, 99, 99.9, 100):
            assert _percentile(v, q) == pytest.approx(np.percentile(v, q), abs=1e-12)
