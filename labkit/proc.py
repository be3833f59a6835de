"""Child processes the lab starts itself: free ports, health waits with timeouts, stop by PID.

Every server the lab runs (its own workers, the router, vLLM, benchmark helpers) is a real
process started here and stopped here; tests check the PIDs are gone afterwards.

Nothing outlives its owner. Each child runs in its own process group (so a stop reaches its
grandchildren) and is tied to the process that started it (the owner: a notebook kernel,
`labkit serve`, a test) twice over, so that it ends within 5 s of the owner dying by any
signal, SIGKILL included, which no `atexit` hook survives:

1. Linux's parent-death signal: `prctl(PR_SET_PDEATHSIG, SIGTERM)` in the child between fork
   and exec. It is set only when the owner forks from its main thread: the kernel sends it
   when the *thread* that forked the child ends, not the process, so a server started from a
   pool or helper thread would die with that thread. The main thread lives as long as the
   process (CPython finishes on it), and Jupyter runs cells there. A race is handled: the
   owner may die between fork and prctl, so the child checks its parent PID afterwards and
   exits if it is no longer the owner.
2. The owner watch (`labkit.owner_watch`): one small guard process per owner, which sees the
   owner's pipe close (or its parent PID change) and stops every registered process group:
   SIGTERM, SIGKILL 2 s later. It covers what the signal misses: children started from other
   threads, grandchildren (vLLM's engine core), platforms without prctl (macOS).

Also here, for the processes themselves: `gc_frozen`, held by the lab's servers for their lifetime
and by its timing clients while they measure, so that a garbage-collector pass does not stall them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from labkit import owner_watch
from labkit.config import labkit_home

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PDEATHSIG = int(signal.SIGTERM)  # a clean shutdown first; the guard sends SIGKILL after its grace


def _find_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up before any fork (nothing is loaded between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _find_prctl()


def owned_preexec(cpus: Sequence[int] | None = None, *, expected_parent: int | None = None) -> Callable[[], None]:
    """The function a child runs between fork and exec: pin to `cpus`, and die with its owner.

    The parent-death signal is armed only when called from the main thread (see the module
    docstring); `expected_parent` (default: this process) is the PID the child checks after
    arming it, exiting at once if its parent is already another process.
    """
    owner = os.getpid() if expected_parent is None else expected_parent
    arm = _PRCTL is not None and threading.current_thread() is threading.main_thread()
    cpu_set = {int(c) for c in cpus} if cpus is not None else None
    prctl = _PRCTL

    def preexec() -> None:  # in the child: no imports, no locks
        if cpu_set is not None:
            os.sched_setaffinity(0, cpu_set)
        if arm and prctl is not None:
            prctl(PR_SET_PDEATHSIG, PDEATHSIG, 0, 0, 0)
            if os.getppid() != owner:  # the owner died before the signal was armed
                os._exit(1)

    return preexec


def popen_owned(argv: Sequence[str], *, cpus: Sequence[int] | None = None, **popen_kw: Any) -> subprocess.Popen[Any]:
    """`subprocess.Popen(argv, **popen_kw)` in a new process group that dies with this process.

    Returns the Popen; the group is registered with this process's guard until `stop_pid`.
    """
    popen: subprocess.Popen[Any] = subprocess.Popen(
        list(argv),
        start_new_session=True,
        preexec_fn=owned_preexec(cpus),  # noqa: PLW1509 - it takes no lock and imports nothing
        **popen_kw,
    )
    try:
        owner_watch.watch(popen.pid, labkit_home() / "logs" / "owner-watch.log")
    except BaseException:  # no guard could start: do not leave a child nobody watches
        stop_pid(popen.pid, timeout_s=2.0, popen=popen)
        raise
    return popen


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


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    cwd: str | None = None,
    cpus: Sequence[int] | None = None,
) -> Child:
    """Starts `argv` in its own process group (so stop() takes its children too), tied to this
    process (it ends when this process dies; see the module docstring).

    Output goes to `log_path` when given (else inherited). `cpus` pins it with taskset
    semantics (sched_setaffinity in the child).
    """
    full_env = dict(os.environ)
    if env:
        full_env.update({k: str(v) for k, v in env.items()})
    log = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 - the Child closes it when stopped
    popen = popen_owned(
        argv,
        cpus=cpus,
        env=full_env,
        cwd=cwd,
        stdout=log or None,
        stderr=subprocess.STDOUT if log else None,
        stdin=subprocess.DEVNULL,
    )
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
    owner_watch.unwatch(pid)


class StartupError(RuntimeError):
    """A child process died or did not become healthy in time; the message holds its log tail."""


class PortInUseError(StartupError):
    """A server was asked to listen on a port that something else holds; the message says what."""

    def __init__(self, message: str, port: int) -> None:
        super().__init__(message)
        self.port = port


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """True when a server could not listen on `host:port` now (bound as uvicorn binds: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
            s.listen(1)
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def pid_start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (Linux; None elsewhere or if it is gone).

    With the PID it names one process for good: a PID the kernel hands out again has another.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@contextlib.contextmanager
def gc_frozen() -> Iterator[int]:
    """Within the block, every object alive at its start is out of the garbage collector's reach.

    The cyclic GC's oldest-generation pass walks every tracked object and holds the process (and its
    GIL) meanwhile: tens of milliseconds for a heap of tens of thousands of objects (40 ms measured
    here in a process holding the worker's imports; a notebook kernel or a test session holds more),
    at whatever moment it comes: between a first token and the client, between two decode steps, in
    the middle of a timed request. Frozen objects are skipped; what the block allocates is collected
    as usual; at the end they rejoin the oldest generation. Servers hold it for their lifetime, timing
    clients for their measurements (vLLM's API server and its benchmark client freeze their heaps the
    same way). Yields how many objects are frozen.
    """
    gc.collect()
    gc.freeze()
    try:
        yield gc.get_freeze_count()
    finally:
        gc.unfreeze()


def wait_http_ok(url: str, *, timeout_s: float, child: Child | None = None, interval_s: float = 0.2) -> None:
    """Polls `url` until it answers 2xx. Raises StartupError on timeout or if `child` exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise StartupError(
                f"{child.name} (pid {child.pid}) exited with {child.popen.returncode} "
                f"before {url} answered. Log tail:\n{child.log_tail()}"
            )
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
