"""A worker process: one engine behind a small internal HTTP API, in one of three roles.

- `mono`: prompt in, tokens out (continuous batching; `--chunked-prefill` for the mitigation).
- `prefill`: runs the prompt (engine policy "prefill_only"), samples the first token, exports the
  KV and sends it over the transport (shm, tcp, ...) straight to the decode worker's receiver;
  answers the router with the first token and the timings. KV bytes never pass the router.
- `decode`: takes a request id, receives its KV from the transport, adopts it (`import_kv`) and
  streams the following tokens.

Internal API (JSON in; NDJSON streams out, one JSON object per line, the router turns them into
OpenAI SSE): `POST /internal/generate` (mono), `POST /internal/prefill`, `POST /internal/decode`,
`GET /health` (role, load, KV endpoint), `GET /metrics`. Errors are OpenAI-style JSON.

Run: `python -m labkit.serve.worker --role mono --model tiny --port 8101`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from labkit.proc import LOOPBACK
from labkit.serve.engine_loop import EngineLoop, TokenEvent
from labkit.serve.faults import Fault, send_kv
from labkit.serve.limits import read_json
from labkit.serve.metrics import CONTENT_TYPE, WorkerMetrics
from labkit.serve.protocol import APIError, bad_request, error_body

log = logging.getLogger("labkit.serve.worker")
ROLES = ("mono", "prefill", "decode")
NDJSON = "application/x-ndjson"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How to build one worker. `token_timeout_s` bounds every wait for the engine's next event."""

    role: str = "mono"
    model: str = "tiny"
    name: str = ""
    host: str = LOOPBACK
    port: int = 8101
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_bytes: int = 256 << 20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = False
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    transfer: str = "shm"
    kv_token: str | None = None
    token_timeout_s: float = 120.0
    transfer_timeout_s: float = 30.0
    cuda_graphs: bool = False
    step_log: str | None = None   # a JSON-lines file: one line per engine step (time, phase, sizes, seconds)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} not one of {ROLES}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        if self.token_timeout_s <= 0 or self.transfer_timeout_s <= 0:
            raise ValueError("token_timeout_s and transfer_timeout_s must be > 0")

    @property
    def policy(self) -> str:
        if self.role == "prefill":
            return "prefill_only"
        if self.role == "decode":
            return "decode_only"
        return "chunked" if self.chunked_prefill else "prefill_first"


def _api_error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Worker:
    """The engine, its thread, the transport ends, and the request handlers."""

    def __init__(self, cfg: WorkerConfig) -> None:
        from labkit.engine import Engine, EngineConfig

        self.cfg = cfg
        self.name = cfg.name or f"{cfg.role}-{cfg.port}"
        self.engine = Engine(EngineConfig(
            model=cfg.model, dtype=cfg.dtype, device=cfg.device, block_size=cfg.block_size,
            kv_cache_bytes=cfg.kv_cache_bytes, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens, policy=cfg.policy,  # type: ignore[arg-type]
            enable_prefix_caching=cfg.enable_prefix_caching, max_model_len=cfg.max_model_len,
            cuda_graphs=cfg.cuda_graphs and cfg.device.startswith("cuda")))
        from labkit.models import load_config

        mcfg = load_config(cfg.model)
        self.vocab_size = int(mcfg["vocab_size"])
        eos = mcfg.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.metrics = WorkerMetrics(cfg.role)
        self._step_log = open(cfg.step_log, "a", buffering=1) if cfg.step_log else None  # noqa: SIM115 - worker-long
        self.loop = EngineLoop(self.engine, on_step=self._on_step)
        self.receiver: Any = None
        self._senders: dict[str, tuple[Any, threading.Lock]] = {}
        self._senders_lock = threading.Lock()
        self.transfer_bytes_total = 0
        self.transfer_seconds_total = 0.0
        self.fault = Fault.from_env()  # LABKIT_FAULT: tests only (labkit.serve.faults)
        if self.fault:
            log.warning("fault injection on: %s", self.fault)
        self.kv_pool_bytes = int(self.engine.num_total_blocks) * cfg.block_size * int(self.engine.kv_bytes_per_token)
        if cfg.role == "decode":
            from labkit.transfer import open_receiver

            if not cfg.kv_token:
                raise ValueError("a decode worker needs the deployment's KV token: set LABKIT_KV_TOKEN "
                                 "(labkit.serve.launcher sets it for you)")
            self.receiver = open_receiver(cfg.transfer, token=cfg.kv_token, host=cfg.host,
                                          stall_timeout_s=cfg.transfer_timeout_s,
                                          max_request_bytes=self.kv_pool_bytes)  # more could never be adopted

    def _on_step(self, out: Any) -> None:
        """Engine thread, after each step: metrics, and the step log when asked for."""
        self.metrics.on_step(out)
        if self._step_log is not None and not self._step_log.closed and out.phase != "idle":
            self._step_log.write(json.dumps({"t_end": time.time(), "role": self.cfg.role, "phase": out.phase,
                                             "prefill_tokens": out.num_prefill_tokens,
                                             "decode_seqs": out.num_decode_seqs,
                                             "context_tokens": out.context_tokens, "seconds": out.elapsed_s}) + "\n")

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.loop.start()

    def close(self) -> None:
        self.loop.stop()
        if self._step_log is not None:
            self._step_log.close()
        for sender, _ in self._senders.values():
            _close_quietly(sender)
        if self.receiver is not None:
            _close_quietly(self.receiver)

    # --- helpers -----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        total = int(self.engine.num_total_blocks)
        free = int(self.engine.num_free_blocks)
        st = self.loop.stats
        return {"status": "ok" if self.loop.alive else "engine thread stopped", "role": self.cfg.role,
                "name": self.name, "model": self.cfg.model, "pid": os.getpid(),
                "model_fingerprint": self.engine.model_fingerprint, "block_size": self.cfg.block_size,
                "max_model_len": int(self.engine.max_model_len), "policy": self.cfg.policy,
                "kv_endpoint": getattr(self.receiver, "endpoint", None), "transfer": self.cfg.transfer,
                "kv_blocks_total": total, "kv_blocks_used": total - free, "kv_blocks_free": free,
                "running_requests": self.loop.num_running, "prefill_tokens_total": st.prefill_tokens,
                "decode_tokens_total": st.decode_tokens, "kv_transfer_bytes_total": self.transfer_bytes_total,
                "kv_transfer_seconds_total": self.transfer_seconds_total, "engine_errors_total": st.errors}

    def sampling(self, d: Any) -> Any:
        from labkit.engine import SamplingParams

        if not isinstance(d, dict):
            raise bad_request("'sampling' must be an object", "sampling", "invalid_type")
        try:
            return SamplingParams(**d)
        except (TypeError, ValueError) as e:
            raise bad_request(f"bad sampling parameters: {e}", "sampling") from None

    def prompt(self, body: dict[str, Any]) -> list[int]:
        ids = body.get("prompt_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad_request("'prompt_ids' must be a non-empty list of token ids", "prompt_ids", "invalid_type")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} outside the vocabulary [0, {self.vocab_size})", "prompt_ids")
        return ids

    def check_length(self, n_prompt: int, max_tokens: int) -> None:
        limit = int(self.engine.max_model_len)
        if n_prompt + max_tokens > limit:
            raise bad_request(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} "
                              f"exceeds the model's context length {limit}; shorten the prompt or lower max_tokens",
                              "max_tokens", "context_length_exceeded")

    def sender(self, endpoint: str) -> tuple[Any, threading.Lock]:
        from labkit.transfer import open_sender

        with self._senders_lock:
            if endpoint not in self._senders:
                self._senders[endpoint] = (open_sender(endpoint, token=self.cfg.kv_token), threading.Lock())
            return self._senders[endpoint]

    def drop_sender(self, endpoint: str) -> None:
        with self._senders_lock:
            pair = self._senders.pop(endpoint, None)
        if pair is not None:
            _close_quietly(pair[0])

    async def next_event(self, q: asyncio.Queue[TokenEvent], request_id: str) -> TokenEvent:
        try:
            return await asyncio.wait_for(q.get(), timeout=self.cfg.token_timeout_s)
        except asyncio.TimeoutError:
            self.loop.abort(request_id)
            return TokenEvent(error=f"no token from the engine within {self.cfg.token_timeout_s:.0f} s")

    async def token_lines(self, q: asyncio.Queue[TokenEvent], request_id: str) -> AsyncIterator[bytes]:
        """NDJSON lines until the request ends; aborts it in the engine if the client goes away."""
        done = False
        try:
            while True:
                ev = await self.next_event(q, request_id)
                if ev.error is not None:
                    done = True
                    self.metrics.requests.labels("error").inc()
                    yield _line({"error": error_body(ev.error, type="server_error", code="engine_error")["error"]})
                    return
                if ev.finish_reason is not None:
                    done = True
                    self.metrics.requests.labels(ev.finish_reason).inc()
                if ev.token_id is not None:
                    yield _line({"token_id": ev.token_id, "finish_reason": ev.finish_reason})
                elif ev.finish_reason is not None:
                    yield _line({"finish_reason": ev.finish_reason})
                if done:
                    return
        finally:
            if not done:
                self.loop.abort(request_id)
                self.metrics.requests.labels("client_gone").inc()


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def _close_quietly(obj: Any) -> None:
    try:
        close = getattr(obj, "close", None)
        if close is not None:
            close()
    except Exception as e:  # noqa: BLE001 - shutting down anyway
        log.debug("close: %s", e)


async def _json_body(request: Request) -> dict[str, Any]:
    body = await read_json(request)  # 413/431 over the size limits, 400 for any malformed JSON
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_type")
    return body


def _request_id(body: dict[str, Any]) -> str:
    rid = body.get("request_id")
    if rid is None:
        return uuid.uuid4().hex
    if not isinstance(rid, str) or not rid or len(rid) > 200:
        raise bad_request("'request_id' must be a non-empty string (<= 200 chars)", "request_id")
    return rid


def build_app(worker: Worker) -> FastAPI:
    """The worker's FastAPI app; starts and stops the engine thread with the server."""
    cfg = worker.cfg

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.close()

    app = FastAPI(title=f"labkit worker ({cfg.role})", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _api_error_response(e)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        # Anything unforeseen still answers in the OpenAI error shape (and is logged), never a bare 500.
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error in the worker: {e.__class__.__name__}: {e}",
                                       type="server_error", code="internal_error"), status_code=500)

    @app.exception_handler(404)
    async def _not_found(request: Request, e: Exception) -> JSONResponse:  # OpenAI-style, like the router
        return JSONResponse(error_body(f"no route {request.method} {request.url.path} on this {cfg.role} worker",
                                       type="not_found_error", code="not_found"), status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}",
                                       code="method_not_allowed"), status_code=405)

    @app.get("/health")
    async def health() -> JSONResponse:
        h = worker.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        h = worker.health()
        worker.metrics.kv_blocks_used.set(h["kv_blocks_used"])
        worker.metrics.kv_blocks_total.set(h["kv_blocks_total"])
        worker.metrics.running.set(h["running_requests"])
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE)

    if cfg.role == "mono":
        @app.post("/internal/generate")
        async def generate(request: Request) -> StreamingResponse:
            body = await _json_body(request)
            rid, ids, sp = _request_id(body), worker.prompt(body), worker.sampling(body.get("sampling", {}))
            worker.check_length(len(ids), sp.max_tokens)
            try:
                q = await worker.loop.submit(ids, sp, rid)
            except ValueError as e:
                raise bad_request(str(e), None) from None
            return StreamingResponse(worker.token_lines(q, rid), media_type=NDJSON)

    if cfg.role == "prefill":
        @app.post("/internal/prefill")
        async def prefill(request: Request) -> JSONResponse:
            body = await _json_body(request)
            rid, ids, sp = _request_id(body), worker.prompt(body), worker.sampling(body.get("sampling", {}))
            worker.check_length(len(ids), sp.max_tokens)
            endpoint = body.get("kv_endpoint")
            if endpoint is not None and not isinstance(endpoint, str):
                raise bad_request("'kv_endpoint' must be a string", "kv_endpoint")
            t0 = time.perf_counter()
            try:
                q = await worker.loop.submit(ids, sp, rid, export_kv=True)
            except ValueError as e:
                raise bad_request(str(e), None) from None
            finished = False
            try:
                ev = await worker.next_event(q, rid)
                finished = True
            finally:
                if not finished:
                    worker.loop.abort(rid)
            if ev.error is not None or ev.kv is None:
                worker.metrics.requests.labels("error").inc()
                return JSONResponse(error_body(ev.error or f"prefill ended with {ev.finish_reason!r} and no KV",
                                               type="server_error", code="engine_error"), status_code=500)
            prefill_s = time.perf_counter() - t0
            first = int(ev.token_id if ev.token_id is not None else ev.kv.first_token_id)
            reason = None
            if sp.max_tokens == 1:
                reason = "length"
            elif not sp.ignore_eos and (first in worker.eos_ids or first in sp.stop_token_ids):
                reason = "stop"
            transfer_s, nbytes = 0.0, 0
            if reason is None and endpoint:
                kv = ev.kv
                kv.extra["prefill_s"] = prefill_s
                try:
                    sender, lock = worker.sender(endpoint)
                except ValueError as e:  # no known scheme: the caller's mistake, not a transfer failure
                    raise bad_request(f"bad 'kv_endpoint': {e}", "kv_endpoint") from None
                t1 = time.perf_counter()

                def send() -> Any:
                    with lock:
                        return send_kv(sender, kv, cfg.transfer_timeout_s, worker.fault)
                try:
                    stats = await asyncio.to_thread(send)
                except Exception as e:  # noqa: BLE001 - any transport failure is the decode side's problem
                    worker.drop_sender(endpoint)
                    worker.metrics.requests.labels("transfer_error").inc()
                    return JSONResponse(error_body(f"KV transfer to {endpoint} failed: {e.__class__.__name__}: {e}",
                                                   type="service_unavailable_error", code="kv_transfer_failed"),
                                        status_code=503)
                # the transport's own clock (send start to the receiver's ack), not our thread hop
                transfer_s = float(getattr(stats, "seconds", time.perf_counter() - t1))
                nbytes = int(kv.nbytes)
                worker.transfer_bytes_total += nbytes
                worker.transfer_seconds_total += transfer_s
                worker.metrics.transfer_bytes.labels("send").inc(nbytes)
                worker.metrics.transfer_s.labels("send").observe(transfer_s)
            worker.metrics.requests.labels("prefilled").inc()
            return JSONResponse({"request_id": rid, "first_token_id": first, "finish_reason": reason,
                                 "num_prompt_tokens": len(ids), "kv_bytes": nbytes,
                                 "prefill_s": prefill_s, "transfer_s": transfer_s})

    if cfg.role == "decode":
        @app.post("/internal/decode")
        async def decode(request: Request) -> StreamingResponse:
            body = await _json_body(request)
            rid, sp = _request_id(body), worker.sampling(body.get("sampling", {}))
            timeout_s = body.get("timeout_s", cfg.transfer_timeout_s)
            if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= 600:
                raise bad_request("'timeout_s' must be a number in (0, 600]", "timeout_s")
            t0 = time.perf_counter()
            try:
                kv = await asyncio.to_thread(worker.receiver.recv, rid, float(timeout_s))
            except TimeoutError:
                raise APIError(504, f"no KV arrived for request {rid!r} within {timeout_s} s",
                               type="timeout_error", code="kv_timeout") from None
            except Exception as e:  # noqa: BLE001 - TransferError and kin: the KV is unusable
                raise APIError(502, f"the KV of request {rid!r} arrived broken: {e.__class__.__name__}: {e}",
                               type="server_error", code="kv_transfer_failed") from None
            # Bytes only: the transfer time is the sender's to measure; this was the wait for it.
            worker.transfer_bytes_total += int(kv.nbytes)
            worker.metrics.transfer_bytes.labels("recv").inc(int(kv.nbytes))
            worker.metrics.kv_wait_s.observe(time.perf_counter() - t0)
            worker.check_length(kv.num_tokens, sp.max_tokens)
            try:
                q = await worker.loop.submit_kv(kv, sp, rid)
            except ValueError as e:
                raise bad_request(f"the KV does not fit this decode worker: {e}", None, "kv_mismatch") from None
            return StreamingResponse(worker.token_lines(q, rid), media_type=NDJSON)

    return app


def parse_args(argv: list[str] | None = None) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="python -m labkit.serve.worker", description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--model", default="tiny")
    p.add_argument("--name", default="")
    p.add_argument("--host", default=LOOPBACK)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-bytes", type=int, default=256 << 20)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--chunked-prefill", action="store_true")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--transfer", default="shm")
    p.add_argument("--transfer-timeout-s", type=float, default=30.0,
                   help="bound on one KV transfer (send, receive, a silent sender)")
    p.add_argument("--step-log", default=None, help="append one JSON line per engine step to this file")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="on a GPU, replay decode steps as CUDA graphs (labkit.engine.cuda_graphs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs this process may use)")
    a = p.parse_args(argv)
    threads = a.threads or len(os.sched_getaffinity(0))
    import torch

    torch.set_num_threads(max(1, threads))
    return WorkerConfig(role=a.role, model=a.model, name=a.name, host=a.host, port=a.port, dtype=a.dtype,
                        device=a.device, block_size=a.block_size, kv_cache_bytes=a.kv_cache_bytes,
                        max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                        chunked_prefill=a.chunked_prefill, enable_prefix_caching=not a.no_prefix_caching,
                        max_model_len=a.max_model_len, transfer=a.transfer,
                        kv_token=os.environ.get("LABKIT_KV_TOKEN") or None, transfer_timeout_s=a.transfer_timeout_s,
                        cuda_graphs=a.cuda_graphs, step_log=a.step_log)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per health poll
    cfg = parse_args(argv)
    worker = Worker(cfg)
    log.info("worker %s: role=%s policy=%s model=%s on %s:%d", worker.name, cfg.role, cfg.policy, cfg.model,
             cfg.host, cfg.port)
    uvicorn.Server(uvicorn.Config(build_app(worker), host=cfg.host, port=cfg.port, log_level="warning",
                                  timeout_graceful_shutdown=3)).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
