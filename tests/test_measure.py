from __future__ import annotations

import json

import matplotlib
import pytest

matplotlib.use("Agg")

from labkit import measure  # noqa: E402
from labkit.hardware import Peaks  # noqa: E402
from labkit.plots import roofline as rplot  # noqa: E402
from labkit.roofline import ModelShape, decode_cost, prefill_cost  # noqa: E402
from labkit.runners import TransformersRunner, make_runner  # noqa: E402
from labkit.telemetry import Sampler  # noqa: E402

# Fixed roofs so MFU/MBU arithmetic is checked exactly (measuring them is test_hardware's job).
PEAKS = Peaks("cpu", "Test CPU", 2, {"float32": 3e11}, 2e10, 1.8e10, 2048, 256 << 20)


@pytest.fixture(scope="module")
def runner():
    r = TransformersRunner("tiny", "float32", "cpu")
    yield r
    r.close()


def test_prefill_record_numbers(runner):
    rec = measure.measure_prefill(runner, batch=2, prompt_len=64, warmup=1, repeats=3, peaks=PEAKS)
    cost = prefill_cost(ModelShape.from_config("tiny"), 64, 2, "float32")
    assert rec["runner"] == "transformers" and rec["phase"] == "prefill" and rec["prompt_len"] == 64
    assert rec["flops"] == cost.flops and rec["bytes"] == cost.bytes
    assert rec["repeats"] == 3 and 0 < rec["ms_min"] <= rec["ms"]
    s = rec["ms"] / 1e3
    assert rec["tokens_per_s"] == pytest.approx(128 / s)
    assert rec["achieved_flops_per_s"] == pytest.approx(cost.flops / s)
    assert rec["mfu"] == pytest.approx(cost.flops / s / 3e11)
    assert rec["mbu"] == pytest.approx(cost.bytes / s / 2e10)
    assert rec["intensity_flop_per_byte"] > 10  # prefill reuses each weight across 128 tokens


def test_decode_record_and_fixed_context(runner):
    step = runner.decode_fn(batch=3, context_len=40)
    cache = step.__closure__  # the cache is cut back after every step: same context each time
    for _ in range(4):
        step()
    caches = [c.cell_contents for c in cache if hasattr(c.cell_contents, "get_seq_length")]
    assert caches and caches[0].get_seq_length() == 40
    rec = measure.measure_decode(runner, batch=3, context_len=40, warmup=1, repeats=4, peaks=PEAKS)
    cost = decode_cost(ModelShape.from_config("tiny"), 3, 40, "float32")
    assert rec["phase"] == "decode" and rec["context_len"] == 40 and rec["batch"] == 3
    assert rec["bytes"] == cost.bytes
    assert rec["tokens_per_s"] == pytest.approx(3 / (rec["ms"] / 1e3))
    assert rec["mbu"] == pytest.approx(cost.bytes / (rec["ms"] / 1e3) / 2e10)
    assert rec["intensity_flop_per_byte"] < 3  # decode: ~2 FLOPs per 4-byte weight per sequence


def test_prefill_is_more_intense_than_decode(runner):
    recs = [measure.measure_prefill(runner, 1, 128, repeats=1, peaks=PEAKS),
            measure.measure_decode(runner, 1, 128, repeats=2, peaks=PEAKS)]
    ridge = PEAKS.ridge_flop_per_byte("float32")
    assert recs[0]["intensity_flop_per_byte"] > ridge > recs[1]["intensity_flop_per_byte"]
    df = measure.to_frame(recs)
    assert list(df["phase"]) == ["prefill", "decode"]
    table = measure.format_records(recs)
    assert "MFU" in table and "transformers" in table and len(table.splitlines()) == 3


def test_sweeps_and_phase_marks(runner):
    s = Sampler("cpu", interval_s=0.05, verbose=False)
    with s:
        dec = measure.sweep_decode(runner, [1, 2, 4], context_len=16, repeats=2, peaks=PEAKS, sampler=s)
        pre = measure.sweep_prefill(runner, [16, 32], repeats=1, peaks=PEAKS, sampler=s)
    assert [r["batch"] for r in dec] == [1, 2, 4] and [r["prompt_len"] for r in pre] == [16, 32]
    assert [r["flops"] for r in dec] == sorted(r["flops"] for r in dec)
    assert [p.name for p in s.phases] == ["decode"] * 3 + ["prefill"] * 2


def test_phase_covers_the_timed_runs_not_the_warm_up(runner):
    """A first call's lazy initialisation (here: 0.4 s) is warm-up: outside the phase MFU describes."""
    import time

    real = runner.prefill_fn
    calls = []

    def slow_first(batch, n):
        fn = real(batch, n)

        def step():
            if not calls:
                time.sleep(0.4)
            calls.append(1)
            fn()
        return step
    runner.prefill_fn = slow_first
    try:
        s = Sampler("cpu", interval_s=0.05, verbose=False)
        real_phase, calls_at_start = s.phase, []

        def phase(name):  # how many calls had run when the phase opened: no clock, so no load can fail it
            calls_at_start.append(len(calls))
            return real_phase(name)
        s.phase = phase
        with s:
            rec = measure.measure_prefill(runner, 1, 16, warmup=1, repeats=2, peaks=PEAKS, sampler=s)
    finally:
        del runner.prefill_fn
    # One warm-up call (the slow one), then the two timed calls, both inside the phase.
    assert len(calls) == 3 and rec["repeats"] == 2
    (phase_mark,) = s.phases
    assert calls_at_start == [1], "the phase must open after the warm-up call and before the timed ones"
    assert phase_mark.name == "prefill"


def test_run_for_keeps_a_phase_busy():
    import time

    calls = []
    t0 = time.perf_counter()
    n = measure.run_for(lambda: calls.append(time.sleep(0.01)), 0.2, "cpu")
    assert n == len(calls) >= 5 and time.perf_counter() - t0 >= 0.2
    assert measure.run_for(lambda: None, 0.0, "cpu") == 1
    with pytest.raises(ValueError, match="seconds"):
        measure.run_for(lambda: None, -1, "cpu")


def test_bad_sizes_are_refused(runner):
    with pytest.raises(ValueError, match="batch"):
        runner.prefill_fn(0, 10)
    with pytest.raises(ValueError, match="context_len"):
        runner.decode_fn(1, 0)
    with pytest.raises(ValueError, match="max length"):
        runner.prefill_fn(1, 10**6)
    with pytest.raises(ValueError, match="runner 'jax'"):
        make_runner("jax", "tiny")


def test_charts_have_titles_and_units(runner):
    recs = [measure.measure_prefill(runner, 1, 64, repeats=1, peaks=PEAKS),
            measure.measure_decode(runner, 1, 64, repeats=1, peaks=PEAKS)]
    fig = rplot.roofline_chart(PEAKS, recs, dtype="float32")
    ax = fig.axes[0]
    assert "FLOP / byte" in ax.get_xlabel() and "FLOP/s" in ax.get_ylabel() and ax.get_title()
    assert ax.get_xscale() == "log"
    assert len(ax.collections) >= 2  # one point per record
    fig = rplot.utilization_bars(recs)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights[:2] == pytest.approx([100 * recs[0]["mfu"], 100 * recs[1]["mfu"]])
    dec = [dict(recs[1], batch=b) for b in (1, 2, 4)]
    fig = rplot.decode_batch_sweep(dec, critical_batch=2)
    assert all(a.get_xlabel() and a.get_ylabel() for a in fig.axes)
    fig = rplot.prefill_length_sweep([dict(recs[0], prompt_len=n) for n in (16, 64)])
    assert "MFU" in fig.axes[1].get_ylabel()
    s = Sampler("cpu", interval_s=0.05, verbose=False)
    with s:
        with s.phase("prefill"):
            runner.prefill_fn(1, 64)()
    fig = rplot.utilization_timeline(s)
    assert fig.axes[0].get_ylabel() == "utilization (%)" and fig.axes[0].patches  # phase shaded
    fig = rplot.util_vs_mfu({"prefill": {"gpu_util_pct": 99, "tensor_active_pct": 60},
                             "decode": {"gpu_util_pct": 98, "tensor_active_pct": 5}}, recs)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["NVML GPU util", "tensor-core active (GPM)", "MFU", "MBU"]
    import matplotlib.pyplot as plt
    plt.close("all")


def test_cli_measure_writes_json(tmp_path, monkeypatch, capsys):
    from labkit.cli import main

    monkeypatch.setenv("LABKIT_PROFILE", "ci")
    monkeypatch.setattr("labkit.hardware.peaks", lambda device=None, refresh=False, **kw: PEAKS)
    out = tmp_path / "m.json"
    rc = main(["measure", "--model", "tiny", "--batch", "1", "4", "--prompt-len", "32", "--context-len", "32",
               "--repeats", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "MBU vs measured read bandwidth" in text and "decode" in text
    data = json.loads(out.read_text())
    assert [r["phase"] for r in data["records"]] == ["prefill", "decode", "decode"]
    assert data["peaks"]["read_bytes_per_s"] == 2e10


def test_tour_sections_ci(tmp_path, monkeypatch):
    from labkit.report import Report

    monkeypatch.setenv("LABKIT_HOME", str(tmp_path / "home"))
    rep = Report(tmp_path / "report")
    rep.section("Hardware: measured peaks")
    measure.hardware_section(rep, "ci")
    rep.section("Prefill vs decode on the default model")
    measure.prefill_decode_section(rep, "ci")
    hw, pd = rep.sections
    assert hw.tables and any(r["part"] == "H100 SXM" for r in hw.tables[1][1])
    assert [c for c, _ in pd.figures] and all(p.is_file() for _, p in pd.figures)
    whats = [r.what for r in rep.summary]
    assert any("prefill MFU" in w for w in whats) and any("decode MBU" in w for w in whats)
    assert rep.data["prefill_vs_decode"][0]["phase"] == "prefill"
    assert rep.write().is_file()


def test_engine_runner_when_engine_present():
    pytest.importorskip("labkit.engine")
    r = make_runner("engine", "tiny", "float32", "cpu")
    eng = r.engine  # close() drains it, then lets it go
    try:
        pre = measure.measure_prefill(r, batch=2, prompt_len=32, repeats=2, peaks=PEAKS)
        dec = measure.measure_decode(r, batch=2, context_len=32, repeats=3, peaks=PEAKS)
    finally:
        r.close()
    assert pre["runner"] == dec["runner"] == "labkit-engine"
    assert pre["flops"] == prefill_cost(r.shape, 32, 2, "float32").flops
    assert dec["batch"] == 2 and dec["ms"] > 0
    assert not eng.has_unfinished() and r.engine is None


def test_one_roof_for_every_runner_sampled_before_each_measurement(runner):
    from labkit.hardware import Roof

    roof = Roof("cpu", ("float32",), buffer_bytes=32 << 20, matmul_size=128, repeats=2)
    recs = [measure.measure_prefill(runner, 1, 32, repeats=2, peaks=roof),
            measure.measure_decode(runner, 1, 32, repeats=2, peaks=roof),
            measure.measure_prefill(runner, 1, 32, repeats=2, peaks=roof)]
    # the read roof before every measurement, the matmul roof before every prefill (the MFU's roof)
    assert len(roof.read_samples) == 3 and len(roof.flops_samples["float32"]) == 2
    roof.read_samples = [10e9, 10e9, 30e9]   # a later sample moves the median: rescore follows it
    roof.rescore(recs)
    assert {r["roof"] for r in recs} == {roof.id} and all(r["peak_bytes_per_s"] == 10e9 for r in recs)
    assert recs[1]["mbu"] == pytest.approx(recs[1]["bytes"] / (recs[1]["ms"] / 1e3) / 10e9)
    assert all(r["noisy"] for r in recs) and "noisy machine" in measure.format_records(recs)
    labelled = measure.label_runners(recs)
    assert {r["model"] for r in labelled} == {"transformers"} and recs[0]["model"] == "tiny"
