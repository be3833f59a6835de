"""Process and core bookkeeping for the vLLM servers: usable cores, core lists, a process
group's PIDs and threads, CPU seconds used (all read from /proc, Linux)."""

from __future__ import annotations

import os


def usable_cpus() -> tuple[int, ...]:
    """The cores this process may run on, sorted."""
    return tuple(sorted(os.sched_getaffinity(0)))


def cpu_list_str(cpus: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2,5' (the format VLLM_CPU_OMP_THREADS_BIND and taskset read)."""
    out: list[str] = []
    cs = sorted(set(cpus))
    i = 0
    while i < len(cs):
        j = i
        while j + 1 < len(cs) and cs[j + 1] == cs[j] + 1:
            j += 1
        out.append(str(cs[i]) if i == j else f"{cs[i]}-{cs[j]}")
        i = j + 1
    return ",".join(out)


def group_pids(pgid: int) -> list[int]:
    """Every live process in process group `pgid` (the server and its engine/worker children)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return sorted(out)


def thread_ids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by `pids` (all their threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total / tick
