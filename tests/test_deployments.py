"""The lab's own bookkeeping of what it started, with real (small) processes and no model:
children and grandchildren die with a SIGKILLed owner, also when started from a thread that
has ended; the deployment registry writes, prunes and refuses; `labkit ps` / `labkit stop`;
a taken port is a clear error."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit import deployments
from labkit.proc import PortInUseError, owned_preexec, pid_alive, pid_start_ticks, port_in_use, start_process
from labkit.vllm.procinfo import group_pids

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

GONE_WITHIN_S = 5.0
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
# A child that starts a grandchild in its group, as vLLM's API server starts its engine core.
PARENT_OF_ONE = [sys.executable, "-c", ("import subprocess, sys, time; "
                 "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)")]

OWNER = f"""
import json, os, signal, sys, threading, time
from labkit import owner_watch
from labkit.proc import start_process
argv = {PARENT_OF_ONE!r}
kids = [start_process("from-main", argv)]
t = threading.Thread(target=lambda: kids.append(start_process("from-thread", argv)))
t.start(); t.join()
time.sleep(1.0)  # a parent-death signal set from that thread would have fired by now
first_guard = owner_watch.guard_pid()
os.kill(first_guard, signal.SIGKILL)  # the guard dies: the next start brings a new one that knows every group
os.waitpid(first_guard, 0)
kids.append(start_process("after", argv))
print(json.dumps({{"pids": [k.pid for k in kids], "guards": [first_guard, owner_watch.guard_pid()]}}), flush=True)
time.sleep(120)
"""


@pytest.fixture
def lab_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    return tmp_path


def wait_gone(pids: list[int], timeout_s: float) -> float:
    """Seconds until none of `pids` is alive (zombies count as gone); fails after `timeout_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if not any(pid_alive(p) for p in pids):
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"still alive {timeout_s} s after the owner died: {[p for p in pids if pid_alive(p)]}")


def test_children_and_grandchildren_die_with_a_sigkilled_owner_even_when_started_from_a_thread() -> None:
    """The thread's child has no parent-death signal: only the guard (restarted once) can stop it."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(owner.stdout.readline())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and [len(group_pids(p)) for p in info["pids"]] != [2, 2, 2]:
            time.sleep(0.05)  # the last child is starting its grandchild
        groups = [group_pids(p) for p in info["pids"]]
        assert [len(g) for g in groups] == [2, 2, 2], groups  # each child and its grandchild, all still running
        first_guard, guard = info["guards"]
        assert guard != first_guard and not pid_alive(first_guard)
        everything = [p for g in groups for p in g] + [guard]
        assert all(pid_alive(p) for p in everything)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        wait_gone(everything, GONE_WITHIN_S)
    finally:
        if owner.poll() is None:
            owner.kill()


def test_a_child_whose_owner_is_already_gone_exits_before_exec(tmp_path) -> None:
    """The race after fork: the owner dies before the parent-death signal is armed."""
    marker = tmp_path / "ran"
    p = subprocess.Popen([sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"],
                         preexec_fn=owned_preexec(expected_parent=os.getpid() + 10**6))  # noqa: PLW1509
    assert p.wait(10) == 1
    assert not marker.exists()
    p = subprocess.Popen([sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"],
                         preexec_fn=owned_preexec())  # noqa: PLW1509
    assert p.wait(30) == 0 and marker.exists()


def test_registry_lifecycle_one_atomic_file_per_deployment(lab_home) -> None:
    a, b = start_process("a", SLEEPER), start_process("b", SLEEPER)
    try:
        dep = deployments.begin("disagg", "tiny")
        try:
            assert deployments.track(name="a", role="prefill", pid=a.pid, port=1001, url="http://x:1001",
                                     model="tiny", single_mode="prefill worker") == dep.id
            deployments.track(name="b", role="router", pid=b.pid, port=1002, url="http://x:1002", model="tiny",
                              single_mode="router")
        finally:
            deployments.end(dep)
        files = list((lab_home / "deployments").iterdir())
        assert [f.name for f in files] == [f"{dep.id}.json"]  # no temporary file left behind
        d = json.loads(files[0].read_text())
        assert d["owner_pid"] == os.getpid() and d["uid"] == os.getuid() and d["mode"] == "disagg"
        assert [(p["name"], p["pid"], p["port"]) for p in d["procs"]] == [("a", a.pid, 1001), ("b", b.pid, 1002)]
        assert d["procs"][0]["start_ticks"] == pid_start_ticks(a.pid)
        (listed,) = deployments.listing()
        assert listed.id == dep.id and listed.url == "http://x:1002"  # the router's URL is the one to use
        # outside begin/end, a process is a deployment of its own
        single = deployments.track(name="a2", role="mono", pid=a.pid, port=1003, url="", model="tiny",
                                   single_mode="mono worker")
        assert single.startswith("mono-worker-") and single != dep.id
        for pid in (a.pid, b.pid):
            deployments.forget(pid)
        assert not list((lab_home / "deployments").iterdir())
    finally:
        a.stop()
        b.stop()


def test_stale_entries_are_pruned_by_pid_liveness_and_start_time(lab_home) -> None:
    live = start_process("live", SLEEPER)
    dead = start_process("dead", SLEEPER)
    dead.stop()
    try:
        reg = lab_home / "deployments"
        reg.mkdir()
        now = time.time()

        def entry(dep_id: str, pid: int, ticks: int | None) -> None:
            (reg / f"{dep_id}.json").write_text(json.dumps(
                {"id": dep_id, "mode": "mono", "model": "tiny", "owner_pid": 1, "owner_cmd": "x", "user": "u",
                 "uid": os.getuid(), "started_at": now,
                 "procs": [{"name": "w", "role": "mono", "pid": pid, "port": 1, "url": "", "start_ticks": ticks}]}))

        entry("mono-live", live.pid, pid_start_ticks(live.pid))
        entry("mono-dead", dead.pid, None)
        entry("mono-reused", live.pid, (pid_start_ticks(live.pid) or 0) + 1)  # same PID, another process
        (reg / "broken.json").write_text("{not json")
        assert [d.id for d in deployments.listing()] == ["mono-live"]
        assert sorted(f.name for f in reg.iterdir()) == ["broken.json", "mono-live.json"]
    finally:
        live.stop()


def labkit(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def test_labkit_ps_and_stop_by_id_and_all_mine_only_the_callers(lab_home) -> None:
    procs = [start_process(f"p{i}", PARENT_OF_ONE) for i in range(3)]
    try:
        ids = [deployments.track(name=f"p{i}", role="mono", pid=p.pid, port=2000 + i, url=f"http://h:{2000 + i}",
                                 model="tiny", single_mode="mono worker") for i, p in enumerate(procs)]
        # the third one says it belongs to another user
        path = lab_home / "deployments" / f"{ids[2]}.json"
        d = json.loads(path.read_text())
        path.write_text(json.dumps({**d, "uid": os.getuid() + 1, "user": "someone-else"}))

        out = labkit("ps")
        assert out.returncode == 0 and all(i in out.stdout for i in ids), out
        assert "someone-else" in out.stdout and "http://h:2000" in out.stdout
        assert {d["id"] for d in json.loads(labkit("ps", "--json").stdout)} == set(ids)

        deadline = time.monotonic() + 10
        while len(group_pids(procs[0].pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        group0 = group_pids(procs[0].pid)
        assert len(group0) == 2
        out = labkit("stop", ids[0])
        assert out.returncode == 0 and f"stopped {ids[0]}" in out.stdout, out
        assert not any(pid_alive(p) for p in group0)  # the whole group, grandchild included

        out = labkit("stop", ids[2])
        assert out.returncode == 1 and "belongs to user someone-else" in out.stderr, out
        assert procs[2].alive()

        out = labkit("stop", "mono-nope")
        assert out.returncode == 2 and "no running deployment mono-nope" in out.stderr, out

        out = labkit("stop", "--all-mine")
        assert out.returncode == 0 and ids[1] in out.stdout and ids[2] not in out.stdout, out
        assert not procs[1].alive() and procs[2].alive()
        assert [d["id"] for d in json.loads(labkit("ps", "--json").stdout)] == [ids[2]]
    finally:
        for p in procs:
            p.stop()


def test_a_taken_port_names_the_deployment_that_holds_it(lab_home) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    child = start_process("w", SLEEPER)
    try:
        assert port_in_use(port)
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is already in use by another program"):
            deployments.check_port_free(port)
        dep_id = deployments.track(name="w", role="router", pid=child.pid, port=port, url="", model="tiny",
                                   single_mode="router")
        with pytest.raises(PortInUseError) as e:
            deployments.check_port_free(port)
        assert f"port {port} is already in use by lab deployment {dep_id}" in str(e.value)
        assert f"`labkit stop {dep_id}`" in str(e.value) and e.value.port == port
    finally:
        holder.close()
        child.stop()
        deployments.forget(child.pid)
    assert not port_in_use(port)
    deployments.check_port_free(port)  # free again: no error
