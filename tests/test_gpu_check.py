from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_gpu_check_smoke_runs_end_to_end(tmp_path):
    """The prepared GPU script, on the CPU with tiny sizes: every check passes and every file is written."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "LABKIT_HOME": str(tmp_path / "home"), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke", "--budget-s", "900"],
                          capture_output=True, text=True, env=env, timeout=960, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] and all(v.startswith("ok") for v in res["status"].values()), res["status"]
    assert res["env"]["device"] == "cpu" and res["peaks"]["read_bytes_per_s"] > 0
    head = res["8b"]["headline"]
    assert [r["phase"] for r in head] == ["prefill", "decode"] and all(r["mfu"] > 0 and r["mbu"] > 0 for r in head)
    assert [r["batch"] for r in res["8b"]["decode_sweep"]] == [1, 4, 16]
    assert "prefill" in res["8b"]["telemetry_means"] and "cpu_util_pct" in res["8b"]["telemetry_means"]["prefill"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8  # what the device runner brings back
    assert {"results.json", "gpu_check.log", "roofline.png", "timeline_8b.png", "util_vs_mfu_8b.png"} <= set(files)
    # the short table comes last
    variants = res["engine"]["variants"]
    assert list(variants) == ["tiny eager", "tiny graphs", "tiny-qwen2 graphs", "tiny-qwen2 compiled+graphs"]
    assert {r["runner"] for r in res["engine"]["headline"]} == {"engine eager", "engine graphs", "engine compiled+graphs"}
    assert not res["engine"]["errors"] and res["engine"]["variants"]["tiny graphs"]["decode_sweep"]
    assert "engine_decode_sweep.png" in files
    # the lab's server on one device: mono and 1P1D agree; mono runs the long prompt's prefill as one
    # step, so its decodes wait through most of that prompt's prefill window. Whether 1P1D stalls less
    # on one device depends on how the two processes share it (on a busy 2-core CI box they fight for
    # the cores: 21 ms quiet, 298 ms loaded), so that comparison is reported by the GPU run, not asserted.
    serving = res["serving"]
    assert serving["greedy_equal"] and serving["greedy_tokens"]["mono"]
    stall = serving["interference"]
    mono = stall["mono"]
    assert mono["decode_stall_max_ms"] >= 0.5 * mono["prefill_window_ms"] > 0, mono
    assert mono["stall_ratio"] > 3, mono
    assert all(stall["disagg"][k] > 0 for k in ("decode_itl_mean_ms", "decode_stall_max_ms", "long_ttft_ms"))
    assert {r["mode"] for r in serving["sweep"]} == {"mono", "1p1d"} and all(r["ok"] == 4 for r in serving["sweep"])
    assert "serving.png" in files
    assert res["notebooks"]["00_welcome"]["passed"]
    lines = proc.stdout.strip().splitlines()
    header = max(i for i, ln in enumerate(lines) if ln.startswith("model"))
    rows = [ln.split() for ln in lines[header + 1:] if not ln.startswith(("serving", "notebooks"))]
    assert [r[1] for r in rows] == ["prefill", "decode"] * 6  # 8b shape, 1b shape, four engine variants
    assert "engine compiled+graphs" in lines[-3] and "transformers" in lines[header + 1]
    assert lines[-2].startswith("serving on one device: greedy mono == 1P1D True")
    assert lines[-1].startswith("notebooks: 00_welcome ok")
