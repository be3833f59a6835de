"""doctor and the command line, run as a user would: real subprocesses."""
from __future__ import annotations

import json
import subprocess
import sys

from labkit import doctor


def _labkit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_doctor_findings_cover_the_machine() -> None:
    findings = {f.name: f for f in doctor.run_checks()}
    for name in ("python", "torch", "cpu", "transformers", "fastapi", "vllm", "nixl", "jupyterlab"):
        assert name in findings, name
    assert findings["python"].ok and findings["torch"].ok
    assert doctor.lab_can_run(list(findings.values()))
    # Every missing piece says how to add it.
    assert all(f.advice for f in findings.values() if not f.ok)
    cpu = doctor.cpu_info()
    assert cpu["logical_cores"] >= 1 and cpu["ram_gib"] > 0


def test_doctor_command_exits_zero_and_prints_json() -> None:
    r = _labkit("doctor", "--json")
    assert r.returncode == 0, r.stderr
    records = json.loads(r.stdout)
    assert any(rec["name"] == "torch" and rec["ok"] for rec in records)
    r = _labkit("doctor")
    assert r.returncode == 0 and "The lab can run on this machine." in r.stdout


def test_cli_help_and_unknown_command() -> None:
    r = _labkit("--help")
    assert r.returncode == 0 and "doctor" in r.stdout and "serve" in r.stdout
    r = _labkit("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_models_command_lists_presets() -> None:
    r = _labkit("models")
    assert r.returncode == 0
    for name in ("tiny", "small", "llama-3.1-8b", "qwen2.5-7b"):
        assert name in r.stdout
