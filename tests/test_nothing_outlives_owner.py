"""Nothing outlives its owner, with real servers on the tiny model: SIGKILL of `labkit serve`,
of a Python process that called launch() for mono and for 1P1D (and started a worker from a
thread that has ended), and a hard restart of a Jupyter kernel that launched 1P1D. Each time,
every process the owner started is gone within 5 s, the ports are free again, and `labkit ps`
lists the deployment while it runs and not after. A second `labkit serve` on a taken port fails
at once with the deployment's id and the command that stops it.

The three owners start side by side (one module fixture) to keep the file's wall time down."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from labkit.config import labkit_home
from labkit.proc import free_port, pid_alive, port_in_use
from labkit.vllm.procinfo import group_pids

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

GONE_WITHIN_S = 5.0
READY_TIMEOUT_S = 240.0
KV = str(32 << 20)

OWNER_SCRIPT = f"""
import json, threading
from labkit import owner_watch
from labkit.deployments import id_of
from labkit.serve.launcher import launch, start_worker

deps = [launch("mono", model="tiny", kv_cache_bytes={KV}), launch("disagg", model="tiny", kv_cache_bytes={KV})]
box = {{}}
t = threading.Thread(target=lambda: box.update(w=start_worker("mono", model="tiny", kv_cache_bytes={KV})))
t.start(); t.join()
w = box["w"]
print(json.dumps({{"ids": [id_of(s.router.pid) for s in deps] + [id_of(w.pid)], "thread_worker": w.url,
                  "thread_worker_pid": w.pid, "thread_alive": t.is_alive(), "guard": owner_watch.guard_pid()}}),
      flush=True)
threading.Event().wait()
"""

KERNEL_CELL = f"""
import json, os, threading
from labkit.deployments import id_of
from labkit.serve.launcher import launch
srv = launch("disagg", model="tiny", kv_cache_bytes={KV})
print(json.dumps({{"id": id_of(srv.router.pid), "kernel_pid": os.getpid(),
                  "main_thread": threading.current_thread() is threading.main_thread()}}))
"""


def descendants(pid: int) -> list[int]:
    """`pid`'s live descendants, and every process in their process groups (grandchildren that moved)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return sorted(out | {q for p in out for q in group_pids(p)})


def ps(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "labkit.cli", "ps", "--json"], capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    return {d["id"]: d for d in json.loads(out.stdout)}


def assert_all_gone(pids: list[int], ports: list[int], t_kill: float) -> float:
    """Waits until every PID is dead and every port free; returns the seconds since `t_kill`."""
    while time.monotonic() - t_kill < GONE_WITHIN_S:
        if not any(pid_alive(p) for p in pids) and not any(port_in_use(p) for p in ports):
            return time.monotonic() - t_kill
        time.sleep(0.02)
    left = [p for p in pids if pid_alive(p)]
    raise AssertionError(f"{GONE_WITHIN_S} s after the owner died: alive {left}, "
                         f"ports held {[p for p in ports if port_in_use(p)]}")


@dataclass
class Owner:
    """One owner process being started; `ready` holds what it printed once its servers answer."""

    name: str
    done: threading.Event = field(default_factory=threading.Event)
    ready: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    popen: subprocess.Popen[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def wait(self) -> dict[str, Any]:
        assert self.done.wait(READY_TIMEOUT_S), f"{self.name} not ready in {READY_TIMEOUT_S} s"
        assert not self.error, f"{self.name}: {self.error}"
        return self.ready


def _run(owner: Owner, body: Any) -> None:
    try:
        body()
    except Exception as e:  # noqa: BLE001 - reported by the test that waits on this owner
        owner.error = f"{e.__class__.__name__}: {e}"
    owner.done.set()


def _start_cli(owner: Owner, env: dict[str, str], log: Path) -> None:
    port = free_port()
    owner.extra["port"] = port
    with open(log, "w") as f:
        owner.popen = subprocess.Popen([sys.executable, "-m", "labkit.cli", "serve", "--mode", "disagg", "--model",
                                        "tiny", "--port", str(port), "--kv-cache-bytes", KV],
                                       stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while "Ctrl-C stops everything" not in log.read_text():
        if owner.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"labkit serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    text = log.read_text()
    owner.ready = {"id": re.search(r"deployment (\S+):", text).group(1), "log": text}


def _start_script(owner: Owner, env: dict[str, str]) -> None:
    owner.popen = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines = []
    for line in owner.popen.stdout:
        lines.append(line)
        if line.startswith('{"ids"'):
            owner.ready = json.loads(line)
            return
    raise RuntimeError("the owner script ended before its servers were up:\n" + "".join(lines)[-3000:])


def _start_kernel(owner: Owner, env: dict[str, str]) -> None:
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    owner.extra["km"] = km
    km.start_kernel(env=env)
    kc = km.client()
    owner.extra["kc"] = kc
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    msg_id = kc.execute(KERNEL_CELL)
    out = []
    while True:
        msg = kc.get_iopub_msg(timeout=READY_TIMEOUT_S)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            raise RuntimeError("\n".join(content["traceback"])[-3000:])
        elif kind == "status" and content["execution_state"] == "idle":
            break
    owner.ready = json.loads([ln for ln in "".join(out).splitlines() if ln.startswith('{"id"')][-1])


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """A LABKIT_HOME of the tests' own (registry and logs), sharing the written models with the real one."""
    home = tmp_path_factory.mktemp("labkit-home")
    real = labkit_home()
    for entry in real.iterdir() if real.is_dir() else []:
        if entry.name not in ("deployments", "logs"):
            (home / entry.name).symlink_to(entry)
    return {**os.environ, "LABKIT_HOME": str(home)}


@pytest.fixture(scope="module")
def owners(env, tmp_path_factory) -> Iterator[dict[str, Owner]]:
    logs = tmp_path_factory.mktemp("owners")
    owners = {n: Owner(n) for n in ("cli", "script", "kernel")}
    bodies = {"cli": lambda: _start_cli(owners["cli"], env, logs / "serve.log"),
              "script": lambda: _start_script(owners["script"], env),
              "kernel": lambda: _start_kernel(owners["kernel"], env)}
    for name, body in bodies.items():
        threading.Thread(target=_run, args=(owners[name], body), daemon=True).start()
    try:
        yield owners
    finally:
        for o in owners.values():
            o.done.wait(READY_TIMEOUT_S)
        km = owners["kernel"].extra.get("km")
        kernel_pid = owners["kernel"].ready.get("kernel_pid")
        left = [p for o in owners.values() if o.popen is not None for p in [o.popen.pid, *descendants(o.popen.pid)]]
        left += descendants(kernel_pid) if kernel_pid else []
        for o in owners.values():
            if o.popen is not None and o.popen.poll() is None:
                o.popen.kill()
        if km is not None:
            owners["kernel"].extra["kc"].stop_channels()
            km.shutdown_kernel(now=True)
        for p in left:  # a failed test must not leave servers behind either
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)


def test_sigkill_of_labkit_serve_leaves_nothing_and_a_taken_port_fails_fast(owners, env) -> None:
    cli = owners["cli"]
    ready = cli.wait()
    dep_id, port = ready["id"], cli.extra["port"]
    listed = ps(env)
    assert dep_id in listed and port in listed[dep_id]["ports"], listed
    assert listed[dep_id]["mode"] == "disagg" and listed[dep_id]["owner_pid"] == cli.popen.pid
    ports = listed[dep_id]["ports"]
    assert len(ports) == 3 and all(port_in_use(p) for p in ports)  # router, prefill, decode
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

    t0 = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "labkit.cli", "serve", "--mode", "mono", "--port", str(port)],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    took_s = time.monotonic() - t0
    assert second.returncode == 1, second
    assert f"port {port} is already in use by lab deployment {dep_id}" in second.stderr, second.stderr
    assert f"`labkit stop {dep_id}`" in second.stderr
    assert "starting" not in second.stdout  # it failed before starting any worker, not in a health wait
    assert took_s < 30, took_s  # Python's start-up on a busy 2-core box; a health wait would be 120 s
    assert set(ps(env)) >= {dep_id}

    pids = [cli.popen.pid, *descendants(cli.popen.pid)]
    assert len(pids) >= 5  # the CLI, its guard, the router and two workers
    t_kill = time.monotonic()
    os.kill(cli.popen.pid, signal.SIGKILL)
    print(f"labkit serve SIGKILLed: {len(pids)} processes gone, ports free in {assert_all_gone(pids, ports, t_kill):.2f} s")
    assert dep_id not in ps(env)


def test_sigkill_of_a_python_owner_of_mono_1p1d_and_a_thread_started_worker(owners, env) -> None:
    script = owners["script"]
    ready = script.wait()
    assert not ready["thread_alive"]  # the thread that started the worker has ended...
    time.sleep(1.0)
    assert pid_alive(ready["thread_worker_pid"])  # ...and its worker still runs
    assert httpx.get(ready["thread_worker"] + "/health", timeout=10).status_code == 200
    listed = ps(env)
    mono_id, disagg_id, worker_id = ready["ids"]
    assert {mono_id, disagg_id, worker_id} <= set(listed), listed
    assert (listed[mono_id]["mode"], listed[disagg_id]["mode"], listed[worker_id]["mode"]) == \
        ("mono", "disagg", "mono worker")
    assert [len(listed[i]["live_pids"]) for i in ready["ids"]] == [2, 3, 1]
    ports = [p for i in ready["ids"] for p in listed[i]["ports"]]

    pids = [script.popen.pid, *descendants(script.popen.pid)]
    assert ready["guard"] in pids and len(pids) >= 8  # owner, guard, 2 routers, 4 workers
    t_kill = time.monotonic()
    os.kill(script.popen.pid, signal.SIGKILL)
    print(f"python owner SIGKILLed: {len(pids)} processes gone, ports free in "
          f"{assert_all_gone(pids, ports, t_kill):.2f} s")
    assert not set(ready["ids"]) & set(ps(env))


def test_restarting_a_jupyter_kernel_that_launched_1p1d_leaves_nothing(owners, env) -> None:
    kernel = owners["kernel"]
    ready = kernel.wait()
    listed = ps(env)
    dep_id = ready["id"]
    assert dep_id in listed and listed[dep_id]["owner_pid"] == ready["kernel_pid"], listed
    assert listed[dep_id]["owner_cmd"] == "jupyter kernel"
    ports = listed[dep_id]["ports"]
    pids = [ready["kernel_pid"], *descendants(ready["kernel_pid"])]
    assert len(pids) >= 5  # the kernel, its guard, the router and two workers
    t_kill = time.monotonic()
    kernel.extra["km"].restart_kernel(now=True)  # SIGKILL to the kernel's process group, then a new kernel
    print(f"kernel restarted (cells on the main thread: {ready['main_thread']}): {len(pids)} processes gone, "
          f"ports free in {assert_all_gone(pids, ports, t_kill):.2f} s")
    assert dep_id not in ps(env)
