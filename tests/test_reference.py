"""labkit.reference against the committed results in docs/results/: the numbers the notebooks draw."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from labkit import reference as R


def test_newest_file_per_kind_prefers_the_plain_run_over_variants() -> None:
    assert R.newest_file("plan_validation").date == "2026-12-07"   # the small-model card with every mode
    assert R.newest_file("plan_validation").tag == "cpu-2core"
    assert R.newest_file("plan_validation", variant="quick").date == "2026-11-30"   # a smoke run, asked for by name
    assert R.newest_file("roofline").tag == "cpu-2core"
    assert R.newest_file("roofline", variant="1t").tag == "cpu-2core-1t"
    assert R.newest_file("gpu_check").path.name == "results.json"
    assert R.newest_file("no_such_kind") is None


def test_gpu_check_loads_the_h100_run() -> None:
    run = R.gpu_check()
    assert run is not None and run.machine == "H100 SXM" and run.dtype == "bfloat16"
    assert run.roofs.peak_flops == pytest.approx(734.2e12, rel=1e-3)
    assert run.roofs.read_bytes_per_s == pytest.approx(3.03e12, rel=1e-2)
    pre = run.point("llama-3.1-8b", "transformers", "prefill")
    assert pre.mfu == pytest.approx(0.637, abs=1e-3) and pre.seq_len == 2048
    eager, graphs = (run.point("llama-3.1-8b", f"engine {f}", "decode") for f in ("eager", "graphs"))
    assert eager.mbu == pytest.approx(0.284, abs=1e-3) and graphs.mbu == pytest.approx(0.496, abs=1e-3)
    sweep = run.decode_sweeps["llama-3.1-8b engine graphs"]
    assert [p.batch for p in sweep] == [1, 16, 64, 128, 256] and {p.seq_len for p in sweep} == {512}
    assert run.telemetry_means["decode"]["dram_bw_util_pct"] == pytest.approx(10.5, abs=0.1)
    assert run.critical_batch == {"measured": 281, "datasheet": 354}
    assert "timeline_8b" in run.images and run.images["timeline_8b"].is_file()
    assert "97–98%" in run.readme_section("Telemetry")
    assert run.readme_section("No such heading") == ""


def test_roofline_loads_the_cpu_run_with_every_runner() -> None:
    run = R.roofline()
    raw = json.loads(run.file.path.read_text())
    assert run.model == "small" and run.threads == 2
    # the 2026-12-07 run (night, post-ops after the matmul, matmul roof sampled before each prefill): one roof
    # for every runner (median read, fp32 matmul)
    assert run.roofs.peak_flops == pytest.approx(143.3e9, rel=0.01) == raw["roof"]["peak_flops"]["float32"]
    assert run.roofs.read_bytes_per_s == pytest.approx(26.20e9, rel=0.01)
    by = {(p.runner, p.phase): p for p in run.points}
    assert {k[0] for k in by} == {"transformers", "labkit-engine", "labkit-engine bfloat16"}
    assert by["labkit-engine", "prefill"].mfu == pytest.approx(0.807, abs=1e-3)
    assert by["labkit-engine", "decode"].mbu == pytest.approx(0.838, abs=1e-3)
    assert by["labkit-engine", "decode"].ms == pytest.approx(18.34, abs=0.01)
    assert by["labkit-engine bfloat16", "decode"].dtype == "bfloat16"
    # bf16 reads half the weight bytes of fp32 for the same FLOPs: twice the intensity
    assert by["labkit-engine bfloat16", "decode"].intensity_flop_per_byte == pytest.approx(
        2 * by["labkit-engine", "decode"].intensity_flop_per_byte, rel=0.05)
    assert run.mbu_range["labkit-engine"][0] <= 0.838 <= run.mbu_range["labkit-engine"][1]


def test_roofline_still_reads_a_file_from_before_the_one_roof(tmp_path) -> None:
    old = R.results_dir() / "roofline-2026-11-26-cpu-2core.json"
    (tmp_path / "roofline-2026-11-26-cpu-2core.json").write_text(old.read_text())
    run = R.roofline(directory=tmp_path)
    by = {(p.runner, p.phase): p for p in run.points}
    assert run.roofs.peak_flops == pytest.approx(226e9, rel=0.02)
    assert by["labkit-engine", "prefill"].mfu == pytest.approx(0.824, abs=1e-3)
    assert by["labkit-engine", "decode"].mbu == pytest.approx(0.552, abs=1e-3)
    assert by["transformers", "decode"].intensity_flop_per_byte == pytest.approx(0.53, abs=0.01)


def test_serving_loaders() -> None:
    gains = R.gains()
    assert set(gains.workloads) == {"conversation", "short_prompt"} and gains.requests_per_rate == 10
    conv = gains.workloads["conversation"]
    assert {r.mode for r in conv.rows} == {"mono", "1p1d"} and conv.rows[0].raw["sent"] == 10
    inter = R.serve_interference()
    assert inter.model == "small" and set(inter.stats) == {"mono", "mono-chunked", "1p1d"}
    assert inter.stats["1p1d"]["decode_stall_max_ms"] < inter.stats["mono"]["decode_stall_max_ms"]
    val = R.plan_validation()
    raw = json.loads(val.file.path.read_text())["rows"]
    # the 2026-12-07 card: small, mono, mono-dp, 1P1D, selective 1P1D and vLLM P/D, 3 rates, 7 metrics each
    assert len(val.rows) == 105 and val.requests_per_rate == 16
    assert {r.mode for r in val.rows} >= {"mono-dp", "vllm-pd"}
    assert val.share_within_15pct == pytest.approx(sum(abs(r["error"]) <= 0.15 for r in raw) / 105) == pytest.approx(43 / 105)
    assert [r.error for r in val.rows] == pytest.approx([r["error"] for r in raw])
    tr = R.transfer()
    assert {lk.how for lk in tr.links} == {"measured", "computed"} and tr.bandwidth
    eng = R.engine()
    assert eng.model == "small" and "prefill_mfu" in eng.efficiency
    # the 2026-12-08 run, decode attention native at every batch size: lab 95.3, vLLM 91.0, transformers 57.9
    assert eng.output_tok_per_s == pytest.approx({"labkit": 95.3, "vllm": 91.0, "transformers": 57.9}, abs=0.1)


def test_loaders_return_none_for_missing_or_broken_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for load in (R.roofline, R.gpu_check, R.engine, R.transfer, R.serve_interference, R.gains, R.plan_validation):
        assert load(directory=empty) is None
        assert load(directory=tmp_path / "absent") is None
    (tmp_path / "roofline-2027-01-01-cpu-2core.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert R.roofline(directory=tmp_path) is None
    (tmp_path / "roofline-2027-01-01-cpu-2core.json").write_text(json.dumps({"model": "small"}))
    with pytest.warns(UserWarning, match="fields"):
        assert R.roofline(directory=tmp_path) is None


def test_a_newer_file_wins(tmp_path: Path) -> None:
    src = R.newest_file("roofline").path
    shutil.copy(src, tmp_path / src.name)
    data = json.loads(src.read_text())
    data["threads"] = 8
    (tmp_path / "roofline-2027-02-02-laptop-8core.json").write_text(json.dumps(data))
    assert R.roofline(directory=tmp_path).threads == 8


def test_write_result_names_the_file_as_the_loaders_read_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from labkit import reference

    monkeypatch.setattr(reference, "results_dir", lambda: tmp_path / "results")
    path = reference.write_result("gains", "cpu-2core-quick", {"date": "2026-01-02", "x": np.float64(1.5)})
    assert path == tmp_path / "results" / "gains-2026-01-02-cpu-2core-quick.json"
    assert json.loads(path.read_text()) == {"date": "2026-01-02", "x": 1.5}
    (f,) = reference.result_files("gains", tmp_path / "results")
    assert (f.date, f.tag) == ("2026-01-02", "cpu-2core-quick")
    mine = reference.write_result("gains", "cpu-2core", {"y": 1}, out=tmp_path / "elsewhere" / "g.json")
    assert mine == tmp_path / "elsewhere" / "g.json" and json.loads(mine.read_text()) == {"y": 1}


def test_a_plan_validation_run_with_a_report_card_gets_its_share_from_the_rows(tmp_path: Path) -> None:
    rows = [{"mode": "mono", "rate_rps": 1.0, "metric": m, "predicted": p, "measured": 1.0}
            for m, p in (("ttft_p50", 1.05), ("ttft_p99", 1.3), ("tpot_p50", 0.9), ("throughput", 1.0))]
    doc = {"model": "small", "requests_per_rate": 24, "rows": rows, "report_card": {"met": {}}}
    (tmp_path / "plan_validation-2026-11-30-cpu-2core.json").write_text(json.dumps(doc))
    run = R.plan_validation(directory=tmp_path)
    assert run is not None and run.share_within_15pct == pytest.approx(0.75)   # 1.3 is 30% off


def test_a_newer_smoke_run_is_never_the_reference(tmp_path: Path) -> None:
    for name in ("gains-2026-11-26-cpu-2core.json", "gains-2026-11-30-cpu-2core-quick.json"):
        (tmp_path / name).write_text("{}")
    assert R.newest_file("gains", directory=tmp_path).tag == "cpu-2core"
    assert R.newest_file("gains", variant="quick", directory=tmp_path).tag == "cpu-2core-quick"


def test_engine_still_reads_a_file_from_before_the_one_roof(tmp_path) -> None:
    old = R.results_dir() / "engine-2026-11-26-cpu-2core.json"
    (tmp_path / "engine-2026-11-26-cpu-2core.json").write_text(old.read_text())
    eng = R.engine(directory=tmp_path)
    assert eng.output_tok_per_s == {r["engine"]: r["output_tok_per_s"] for r in json.loads(old.read_text())["rows"]}
