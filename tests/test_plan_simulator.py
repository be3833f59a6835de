"""The serving simulator: exact single-request times, interference, links, prefix hits, limits, goodput."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from labkit.links import Link
from labkit.plan.latency_model import LatencyModel
from labkit.plan.simulator import SLO, Layout, Limits, simulate
from labkit.plan.workload import Requests, WorkloadShape, sample_requests

LAT = LatencyModel(0.002, 50e-6, 1e-8, 0.003, 1e-7, 1e-4, kv_bytes_per_token=100_000)


def one(prompt: int, output: int, at: float = 0.0) -> Requests:
    return Requests(np.array([at]), np.array([prompt]), np.array([output]))


def decode_total_s(prompt: int, output: int) -> float:
    """Sum of batch-1 decode steps for tokens 2..output (context grows by one each step)."""
    return sum(float(LAT.decode_step_s(1, prompt + 1 + j)) for j in range(output - 1))


def test_single_request_mono_matches_the_formulas() -> None:
    r = simulate(one(500, 20), LAT, Layout.mono())
    assert r.ttft_s[0] == pytest.approx(float(LAT.prefill_s(500)), rel=1e-12)
    assert r.e2e_s[0] == pytest.approx(float(LAT.prefill_s(500)) + decode_total_s(500, 20), rel=1e-9)
    assert r.tpot_s[0] == pytest.approx(decode_total_s(500, 20) / 19, rel=1e-9)


def test_server_costs_delay_the_first_token_and_slow_every_step() -> None:
    served = LAT.with_serving(0.040, 0.005)
    r = simulate(one(500, 20), served, Layout.mono())
    assert r.ttft_s[0] == pytest.approx(float(LAT.prefill_s(500)) + 0.040, rel=1e-9)
    assert r.tpot_s[0] == pytest.approx(decode_total_s(500, 20) / 19 + 0.005, rel=1e-9)
    d = simulate(one(500, 20), served, Layout.disagg(1, 1), link=Link.from_gbps(8.0, 1e-3))
    assert d.tpot_s[0] == pytest.approx(r.tpot_s[0], rel=1e-9)


def test_single_request_disagg_adds_the_kv_transfer() -> None:
    link = Link.from_gbps(8.0, 1e-3)                # 1 GB/s
    r = simulate(one(500, 20), LAT, Layout.disagg(1, 1), link=link)
    transfer = 1e-3 + 500 * 100_000 / 1e9                          # 51 ms
    assert r.ttft_s[0] == pytest.approx(float(LAT.prefill_s(500)) + transfer, rel=1e-9)
    assert r.tpot_s[0] == pytest.approx(decode_total_s(500, 20) / 19, rel=1e-9)
    faster = simulate(one(500, 20), LAT, Layout.disagg(1, 1), link=Link.from_gbps(800.0, 1e-3))
    assert faster.ttft_s[0] < r.ttft_s[0]


def test_prefix_hits_shorten_prefill_but_not_the_transfer() -> None:
    full = simulate(one(1000, 2), LAT, Layout.mono())
    hit = simulate(one(1000, 2), LAT, Layout.mono(), prefix_hit_rate=0.5)
    expected = LAT.prefill_a_s + LAT.chunk_work_s(500, 500)
    assert hit.ttft_s[0] == pytest.approx(expected, rel=1e-12) and hit.ttft_s[0] < full.ttft_s[0]
    link = Link.from_gbps(8.0, 0.0)
    d_full = simulate(one(1000, 2), LAT, Layout.disagg(1, 1), link=link)
    d_hit = simulate(one(1000, 2), LAT, Layout.disagg(1, 1), link=link, prefix_hit_rate=0.5)
    saved = full.ttft_s[0] - hit.ttft_s[0]
    assert d_full.ttft_s[0] - d_hit.ttft_s[0] == pytest.approx(saved, rel=1e-9)   # the KV still moves in full


def _mixed_load() -> Requests:
    # short decodes running, long prompts arriving: the interference lesson
    shape = WorkloadShape("mix", 2000, 200, 0.3, 0.3)
    return sample_requests(shape, 120, 4.0, seed=3)


def test_prefill_first_stalls_decodes_and_disaggregation_removes_the_stalls() -> None:
    req = _mixed_load()
    mono = simulate(req, LAT, Layout.mono())
    chunked = simulate(req, LAT, Layout.mono(policy="chunked"), limits=Limits(64, 512))
    disagg = simulate(req, LAT, Layout.disagg(1, 1))
    p99 = {k: r.itl_percentile_s(99) for k, r in (("mono", mono), ("chunked", chunked), ("disagg", disagg))}
    # a 2,000-token prefill (~0.14 s) lands between two decode steps in mono
    assert p99["mono"] > 3 * p99["disagg"]
    assert p99["chunked"] < p99["mono"]
    # decode steps alone: the p99 ITL of disaggregated decode is a few decode steps at most
    assert p99["disagg"] < 4 * float(LAT.decode_step_s(64, 64 * 2300))


def test_every_request_finishes_in_order_of_its_phases() -> None:
    req = sample_requests(WorkloadShape("w", 300, 50, 0.8, 0.8), 200, 20.0, seed=1)
    for lay in (Layout.mono(2), Layout.mono(1, "chunked"), Layout.disagg(2, 3)):
        r = simulate(req, LAT, lay)
        assert np.isfinite(r.finish_s).all()
        assert (r.first_token_s >= r.arrival_s).all() and (r.finish_s >= r.first_token_s).all()
        # a request's decode cannot beat back-to-back batch-1 steps
        floor = np.array([(o - 1) * LAT.decode_a_s for o in r.output_tokens])
        assert (r.finish_s - r.first_token_s >= floor * (1 - 1e-9)).all()
        assert r.itl_weights.sum() == pytest.approx(float((req.output_tokens - 1).sum()))


def test_max_num_seqs_one_serializes_requests() -> None:
    req = Requests(np.array([0.0, 0.0]), np.array([100, 100]), np.array([10, 10]))
    r = simulate(req, LAT, Layout.mono(), limits=Limits(max_num_seqs=1))
    assert r.first_token_s[1] >= r.finish_s[0] - 1e-12


def test_overload_cuts_goodput_and_more_devices_restore_it() -> None:
    shape = WorkloadShape("w", 1000, 100, 0.5, 0.5)
    slo = SLO(ttft_s=1.0, tpot_s=0.05)
    base = sample_requests(shape, 300, 1.0, seed=2)
    light = simulate(base.at_rate(1.0), LAT, Layout.mono()).summary(slo)
    heavy = simulate(base.at_rate(30.0), LAT, Layout.mono()).summary(slo)
    assert light["slo_attainment"] > 0.9 > heavy["slo_attainment"]
    assert heavy["ttft_p50_s"] > 10 * light["ttft_p50_s"]
    spread = simulate(base.at_rate(30.0), LAT, Layout.mono(16)).summary(slo)
    assert spread["goodput_rps"] > 3 * heavy["goodput_rps"]


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(ValueError, match="num_prefill >= 1"):
        Layout.disagg(0, 2)
    with pytest.raises(ValueError, match="prefix_hit_rate"):
        simulate(one(10, 2), LAT, Layout.mono(), prefix_hit_rate=1.0)
    with pytest.raises(ValueError, match="gbps"):
        Link.from_gbps(0.0)
    with pytest.raises(ValueError, match="from_gbps"):       # a line rate in Gbit/s passed as bytes/s
        Link(100.0)
    with pytest.raises(ValueError, match="sorted"):
        Requests(np.array([1.0, 0.0]), np.array([1, 1]), np.array([1, 1]))


def test_first_token_when_the_kv_lands_or_when_decode_adopts_it() -> None:
    # two requests on one decode slot: the second waits for the first to finish before adoption
    req = Requests(np.array([0.0, 0.0]), np.array([100, 100]), np.array([20, 20]))
    lim = Limits(max_num_seqs=1)
    adopted = simulate(req, LAT, Layout.disagg(1, 1), limits=lim)
    landed = simulate(req, LAT, Layout.disagg(1, 1), limits=lim, first_token_at="landed")
    assert landed.ttft_s[1] < adopted.ttft_s[1]                       # adoption waited for the slot
    assert adopted.ttft_s[1] >= adopted.e2e_s[0] - 1e-12
    np.testing.assert_allclose(landed.finish_s, adopted.finish_s)     # the same work either way
    with pytest.raises(ValueError, match="first_token_at"):
        simulate(req, LAT, Layout.disagg(1, 1), first_token_at="whenever")  # type: ignore[arg-type]


def _same_times(a, b) -> None:
    np.testing.assert_allclose(a.first_token_s, b.first_token_s, rtol=1e-12)
    np.testing.assert_allclose(a.finish_s, b.finish_s, rtol=1e-12)


def test_mono_dp_with_one_replica_is_mono_and_with_two_is_two_monos() -> None:
    req = sample_requests(WorkloadShape("w", 600, 80, 0.5, 0.5), 80, 6.0, seed=5)
    _same_times(simulate(req, LAT, Layout.mono_dp(1)), simulate(req, LAT, Layout.mono()))
    two = simulate(req, LAT, Layout.mono_dp(2, dispatch="round-robin"))
    assert two.layout.label == "mono-dp x2 round-robin" and two.layout.num_devices == 2
    assert Layout.mono_dp(2).label == "mono-dp x2"
    for rep in (0, 1):       # round-robin: replica k serves requests k, k+2, ... as a mono engine alone would
        half = Requests(req.arrival_s[rep::2], req.prompt_tokens[rep::2], req.output_tokens[rep::2])
        alone = simulate(half, LAT, Layout.mono())
        np.testing.assert_allclose(two.first_token_s[rep::2], alone.first_token_s, rtol=1e-12)
        np.testing.assert_allclose(two.finish_s[rep::2], alone.finish_s, rtol=1e-12)
    assert simulate(req.at_rate(30.0), LAT, Layout.mono_dp(2)).summary()["ttft_p50_s"] < \
        simulate(req.at_rate(30.0), LAT, Layout.mono()).summary()["ttft_p50_s"]


def test_mono_dp_sends_each_request_to_the_replica_with_the_fewest_in_flight() -> None:
    """A long request (0), a short one (1) that is done before the third (2) arrives: by load, 2 joins the idle
    replica of 1; round-robin puts it beside 0. Each replica then runs as a mono engine alone would."""
    req = Requests(np.array([0.0, 0.01, 2.0]), np.array([300, 50, 400]), np.array([2000, 3, 30]))
    assert float(simulate(one(50, 3), LAT, Layout.mono()).finish_s[0]) < 2.0 - 0.01   # 1 is over before 2 comes
    assert float(simulate(one(300, 2000), LAT, Layout.mono()).finish_s[0]) > 2.5      # 0 is still running

    def alone(rows: list[int]) -> Requests:
        return Requests(req.arrival_s[rows], req.prompt_tokens[rows], req.output_tokens[rows])

    by_load = simulate(req, LAT, Layout.mono_dp(2))
    np.testing.assert_allclose(by_load.finish_s[[0]], simulate(alone([0]), LAT, Layout.mono()).finish_s, rtol=1e-12)
    np.testing.assert_allclose(by_load.finish_s[[1, 2]], simulate(alone([1, 2]), LAT, Layout.mono()).finish_s,
                               rtol=1e-12)
    in_turn = simulate(req, LAT, Layout.mono_dp(2, dispatch="round-robin"))
    np.testing.assert_allclose(in_turn.finish_s[[0, 2]], simulate(alone([0, 2]), LAT, Layout.mono()).finish_s,
                               rtol=1e-12)
    assert by_load.ttft_s[2] < in_turn.ttft_s[2]      # beside the long request its prefill waits for a step
    # A busy trace: whenever fewer requests are in flight than there are replicas, one replica is idle and a
    # request sent by load starts its prefill on arrival (TTFT = its prefill alone); in turn, some wait.
    busy = sample_requests(WorkloadShape("w", 600, 80, 0.8, 0.8), 300, 6.0, seed=9)

    def unhindered(res: Any) -> tuple[np.ndarray, np.ndarray]:
        a, f = res.arrival_s, res.finish_s
        in_flight = np.array([np.count_nonzero((a < a[i]) & (f > a[i])) for i in range(len(a))])
        free = in_flight < 3
        return free, np.isclose(res.ttft_s, LAT.prefill_s(busy.prompt_tokens), rtol=1e-9)

    free, alone_ttft = unhindered(simulate(busy, LAT, Layout.mono_dp(3)))
    assert free.sum() > 100 and alone_ttft[free].all()
    free, alone_ttft = unhindered(simulate(busy, LAT, Layout.mono_dp(3, dispatch="round-robin")))
    assert not alone_ttft[free].all()
    with pytest.raises(ValueError, match="dispatch"):
        Layout.mono_dp(2, dispatch="random")  # type: ignore[arg-type]


def test_selective_threshold_zero_is_plain_xpyd_and_above_every_prompt_is_mono_on_decode() -> None:
    req = sample_requests(WorkloadShape("w", 600, 80, 0.6, 0.5), 100, 8.0, seed=6)
    link = Link.from_gbps(8.0, 1e-3)
    _same_times(simulate(req, LAT, Layout.disagg(1, 1, prefill_threshold=0), link=link),
                simulate(req, LAT, Layout.disagg(1, 1), link=link))
    # every prompt under the threshold: the decode device prefills everything, the prefill device idles
    slower = LatencyModel(0.004, 80e-6, 2e-8, 0.006, 2e-7, 2e-4, kv_bytes_per_token=100_000)
    above = int(req.prompt_tokens.max()) + 1
    sel = simulate(req, LAT, Layout.disagg(1, 1, prefill_threshold=above), link=link, decode_latency=slower)
    _same_times(sel, simulate(req, slower, Layout.mono()))
    assert Layout.disagg(2, 1, 512).label == "2P1D sel<512"
    with pytest.raises(ValueError, match="prefill_threshold"):
        Layout("mono", prefill_threshold=8)


def test_selective_sends_short_prompts_to_the_decode_side_without_a_transfer() -> None:
    req = Requests(np.array([0.0, 10.0]), np.array([100, 1000]), np.array([5, 5]))
    link = Link.from_gbps(8.0, 1e-3)                                # 1 GB/s: the 1,000-token KV takes 100 ms
    r = simulate(req, LAT, Layout.disagg(1, 1, prefill_threshold=500), link=link)
    assert r.ttft_s[0] == pytest.approx(float(LAT.prefill_s(100)), rel=1e-12)          # prefilled on decode
    assert r.ttft_s[1] == pytest.approx(float(LAT.prefill_s(1000)) + 1e-3 + 1000 * 100_000 / 1e9, rel=1e-9)


def test_decode_device_link_carries_one_transfer_at_a_time() -> None:
    # two prompts prefilled at once on two prefill devices, both for the one decode device
    req = Requests(np.array([0.0, 0.0]), np.array([500, 500]), np.array([3, 3]))
    link = Link.from_gbps(8.0, 0.0)                                 # 50 ms for a 500-token KV
    r = simulate(req, LAT, Layout.disagg(2, 1), link=link, first_token_at="landed")
    xfer = 500 * 100_000 / 1e9
    assert sorted(r.ttft_s) == pytest.approx([float(LAT.prefill_s(500)) + xfer, float(LAT.prefill_s(500)) + 2 * xfer])
    two = simulate(req, LAT, Layout.disagg(2, 2), link=link, first_token_at="landed")     # one link each
    assert two.ttft_s == pytest.approx([float(LAT.prefill_s(500)) + xfer] * 2)


def test_decode_on_another_part_uses_its_step_times() -> None:
    slower = LatencyModel(0.002, 50e-6, 1e-8, 0.009, 3e-7, 2e-4, kv_bytes_per_token=100_000)
    r = simulate(one(500, 20), LAT, Layout.disagg(1, 1), link=Link.from_gbps(8.0, 1e-3), decode_latency=slower)
    steps = sum(float(slower.decode_step_s(1, 500 + 1 + j)) for j in range(19))
    assert r.tpot_s[0] == pytest.approx(steps / 19, rel=1e-9)
    assert r.ttft_s[0] == pytest.approx(float(LAT.prefill_s(500)) + 1e-3 + 500 * 100_000 / 1e9, rel=1e-9)
