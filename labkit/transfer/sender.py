"""The sending side every backend shares: layer streams, the connection pool, replies and timeouts."""

from __future__ import annotations

import queue
import socket
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Self

import torch

from labkit.kv import KVExport
from labkit.links import Link
from labkit.transfer import wire
from labkit.transfer.base import TransferStats, _close_quietly, _still_open, check_token
from labkit.transfer.errors import (
    HeaderError,
    PayloadError,
    TransferError,
    TransferTimeout,
)


class OutboundStream(ABC):
    """One request being sent, layer by layer: `send_layer(i, k_i, v_i)` ..., then `finish()`.

    In a layer-wise stream (`Sender.begin`), `send_layer` only queues the layer: a writer
    thread moves it while the caller computes the next layer, and the stream keeps the
    tensors until then. A writer error surfaces at the next `send_layer` or at `finish`.
    Use it as a context manager: an exception inside aborts the transfer (the receiver sees
    the stream cut and fails that request with PayloadError).
    """

    def __init__(
        self, sender: Sender, conn: socket.socket, meta: wire.KVMeta, timeout_s: float, layerwise: bool
    ) -> None:
        self.sender = sender
        self.conn = conn
        self.meta = meta
        self.timeout_s = timeout_s
        self.layerwise = layerwise
        self.t0 = time.perf_counter()
        self.deadline = time.monotonic() + timeout_s
        self.sent: set[int] = set()
        self.layer_sent_s: dict[int, float] = {}  # layer -> perf_counter() when its bytes were written out
        self._done = False
        self._dtype = getattr(torch, meta.dtype)
        self._queue: queue.Queue[tuple[int, torch.Tensor, torch.Tensor] | None] | None = None
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Sends layer `layer`'s K and V (each `[num_tokens, num_kv_heads, head_dim]`, this stream's dtype)."""
        if self._done:
            raise TransferError(f"request {self.meta.request_id!r}: stream already finished or aborted")
        if not 0 <= layer < self.meta.num_layers or layer in self.sent:
            raise ValueError(f"layer {layer} out of range [0, {self.meta.num_layers}) or already sent")
        want = self.meta.shape[1:]
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want or t.dtype != self._dtype:
                raise ValueError(
                    f"{name} of layer {layer}: shape {tuple(t.shape)} {t.dtype}, expected {want} {self._dtype}"
                )
        k, v = k.detach().contiguous(), v.detach().contiguous()
        if self.layerwise:
            self._raise_writer_error()
            if self._writer is None:
                self._queue = queue.Queue()
                self._writer = threading.Thread(target=self._write_loop, name="kv-tx-writer", daemon=True)
                self._writer.start()
            assert self._queue is not None
            self._queue.put((layer, k, v))
            self.sent.add(layer)
            return
        try:
            self._write(layer, k, v)
        except BaseException:
            self.abort()
            raise
        self.sent.add(layer)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._write_layer(layer, k, v)
        self.layer_sent_s[layer] = time.perf_counter()

    def _write_loop(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            if self._error is not None or self._done:
                continue  # drain: the stream failed or was aborted
            try:
                self._write(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e

    def _join_writer(self) -> None:
        if self._writer is None:
            return
        assert self._queue is not None
        self._queue.put(None)
        self._writer.join(timeout=max(0.0, self.deadline - time.monotonic()) + 1.0)
        if self._writer.is_alive():
            self._error = self._error or TransferTimeout(
                f"request {self.meta.request_id!r}: layers not written within {self.timeout_s:g} s",
                request_id=self.meta.request_id,
            )
        self._writer = None

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            err = self._error
            self.abort()
            raise err

    def finish(self, first_token_id: int | None = None, extra: dict[str, Any] | None = None) -> TransferStats:
        """Ends the transfer and waits for the receiver's ack; returns TransferStats.

        Raises the receiver's refusal (AuthError, HeaderError, PayloadError) or TransferTimeout.
        """
        if self._done:
            raise TransferError(f"request {self.meta.request_id!r}: stream already finished or aborted")
        missing = sorted(set(range(self.meta.num_layers)) - self.sent)
        if missing:
            self.abort()
            raise PayloadError(f"finish() before layers {missing[:8]} were sent", request_id=self.meta.request_id)
        self._join_writer()
        self._raise_writer_error()
        header: dict[str, Any] = {"kind": "end", "request_id": self.meta.request_id}
        if first_token_id is not None:
            header["first_token_id"] = int(first_token_id)
        if extra:
            header["extra"] = extra
        try:
            self._before_end()
            self.sender._send_or_explain(self.conn, wire.encode_frame(header), self.deadline, self.meta.request_id)
            reply = self.sender._read_reply(self.conn, self.deadline, self.meta.request_id)
            if reply.get("kind") != "ack" or reply.get("request_id") != self.meta.request_id:
                raise HeaderError(f"unexpected reply {reply.get('kind')!r} for {self.meta.request_id!r}", field="kind")
        except BaseException:
            self.abort()
            raise
        if self.sender.link is not None:
            time.sleep(self.sender.link.fixed_s / 2)  # the ack's trip back
        self._done = True
        self.sender._release(self.conn)
        return TransferStats(
            request_id=self.meta.request_id,
            backend=self.sender.backend,
            nbytes=self.meta.nbytes,
            seconds=time.perf_counter() - self.t0,
            num_layers=self.meta.num_layers,
            layerwise=self.layerwise,
        )

    def abort(self) -> None:
        """Cuts the transfer; the connection is closed (the receiver fails this request)."""
        if self._done:
            return
        self._done = True
        self.sender._discard(self.conn)  # unblocks a writer stuck on the socket
        if self._writer is not None and self._writer is not threading.current_thread():
            assert self._queue is not None
            self._queue.put(None)
            self._writer.join(timeout=5.0)
        self._release_resources()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self.abort()

    @abstractmethod
    def _write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def _before_end(self) -> None:
        """Backend hook (shm: unmap and seal the segment)."""

    def _release_resources(self) -> None:
        """Backend hook on abort."""


class Sender(ABC):
    """Sends requests' KV to one receiver endpoint. Thread-safe: each concurrent stream gets its own connection."""

    backend = ""

    def __init__(self, endpoint: str, *, token: str, link: Link | None = None, connect_timeout_s: float = 10.0) -> None:
        self.endpoint = endpoint
        self._token = check_token(token)
        self.link = link
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def send(self, kv: KVExport, timeout_s: float = 30.0) -> TransferStats:
        """Sends a whole request (all layers, after prefill); returns TransferStats once the receiver acked."""
        kv.validate()
        stream = self._begin(wire.KVMeta.from_export(kv), timeout_s, layerwise=False)
        with stream:
            for i in range(kv.num_layers):
                stream.send_layer(i, kv.k[i], kv.v[i])
            return stream.finish(first_token_id=kv.first_token_id)

    def begin(self, meta: wire.KVMeta, timeout_s: float = 30.0) -> OutboundStream:
        """Starts a layer-wise transfer (before or during prefill); returns the stream to feed."""
        return self._begin(meta, timeout_s, layerwise=True)

    def close(self) -> None:
        """Closes idle connections (streams in progress keep theirs until they end)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            _close_quietly(c)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # internals -------------------------------------------------------------------------
    def _begin(self, meta: wire.KVMeta, timeout_s: float, layerwise: bool) -> OutboundStream:
        if self._closed:
            raise TransferError(f"sender to {self.endpoint} is closed")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        conn = self._acquire(timeout_s)
        try:
            if self.link is not None:
                time.sleep(self.link.fixed_s / 2)  # the first byte's one-way trip
            return self._open(conn, meta, timeout_s, layerwise)
        except OSError as e:
            self._discard(conn)
            raise TransferError(
                f"begin of {meta.request_id!r} to {self.endpoint} failed: {e}", request_id=meta.request_id
            ) from None
        except BaseException:
            self._discard(conn)
            raise

    @abstractmethod
    def _connect(self, timeout_s: float) -> socket.socket: ...

    @abstractmethod
    def _open(self, conn: socket.socket, meta: wire.KVMeta, timeout_s: float, layerwise: bool) -> OutboundStream: ...

    def _acquire(self, timeout_s: float) -> socket.socket:
        with self._lock:
            while self._idle:
                c = self._idle.pop()
                if _still_open(c):
                    return c
                _close_quietly(c)
        try:
            return self._connect(min(timeout_s, self.connect_timeout_s))
        except TimeoutError:
            raise TransferTimeout(f"connect to {self.endpoint}: timed out") from None
        except OSError as e:
            raise TransferError(f"cannot connect to {self.endpoint}: {e} (is the receiver running?)") from None

    def _release(self, conn: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        _close_quietly(conn)

    def _discard(self, conn: socket.socket) -> None:
        _close_quietly(conn)

    def _read_reply(self, conn: socket.socket, deadline: float, request_id: str) -> dict[str, Any]:
        try:
            reply = wire.read_frame(conn, deadline, what=f"ack for {request_id!r} from {self.endpoint}")
        except TransferTimeout as e:
            raise TransferTimeout(str(e), request_id=request_id) from None
        except (ConnectionResetError, BrokenPipeError):
            raise TransferError(
                f"{self.endpoint} closed the connection before acking {request_id!r}", request_id=request_id
            ) from None
        wire.raise_if_error(reply)
        return reply

    def _send_or_explain(self, conn: socket.socket, data: Any, deadline: float, request_id: str) -> None:
        """sendall; if the receiver hung up, raise the error frame it left (its reason) instead of EPIPE."""
        try:
            conn.settimeout(max(1e-3, deadline - time.monotonic()))
            conn.sendall(data)
        except TimeoutError:
            raise TransferTimeout(f"send of {request_id!r} to {self.endpoint} stalled", request_id=request_id) from None
        except (BrokenPipeError, ConnectionResetError):
            self._read_reply(conn, min(deadline, time.monotonic() + 1.0), request_id)
            raise TransferError(
                f"{self.endpoint} dropped the connection during {request_id!r}", request_id=request_id
            ) from None
