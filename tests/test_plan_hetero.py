"""Prefill and decode on different parts (cost per million tokens), and selective disaggregation's threshold."""
from __future__ import annotations

import numpy as np
import pytest

from labkit.links import Link
from labkit.plan.goodput import SearchSettings
from labkit.plan.hetero import Part, compare_parts, kv_limited_seqs, part_from_datasheet
from labkit.plan.latency_model import LatencyModel
from labkit.plan.scaling import ModelShape
from labkit.plan.search import Network
from labkit.plan.selective import best_prefill_threshold, threshold_candidates
from labkit.plan.simulator import SLO, Layout, Limits, simulate
from labkit.plan.workload import WorkloadShape, sample_requests

LAT = LatencyModel(0.002, 50e-6, 1e-8, 0.003, 1e-7, 1e-4, kv_bytes_per_token=100_000)
FAST = SearchSettings(bisection_steps=4, min_requests=60, max_requests=400)


def test_a_part_from_the_datasheet_holds_what_its_memory_holds() -> None:
    m = ModelShape.from_preset("llama-3.1-8b")
    # L4: 24 GB x 0.9 - 16.06 GB of bf16 weights = 5.54 GB of KV; 2,000-token requests at 131,072 B/token
    l4 = part_from_datasheet("L4", m, 0.8, limits=Limits(256, 8192), context_tokens=2000)
    assert l4.limits.max_num_seqs == kv_limited_seqs(24e9, m.param_bytes, 131_072, 2000) == 21
    assert l4.limits.max_num_batched_tokens == 8192 and l4.latency.device == "L4"
    h100 = part_from_datasheet("H100 SXM", m, 2.5, limits=Limits(256, 8192), context_tokens=2000)
    assert h100.limits.max_num_seqs == 213                              # (72e9 - 16.06e9) / 2.62e8
    assert h100.latency.decode_a_s < l4.latency.decode_a_s              # 3.35 TB/s against 300 GB/s
    big = ModelShape("70b", 70_000_000_000, 80, 8192, 327_680)
    with pytest.raises(ValueError, match="no room"):
        part_from_datasheet("L40S", big, 1.0, context_tokens=2000)      # 140 GB of weights, 48 GB card
    with pytest.raises(ValueError, match="price"):
        Part("x", LAT, 0.0, Limits())


def test_decode_on_a_cheaper_part_that_decodes_as_fast_costs_less() -> None:
    req = sample_requests(WorkloadShape("long", 2000, 60, 0.3, 0.3), 200, 1.0, seed=0)
    slo = SLO(2.0, 0.02)
    flagship, cheap = Part("A", LAT, 4.0, Limits(64, 2048)), Part("B", LAT, 1.0, Limits(64, 2048))
    net = Network(Link.from_gbps(400, 10e-6), Link.from_gbps(3600, 4e-6), 8)
    cmp = compare_parts(req, slo, flagship, cheap, network=net, settings=FAST, max_unit_devices=4)
    groups = [r["parts"] for r in cmp.rows()]
    assert groups[0] in ("P on A, D on B", "xPyD on B") and set(groups) >= {"mono on A", "xPyD on A", "P on A, D on B"}
    mixed, same = cmp.best_of("P on A, D on B"), cmp.best_of("xPyD on A")
    assert mixed is not None and same is not None
    assert mixed.cost_per_m_output_tokens < same.cost_per_m_output_tokens
    # price per hour of a unit: P at A's price, D at B's; cost = price / (req/s x output tokens) per million
    assert mixed.price_per_hour == mixed.unit.num_prefill * 4.0 + mixed.unit.num_decode * 1.0
    mean_out = float(req.output_tokens.mean())
    assert mixed.cost_per_m_output_tokens == pytest.approx(mixed.price_per_hour / 3600 / (mixed.rate_rps * mean_out) * 1e6)
    costs = [s.cost_per_m_output_tokens for s in cmp.scores]
    assert costs == sorted(costs) and "P on A, D on B" in cmp.render()


def test_threshold_sweep_ends_at_plain_xpyd_and_at_mono_on_decode() -> None:
    req = sample_requests(WorkloadShape("w", 800, 100, 0.6, 0.4), 150, 1.0, seed=3)
    ts = threshold_candidates(req)
    assert ts[0] == 0 and ts[-1] == int(req.prompt_tokens.max()) + 1 and ts == sorted(set(ts))
    slo, link = SLO(2.0, 0.05), Link.from_gbps(100, 10e-6)
    sweep = best_prefill_threshold(req, LAT, slo, rate_rps=6.0, link=link)
    assert sweep.thresholds == tuple(ts) and sweep.share_on_decode[0] == 0.0 and sweep.share_on_decode[-1] == 1.0
    plain = simulate(req.at_rate(6.0), LAT, Layout.disagg(1, 1), link=link)
    mono = simulate(req.at_rate(6.0), LAT, Layout.mono())
    assert sweep.goodput_rps[0] == pytest.approx(plain.goodput_rps(slo))
    assert sweep.goodput_rps[-1] == pytest.approx(mono.goodput_rps(slo))
    assert sweep.goodput_rps[sweep.best_index] == max(sweep.goodput_rps)
    assert sweep.best_threshold == ts[int(np.argmax(sweep.goodput_rps))]
    assert [r["threshold (tokens)"] for r in sweep.rows()] == ts


def test_best_threshold_by_sustained_goodput_beats_both_ends_on_a_mixed_workload() -> None:
    # short and long prompts: prefilling the short ones on the decode device balances the two devices
    req = sample_requests(WorkloadShape("mix", 600, 60, 0.8, 0.3), 200, 1.0, seed=4)
    sweep = best_prefill_threshold(req, LAT, SLO(2.0, 0.05), thresholds=[0, 300, 600, 100_000],
                                   link=Link.from_gbps(100, 10e-6), settings=FAST)
    g = dict(zip(sweep.thresholds, sweep.goodput_rps))
    assert sweep.best_threshold in (300, 600)
    assert g[sweep.best_threshold] > max(g[0], g[100_000])
    assert sweep.gain_over_plain() == pytest.approx(g[sweep.best_threshold] / g[0])
    with pytest.raises(ValueError, match=">= 0"):
        best_prefill_threshold(req, LAT, SLO(2.0, 0.05), thresholds=[-1])
