"""The router's upstreams (workers, or vLLM servers): health, load, and who is down.

A monitor task polls every upstream's `GET /health` on a short interval. A refused connection
marks it down at once; timeouts mark it down after `max_failures` polls in a row. A request
that fails to reach an upstream marks it down too, so the next request routes around it. An
upstream that answers again is taken back; if its pid changed (a restart) its cache is gone,
which `on_reset` tells the prefix index.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

log = logging.getLogger("labkit.serve.upstream")


@dataclass
class Upstream:
    """One upstream server and what the router knows of it."""

    name: str
    url: str
    role: str                          # "mono" | "prefill" | "decode"
    up: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # the last /health JSON (lab workers)
    in_flight: int = 0                 # requests the router has open to it now
    failures: int = 0
    last_error: str = ""
    last_ok_s: float = 0.0
    ups: int = 0                       # times it came up (1 on first contact)

    def load_key(self) -> tuple[float, float]:
        """Lower is less loaded: (requests open or running, -free KV blocks)."""
        running = max(self.in_flight, int(self.info.get("running_requests", 0) or 0))
        return (float(running), -float(self.info.get("kv_blocks_free", 0) or 0))

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "url": self.url, "up": self.up, **{
            k: self.info.get(k) for k in ("kv_blocks_used", "kv_blocks_total", "running_requests",
                                          "kv_transfer_bytes_total", "kv_transfer_seconds_total",
                                          "prefill_tokens_total", "decode_tokens_total")}}


class UpstreamPool:
    """All upstreams of one router plus the monitor that keeps their `up` flags true."""

    def __init__(self, upstreams: list[Upstream], *, health_interval_s: float = 0.5,
                 health_timeout_s: float = 2.0, max_failures: int = 3,
                 on_down: Callable[[Upstream], None] | None = None,
                 on_up: Callable[[Upstream], None] | None = None) -> None:
        names = [u.name for u in upstreams]
        if len(set(names)) != len(names):
            raise ValueError(f"upstream names must be unique, got {names}")
        self.upstreams = upstreams
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.max_failures = max_failures
        self.on_down = on_down
        self.on_up = on_up
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    def by_role(self, role: str, *, only_up: bool = True) -> list[Upstream]:
        return [u for u in self.upstreams if u.role == role and (u.up or not only_up)]

    def roles(self) -> set[str]:
        return {u.role for u in self.upstreams}

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.health_timeout_s))
        await asyncio.gather(*(self.poll(u) for u in self.upstreams))
        self._task = asyncio.create_task(self._monitor(), name="upstream-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self._client is not None:
            await self._client.aclose()

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await asyncio.gather(*(self.poll(u) for u in self.upstreams), return_exceptions=True)

    async def poll(self, u: Upstream) -> None:
        """One health check of `u`; updates its flags and load."""
        assert self._client is not None
        try:
            r = await self._client.get(u.url + "/health")
        except httpx.ConnectError as e:
            self.mark_down(u, f"connection refused ({e.__class__.__name__})", now=True)
            return
        except httpx.HTTPError as e:
            self.mark_down(u, f"/health: {e.__class__.__name__}", now=False)
            return
        if r.status_code != 200:
            self.mark_down(u, f"/health answered HTTP {r.status_code}")
            return
        info: dict[str, Any] = {}
        if r.headers.get("content-type", "").startswith("application/json"):
            try:
                info = r.json()
            except ValueError:
                info = {}
        restarted = bool(u.info.get("pid")) and info.get("pid") not in (None, u.info.get("pid"))
        u.info = info
        u.failures = 0
        u.last_ok_s = time.monotonic()
        if restarted and self.on_down is not None:
            self.on_down(u)  # same URL, new process: its cache is empty
        if not u.up:
            u.up = True
            u.ups += 1
            u.last_error = ""
            log.info("upstream %s (%s) is up", u.name, u.url)
            if self.on_up is not None:
                self.on_up(u)

    def mark_down(self, u: Upstream, why: str, *, now: bool = True) -> None:
        """Counts a failure; takes `u` out of routing at once (`now`) or after max_failures."""
        u.failures += 1
        u.last_error = why
        if u.up and (now or u.failures >= self.max_failures):
            u.up = False
            log.warning("upstream %s (%s) is down: %s", u.name, u.url, why)
            if self.on_down is not None:
                self.on_down(u)

    def health(self) -> dict[str, Any]:
        return {u.name: {"role": u.role, "url": u.url, "up": u.up, "in_flight": u.in_flight,
                         "last_error": u.last_error or None, "times_up": u.ups} for u in self.upstreams}
