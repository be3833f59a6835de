"""`labkit serve`: one command starts router + workers; SIGTERM stops every process it started."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx

from labkit.proc import free_port, pid_alive


def test_labkit_serve_disagg_starts_serves_and_leaves_no_orphans(tiny_model_dir, tmp_path) -> None:
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "labkit.cli", "serve", "--mode", "disagg", "--prefill", "1",
                             "--decode", "1", "--model", "tiny", "--port", str(port), "--transfer", "tcp",
                             "--prefill-cpus", "0", "--decode-cpus", str(min(1, os.cpu_count() - 1))],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and "Ctrl-C stops everything" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        out = (tmp_path / "serve.log").read_text()
        pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
        assert len(pids) == 3, out  # router, prefill worker, decode worker
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "over tcp", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert h["mode"] == "disagg" and all(u["up"] for u in h["upstreams"].values())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "stopped:" in (tmp_path / "serve.log").read_text()
        assert not [p for p in pids if pid_alive(p)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_labkit_serve_refuses_a_bad_policy_before_starting_anything() -> None:
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "labkit.cli", "serve", "--mode", "disagg", "--prefill", "2",
                          "--port", str(port), "--prefill-policy", "dynamo-cost:temperature=-1"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2 and "starting" not in out.stdout
    assert "prefill policy 'dynamo-cost:temperature=-1': temperature must be a finite number >= 0" in out.stderr
