"""Helpers shared by the reliability suites (bad input, faults, security, soak).

Real processes only: a 1P1D topology on the `tiny` model, started piece by piece through
labkit.serve.launcher so a test can kill and restart any piece (the KV token is kept here).
Every wait below has a timeout; nothing in this file can hang a test.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from labkit.proc import pid_alive
from labkit.serve.launcher import (ServerProcess, default_cpu_split, new_kv_token, start_router, start_worker,
                                   stop_all)

CLIENT_TIMEOUT_S = 30.0   # any single client call in these suites
SETTLE_TIMEOUT_S = 15.0   # pools back to full, upstream marked up/down


@dataclass
class Topology:
    """A router in front of one prefill and one decode worker, each restartable on its port."""

    model: str = "tiny"
    kv_token: str = field(default_factory=new_kv_token)
    prefill: ServerProcess | None = None
    decode: ServerProcess | None = None
    router: ServerProcess | None = None
    worker_env: dict[str, dict[str, str]] = field(default_factory=dict)  # role -> extra env (fault settings)
    transfer_timeout_s: float = 30.0
    transfer: str = "shm"               # KV transport: shm or tcp

    @property
    def url(self) -> str:
        assert self.router is not None
        return self.router.url

    @property
    def workers(self) -> list[ServerProcess]:
        return [w for w in (self.prefill, self.decode) if w is not None]

    @property
    def procs(self) -> list[ServerProcess]:
        return [p for p in (self.router, self.prefill, self.decode) if p is not None]

    def start(self) -> Topology:
        try:
            self.prefill = self.start_worker("prefill")
            self.decode = self.start_worker("decode")
            self.start_router()
        except BaseException:
            self.stop()
            raise
        return self

    def start_worker(self, role: str, port: int | None = None) -> ServerProcess:
        cpus = default_cpu_split()[role]
        env = self.worker_env.get(role, {})
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # start_process passes os.environ on to the child
        try:
            return start_worker(role, model=self.model, port=port, name=f"{role}0", cpus=cpus,
                                kv_token=self.kv_token, kv_cache_bytes=32 << 20, transfer=self.transfer,
                                transfer_timeout_s=self.transfer_timeout_s)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def start_router(self, port: int | None = None) -> ServerProcess:
        assert self.prefill is not None and self.decode is not None
        self.router = start_router(model=self.model, prefill=[self.prefill], decode=[self.decode], port=port,
                                   health_interval_s=0.25)
        return self.router

    def restart_worker(self, role: str, env: dict[str, str] | None = None) -> ServerProcess:
        """Stops (if alive) and starts `role` again on the same port (the router knows the URL)."""
        old = self.prefill if role == "prefill" else self.decode
        assert old is not None
        old.stop(timeout_s=5)
        wait_router_sees(self, role, up=False)  # so that "up" below is the new process's first poll
        port = int(old.url.rsplit(":", 1)[1])
        if env is not None:
            self.worker_env[role] = env
        new = self.start_worker(role, port=port)
        if role == "prefill":
            self.prefill = new
        else:
            self.decode = new
        wait_router_sees(self, role, up=True)
        return new

    def stop(self) -> None:
        procs = self.procs
        if procs:
            stop_all(procs, timeout_s=5)
        assert not [p.pid for p in procs if pid_alive(p.pid)], "a server process survived stop()"


def worker_health(w: ServerProcess, timeout_s: float = 5.0) -> dict[str, Any]:
    r = httpx.get(w.url + "/health", timeout=timeout_s)
    return r.json()


def wait_for(pred: Any, timeout_s: float = SETTLE_TIMEOUT_S, what: str = "condition", interval_s: float = 0.1) -> Any:
    """Polls `pred()` until truthy; returns its value. AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except (httpx.HTTPError, ValueError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval_s)
    raise AssertionError(f"{what} not reached within {timeout_s} s (last: {last!r})")


def pool_full(w: ServerProcess) -> dict[str, Any]:
    """Waits until `w`'s KV pool is back to full and nothing runs there; returns its /health."""
    def idle() -> dict[str, Any] | None:
        h = worker_health(w)
        return h if h["kv_blocks_used"] == 0 and h["running_requests"] == 0 else None
    h = wait_for(idle, what=f"{w.name}: KV pool back to full, no request running")
    assert h["kv_blocks_free"] == h["kv_blocks_total"] > 0
    return h


def pools_full(topo: Topology) -> None:
    """Waits until every worker's KV pool is back to full and nothing is running."""
    for w in topo.workers:
        pool_full(w)


def wait_router_sees(topo: Topology, role: str, *, up: bool) -> None:
    """Waits until the router's /health shows `role`'s worker up or down."""
    name = f"{role}0"

    def seen() -> bool:
        h = httpx.get(topo.url + "/health", timeout=5.0).json()["upstreams"][name]
        return bool(h["up"]) == up
    wait_for(seen, what=f"router sees {name} {'up' if up else 'down'}")


def complete(url: str, max_tokens: int = 8, prompt: Any = "hello, world", **extra: Any) -> dict[str, Any]:
    """One valid non-streaming completion; asserts it is complete and returns the body."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
            **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == max_tokens
    assert out["choices"][0]["finish_reason"] == "length"
    return out


def assert_openai_error(r: httpx.Response, status: int | tuple[int, ...], param: Any = "any",
                        code: Any = "any") -> dict[str, Any]:
    """Checks an HTTP error: the status and the OpenAI body `{"error": {message, type, param, code}}`."""
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if param != "any":
        assert err["param"] == param, err
    if code != "any":
        assert err["code"] == code, err
    return err


@dataclass
class StreamResult:
    """What one streaming client saw: tokens, how it ended, and when (monotonic seconds)."""

    status: int | None = None
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False            # saw `data: [DONE]`
    t_first_s: float | None = None
    t_end_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.done and self.finish_reason is not None


def stream_completion(url: str, body: dict[str, Any], res: StreamResult, *, timeout_s: float = 60.0,
                      first_token: threading.Event | None = None) -> None:
    """Streams one request into `res`; never raises (a transport error is `res.error`)."""
    body = {**body, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body,
                          timeout=httpx.Timeout(timeout_s, connect=5.0)) as r:
            res.status = r.status_code
            if r.status_code != 200:
                r.read()
                res.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    res.done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"stream error: {obj['error'].get('message')}"
                    continue  # [DONE] follows
                for ch in obj.get("choices", []):
                    res.tokens += 1
                    if res.t_first_s is None:
                        res.t_first_s = time.monotonic()
                        if first_token is not None:
                            first_token.set()
                    if ch.get("finish_reason"):
                        res.finish_reason = ch["finish_reason"]
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{e.__class__.__name__}: {e}"
    finally:
        res.t_end_s = time.monotonic()


def start_streams(url: str, bodies: list[dict[str, Any]], timeout_s: float = 60.0
                  ) -> tuple[list[StreamResult], list[threading.Thread], list[threading.Event]]:
    """Starts one thread per body streaming it; returns (results, threads, first-token events)."""
    results = [StreamResult() for _ in bodies]
    events = [threading.Event() for _ in bodies]
    threads = [threading.Thread(target=stream_completion, args=(url, b, res),
                                kwargs={"timeout_s": timeout_s, "first_token": ev}, daemon=True)
               for b, res, ev in zip(bodies, results, events)]
    for t in threads:
        t.start()
    return results, threads, events


def join_all(threads: list[threading.Thread], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not [t for t in threads if t.is_alive()], f"client threads still running after {timeout_s} s (a hang)"


def kill9(p: ServerProcess) -> float:
    """SIGKILL to `p`'s process group; returns the monotonic time of the kill once it is gone."""
    os.killpg(p.pid, signal.SIGKILL)
    p.child.popen.wait(timeout=10)
    return time.monotonic()
