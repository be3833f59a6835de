"""The router's upstreams (workers, or vLLM servers): health, load, and who is down.

A monitor task polls every upstream's `GET /health` on a short interval. A refused connection
marks it down at once; timeouts mark it down after `max_failures` polls in a row. A request
that fails to reach an upstream marks it down too, so the next request routes around it. An
upstream that answers again is taken back; if its pid changed (a restart) its cache is gone,
which `on_down` tells the prefix index; `on_up` hands the backend the worker's first /health.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from labkit.serve.limits import CLIENT_KEEP_ALIVE_S
from labkit.serve.messages import WorkerHealth

log = logging.getLogger("labkit.serve.upstream")


@dataclass
class Upstream:
    """One upstream server and what the router knows of it."""

    name: str
    url: str
    role: str  # "mono" | "prefill" | "decode"
    up: bool = False
    health: WorkerHealth | None = None  # the last /health of a lab worker (None: another server, or none yet)
    in_flight: int = 0  # requests the router has open to it now
    failures: int = 0
    last_error: str = ""
    last_ok_s: float = 0.0
    ups: int = 0  # times it came up (1 on first contact)
    pid: int | None = None  # the process that answered the last /health, when it says

    @property
    def load(self) -> int:
        """Requests open to it or running in it, whichever is more (the router's count is fresher)."""
        return max(self.in_flight, self.health.running_requests if self.health else 0)

    def load_key(self) -> tuple[float, float]:
        """Lower is less loaded: (requests open or running, -free KV blocks)."""
        return (float(self.load), -float(self.health.kv_blocks_free if self.health else 0))


class UpstreamPool:
    """All upstreams of one router plus the monitor that keeps their `up` flags true."""

    def __init__(
        self,
        upstreams: list[Upstream],
        *,
        health_interval_s: float,
        health_timeout_s: float = 2.0,
        max_failures: int = 3,
        on_down: Callable[[Upstream], None] | None = None,
        on_up: Callable[[Upstream], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        names = [u.name for u in upstreams]
        if len(set(names)) != len(names):
            raise ValueError(f"upstream names must be unique, got {names}")
        self.upstreams = upstreams
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.max_failures = max_failures
        self.on_down = on_down
        self.on_up = on_up
        self.transport = transport  # None: real sockets; tests pass an ASGI transport
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    def by_role(self, role: str, *, only_up: bool = True) -> list[Upstream]:
        return [u for u in self.upstreams if u.role == role and (u.up or not only_up)]

    def roles(self) -> set[str]:
        return {u.role for u in self.upstreams}

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.health_timeout_s),
            limits=httpx.Limits(keepalive_expiry=CLIENT_KEEP_ALIVE_S),
            transport=self.transport,
        )
        await asyncio.gather(*(self.poll(u) for u in self.upstreams))
        self._task = asyncio.create_task(self._monitor(), name="upstream-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception) as e:  # noqa: BLE001 - closing: how it ended does not matter
                log.debug("monitor: %r", e)
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
        health = None
        if r.headers.get("content-type", "").startswith("application/json"):
            try:
                health = WorkerHealth.model_validate_json(r.content)
            except ValidationError:
                health = None  # not a lab worker (a vLLM server answers with an empty body)
        restarted = u.pid is not None and health is not None and health.pid != u.pid
        u.health = health
        u.pid = health.pid if health is not None else u.pid
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
        return {
            u.name: {
                "role": u.role,
                "url": u.url,
                "up": u.up,
                "in_flight": u.in_flight,
                "last_error": u.last_error or None,
                "times_up": u.ups,
            }
            for u in self.upstreams
        }
