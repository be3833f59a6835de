"""`--step-log`: a worker writes one JSON line per engine step (what the planner's validation reads)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx

from labkit.proc import pid_alive
from labkit.serve.launcher import launch


def test_mono_worker_logs_its_steps(tmp_path: Path) -> None:
    log = tmp_path / "steps.jsonl"
    with launch("mono", model="tiny", kv_cache_bytes=32 << 20, step_log=str(log)) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hello there", "max_tokens": 5,
                                                           "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        pids = srv.pids
    assert not any(pid_alive(p) for p in pids)
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert [s["phase"] for s in steps] == ["prefill"] + ["decode"] * 4       # the first token comes from the prefill
    assert steps[0]["prefill_tokens"] > 0 and all(s["decode_seqs"] == 1 for s in steps[1:])
    assert {s["role"] for s in steps} == {"mono"}
    ctx = [s["context_tokens"] for s in steps[1:]]     # the prompt plus each token decoded so far
    assert ctx == list(range(ctx[0], ctx[0] + 4)) and ctx[0] == steps[0]["prefill_tokens"] + 1
    assert all(s["seconds"] > 0 for s in steps) and [s["t_end"] for s in steps] == sorted(s["t_end"] for s in steps)
