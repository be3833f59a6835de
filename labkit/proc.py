"""Child processes the lab starts itself: free ports, health waits with timeouts, stop by PID.

Every server the lab runs (its own workers, the router, vLLM) is a real process started
here and stopped here; tests check the PIDs are gone afterwards.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Mapping, Sequence

import httpx

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


@dataclass
class Child:
    """A started process: its Popen, its name for messages, and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n_chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[-n_chars:]
        return data.decode("utf-8", errors="replace")

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after `timeout_s`; returns the exit code."""
        stop_pid(self.pid, timeout_s=timeout_s, popen=self.popen)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.popen.returncode


def start_process(name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                  log_path: str | os.PathLike[str] | None = None, cwd: str | None = None,
                  cpus: Sequence[int] | None = None) -> Child:
    """Starts `argv` in its own process group (so stop() takes its children too).

    Output goes to `log_path` when given (else inherited). `cpus` pins it with taskset
    semantics (sched_setaffinity in the child).
    """
    full_env = dict(os.environ)
    if env:
        full_env.update({k: str(v) for k, v in env.items()})
    log = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
    preexec = None
    if cpus is not None:
        cpu_set = set(int(c) for c in cpus)

        def preexec() -> None:  # runs in the child between fork and exec
            os.sched_setaffinity(0, cpu_set)

    popen = subprocess.Popen(list(argv), env=full_env, cwd=cwd, stdout=log or None,
                             stderr=subprocess.STDOUT if log else None, stdin=subprocess.DEVNULL,
                             start_new_session=True, preexec_fn=preexec)
    return Child(name=name, popen=popen, log_path=Path(log_path) if log_path else None, _log=log)


def python_module_argv(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def stop_pid(pid: int, timeout_s: float = 10.0, popen: subprocess.Popen[bytes] | None = None) -> None:
    """Stops `pid` and its process group: SIGTERM, then SIGKILL after `timeout_s`."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if popen is not None:
                if popen.poll() is not None:
                    break
            elif not pid_alive(pid):
                break
            time.sleep(0.05)
        else:
            continue
        break
    if popen is not None:
        try:
            popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
    # The group may hold grandchildren (engine-core processes, tokenizer workers).
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class StartupError(RuntimeError):
    """A child process died or did not become healthy in time; the message holds its log tail."""


def wait_http_ok(url: str, *, timeout_s: float, child: Child | None = None, interval_s: float = 0.2) -> None:
    """Polls `url` until it answers 2xx. Raises StartupError on timeout or if `child` exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise StartupError(f"{child.name} (pid {child.pid}) exited with {child.popen.returncode} "
                               f"before {url} answered. Log tail:\n{child.log_tail()}")
        try:
            r = httpx.get(url, timeout=min(2.0, interval_s * 10))
            if 200 <= r.status_code < 300:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = e.__class__.__name__
        time.sleep(interval_s)
    tail = f" Log tail:\n{child.log_tail()}" if child is not None else ""
    raise StartupError(f"{url} not healthy after {timeout_s:.0f} s (last: {last}).{tail}")
