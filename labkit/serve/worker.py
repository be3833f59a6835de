"""A worker process: one engine behind a small internal HTTP API, in one of three roles.

- `mono`: prompt in, tokens out (continuous batching; `--chunked-prefill` for the mitigation).
- `prefill`: runs the prompt, samples the first token and sends the KV over the transport
  straight to the decode worker's receiver (labkit.serve.prefill). KV bytes never pass the router.
- `decode`: takes a request id, receives its KV, adopts it and streams the following tokens
  (labkit.serve.decode). With `--local-prefill` it also runs whole requests as a mono worker does
  (the router's selective disaggregation sends it the prompts it should prefill itself).

Internal API, typed by labkit.serve.messages: `POST /internal/generate` (mono, and decode with
local_prefill: GenerateRequest in, TokenEvent lines out), `POST /internal/prefill` (PrefillRequest in, PrefillResult out),
`POST /internal/decode` (DecodeRequest in, TokenEvent lines out), `GET /health` (WorkerHealth),
`GET /metrics` (Prometheus). Errors are OpenAI-style JSON.

Run: `python -m labkit.serve.worker --role mono --model tiny --port 8101` (`--help` lists every
setting, labkit.serve.config), or `--config JSON` with the whole WorkerConfig (the launcher's way).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from labkit.engine.config import RequestError
from labkit.proc import gc_frozen
from labkit.serve import decode, prefill
from labkit.serve.config import WorkerConfig, parse_config
from labkit.serve.engine_loop import EngineEvent, KVAfterPrefill
from labkit.serve.limits import install_error_handlers, read_message, run_server
from labkit.serve.messages import DecodeRequest, GenerateRequest, PrefillRequest, WorkerHealth
from labkit.serve.metrics import CONTENT_TYPE, WorkerMetrics
from labkit.serve.protocol import bad_request
from labkit.transfer.faults import Fault, wrap_sender

log = logging.getLogger("labkit.serve.worker")
NDJSON = "application/x-ndjson"


class Worker:
    """The engine, its thread, the transport ends, the statistics; the role modules act on it."""

    def __init__(self, cfg: WorkerConfig, kv_token: str | None = None) -> None:
        from labkit.engine import Engine
        from labkit.serve.engine_loop import EngineLoop

        self.cfg = cfg
        self.name = cfg.name or f"{cfg.role}-{cfg.port}"
        # CUDA graphs on a CPU run padded batches without capture: a test aid, never a worker's.
        self.engine = Engine(replace(cfg.engine, cuda_graphs=cfg.engine.cuda_graphs and cfg.engine.device != "cpu"))
        self.kv_token = kv_token or os.environ.get("LABKIT_KV_TOKEN") or None
        self.metrics = WorkerMetrics()
        self._step_log = open(cfg.step_log, "a", buffering=1) if cfg.step_log else None  # noqa: SIM115 - worker-long
        self.loop = EngineLoop(self.engine, on_step=self._on_step, on_error=self.metrics.engine_errors.inc)
        self.fault = Fault.from_env()  # LABKIT_FAULT: tests only (labkit.transfer.faults)
        if self.fault:
            log.warning("fault injection on: %s", self.fault)
        # One Sender per decode endpoint, shared by concurrent requests without a lock: a Sender is
        # thread-safe (each transfer gets its own connection; tests/test_serve_units.py sends concurrently).
        self._senders: dict[str, Any] = {}
        self._senders_lock = threading.Lock()  # guards the dict, not the sends
        self.receiver: Any = None
        # What the KV transfers are held against (prefill workers send): this host's measured figure.
        self.kv_reference: Any = None
        self.kv_flag: str | None = None  # the last flagged transfer, for /health
        self._kv_flag_logged_s = -1e9
        if cfg.role == "prefill" and cfg.transfer.kv_flag_factor > 0:
            from labkit.transfer.reference import host_reference

            self.kv_reference = host_reference(timeout_s=90.0)  # within the launcher's start-up wait
        if cfg.role != "mono" and not self.kv_token:
            raise ValueError(
                f"a {cfg.role} worker needs the deployment's KV token: set LABKIT_KV_TOKEN "
                "(labkit.serve.launcher sets it for you)"
            )
        if cfg.role == "decode" and self.kv_token:
            from labkit.transfer import open_receiver

            pool_bytes = self.engine.num_total_blocks * cfg.engine.block_size * self.engine.kv_bytes_per_token
            # cuda-ipc lands the KV on the engine's own GPU (cuda:N, numbered as the prefill side numbers it)
            on_gpu: dict[str, Any] = {"device": cfg.engine.device} if cfg.transfer.backend == "cuda-ipc" else {}
            self.receiver = open_receiver(
                cfg.transfer.backend,
                token=self.kv_token,
                host=cfg.host,
                stall_timeout_s=cfg.transfer.timeout_s,
                max_request_bytes=pool_bytes,
                **on_gpu,
            )  # more could never be adopted

    def _on_step(self, out: Any) -> None:
        """Engine thread, after each step: metrics, and the step log when asked for."""
        self.metrics.on_step(out)
        if self._step_log is not None and not self._step_log.closed and out.phase != "idle":
            self._step_log.write(
                json.dumps(
                    {
                        "t_end": time.time(),
                        "role": self.cfg.role,
                        "worker": self.name,
                        "phase": out.phase,
                        "prefill_tokens": out.num_prefill_tokens,
                        "decode_seqs": out.num_decode_seqs,
                        "context_tokens": out.context_tokens,
                        "seconds": out.elapsed_s,
                    }
                )
                + "\n"
            )

    def start(self) -> None:
        self.loop.start()

    def close(self) -> None:
        self.loop.stop()
        if self._step_log is not None:
            self._step_log.close()
        for obj in [*self._senders.values(), self.receiver]:
            try:
                if obj is not None:
                    obj.close()
            except Exception as e:  # noqa: BLE001 - shutting down anyway
                log.debug("close: %s", e)

    def health(self) -> WorkerHealth:
        total, free = self.engine.num_total_blocks, self.engine.num_free_blocks
        return WorkerHealth(
            status="ok" if self.loop.alive else "engine thread stopped",
            role=self.cfg.role,
            name=self.name,
            model=self.cfg.engine.model,
            pid=os.getpid(),
            model_fingerprint=self.engine.model_fingerprint,
            block_size=self.cfg.engine.block_size,
            max_model_len=int(self.engine.max_model_len),
            policy=self.cfg.engine.policy,
            transfer=self.cfg.transfer.backend,
            kv_stream=self.cfg.transfer.kv_stream,
            kv_endpoint=getattr(self.receiver, "endpoint", None),
            kv_blocks_total=total,
            kv_blocks_used=total - free,
            kv_blocks_free=free,
            running_requests=self.loop.num_running,
            kv_flag=self.kv_flag,
            **self.metrics.totals(),
        )

    def check_transfer(self, nbytes: int, seconds: float) -> str | None:
        """A sentence when moving `nbytes` in `seconds` was far below this host's figure for the worker's
        transport (labkit.transfer.reference), counted and logged (at most every 30 s); else None."""
        from labkit.transfer.reference import slow_transfer_flag

        backend = self.cfg.transfer.backend
        flag = slow_transfer_flag(self.kv_reference, backend, nbytes, seconds, self.cfg.transfer.kv_flag_factor)
        if flag is not None:
            self.kv_flag = flag
            self.metrics.kv_slow.labels(backend).inc()
            if time.monotonic() - self._kv_flag_logged_s > 30.0:
                self._kv_flag_logged_s = time.monotonic()
                log.warning("%s", flag)
        return flag

    def sender(self, endpoint: str) -> Any:
        """The Sender for a decode worker's endpoint (opened once); ValueError for an unknown scheme."""
        from labkit.transfer import open_sender

        with self._senders_lock:
            if endpoint not in self._senders:
                tx = open_sender(endpoint, token=self.kv_token or "", link=self.cfg.transfer.link())
                self._senders[endpoint] = wrap_sender(tx, self.fault)
            return self._senders[endpoint]

    def drop_sender(self, endpoint: str) -> None:
        with self._senders_lock:
            tx = self._senders.pop(endpoint, None)
        if tx is not None:
            tx.close()

    async def submit(
        self, req: GenerateRequest, *, after_prefill: KVAfterPrefill | None = None, on_layer_kv: Any = None
    ) -> asyncio.Queue[EngineEvent]:
        """Hands `req` to the engine; the engine's refusal becomes a 400 naming the field."""
        try:
            return await self.loop.submit(
                req.prompt_ids, req.sampling, req.request_id, after_prefill=after_prefill, on_layer_kv=on_layer_kv
            )
        except RequestError as e:
            raise bad_request(str(e), e.param, e.code) from None
        except ValueError as e:
            raise bad_request(str(e), None) from None

    async def next_event(self, q: asyncio.Queue[EngineEvent], request_id: str) -> EngineEvent:
        try:
            return await asyncio.wait_for(q.get(), timeout=self.cfg.token_timeout_s)
        except TimeoutError:
            self.loop.abort(request_id)
            return EngineEvent(error=f"no token from the engine within {self.cfg.token_timeout_s:.0f} s")


def build_app(worker: Worker) -> FastAPI:
    """The worker's FastAPI app; starts and stops the engine thread with the server."""
    role = worker.cfg.role

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        with gc_frozen():  # no long GC pause between two engine steps (labkit.proc.gc_frozen)
            yield
        worker.close()

    app = FastAPI(title=f"labkit worker ({role})", lifespan=lifespan)
    install_error_handlers(app, f"{role} worker")

    @app.get("/health")
    async def health() -> Response:
        h = worker.health()
        return Response(
            h.model_dump_json(), media_type="application/json", status_code=200 if h.status == "ok" else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        h = worker.health()
        worker.metrics.kv_blocks_used.set(h.kv_blocks_used)
        worker.metrics.kv_blocks_total.set(h.kv_blocks_total)
        worker.metrics.running.set(h.running_requests)
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE)

    if role == "mono" or worker.cfg.local_prefill:  # a decode worker with local_prefill runs short prompts whole

        @app.post("/internal/generate")
        async def generate(request: Request) -> StreamingResponse:
            t0 = time.perf_counter()
            req = await read_message(request, GenerateRequest)
            q = await worker.submit(req)
            return StreamingResponse(decode.token_lines(worker, q, req.request_id, t0), media_type=NDJSON)

    if role == "prefill":

        @app.post("/internal/prefill")
        async def prefill_(request: Request) -> Response:
            t0 = time.perf_counter()
            res = await prefill.prefill(worker, await read_message(request, PrefillRequest), t0)
            return Response(res.model_dump_json(), media_type="application/json")

    if role == "decode":

        @app.post("/internal/decode")
        async def decode_(request: Request) -> StreamingResponse:
            t0 = time.perf_counter()
            req = await read_message(request, DecodeRequest)
            q = await decode.adopt(worker, req, await decode.receive(worker, req))
            return StreamingResponse(
                decode.token_lines(worker, q, req.request_id, t0, time.perf_counter() - t0), media_type=NDJSON
            )

    return app


def main(argv: list[str] | None = None) -> int:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per health poll
    cfg = parse_args(argv)
    torch.set_num_threads(max(1, cfg.threads or len(os.sched_getaffinity(0))))
    worker = Worker(cfg)
    log.info(
        "worker %s: role=%s policy=%s model=%s kv_stream=%s on %s:%d",
        worker.name,
        cfg.role,
        cfg.engine.policy,
        cfg.engine.model,
        cfg.transfer.kv_stream,
        cfg.host,
        cfg.port,
    )
    run_server(build_app(worker), cfg.host, cfg.port)
    return 0


def parse_args(argv: list[str] | None = None) -> WorkerConfig:
    """The worker's settings from a command line (labkit.serve.config.parse_config)."""
    return parse_config(WorkerConfig, argv, "python -m labkit.serve.worker", (__doc__ or "").splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
