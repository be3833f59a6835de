"""Filling N devices with units: the packer's arithmetic, then the search and the gain-vs-devices curve."""
from __future__ import annotations

import math

import numpy as np
import pytest

from labkit.links import Link
from labkit.plan.curve import gain_curve, gain_map
from labkit.plan.latency_model import LatencyModel
from labkit.plan.packing import Item, best_packings, node_sizes
from labkit.plan.search import (
    Network,
    SearchSettings,
    UnitTable,
    candidate_layouts,
    search_layouts,
)
from labkit.plan.simulator import SLO, Layout
from labkit.plan.workload import WorkloadShape, sample_requests

# rates (req/s) shaped like the H100 code workload: 7P1D fills a node best
MONO = Item("mono", 1, 6.0, False)
UNITS = [MONO, Item("1P1D", 2, 14.0, True), Item("4P1D", 5, 64.0, True), Item("7P1D", 8, 113.0, True)]


def counts(p) -> dict:
    return dict(p.counts)


def test_ten_devices_fill_both_nodes_instead_of_idling_two() -> None:
    packs = best_packings(UNITS, [8, 10, 16], devices_per_node=8)
    assert counts(packs[8]) == {"7P1D": 1} and packs[8].rate == 113.0
    # 10 devices are a node of 8 and a node of 2: 7P1D + 1P1D (127 req/s), not 7P1D with 2 idle (113)
    assert counts(packs[10]) == {"7P1D": 1, "1P1D": 1} and packs[10].rate == 127.0 and packs[10].idle_devices == 0
    # two 4P1D would serve 128, but the second would straddle the two nodes
    assert counts(packs[16]) == {"7P1D": 2}
    assert [slot for slot, _ in packs[10].placement] == [0, 8]


def test_a_leftover_device_runs_one_mono_replica_or_idles() -> None:
    packs = best_packings(UNITS, [9, 3], devices_per_node=8)
    assert counts(packs[9]) == {"7P1D": 1, "mono": 1}
    assert counts(packs[3]) == {"1P1D": 1, "mono": 1}           # one mono at most per node
    only_big = [MONO, Item("3P1D", 4, 40.0, True)]
    p = best_packings(only_big, [7], devices_per_node=8)[7]
    assert counts(p) == {"3P1D": 1, "mono": 1} and p.idle_devices == 2 and p.rate == 46.0


def test_a_unit_larger_than_a_node_is_used_when_it_beats_node_sized_ones() -> None:
    items = UNITS + [Item("9P1D", 10, 140.0, True)]
    assert counts(best_packings(items, [10], devices_per_node=8)[10]) == {"9P1D": 1}
    # 18 devices: 9P1D would leave 6 + 2 devices that serve less than a second 7P1D and a 1P1D (240 req/s)
    assert counts(best_packings(items, [18], devices_per_node=8)[18]) == {"7P1D": 2, "1P1D": 1}
    p20 = best_packings(items, [20], devices_per_node=8)[20]
    assert counts(p20) == {"9P1D": 2} and p20.rate == 280.0 and [s for s, _ in p20.placement] == [0, 10]
    assert best_packings([MONO], [4], devices_per_node=8)[4] is None       # no xPyD unit at all
    assert node_sizes(10, 8) == [8, 2] and node_sizes(16, 8) == [8, 8]


# a toy model: long prompts and a tight TPOT -> prefill stalls hurt mono; best split 3P1D in nodes of 4
LAT = LatencyModel(0.002, 50e-6, 1e-8, 0.003, 1e-7, 1e-4, kv_bytes_per_token=100_000)
SHAPE = WorkloadShape("long", 2000, 60, 0.3, 0.3)
SLO_ = SLO(2.0, 0.02)
FAST = SearchSettings(bisection_steps=4, min_requests=60, max_requests=600)
# 10 Gbps between nodes: a 200 MB KV takes 160 ms there, so a unit across nodes starves its decode side
NET = Network(Link.from_gbps(10, 10e-6), Link.from_gbps(3600, 4e-6), devices_per_node=4)


def _table(tol: float = 0.05) -> UnitTable:
    from dataclasses import replace

    return UnitTable(sample_requests(SHAPE, 200, 1.0, seed=0), LAT, SLO_, network=NET,
                     settings=replace(FAST, packing_tolerance=tol))


def test_the_curve_repeats_the_best_node_and_dips_past_it() -> None:
    t = _table()
    curve = gain_curve(t.requests, LAT, SLO_, range(1, 13), table=t)
    g = curve.gain
    assert math.isnan(g[0])                                     # one device: nothing to split
    best4, _, d4, g4 = curve.at(4)
    assert d4 is not None and d4.label == "3P1D" and best4.kind == "disagg"
    # whole nodes replicate the node's best packing: the same gain at 4, 8 and 12 devices
    assert curve.at(8)[3] == pytest.approx(g4) and curve.at(12)[3] == pytest.approx(g4)
    assert curve.at(8)[2].label == "2 x 3P1D"
    # one device past a node: a remainder that serves less per device, so the gain dips
    assert curve.at(5)[3] < g4 and curve.at(6)[3] < g4
    # idle devices count: goodput per device is over every device of the budget
    for n, d in zip(curve.devices, curve.disagg):
        if d is not None:
            assert d.goodput_rps_per_device == pytest.approx(d.goodput_rps / n)
            assert d.devices_used + d.idle_devices == n
    assert curve.pays_from() == 3 and "from 3 devices on" in curve.describe()
    assert [r["devices"] for r in curve.rows()] == list(range(1, 13))


def test_the_lazy_search_finds_what_simulating_every_unit_finds() -> None:
    lazy = _table(tol=0.0)
    lazy_res = lazy.deployments(range(1, 10))
    full = _table(tol=0.0)
    for unit in candidate_layouts(9, full.settings, NET.devices_per_node):
        full.score(unit)
    full_res = full.deployments(range(1, 10))
    assert len(lazy.scores) < len(full.scores)                  # it skipped some units ...
    for n in range(1, 10):                                      # ... and none of them mattered
        a, b = lazy_res[n][2], full_res[n][2]
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.goodput_rps == pytest.approx(b.goodput_rps)


def test_search_result_for_ten_devices_charges_the_idle_and_names_the_parts() -> None:
    res = search_layouts(sample_requests(SHAPE, 200, 1.0, seed=0), LAT, 10, SLO_, network=NET, settings=FAST)
    d = res.disagg
    assert d is not None and d.devices == 10
    assert d.goodput_rps == pytest.approx(sum(s.max_rate_rps_per_unit * k for s, k in d.parts))
    assert res.mono.label.startswith("mono") and res.mono.devices_used == 10
    assert res.disagg_gain == pytest.approx(d.goodput_rps / res.mono.goodput_rps)
    # nodes of 4: 4 + 4 + 2 devices, so 2 x 3P1D and a 2-device remainder, never a unit across the nodes
    assert {s.unit.label: k for s, k in d.parts} == {"3P1D": 2, "1P1D": 1}
    assert not any(s.spans_nodes for s, _ in d.parts) and res.best is d


def test_gain_map_rows_are_device_counts() -> None:
    g = gain_map(SHAPE, LAT, SLO_, [500, 2000], [2, 4], num_requests=150, network=NET, settings=FAST)
    assert g.shape == (2, 2) and np.isfinite(g).all()
    assert g[1, 1] > g[1, 0]            # longer prompts: more to take off the decode devices


def test_units_across_nodes_move_their_kv_between_nodes() -> None:
    assert NET.link_for(Layout.disagg(3, 1)) == NET.intra_node
    assert NET.link_for(Layout.disagg(4, 1)) == NET.inter_node and NET.spans_nodes(Layout.disagg(4, 1))
    with pytest.raises(ValueError, match="devices_per_node"):
        Network(devices_per_node=0)
