"""A run's waterfalls summarized (labkit.bench.waterfall), kept through save/load, and charted; no server."""
from __future__ import annotations

from pathlib import Path

import pytest

from labkit.bench.metrics import RequestRecord, load_records, save_records, summarize
from labkit.bench.waterfall import prefix_hit_rate, requests_per_upstream, waterfall_stacks
from labkit.serve.messages import PrefillResult, StreamTiming
from labkit.serve.waterfall import PARTS, RequestTiming


def record(i: int, ttft_s: float, *, upstream: str = "p0", flag: str | None = None, cached: int = 0) -> RequestRecord:
    """A completed request whose waterfall splits `ttft_s`: 10% each router/http/queue, 50% prefill,
    15% KV, 5% out; 0.02 s of decode admission."""
    shares = dict(zip(PARTS, (0.1, 0.1, 0.1, 0.5, 0.15, 0.05)))
    wf = {**{p: s * ttft_s for p, s in shares.items()}, "ttft_s": ttft_s, "mode": "disagg", "upstream": upstream,
          "prompt_tokens": 100, "cached_tokens": cached, "kv_bytes": 400_000, "kv_window_s": 0.15 * ttft_s,
          "kv_gb_per_s": 400_000 / (0.15 * ttft_s) / 1e9, "kv_flag": flag, "decode_admit_s": 0.02}
    return RequestRecord(i, 100, 4, ok=True, ttft_s=ttft_s * 1.01, e2e_s=ttft_s + 0.1, itl_s=[0.03] * 3,
                         output_tokens=4, waterfall=wf)


def test_stacks_average_the_parts_over_a_band_so_they_add_up() -> None:
    recs = [record(i, 0.1 * (i + 1)) for i in range(100)]      # TTFT 0.1 .. 10 s
    st = waterfall_stacks(recs)
    # p50: ranks 45..54 -> TTFT 4.6 .. 5.5 s, mean 5.05 s; p99: the slowest 1%, 10 s
    assert st["p50"]["requests"] == 10 and st["p50"]["ttft_ms"] == pytest.approx(5050.0)
    assert st["p50"]["prefill_ms"] == pytest.approx(0.5 * 5050.0) and st["p50"]["client_ttft_ms"] == pytest.approx(5100.5)
    assert st["p99"]["requests"] == 1 and st["p99"]["ttft_ms"] == pytest.approx(10_000.0)
    for band in st.values():
        assert sum(band[f"{p.removesuffix('_s')}_ms"] for p in PARTS) == pytest.approx(band["ttft_ms"])
        assert band["decode_admit_ms"] == pytest.approx(20.0)
    assert waterfall_stacks([RequestRecord(0, 1, 1, ok=True, ttft_s=0.1)]) == {}    # no waterfall, nothing made up


def test_hit_rate_balance_and_flags_come_from_the_records() -> None:
    recs = [record(0, 1.0, cached=50), record(1, 1.0, upstream="p1", flag="KV moving at 0.001 GB/s over tcp"),
            record(2, 1.0, upstream="p1", cached=25)]
    assert prefix_hit_rate(recs) == pytest.approx(75 / 300)
    assert requests_per_upstream(recs) == {"p0": 1, "p1": 2}
    s = summarize(recs, 3.0)
    assert s.kv_flagged == 1 and s.kv_flag.startswith("KV moving at 0.001 GB/s")
    assert s.flat()["kv_flagged"] == 1 and summarize([record(0, 1.0)], 1.0).kv_flag == ""


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_records_keep_their_waterfall_through_save_and_load(tmp_path: Path, suffix: str) -> None:
    recs = [record(0, 0.5, flag="slow"), RequestRecord(1, 10, 2, ok=False, error="HTTP 503: down")]
    save_records(recs, tmp_path / "run")
    back = load_records((tmp_path / "run").with_suffix(suffix))
    assert back[0].waterfall == recs[0].waterfall and back[1].waterfall == {} and not back[1].ok


def test_request_timing_parts_add_up_to_the_routers_ttft() -> None:
    res = PrefillResult(request_id="r", first_token_id=5, finish_reason=None, num_prompt_tokens=64, cached_tokens=48,
                        kv_bytes=262_144, kv_transport="shm", prefill_start_s=0.010, prefill_s=0.050,
                        kv_acked_s=0.058, kv_window_s=0.008, reply_s=0.060)
    t = RequestTiming("disagg", prompt_tokens=64)
    t.prefill_reply(res, "p0", sent_at=100.002, reply_at=100.070)
    parts = t.parts(t_in=100.0, t_out=100.073)
    assert parts == pytest.approx({"router_s": 0.002, "http_s": 0.008, "queue_s": 0.010, "prefill_s": 0.040,
                                   "kv_transfer_s": 0.008, "first_token_out_s": 0.005})
    rep = t.report(100.0, 100.073)
    assert rep["ttft_s"] == pytest.approx(0.073) == pytest.approx(sum(parts.values()))
    assert rep["kv_gb_per_s"] == pytest.approx(262_144 / 0.008 / 1e9) and rep["cached_tokens"] == 48
    m = RequestTiming("mono", prompt_tokens=64)
    m.mono_first_line(StreamTiming(ready_s=0.004, first_token_s=0.030, sent_s=0.031), "m0", 5.001, 5.040)
    mp = m.parts(5.0, 5.041)
    assert mp["kv_transfer_s"] == 0 and mp["prefill_s"] == pytest.approx(0.026)
    assert sum(mp.values()) == pytest.approx(0.041) and "kv_bytes" not in m.report(5.0, 5.041)


def test_the_waterfall_chart_stacks_every_part_per_mode_and_band() -> None:
    from labkit.plots.serving import plot_router_policies, plot_ttft_waterfall

    recs = [record(i, 0.1 * (i + 1)) for i in range(100)]
    ax = plot_ttft_waterfall({"1p1d": recs, "mono": recs[:50]})
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1p1d p50", "1p1d p99", "mono p50", "mono p99"]
    st = waterfall_stacks(recs)["p50"]
    row0 = [p for p in ax.patches if abs(p.get_y() + p.get_height() / 2) < 1e-9]
    widths = [p.get_width() for p in row0]
    assert sum(widths[:len(PARTS)]) == pytest.approx(st["ttft_ms"]) and widths[-1] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="no record carries a waterfall"):
        plot_ttft_waterfall({"x": [RequestRecord(0, 1, 1, ok=True, ttft_s=0.1)]})
    fig = plot_router_policies([{"policy": "a", "prefix_hit_rate": 0.3, "ttft_p50_ms": 10, "ttft_p99_ms": 30,
                                 "requests_per_worker": {"p0": 5, "p1": 3}},
                                {"policy": "b", "prefix_hit_rate": 0.1, "ttft_p50_ms": 12, "ttft_p99_ms": 40,
                                 "requests_per_worker": {"p0": 8}}])
    assert len(fig.axes) == 3
