"""The owner watch: a tiny guard process that stops the lab's process groups when their owner dies.

Why a separate process: the servers the lab starts run other people's code (uvicorn, vLLM),
so nothing inside them can be trusted to notice that the notebook kernel or the `labkit serve`
command that started them is gone. The guard is ~100 lines of the standard library, started
once per owner process (`python -I -S owner_watch.py OWNER_PID`, about 20 ms, its own session
so a Ctrl-C or a `killpg` aimed at the owner's group does not take it too). The owner holds
the only write end of the guard's stdin and sends one line per process group it starts
(`+PGID`) or stops (`-PGID`). The guard sees the owner die in two ways:

- EOF on stdin: the kernel closes the owner's end when it exits, by any signal, SIGKILL included;
- its parent PID changes (polled every POLL_S), for the case EOF misses: a child the owner
  `fork()`ed without exec also holds the write end, and keeps the pipe open.

Then it sends SIGTERM to every group still registered, SIGKILL after GRACE_S to what is left,
and exits. Signalling the *group* reaches grandchildren (vLLM's engine-core processes), which
no parent-death signal does. Groups that no longer exist are dropped at each poll, so a
process-group id the kernel hands out again later is never signalled.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

POLL_S = 0.25  # how often the guard checks its parent PID and drops vanished groups
GRACE_S = 2.0  # SIGTERM -> SIGKILL: under 5 s from the owner's death to every process gone


def group_exists(pgid: int) -> bool:
    """True while any process (zombies included) is in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_groups(pgids: set[int], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM to each group, SIGKILL after `grace_s` to those left; returns groups still there after."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        for g in pgids:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            pgids = {g for g in pgids if group_exists(g)}
            if not pgids:
                return []
            time.sleep(0.05)
    return sorted(pgids)


def guard_main(owner_pid: int) -> int:
    """The guard's loop: track `+PGID`/`-PGID` lines, and stop what is left once the owner is gone."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    fd = sys.stdin.fileno()
    groups: set[int] = set()
    buf = b""
    why = ""
    while not why:
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready:
            data = os.read(fd, 4096)
            if not data:
                why = "its pipe closed"
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line[:1] in (b"+", b"-") and line[1:].isdigit():
                    (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
        if not why and os.getppid() != owner_pid:
            why = "its parent PID changed"
        groups = {g for g in groups if group_exists(g)}
    if groups:
        t0 = time.monotonic()
        left = stop_groups(groups)
        print(
            f"{time.strftime('%H:%M:%S')} owner {owner_pid} gone ({why}): stopped process groups "
            f"{sorted(groups)} in {time.monotonic() - t0:.1f} s" + (f"; still there: {left}" if left else ""),
            file=sys.stderr,
            flush=True,
        )
    return 0


# --- the owner's side -------------------------------------------------------------------------


class _Guard:
    """This process's guard: started on first use, restarted (with every group) if it died or we forked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.popen: subprocess.Popen[bytes] | None = None
        self.owner_pid = 0
        self.groups: set[int] = set()
        self.log: IO[bytes] | None = None

    def _alive(self) -> bool:
        return self.popen is not None and self.owner_pid == os.getpid() and self.popen.poll() is None

    def _start(self, log_path: Path | None) -> None:
        if log_path is not None and self.log is None:
            try:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                self.log = open(log_path, "ab")  # noqa: SIM115 - kept open for the guard's whole life
            except OSError:
                self.log = None  # a read-only LABKIT_HOME: the guard works, it only keeps no notes
        self.owner_pid = os.getpid()
        # The write end of this pipe is non-inheritable, so other children never hold it.
        self.popen = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__, str(self.owner_pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self.log or subprocess.DEVNULL,
            start_new_session=True,
        )
        self._send("".join(f"+{g}\n" for g in self.groups))

    def _send(self, text: str) -> bool:
        if not text:
            return True
        if self.popen is None or self.popen.stdin is None:
            return False
        try:
            self.popen.stdin.write(text.encode())
            self.popen.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def watch(self, pgid: int, log_path: Path | None) -> int:
        """Registers `pgid`; returns the guard's PID."""
        with self.lock:
            if self.owner_pid != os.getpid():  # first use, or a fork of the owner: its guard is not ours
                self.popen, self.groups = None, set()
            self.groups.add(pgid)
            if not self._alive() or not self._send(f"+{pgid}\n"):
                self._start(log_path)
            assert self.popen is not None
            return self.popen.pid

    def unwatch(self, pgid: int) -> None:
        with self.lock:
            if pgid in self.groups:
                self.groups.discard(pgid)
                if self._alive():
                    self._send(f"-{pgid}\n")

    def pid(self) -> int | None:
        with self.lock:
            return self.popen.pid if self._alive() and self.popen is not None else None


_GUARD = _Guard()


def watch(pgid: int, log_path: Path | None = None) -> int:
    """Has this process's guard stop group `pgid` when this process dies; returns the guard's PID.

    `log_path`: where the guard notes what it stopped (only the first call's counts).
    """
    return _GUARD.watch(pgid, log_path)


def unwatch(pgid: int) -> None:
    """Forgets group `pgid` (it was stopped by its owner)."""
    _GUARD.unwatch(pgid)


def guard_pid() -> int | None:
    """The PID of this process's guard, or None before the first `watch`."""
    return _GUARD.pid()


if __name__ == "__main__":
    raise SystemExit(guard_main(int(sys.argv[1])))
