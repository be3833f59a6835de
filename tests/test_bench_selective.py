"""The selective-disaggregation sweep's parts: mode names, the router's counts, the planner's prediction,
the chart, and (slow) a sweep over thresholds in front of one pair of real workers on `tiny`."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from labkit.bench import SLO, sample_requests, synthetic
from labkit.bench.selective import candidates, predict, router_prefills, shared_1p1d, threshold_modes, threshold_of
from labkit.bench.sweep import SweepConfig, run_sweeps
from labkit.plan.latency_model import LatencyModel
from labkit.plan.simulator import SLO as PlanSLO
from labkit.proc import pid_alive

LAT = LatencyModel(0.002, 50e-6, 1e-8, 0.003, 1e-7, 1e-4, kv_bytes_per_token=100_000)


def test_threshold_modes_name_each_threshold() -> None:
    modes = threshold_modes([0, 64, 512])
    assert modes == ("1p1d", "1p1d-selective-64", "1p1d-selective-512")
    assert [threshold_of(m) for m in modes] == [0, 64, 512]
    with pytest.raises(ValueError, match=">= 0"):
        threshold_modes([-1])


def test_router_prefills_sums_the_counter_by_side() -> None:
    text = ('labkit_router_prefills_total{upstream="decode0",where="decode"} 3.0\n'
            'labkit_router_prefills_total{upstream="prefill0",where="prefill"} 5.0\n'
            'labkit_router_prefills_total{upstream="prefill1",where="prefill"} 2.0\n'
            'labkit_router_prefix_hit_tokens_total{upstream="prefill0"} 16.0\n')
    assert router_prefills(text) == {"decode": 3.0, "prefill": 7.0}


def test_candidates_and_the_planners_prediction() -> None:
    w = synthetic("mix", (100, 900), (5, 40))
    ts = candidates(w, n=200)
    longest = max(r.prompt_tokens for r in sample_requests(w, 200).requests)
    assert ts[0] == 0 and ts == sorted(ts) and ts[-1] == longest + 1 and len(ts) == 5
    sweep = predict(w, ts, 5.0, LAT, PlanSLO(2.0, 0.2), n=200)
    assert list(sweep.thresholds) == ts and len(sweep.goodput_rps) == 5
    # above every prompt, every prompt is prefilled on the decode side; at 0 none is
    assert sweep.share_on_decode[0] == 0.0 and sweep.share_on_decode[-1] == 1.0
    assert sweep.best_threshold in ts and np.all(np.asarray(sweep.goodput_rps) >= 0)


def test_the_threshold_chart_marks_the_best_of_each(tmp_path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from labkit.plots import bench as pb

    rows = [{"threshold": t, "goodput_tpot_rps": g, "predicted_goodput_rps": p}
            for t, g, p in ((0, 0.2, 0.5), (128, 0.6, 0.4), (512, 0.4, 0.7))]
    fig = pb.plot_threshold_sweep({"conv": {"rows": rows, "rate_rps": 1.5}, "code": {"rows": rows[:2]}})
    a, b = fig.axes[:2]
    labels = [t.get_text() for t in a.get_legend().get_texts()]
    assert labels == ["measured", "planner", "best measured: 128", "best predicted: 512"]
    assert "at 1.5 req/s" in a.get_title() and b.get_title() == "code"
    fig.savefig(tmp_path / "t.png")
    with pytest.raises(ValueError, match="no workloads"):
        pb.plot_threshold_sweep({})


@pytest.mark.slow
def test_a_router_per_threshold_in_front_of_one_pair_of_workers(tiny_model_dir: Any) -> None:
    """Prompts of 10-30 tokens and of 60-80: at threshold 40 the short ones (and only they) are prefilled on
    the decode worker; plain 1P1D sends all to the prefill worker. The workers start once; all stop."""
    w = synthetic("two-sizes", (10, 80), 4)
    cfg = SweepConfig(w, rates_rps=(20.0,), modes=threshold_modes([0, 40]), n_requests=10, warmup_requests=1,
                      slo=SLO(ttft_s=60.0), request_timeout_s=60.0, progress=False, seed=3)
    with shared_1p1d("tiny", kv_cache_bytes=32 << 20) as (factory, placed):
        [res] = run_sweeps([cfg], factory, model="tiny")
        from labkit.serve import launcher

        pids = [p.pid for p in launcher._LIVE.values()]
    assert not [p for p in pids if pid_alive(p)]
    for run in res.runs.values():
        assert run.summary.ok == 10, run.meta["first_errors"]
    # warm-up (1) + measured (10) prompts went through each router; the split follows the prompt lengths
    short = sum(r.prompt_tokens < 40 for r in res.runs[("1p1d-selective-40", 20.0)].records)
    assert placed["1p1d"] == {"prefill": 11.0}
    assert placed["1p1d-selective-40"].get("decode", 0) >= short > 0
    assert placed["1p1d-selective-40"].get("decode", 0) + placed["1p1d-selective-40"].get("prefill", 0) == 11
