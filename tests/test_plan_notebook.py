"""Notebook 06's helpers: the planner widget's logic (inputs, one run, the verdict panel, sliders that
redraw on release), the claims against the planner, the held-out split of a calibration, the
efficiencies taken from the committed H100 run, and the decode fit the planner shares with exercise 1."""
from __future__ import annotations

import math

import numpy as np
import pytest

from labkit import reference
from labkit.plan import claims
from labkit.plan.calibrate import CalibrationPoints, split_decode_samples
from labkit.plan.latency_model import DecodeSample, LatencyModel, fit_decode_steps
from labkit.plan.scaling import (
    Efficiency,
    ModelShape,
    datasheet_spec,
    efficiency_of_steps,
    reference_efficiency,
    roofline_latency_model,
)
from labkit.plan.search import SearchSettings
from labkit.plan.widget import SLIDERS, PlannerInputs, build_sliders, run_planner, verdict_color, verdict_html
from labkit.plan.workload import workload_shape

QUICK = SearchSettings(bisection_steps=3, min_requests=40, max_requests=200, max_unit_devices=4)


@pytest.fixture(scope="module")
def h100_8b() -> LatencyModel:
    return roofline_latency_model(ModelShape.from_preset("llama-3.1-8b"), datasheet_spec("H100 SXM"),
                                  Efficiency(0.46, 0.45))


@pytest.mark.parametrize("field,value,word", [("prompt_tokens", 0, "prompt_tokens"), ("rate_per_device", 0.0, "rate"),
                                              ("prefix_hit", 1.0, "prefix_hit"), ("devices", 0, "devices"),
                                              ("link_gbps", -1.0, "link_gbps"), ("tpot_slo_ms", 0.0, "SLO")])
def test_planner_inputs_name_the_bad_value(field: str, value: float, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        PlannerInputs(**{field: value})


def test_planner_inputs_map_to_shape_slo_and_network() -> None:
    i = PlannerInputs(prompt_tokens=4096, output_tokens=64, prefix_hit=0.5, link_gbps=25.0, ttft_slo_ms=800,
                      tpot_slo_ms=40)
    s = i.shape(workload_shape("azure-conv-2023"))
    assert (s.prompt_median_tokens, s.output_median_tokens, s.prefix_hit_rate) == (4096.0, 64.0, 0.5)
    assert s.prompt_sigma == workload_shape("azure-conv-2023").prompt_sigma, "the spread is kept"
    assert (i.slo.ttft_s, i.slo.tpot_s) == (0.8, 0.04)
    assert i.network.inter_node.gbps == pytest.approx(25.0) and not i.rdma
    assert PlannerInputs(link_gbps=100.0).rdma


def test_one_planner_run_simulates_the_best_units_at_the_chosen_rate(h100_8b: LatencyModel) -> None:
    inputs = PlannerInputs(devices=4, rate_per_device=3.0)
    view = run_planner(inputs, workload_shape("azure-conv-2023"), h100_8b, num_requests=80, settings=QUICK)
    rep = view.report
    assert rep.search.devices == 4 and view.seconds > 0
    assert rep.curve.devices == (1, 2, 3, 4), "no curve beyond the budget: a redraw stays in seconds"
    for dep in (rep.search.mono, rep.search.disagg):
        sim = view.sims[dep.unit.label]
        rate = (len(sim.arrival_s) - 1) / sim.arrival_s[-1]
        assert rate == pytest.approx(inputs.rate_per_device * dep.unit.num_devices, rel=1e-6)
    html = verdict_html(rep)
    assert rep.checklist.verdict in html and rep.search.best.label in html
    assert html.count("<tr>") == len(rep.checklist.items)
    assert verdict_color(rep.checklist.verdict) in html


def test_verdict_colours_and_escaping() -> None:
    assert verdict_color("DISAGGREGATE: about 1.4x") == "#2ca02c"
    assert verdict_color("STAY MONOLITHIC: 0.8x") == "#d62728"
    assert verdict_color("MARGINAL (1.02x)") == verdict_color("no verdict") == "#ff7f0e"


def test_sliders_redraw_on_release_and_cover_the_defaults() -> None:
    pytest.importorskip("ipywidgets")
    d = PlannerInputs(devices=16, link_gbps=100.0)
    sliders = build_sliders(d)
    assert set(sliders) == set(SLIDERS) == set(PlannerInputs.__dataclass_fields__)
    assert all(w.continuous_update is False for w in sliders.values())
    for name, w in sliders.items():
        assert w.value == pytest.approx(getattr(d, name)), name


def test_cost_saving_and_gain_are_one_number_on_the_same_devices() -> None:
    assert claims.saving_for_gain(2.0) == pytest.approx(0.5)
    assert claims.gain_for_saving(0.4) == pytest.approx(1 / 0.6)
    for g in (1.18, 2.0, 6.4):
        assert claims.gain_for_saving(claims.saving_for_gain(g)) == pytest.approx(g)
    with pytest.raises(ValueError, match="saving"):
        claims.gain_for_saving(1.0)


def test_claims_rows_and_verdicts(h100_8b: LatencyModel) -> None:
    small = [s for s in claims.small_setup_scenarios((2,)) if s.shape.name == "short-prompt"]
    rows = claims.plan_rows(small, h100_8b, num_requests=80, settings=QUICK)
    (r,) = rows
    assert r.devices == 2 and r.gain < 0.95, "short prompts on two devices over TCP: disaggregation loses"
    assert r.cost_saving == pytest.approx(1 - 1 / r.gain, rel=1e-6), "same devices: the saving is the gain"
    text = claims.small_setup_verdict(rows, reference.HANDBOOK_SMALL_SETUP_LOSS)
    assert f"{r.gain:.2f}x" in text and "20-30%" in text and "loss" in text
    art = claims.article_scenarios()
    assert all(s.devices > reference.ARTICLE_CONDITIONS.min_devices for s in art)
    assert all(s.link.gbps > reference.ARTICLE_CONDITIONS.min_link_gbps and s.shape.prefix_hit_rate == 0 for s in art)
    fake = [claims.ClaimRow("long", 32, "400 Gbps RDMA", "8 x 3P1D", "mono-dp x32", 1.5, 1 / 3, 9),
            claims.ClaimRow("code", 32, "400 Gbps RDMA", "4 x 7P1D", "mono-dp x32", 3.0, 2 / 3, 3)]
    verdict = claims.article_verdict(fake, reference.ARTICLE)
    assert "1.50x goodput (below the article's 2-6.4x)" in verdict and "33% lower cost" in verdict
    assert "3.00x goodput (inside" in verdict and "67% lower cost per output token (above" in verdict
    assert "1.18-1.67x" in verdict and "50%-84%" in verdict


def test_held_out_split_keeps_every_other_batch_size() -> None:
    samples = [DecodeSample(b, b * 100, 0.01 * b) for b in (1, 4, 8, 16, 32) for _ in range(2)]
    fit, held = split_decode_samples(samples)
    assert sorted({s.batch_size for s in fit}) == [1, 8, 32] and sorted({s.batch_size for s in held}) == [4, 16]
    assert len(fit) + len(held) == len(samples)
    with pytest.raises(ValueError, match=">= 3"):
        split_decode_samples([DecodeSample(1, 10, 0.01), DecodeSample(2, 20, 0.02)])
    for profile in ("ci", "full", "gpu"):
        assert len(CalibrationPoints.for_profile(profile).decode_batches) >= 3, profile


def test_decode_fit_recovers_a_known_model_and_keeps_coefficients_non_negative() -> None:
    a, b, c = 5e-3, 2e-8, 3e-5
    samples = [DecodeSample(n, n * ctx, a + b * n * ctx + c * n) for n in (1, 8, 64) for ctx in (128, 2048)]
    (fa, fb, fc), r2 = fit_decode_steps(samples)
    assert (fa, fb, fc) == pytest.approx((a, b, c), rel=1e-6) and r2 == pytest.approx(1.0)
    flat = [DecodeSample(n, n * 10, 0.01 * (1.1 if n % 2 else 0.9)) for n in (1, 2, 3, 4)]
    assert min(fit_decode_steps(flat)[0]) >= 0


def test_efficiency_from_the_committed_h100_run() -> None:
    run = reference.gpu_check()
    if run is None:
        pytest.skip("no committed GPU run in this checkout")
    hw = datasheet_spec("H100 SXM")
    eff = reference_efficiency(run, hw)
    pre = run.point("llama-3.1-8b", "engine graphs", "prefill")
    dec = run.point("llama-3.1-8b", "engine graphs", "decode")
    # as fractions of the datasheet: the measured MFU/MBU times measured roof / datasheet peak
    assert eff.mfu_prefill == pytest.approx(pre.mfu * run.roofs.peak_flops / hw.flops_per_s, rel=1e-6)
    assert eff.mbu_decode == pytest.approx(dec.mbu * run.roofs.read_bytes_per_s / hw.bandwidth_bytes_per_s, rel=1e-6)
    # a roofline model at those efficiencies predicts the measured batch-1 decode step within 10%
    lat = roofline_latency_model(ModelShape.from_preset("llama-3.1-8b"), hw, eff)
    assert float(lat.decode_step_s(1, dec.seq_len)) == pytest.approx(dec.ms / 1e3, rel=0.10)
    with pytest.raises(KeyError, match="no-such-model"):
        reference_efficiency(run, hw, model="no-such-model")

    class P:
        achieved_flops_per_s, mbu = 2 * hw.flops_per_s, 0.5

    assert efficiency_of_steps(P(), P(), hw.bandwidth_bytes_per_s, hw).mfu_prefill == 1.0, "capped at the peak"
    assert math.isclose(efficiency_of_steps(P(), P(), hw.bandwidth_bytes_per_s, hw).mbu_decode, 0.5)


def test_decode_fit_exercise_plugs_into_a_latency_model(h100_8b: LatencyModel) -> None:
    from labkit.exercises import nb06

    m, clipped = nb06.model_with_decode(h100_8b, (1e-3, -2e-9, 4e-5))
    assert (m.decode_a_s, m.decode_b_s_per_ctx_token, m.decode_c_s_per_seq) == (1e-3, 0.0, 4e-5)
    assert clipped == ["decode_b_s_per_ctx_token"] and "your fit" in m.note
    assert m.prefill_b_s_per_token == h100_8b.prefill_b_s_per_token
    with pytest.raises(ValueError, match="three numbers"):
        nb06.model_with_decode(h100_8b, (1.0, 2.0))
    transfer, prefill = nb06.simulated_transfer_and_prefill_s(h100_8b, 100.0, 4096)
    assert prefill == pytest.approx(float(h100_8b.prefill_s(4096)), rel=1e-9)
    assert transfer == pytest.approx(4096 * h100_8b.kv_bytes_per_token / 12.5e9, rel=1e-6)
    assert np.isfinite(transfer)
