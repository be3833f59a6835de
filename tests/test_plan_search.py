"""P:D search, cost, checklist, vLLM commands and the `labkit plan` CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from labkit.links import Link
from labkit.plan.checklist import build_checklist, verdict_for_gain
from labkit.plan.commands import (
    KV_TRANSFER_CONFIG,
    LaunchPlan,
    launch_commands,
    render_script,
)
from labkit.plan.latency_model import LatencyModel
from labkit.plan.search import (
    Network,
    SearchSettings,
    candidate_layouts,
    capacity_rps,
    cost_per_m_output_tokens,
    max_goodput_rate,
    search_layouts,
)
from labkit.plan.simulator import SLO, Layout
from labkit.plan.workload import WorkloadShape, sample_requests

LAT = LatencyModel(0.002, 50e-6, 1e-8, 0.003, 1e-7, 1e-4, kv_bytes_per_token=100_000)
FAST = SearchSettings(bisection_steps=5, max_unit_devices=4, min_requests=60)


def test_candidates_cover_every_split_with_no_common_factor() -> None:
    labels = [lay.label for lay in candidate_layouts(4, SearchSettings(max_unit_devices=4))]
    assert labels[:2] == ["mono", "mono-chunked"]
    # 2P2D is two 1P1D: round-robin hands each instance the same requests, so replication covers it
    assert set(labels[2:]) == {"1P1D", "1P2D", "2P1D", "1P3D", "3P1D"}
    assert [lay.label for lay in candidate_layouts(1)] == ["mono", "mono-chunked"]
    # by default units go up to two nodes
    assert max(lay.num_devices for lay in candidate_layouts(64, devices_per_node=4)) == 8


def test_cost_per_million_tokens() -> None:
    # 8 devices at $2/h serving 10 req/s of 100 output tokens = 1,000 tok/s: $16/h / 3.6 M tok
    assert cost_per_m_output_tokens(2.0, 8, 10.0, 100.0) == pytest.approx(16 / 3.6)
    assert math.isinf(cost_per_m_output_tokens(2.0, 8, 0.0, 100.0))


def test_max_goodput_rate_is_where_attainment_crosses_the_target() -> None:
    shape = WorkloadShape("w", 800, 100, 0.4, 0.4)
    pool = sample_requests(shape, 300, 1.0, seed=0)
    slo = SLO(1.0, 0.05)
    rate, res = max_goodput_rate(pool, LAT, Layout.mono(), slo, settings=FAST)
    assert rate > 0 and res is not None
    assert float(res.slo_met(slo).mean()) >= 0.9
    assert rate <= capacity_rps(LAT, pool, Layout.mono()) * (1 + 1e-9)
    # 20% above the found rate, the SLO is missed (or the unit is past its capacity)
    from labkit.plan.simulator import simulate

    over = simulate(pool.at_rate(rate * 1.5), LAT, Layout.mono())
    assert float(over.slo_met(slo).mean()) < 0.9 or rate * 1.5 > capacity_rps(LAT, pool, Layout.mono())
    # an impossible SLO (tighter than one decode step) gives zero
    zero, _ = max_goodput_rate(pool, LAT, Layout.mono(), SLO(1.0, 1e-4), settings=FAST)
    assert zero == 0.0


def test_search_prefers_disaggregation_for_long_prompts_and_tight_tpot() -> None:
    long_prompts = WorkloadShape("long", 3000, 60, 0.3, 0.3)
    res = search_layouts(sample_requests(long_prompts, 300, 1.0, seed=1), LAT, 4, SLO(3.0, 0.02),
                         network=Network.single(Link.from_gbps(400.0, 5e-6)), settings=FAST)
    assert res.best.unit.kind == "disagg" and res.disagg_gain > 1.1
    assert res.best.unit.num_prefill >= res.best.unit.num_decode   # prefill-heavy work wants more P
    scores = [s.goodput_rps_per_device for s in res.scores]
    assert scores == sorted(scores, reverse=True)


def test_search_keeps_short_prompts_monolithic_on_two_devices() -> None:
    short = WorkloadShape("short", 40, 200, 0.2, 0.2)
    res = search_layouts(sample_requests(short, 300, 1.0, seed=1), LAT, 2, SLO(1.0, 0.05),
                         network=Network.single(Link.from_gbps(10.0, 50e-6)), settings=FAST)
    assert res.best.unit.kind == "mono" and res.disagg_gain < 0.95


def test_checklist_items_and_verdict() -> None:
    conv = WorkloadShape("conv", 1020, 129, prefix_hit_rate=0.0)
    cl = build_checklist(conv, LAT, devices=16, link=Link.from_gbps(200.0), rdma=True, gain=1.4, best_layout="2 x 3P1D",
                         ttft_slo_s=1.0)
    v = {i.name: i.verdict for i in cl.items}
    # 102 MB of KV at 25 GB/s: 4 ms, 6.5% of its 63 ms prefill
    assert v == {"prefill:decode token ratio": "favours", "KV bytes per request": "favours",
                 "prefix-cache hit rate": "favours", "device count": "favours", "network": "favours"}
    assert cl.verdict.startswith("DISAGGREGATE")
    slow = build_checklist(conv, LAT, devices=16, link=Link.from_gbps(10.0), rdma=False, gain=1.0, best_layout="x",
                           ttft_slo_s=1.0)
    assert {i.name: i.verdict for i in slow.items}["KV bytes per request"] == "against"   # 82 ms > 50% of prefill
    small = build_checklist(WorkloadShape("chat", 50, 300, prefix_hit_rate=0.6), LAT, devices=2,
                            link=Link.from_gbps(10.0), rdma=False, gain=0.75, best_layout="2 x mono", ttft_slo_s=1.0)
    assert all(i.verdict == "against" for i in small.items)
    assert small.verdict.startswith("STAY MONOLITHIC") and "25% loss" in small.verdict
    assert "DistServe" in small.render() and "Splitwise" in small.render()
    assert verdict_for_gain(1.0).startswith("MARGINAL")


def test_the_device_count_line_cites_the_simulated_curve() -> None:
    from labkit.plan.curve import gain_curve

    long_prompts = WorkloadShape("long", 2000, 60, 0.3, 0.3)
    req = sample_requests(long_prompts, 200, 1.0, seed=0)
    net = Network(Link.from_gbps(10.0), Link.from_gbps(3600.0), devices_per_node=4)
    curve = gain_curve(req, LAT, SLO(2.0, 0.02), range(1, 9), network=net, settings=FAST)
    g6 = float(curve.gain[5])
    cl = build_checklist(long_prompts, LAT, devices=6, link=net.intra_node, network_link=net.inter_node, rdma=True,
                         gain=g6, best_layout="3P1D + 1P1D", ttft_slo_s=2.0, curve=curve)
    item = next(i for i in cl.items if i.name == "device count")
    assert item.value == f"6 (simulated gain here: {g6:.2f}x)"
    assert item.effect.endswith(curve.describe()) and "gain-vs-devices curve" in item.effect
    assert item.verdict == ("favours" if g6 >= 1.10 else "against" if g6 <= 0.95 else "neutral")
    assert "16 or more" not in cl.render()
    net_item = next(i for i in cl.items if i.name == "network")
    assert net_item.value.startswith("between nodes 10 Gbps") and net_item.verdict == "against"


def test_a_deployment_gets_one_router_per_unit_on_its_own_devices() -> None:
    from labkit.plan.commands import render_deployment

    script = render_deployment("llama-3.1-8b", [(0, 7, 1, 113.0), (8, 1, 1, 14.3), (10, 0, 0, 6.1)],
                               devices_per_node=8, node_hosts=("n1", "n2"))
    assert "# unit 1: 7P1D, 113 req/s" in script and "# unit 2: 1P1D, 14.3 req/s" in script
    assert "--port 8000" in script and "--port 8001" in script             # a router per unit
    # unit 2 lives on n2's first two GPUs, the mono replica on n2's third
    assert "CUDA_VISIBLE_DEVICES=0 VLLM_NIXL_SIDE_CHANNEL_PORT=5608 VLLM_NIXL_SIDE_CHANNEL_HOST=n2" in script
    assert "CUDA_VISIBLE_DEVICES=2 vllm serve meta-llama/Llama-3.1-8B-Instruct --port 8110" in script
    assert "http://n1:8000 (113 req/s), http://n2:8001 (14.3 req/s), n2:8110 (6.1 req/s)" in script


def test_vllm_commands_one_node_and_across_nodes() -> None:
    cmds = launch_commands(LaunchPlan("llama-3.1-8b", 3, 1))
    servers = [c for c in cmds if c.role != "router"]
    assert [c.role for c in servers] == ["prefill"] * 3 + ["decode"]
    assert all(f"--kv-transfer-config '{KV_TRANSFER_CONFIG}'" in c.command for c in servers)
    assert all("meta-llama/Llama-3.1-8B-Instruct" in c.command for c in servers)
    assert [c.command.split()[0] for c in servers] == [f"CUDA_VISIBLE_DEVICES={i}" for i in range(4)]
    ports = [c.command.split()[1] for c in servers]
    assert len(set(ports)) == 4 and ports[0] == "VLLM_NIXL_SIDE_CHANNEL_PORT=5600"
    router = cmds[-1].command
    assert "--backend vllm" in router and "--prefill http://127.0.0.1:8100" in router
    multi = LaunchPlan("llama-3.1-8b", 6, 6, tensor_parallel=2, node_hosts=("10.0.0.1", "10.0.0.2", "10.0.0.3"))
    mc = launch_commands(multi)
    assert {c.host for c in mc if c.role != "router"} == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert all("VLLM_NIXL_SIDE_CHANNEL_HOST=" + c.host in c.command for c in mc if c.role != "router")
    assert "--tensor-parallel-size 2" in mc[0].command and "CUDA_VISIBLE_DEVICES=0,1" in mc[0].command
    assert "# --- on 10.0.0.2" in render_script(multi)
    with pytest.raises(ValueError, match="node_hosts"):
        LaunchPlan("m", 8, 8)


def _labkit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "labkit.cli", "plan", *args], capture_output=True, text=True,
                          timeout=240, check=False)


@pytest.mark.timeout(300)
def test_cli_gives_a_verdict_for_the_azure_presets() -> None:
    out = _labkit("--workload", "azure-code-2023", "--devices", "4", "--link-gbps", "100",
                  "--requests", "150", "--max-unit", "4", "--curve-devices", "8", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["verdict"].split()[0] in ("DISAGGREGATE:", "STAY", "MARGINAL")
    assert {r["check"] for r in d["checklist"]} >= {"device count", "network", "prefix-cache hit rate"}
    assert d["gain"] > 0 and "NixlConnector" in d["commands"]
    text = _labkit("--workload", "azure-conv-2023", "--devices", "16", "--link-gbps", "100",
                   "--requests", "120", "--max-unit", "3", "--curve-devices", "16")
    assert text.returncode == 0, text.stderr
    assert "VERDICT:" in text.stdout and "vllm serve" in text.stdout and "# --- on node2" in text.stdout


@pytest.mark.timeout(300)
def test_cli_fills_ten_devices_instead_of_reporting_a_bare_unit() -> None:
    # before: "7P1D at 2.31x" for 10 devices, two of them idle and not counted
    out = _labkit("--workload", "azure-code-2023", "--devices", "10", "--requests", "300", "--curve-devices", "10",
                  "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    dis, mono = d["deployments"]
    assert (dis["deployment"], mono["deployment"]) == ("disaggregated", "monolithic")
    assert mono["layout"] in ("mono-dp x10", "mono-chunked-dp x10") and mono["devices used"] == 10
    assert dis["devices used"] + dis["idle"] == 10
    assert d["gain"] == pytest.approx(dis["goodput (req/s)"] / mono["goodput (req/s)"], rel=1e-2)
    assert d["gain"] == pytest.approx(dis["goodput/device (req/s)"] / mono["goodput/device (req/s)"], rel=1e-2)
    unit = next(r for r in d["layouts"] if r["unit"] == d["best_layout"].split(" + ")[0].split(" x ")[-1])
    # a bare unit's goodput per device is not the deployment's unless the unit fills all 10 devices
    assert unit["devices"] == 10 or dis["goodput/device (req/s)"] < unit["goodput/device (req/s)"]
    assert [r["devices"] for r in d["curve"]] == list(range(1, 11))


def test_cli_rejects_bad_input_with_a_message() -> None:
    out = _labkit("--workload", "no-such-workload")
    assert out.returncode == 2 and "unknown workload" in out.stderr
    out = _labkit("--hardware", "Abacus 3000")
    assert out.returncode == 2 and "unknown device" in out.stderr
    out = _labkit("--decode-hardware", "L40S")
    assert out.returncode == 2 and "--decode-price-per-device-hour" in out.stderr
    out = _labkit("--tp", "3")
    assert out.returncode == 2 and "must divide" in out.stderr
