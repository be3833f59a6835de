"""Replaying measured runs in the simulator, the comparison table, the planner's charts and tour section."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from labkit.plan import validate
from labkit.plan.latency_model import (
    Calibration,
    DecodeSample,
    LatencyModel,
    PrefillSample,
)
from labkit.plan.simulator import SLO, Layout, simulate

LAT = LatencyModel(0.002, 50e-6, 1e-8, 0.003, 1e-7, 1e-4, kv_bytes_per_token=100_000)


class Rec:
    """The fields of labkit.bench.metrics.RequestRecord that the replay reads."""

    def __init__(self, start_s: float, prompt: int, out: int, ttft_s: float, e2e_s: float, ok: bool = True) -> None:
        self.start_s, self.prompt_tokens, self.output_tokens = start_s, prompt, out
        self.expected_output_tokens, self.ttft_s, self.e2e_s, self.ok = out, ttft_s, e2e_s, ok


def test_replaying_a_simulated_run_reproduces_its_numbers() -> None:
    # a "measurement" that is itself a simulation: replaying its trace must give 0% error
    from labkit.plan.workload import WorkloadShape, sample_requests

    req = sample_requests(WorkloadShape("w", 300, 40, 0.5, 0.5), 60, 5.0, seed=4)
    sim = simulate(req, LAT, Layout.mono())
    recs = [Rec(10.0 + a, int(p), int(o), t, e) for a, p, o, t, e in
            zip(req.arrival_s, req.prompt_tokens, req.output_tokens, sim.ttft_s, sim.e2e_s)]
    recs.append(Rec(99.0, 10, 5, math.nan, math.nan, ok=False))       # failed requests are left out
    trace = validate.requests_from_records(list(reversed(recs)))
    assert len(trace) == 60 and trace.arrival_s[0] == 0.0
    np.testing.assert_allclose(trace.arrival_s, req.arrival_s - req.arrival_s[0], atol=1e-9)
    rows = validate.compare("mono", 5.0, validate.predicted_metrics(simulate(trace, LAT, Layout.mono())),
                            validate.measured_metrics(recs))
    # the records carry no inter-token gaps, so no ITL rows; every other figure, p99s included, replays exactly
    assert [r.metric for r in rows] == [m for m in validate.METRICS if not m.startswith("itl")]
    assert all(abs(r.error) < 1e-6 for r in rows)
    assert validate.within(rows, 0.15) == 1.0


def test_errors_and_the_table() -> None:
    rows = [validate.ValidationRow("mono", 1.0, "ttft_p50_ms", 110.0, 100.0),
            validate.ValidationRow("1p1d", 1.0, "tpot_p50_ms", 50.0, 100.0)]
    assert rows[0].error == pytest.approx(0.10) and rows[1].error == pytest.approx(-0.5)
    assert validate.within(rows, 0.15) == 0.5
    text = validate.table(rows)
    assert "+10.0%" in text and "-50.0%" in text
    with pytest.raises(ValueError, match="no successful requests"):
        validate.requests_from_records([Rec(0.0, 5, 5, 1.0, 2.0, ok=False)])


def test_load_rows_reads_what_the_benchmark_writes(tmp_path) -> None:
    rows = [validate.ValidationRow("mono", 2.0, "output_tok_s", 90.0, 100.0)]
    p = tmp_path / "plan_validation-x.json"
    p.write_text(json.dumps({"rows": [r.as_dict() for r in rows]}))
    back = validate.load_rows(p)
    assert back == rows and back[0].error == pytest.approx(-0.1)


def test_charts_show_what_they_say(tmp_path) -> None:
    from labkit.plan.search import SearchSettings, search_layouts
    from labkit.plan.workload import WorkloadShape, sample_requests
    from labkit.plots import plan as plan_plots

    pre = [PrefillSample(t, float(LAT.prefill_s(t))) for t in (16, 64, 256, 1024)]
    dec = [DecodeSample(b, b * c, float(LAT.decode_step_s(b, b * c))) for b in (1, 4) for c in (64, 512)]
    fig = plan_plots.plot_fit(Calibration(LAT, tuple(pre), tuple(dec)))
    a1, a2 = fig.axes[:2]
    assert a1.get_xlabel() == "prompt tokens T" and "ms" in a1.get_ylabel() and "ms" in a2.get_ylabel()
    assert len(a2.get_legend().get_texts()) == 2                          # one entry per batch size
    req = sample_requests(WorkloadShape("w", 500, 50, 0.3, 0.3), 100, 1.0, seed=0)
    res = search_layouts(req, LAT, 3, SLO(1.0, 0.05), settings=SearchSettings(bisection_steps=3, max_unit_devices=3,
                                                                                min_requests=50))
    fig = plan_plots.plot_layouts(res)
    assert len(fig.axes[0].patches) == len(res.scores)
    runs = {"mono": simulate(req.at_rate(3.0), LAT, Layout.mono()),
            "1P1D": simulate(req.at_rate(3.0), LAT, Layout.disagg(1, 1))}
    fig = plan_plots.plot_sim_compare(runs, SLO(1.0, 0.05))
    assert fig.axes[0].get_xlabel() == "TTFT (ms)" and len(fig.axes[2].patches) == 2
    rows = [validate.ValidationRow(m, 1.0, k, 1.0 + i, 1.0) for i, (m, k) in
            enumerate([("mono", "ttft_p50_ms"), ("1p1d", "tpot_p50_ms"), ("mono", "output_tok_s")])]
    fig = plan_plots.plot_validation(rows)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["TTFT p50", "TPOT p50", "output tok/s"]
    fig = plan_plots.plot_gain_map([1, 2], [3, 4, 5], np.array([[0.8, 1.2], [1.0, 1.5], [0.7, 2.0]]), "x", "y")
    assert fig.axes[0].get_xlabel() == "x"


@pytest.mark.timeout(300)
def test_tour_section_adds_a_verdict_per_azure_preset(tmp_path) -> None:
    from labkit.plan.tour import tour_section
    from labkit.report import Report

    report = Report(tmp_path / "report")
    report.section("Should you disaggregate?")
    tour_section(report, "ci")
    s = report.sections[-1]
    rows = s.tables[0][1]
    assert {r["workload"] for r in rows} == {"azure-conv-2023", "azure-code-2023"}
    assert all(r["verdict"].split()[0] in ("DISAGGREGATE:", "STAY", "MARGINAL") for r in rows)
    assert s.figures and s.figures[0][1].is_file()
    assert any(row.what.startswith("planner") for row in report.summary)


def test_latest_result_finds_the_benchmark_json() -> None:
    # benchmarks/plan_validation.py writes docs/results/plan_validation-<date>-<machine>.json
    path = validate.latest_result()
    if path is None:
        pytest.skip("no validation JSON under docs/results yet")
    assert path.name.startswith("plan_validation-") and validate.load_rows(path)


def test_report_card_scores_each_figure_against_its_target() -> None:
    from labkit.plan.card import METRICS, target_for

    rows = [validate.ValidationRow("mono", 0.5, "ttft_p50_ms", 109.0, 100.0),       # +9%: within 10%
            validate.ValidationRow("mono", 0.5, "ttft_p99_ms", 119.0, 100.0),       # +19%: within 20%
            validate.ValidationRow("mono", 0.5, "tpot_p50_ms", 88.0, 100.0),        # -12%: missed
            validate.ValidationRow("1p1d", 0.5, "itl_p99_ms", 75.0, 100.0),         # -25%: missed
            validate.ValidationRow("1p1d", 0.5, "output_tok_s", 95.0, 100.0)]
    card = validate.report_card(rows)
    assert [target_for(m) for m in METRICS] == [0.10, 0.20, 0.10, 0.20, 0.10, 0.20, 0.10]
    assert [r.met for r in rows] == [True, True, False, False, True]
    assert card.runs == [("mono", 0.5), ("1p1d", 0.5)]
    assert card.missing_modes == ["mono-dp", "1p1d-selective", "vllm-pd"]
    assert card.missing_metrics == ["tpot_p99_ms", "itl_p50_ms"]        # no run has these
    text = card.table()
    assert "p50s within 10%: 1 of 2  (target not met); worst: mono TPOT p50 at 0.5 req/s, -12.0%" in text
    assert "p99s within 20%: 1 of 2" in text and "-12.0% x" in text and "+9.0%  " in text
    d = card.to_dict()
    assert d["met"] == {"p50": [1, 2], "p99": [1, 2], "throughput": [1, 1]} and d["targets"]["p99"] == 0.20
    with pytest.raises(ValueError, match="unknown metric"):
        validate.report_card([validate.ValidationRow("mono", 1.0, "e2e_p50_ms", 1.0, 1.0)])


def test_an_old_validation_file_gives_a_card_that_names_what_it_lacks(tmp_path) -> None:
    # the 2026-11-27 file's shape: p50 TTFT, p50 TPOT and throughput only
    old = [validate.ValidationRow(m, r, k, 1.0 + e, 1.0) for m, r, k, e in
           [("mono", 0.2, "ttft_p50_ms", -0.12), ("mono", 0.2, "tpot_p50_ms", -0.01), ("mono", 0.2, "output_tok_s", 0.0),
            ("1p1d", 0.2, "ttft_p50_ms", -0.05), ("1p1d", 0.2, "tpot_p50_ms", -0.06), ("1p1d", 0.2, "output_tok_s", 0.0)]]
    p = tmp_path / "plan_validation-old.json"
    p.write_text(json.dumps({"rows": [r.as_dict() for r in old], "share_within_15pct": 0.9}))
    card = validate.report_card(p)
    assert card.source == "plan_validation-old.json"
    assert card.missing_metrics == ["ttft_p99_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms"]
    lines = card.summary()
    assert "p99s: none in this file" in lines
    assert "missing from this file: TTFT p99, TPOT p99, ITL p50, ITL p99 (written before the card recorded them)" in lines
    assert lines[0].startswith("p50s within 10%: 3 of 4")
    from labkit.plots import plan as plan_plots

    fig = plan_plots.plot_report_card(card)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("missing") == 2 * 4 and "-12.0%" in texts      # 2 runs x 4 figures the file lacks


def test_the_committed_validation_has_a_card() -> None:
    path = validate.latest_result()
    if path is None:
        pytest.skip("no validation JSON under docs/results yet")
    card = validate.report_card(path)
    assert card.runs and all(m in validate.METRICS for m in {r.metric for r in card.rows})


def test_mode_layouts_for_the_lab_modes() -> None:
    from labkit.links import Link

    link = Link.from_gbps(20, 1e-3)
    assert validate.mode_layout("mono")[0] == Layout.mono()
    assert validate.mode_layout("mono-dp", replicas=2)[0] == Layout.mono_dp(2)
    lay, lk, first = validate.mode_layout("2p1d", link=link)
    assert lay == Layout.disagg(2, 1) and lk is link and first == "landed"
    assert validate.mode_layout("1p1d-selective", link=link, prefill_threshold=256)[0] == Layout.disagg(1, 1, 256)
    with pytest.raises(ValueError, match="prefill_threshold"):
        validate.mode_layout("1p1d-selective")
    with pytest.raises(ValueError, match="no simulator layout"):
        validate.mode_layout("mono-pipeline")
    # the names the sweep's servers run under: the threshold and the chunk travel in them
    assert validate.mode_layout("1p1d-selective-128", link=link)[0] == Layout.disagg(1, 1, 128)
    assert validate.server_mode("1p1d-selective", 128) == "1p1d-selective-128" == validate.server_mode("1P1D-selective-128")
    assert validate.mode_layout("mono-chunked-512")[0] == Layout.mono(policy="chunked")
    assert validate.mode_limits("mono-chunked-512").max_num_batched_tokens == 512
    assert validate.mode_limits("mono-chunked").max_num_batched_tokens == 256      # the factory's default chunk
    assert validate.mode_limits("mono-dp").max_num_batched_tokens == 2048
    # the simulator spreads mono-dp's requests by load, as the lab's router does
    assert validate.mode_layout("mono-dp")[0].dispatch == "least-loaded"


def test_a_selective_run_fills_the_cards_selective_slot() -> None:
    rows = [validate.ValidationRow("1p1d-selective-256", 1.0, "ttft_p50_ms", 110.0, 100.0),
            validate.ValidationRow("mono-dp", 1.0, "ttft_p50_ms", 100.0, 100.0),
            validate.ValidationRow("mono", 1.0, "ttft_p50_ms", 100.0, 100.0)]
    card = validate.report_card(rows)
    assert "1p1d-selective" not in card.missing_modes and "mono-dp" not in card.missing_modes
    assert [m for m, _ in card.runs] == ["mono", "mono-dp", "1p1d-selective-256"]      # the card's mode order
    assert "1p1d-selective-256" in card.table()


def test_measured_itl_comes_from_every_gap() -> None:
    recs = [Rec(0.0, 100, 4, 0.1, 0.4), Rec(1.0, 100, 3, 0.1, 0.3)]
    recs[0].itl_s, recs[1].itl_s = [0.1, 0.1, 0.1], [0.1, 0.5]
    m = validate.measured_metrics(recs)
    assert m["itl_p50_ms"] == pytest.approx(100.0) and m["itl_p99_ms"] == pytest.approx(1e3 * np.percentile([.1] * 4 + [.5], 99))
    assert m["tpot_p50_ms"] == pytest.approx(100.0)


def test_mode_layouts_and_limits_for_vllms_modes() -> None:
    from labkit.links import Link

    link = Link.from_gbps(20, 1e-3)
    lay, lk, first = validate.mode_layout("vllm-pd", link=link)
    assert lay == Layout.disagg(1, 1) and lk is link and first == "adopted"   # vLLM's proxy streams from decode
    assert validate.mode_layout("vllm-mono") == (Layout.mono(policy="chunked"), None, "adopted")
    assert validate.mode_limits("vllm-pd") == validate.mode_limits("1p1d")
    cfg = validate.vllm_config("small")   # vLLM gets the lab workers' limits and the preset's context
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len) == (64, 2048, 4096)


def test_a_server_seen_from_outside_is_fitted_from_its_requests() -> None:
    """fit_from_requests recovers prefill (TTFT less the KV link) and batch-1 decode (TPOT) of a
    server whose requests follow a known model."""
    from labkit.links import Link
    from labkit.plan.calibrate import fit_from_requests

    class Timed(Rec):
        @property
        def tpot_s(self) -> float:
            return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    link = Link(2e9, 0.0)
    recs = []
    for k, (p, out) in enumerate([(40, 20), (300, 60), (900, 30), (1500, 80), (2000, 10)]):
        ttft = float(LAT.prefill_s(p)) + link.seconds(p * LAT.kv_bytes_per_token)
        step = float(LAT.decode_step_s(1, p + out // 2))
        recs.append(Timed(k * 10.0, p, out, ttft, ttft + (out - 1) * step))
    recs.append(Timed(99.0, 500, 10, 1.0, 2.0, ok=False))   # failed requests are left out
    m = fit_from_requests(recs, kv_bytes_per_token=LAT.kv_bytes_per_token, link=link)
    for p in (40, 700, 2000):
        assert m.prefill_s(p) == pytest.approx(float(LAT.prefill_s(p)), rel=0.02)
    for ctx in (50, 1000, 2000):   # batch 1: the per-sequence cost is folded into the intercept
        assert m.decode_step_s(1, ctx) == pytest.approx(float(LAT.decode_step_s(1, ctx)), rel=0.02)
    assert m.decode_c_s_per_seq == 0.0
    # without the link, the transfer is part of the prefill it reports
    assert fit_from_requests(recs, kv_bytes_per_token=LAT.kv_bytes_per_token).prefill_s(2000) > m.prefill_s(2000)
    with pytest.raises(ValueError, match="3 distinct lengths"):
        fit_from_requests(recs[:2], kv_bytes_per_token=1)


def test_a_later_run_adds_its_modes_to_an_earlier_card() -> None:
    same = {"model": "small", "machine": "cpu-2core", "workload": "azure-conv-2023", "length_scale": 0.25,
            "rates_rps": [0.2], "requests_per_rate": 16}

    def doc(modes: list[str], predicted: float, **kw: object) -> dict:
        rows = [validate.ValidationRow(m, 0.2, "ttft_p50_ms", predicted, 100.0).as_dict() for m in modes]
        return {**same, "modes": modes, "rows": rows, "date": "d", "seconds": 5.0,
                "serving_overhead_s": {m: {"per_request": predicted} for m in modes}, **kw}

    old = doc(["mono", "1p1d"], 150.0)
    merged = validate.merge_results(old, doc(["1p1d", "vllm-pd"], 105.0))
    assert merged["modes"] == ["mono", "1p1d", "vllm-pd"]
    assert {(r["mode"], r["predicted"]) for r in merged["rows"]} == {("mono", 150.0), ("1p1d", 105.0),
                                                                     ("vllm-pd", 105.0)}
    assert merged["serving_overhead_s"]["1p1d"] == {"per_request": 105.0}    # the newer run replaces a mode
    card = validate.rows_of(merged)
    assert len(card) == 3 and merged["report_card"] == validate.report_card(card).to_dict()
    assert merged["added"] == [{"modes": ["1p1d", "vllm-pd"], "date": "d", "seconds": 5.0}]
    assert old["modes"] == ["mono", "1p1d"]      # the earlier document is left as it was
    with pytest.raises(ValueError, match="requests_per_rate"):
        validate.merge_results(old, {**doc(["vllm-pd"], 1.0), "requests_per_rate": 4})
