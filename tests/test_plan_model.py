"""The planner's latency model: least-squares fit, R², persistence, calibration on the engine, scaling."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from labkit.plan.latency_model import (
    Calibration,
    DecodeSample,
    LatencyModel,
    PrefillSample,
    fit_latency_model,
)
from labkit.plan.scaling import (
    Efficiency,
    HardwareSpec,
    ModelShape,
    efficiencies_from,
    roofline_latency_model,
    scale_latency_model,
)

TRUE = LatencyModel(0.004, 40e-6, 2e-9, 0.006, 3e-8, 2e-4, kv_bytes_per_token=16384)


def _samples(noise: float = 0.01, seed: int = 0) -> tuple[list[PrefillSample], list[DecodeSample]]:
    rng = np.random.default_rng(seed)
    pre = [PrefillSample(t, float(TRUE.prefill_s(t)) * (1 + noise * rng.standard_normal()))
           for t in (32, 128, 256, 512, 1024, 2048, 4096) for _ in range(2)]
    dec = [DecodeSample(b, b * c, float(TRUE.decode_step_s(b, b * c)) * (1 + noise * rng.standard_normal()))
           for b in (1, 4, 16, 32) for c in (128, 1024, 4096)]
    return pre, dec


def test_fit_recovers_known_coefficients_with_high_r2() -> None:
    pre, dec = _samples(noise=0.01)
    m = fit_latency_model(pre, dec, kv_bytes_per_token=16384, model="synthetic")
    assert m.r2_prefill > 0.99 and m.r2_decode > 0.99
    assert m.prefill_b_s_per_token == pytest.approx(TRUE.prefill_b_s_per_token, rel=0.1)
    assert m.prefill_c_s_per_token2 == pytest.approx(TRUE.prefill_c_s_per_token2, rel=0.1)
    assert m.decode_a_s == pytest.approx(TRUE.decode_a_s, rel=0.1)
    assert m.decode_b_s_per_ctx_token == pytest.approx(TRUE.decode_b_s_per_ctx_token, rel=0.1)
    assert m.decode_c_s_per_seq == pytest.approx(TRUE.decode_c_s_per_seq, rel=0.15)
    # predictions on unseen points within a few percent
    assert float(m.prefill_s(3000)) == pytest.approx(float(TRUE.prefill_s(3000)), rel=0.03)


def test_fit_keeps_coefficients_non_negative() -> None:
    # purely linear prefill with noise would fit a slightly negative T² term with plain lstsq
    pre = [PrefillSample(t, 1e-3 + 1e-5 * t * (1 + 0.05 * (-1) ** t)) for t in range(16, 600, 37)]
    dec = [DecodeSample(b, b * c, 5e-3 + 1e-4 * b) for b in (1, 2, 4, 8) for c in (100, 300)]
    m = fit_latency_model(pre, dec, kv_bytes_per_token=1)
    assert min(m.prefill_a_s, m.prefill_b_s_per_token, m.prefill_c_s_per_token2) >= 0
    assert m.decode_b_s_per_ctx_token == pytest.approx(0.0, abs=1e-12)  # no context effect in the data
    assert float(m.prefill_s(10_000)) > 0


def test_fit_weighs_small_steps_as_much_as_big_ones() -> None:
    """Decode steps bend (memory-bound at batch 1, compute-bound at 32): a plain least-squares fit
    is decided by the big steps and misses batch 1 by far; the relative fit keeps it close."""
    pre, _ = _samples(noise=0.0)
    # 20 ms at batch 1 (weights read once), then +3 ms per sequence past batch 4
    step = lambda b, s: 0.020 + 0.003 * max(0, b - 4) + 2e-8 * s
    dec = [DecodeSample(b, b * c, step(b, b * c)) for b in (1, 2, 4, 8, 16, 32) for c in (64, 512, 1024)]
    m = fit_latency_model(pre, dec, kv_bytes_per_token=1)
    worst = max(abs(float(m.decode_step_s(d.batch_size, d.context_tokens)) / d.elapsed_s - 1) for d in dec)
    assert worst < 0.35
    assert float(m.decode_step_s(1, 512)) == pytest.approx(step(1, 512), rel=0.25)


def test_serving_terms_add_to_ttft_and_every_decode_step() -> None:
    m = TRUE.with_serving(0.05, 0.01)
    assert m.decode_step_s(4, 400) == pytest.approx(TRUE.decode_step_s(4, 400) + 0.01)
    assert m.step_overhead_s >= TRUE.decode_a_s + 0.01
    assert "per decode step" in m.describe() and "per decode step" not in TRUE.describe()
    assert LatencyModel.from_dict(m.to_dict()) == m
    assert m.with_serving(0.0, 0.0, 0.003).decode_step_s(4, 400) == pytest.approx(TRUE.decode_step_s(4, 400) + 0.012)
    assert m.engine_only == TRUE
    with pytest.raises(ValueError, match="serve_token_s"):
        TRUE.with_serving(0.0, -1.0)
    # scaled to other hardware, this host's server costs are not carried over
    src, dst = HardwareSpec("a", 1e12, 1e11), HardwareSpec("b", 2e12, 2e11)
    assert scale_latency_model(m, src, dst).serve_token_s == 0.0


def _records(sim, start_s) -> list:
    """A simulated run as the benchmark client's records (what serving_overhead reads)."""
    from types import SimpleNamespace

    return [SimpleNamespace(ok=True, start_s=float(start_s[i]), prompt_tokens=int(sim.prompt_tokens[i]),
                            output_tokens=int(sim.output_tokens[i]), expected_output_tokens=int(sim.output_tokens[i]),
                            ttft_s=float(sim.ttft_s[i]), e2e_s=float(sim.e2e_s[i]), tpot_s=float(sim.tpot_s[i]))
            for i in range(len(start_s))]


@pytest.mark.parametrize("disagg", [False, True])
def test_serving_overhead_recovers_what_the_server_adds(disagg: bool) -> None:
    """Probes 'measured' on a server that costs 40 ms per request, 6 ms per step and 2 ms per running
    sequence: one-at-a-time and all-together runs give back those three numbers."""
    from labkit.links import Link
    from labkit.plan.calibrate import serving_overhead
    from labkit.plan.simulator import Layout, simulate
    from labkit.plan.workload import Requests

    true = TRUE.with_serving(0.040, 0.006, 0.002)
    link, layout = (Link.from_gbps(8.0, 1e-3), Layout.disagg(1, 1)) if disagg else (None, Layout.mono())
    first = "landed" if disagg else "adopted"
    prompt, out = np.array([100, 300, 700, 250]), np.array([20, 50, 30, 40])
    runs = []
    for arrivals in (np.array([0.0, 100.0, 200.0, 300.0]), np.zeros(4)):   # one at a time; all together
        req = Requests(arrivals, prompt, out)
        runs.append(_records(simulate(req, true, layout, link=link, first_token_at=first), arrivals))
    got = serving_overhead(TRUE.with_serving(9.0, 9.0, 9.0), *runs, layout=layout, link=link,
                           first_token_at=first)   # the model's own server terms are ignored
    assert got == pytest.approx((0.040, 0.006, 0.002), rel=0.02)
    # one-at-a-time only: the whole per-step cost at batch 1
    req_s, step_s, seq_s = serving_overhead(TRUE, runs[0], layout=layout, link=link, first_token_at=first)
    assert (req_s, step_s, seq_s) == pytest.approx((0.040, 0.008, 0.0), rel=0.02)
    # a server faster than the model (noise): never a negative cost
    assert serving_overhead(true, _records(simulate(Requests(np.zeros(1), prompt[:1], out[:1]), TRUE, Layout.mono()),
                                           np.zeros(1))) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="successful"):
        serving_overhead(TRUE, [SimpleNamespace(ok=False)])


def test_fit_server_steps_moves_decode_and_scales_prefill(tmp_path) -> None:
    """A step log from a server that adds 12 ms to every decode step (1 ms of it loop work between
    back-to-back steps), with 5% noise, and whose prefills run 10% slower."""
    import json

    from labkit.plan.calibrate import fit_server_steps, read_step_log

    rng = np.random.default_rng(3)
    t, lines = 1000.0, []
    for i in range(200):
        if i % 20 == 0:
            n = int(rng.integers(50, 800))
            secs = float(TRUE.prefill_s(n)) * 1.10
            t += 0.5 + secs                     # after idle time: the gap is not part of the step
            lines.append({"t_end": t, "role": "mono", "phase": "prefill", "prefill_tokens": n, "decode_seqs": 0,
                          "context_tokens": 0, "seconds": secs})
            continue
        b = int(rng.integers(1, 4))
        ctx = b * int(rng.integers(100, 600))
        cycle = (float(TRUE.decode_step_s(b, ctx)) + 0.012) * (1 + 0.05 * rng.standard_normal())
        t += cycle                              # back to back: 1 ms of it between the steps
        lines.append({"t_end": t, "role": "mono", "phase": "decode", "prefill_tokens": 0, "decode_seqs": b,
                      "context_tokens": ctx, "seconds": cycle - 0.001})
    log = tmp_path / "mono.jsonl"
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = fit_server_steps(TRUE.with_serving(1.0, 1.0, 1.0), read_step_log(log))
    assert got.serve_request_s == got.serve_token_s == got.serve_seq_s == 0.0
    assert got.prefill_s(500) == pytest.approx(1.10 * TRUE.prefill_s(500), rel=1e-6)
    assert got.decode_a_s == pytest.approx(TRUE.decode_a_s + 0.012, abs=0.001)
    assert (got.decode_b_s_per_ctx_token, got.decode_c_s_per_seq) == (TRUE.decode_b_s_per_ctx_token,
                                                                      TRUE.decode_c_s_per_seq)  # slopes kept
    assert "server's steps" in got.note
    # too few decode steps: the decode formula stays the engine's
    few = fit_server_steps(TRUE, read_step_log(log)[:10])
    assert few.decode_step_s(4, 1600) == TRUE.decode_step_s(4, 1600)
    assert read_step_log(tmp_path / "missing.jsonl") == []


def test_fit_refuses_too_few_points_and_bad_samples() -> None:
    with pytest.raises(ValueError, match="3 distinct lengths"):
        fit_latency_model([PrefillSample(8, 1.0), PrefillSample(16, 2.0)], [], kv_bytes_per_token=1)
    with pytest.raises(ValueError, match="context_tokens >= batch_size"):
        DecodeSample(4, 2, 0.1)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        LatencyModel(-1.0, 1e-5, 0, 1e-3, 0, 0, kv_bytes_per_token=1)


def test_calibration_round_trips_through_json(tmp_path) -> None:
    pre, dec = _samples()
    m = fit_latency_model(pre, dec, kv_bytes_per_token=16384)
    path = Calibration(m, tuple(pre), tuple(dec), {"who": "test"}).save(tmp_path / "c.json")
    back = Calibration.load(path)
    assert back.model == m and back.prefill_samples == tuple(pre) and back.meta == {"who": "test"}
    (tmp_path / "bad.json").write_text('{"model": {}}')
    with pytest.raises((ValueError, TypeError)):
        Calibration.load(tmp_path / "bad.json")


def test_chunk_work_adds_up_to_a_whole_prefill() -> None:
    whole = float(TRUE.prefill_s(1000)) - TRUE.prefill_a_s
    parts = sum(TRUE.chunk_work_s(o, 250) for o in (0, 250, 500, 750))
    assert parts == pytest.approx(whole, rel=1e-12)
    # a chunk late in the prompt costs more than the first (it attends to more tokens)
    assert TRUE.chunk_work_s(750, 250) > TRUE.chunk_work_s(0, 250)


def test_scaling_by_datasheet_ratios_is_an_estimate() -> None:
    src = HardwareSpec("A", flops_per_s=100e12, bandwidth_bytes_per_s=1e12)
    dst = HardwareSpec("B", flops_per_s=400e12, bandwidth_bytes_per_s=2e12)
    s = scale_latency_model(TRUE, src, dst)
    assert s.prefill_b_s_per_token == pytest.approx(TRUE.prefill_b_s_per_token / 4)      # compute-bound
    assert s.prefill_c_s_per_token2 == pytest.approx(TRUE.prefill_c_s_per_token2 / 4)
    assert s.decode_a_s == pytest.approx(TRUE.decode_a_s / 2)                            # memory-bound
    assert s.decode_b_s_per_ctx_token == pytest.approx(TRUE.decode_b_s_per_ctx_token / 2)
    assert s.note.startswith("estimate") and s.device == "B"


def test_roofline_model_matches_hand_computed_8b_on_h100() -> None:
    shape = ModelShape.from_preset("llama-3.1-8b")
    assert shape.kv_bytes_per_token == 131072          # 2 x 32 layers x 8 kv heads x 128 x 2 bytes
    hw = HardwareSpec("H100 SXM", 989.4e12, 3.35e12)
    m = roofline_latency_model(shape, hw, Efficiency(0.5, 0.7, 0.0))
    # decode of batch 1: read ~16 GB of bf16 weights at 70% of 3.35 TB/s, ~6.9 ms
    assert m.decode_a_s == pytest.approx(shape.param_bytes / (0.7 * 3.35e12), rel=1e-9)
    assert 6e-3 < m.decode_a_s < 7.5e-3
    # prefill of 1,000 tokens: 2 x 8e9 x 1000 FLOPs at 50% of 989 TFLOP/s, ~32 ms
    assert 0.025 < float(m.prefill_s(1000)) < 0.04
    eff = efficiencies_from(m, shape, hw)
    assert eff.mfu_prefill == pytest.approx(0.5, rel=1e-6) and eff.mbu_decode == pytest.approx(0.7, rel=1e-6)


def test_datasheet_lookup_reads_the_shared_table() -> None:
    from labkit.plan.scaling import datasheet_spec

    h = datasheet_spec("H100 SXM")
    assert h.flops_per_s == pytest.approx(989.4e12) and h.bandwidth_bytes_per_s == pytest.approx(3.35e12)
    with pytest.raises(KeyError, match="unknown device"):
        datasheet_spec("no such accelerator 9000")


@pytest.mark.timeout(300)
def test_calibrate_times_the_engine_and_fits(tmp_path) -> None:
    from labkit.plan.calibrate import CalibrationPoints, calibrate

    pts = CalibrationPoints((8, 48, 128), (1, 2), (16, 40), repeats=1, decode_steps=2)
    cal = calibrate("tiny", "ci", points=pts)
    assert [s.num_tokens for s in cal.prefill_samples] == [8, 48, 128]
    assert {(s.batch_size) for s in cal.decode_samples} == {1, 2}
    # every decode sample's context = batch x (prompt + first token + decoded so far)
    for s in cal.decode_samples:
        assert s.context_tokens % s.batch_size == 0 and s.context_tokens // s.batch_size in (17, 18, 41, 42)
    m = cal.model
    assert m.note == "measured" and m.model == "tiny" and m.kv_bytes_per_token == 2 * 4 * 2 * 64 * 4
    assert not math.isnan(m.r2_prefill) and not math.isnan(m.r2_decode)
    assert float(m.prefill_s(128)) > 0 and float(m.decode_step_s(1, 17)) > 0
    back = Calibration.load(cal.save(tmp_path / "cal.json"))
    assert back.model == m and len(back.decode_samples) == len(cal.decode_samples)
