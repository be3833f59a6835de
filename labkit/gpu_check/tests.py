"""The test suite's GPU tests, run where a GPU is (they skip elsewhere)."""

from __future__ import annotations

import os
import sys

from labkit.config import repo_root
from labkit.gpu_check.core import Ctx


def check_gpu_tests(ctx: Ctx) -> None:
    """The test suite's GPU tests (cuda-ipc KV transfer between processes, bf16 + compiled engine decode).

    They are skipped on a machine without a GPU, so this is where they run. pytest runs in a child
    process with its own timeout; its summary line and the tail of its output go to the log.
    """
    import re
    import subprocess

    root = repo_root()
    marker = "gpu" if ctx.device.startswith("cuda") else "not gpu"  # smoke: the same files' CPU tests
    files = ["tests/test_transfer_cuda_ipc.py", *(["tests/test_engine.py"] if ctx.device.startswith("cuda") else [])]
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:logging",
        "--tb=short",
        "-rfE",
        "-m",
        marker,
        *(["-k", ctx.pytest_k] if ctx.pytest_k else []),
        "--timeout",
        "240",
        *files,
    ]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    limit = max(30.0, ctx.left_s() - 10)
    try:
        proc = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=limit, check=False
        )  # rc is recorded and raised below with the counts
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        text, rc = text + f"\n(pytest killed after {limit:.0f} s)", -9
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    ctx.results["gpu_tests"] = {
        "command": " ".join(cmd[1:]),
        "returncode": rc,
        "counts": counts,
        "output_tail": text[-6000:],
    }
    ctx.log(f"gpu tests: rc={rc} {counts}\n{text[-3000:]}")
    if rc != 0:
        raise RuntimeError(f"pytest -m {marker} returned {rc}: {counts}")
