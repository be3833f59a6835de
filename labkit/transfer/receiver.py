"""The receiving side every backend shares: inbox, connection loop, validation, error replies.

A backend supplies how frames (and, for shm, file descriptors) arrive on its control channel
and where a layer's bytes land (an InboundStream); authentication, validation, timeouts and
the inbox that `recv(request_id)` waits on live here once.
"""

from __future__ import annotations

import socket
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Self

import torch

from labkit.kv import KVExport
from labkit.transfer import wire
from labkit.transfer.base import _close_fd, _close_quietly, _linger, check_token, log
from labkit.transfer.errors import AuthError, HeaderError, PayloadError, TransferError, TransferTimeout


class InboundStream(ABC):
    """One request being received: where its layers land, and how it becomes a KVExport."""

    def __init__(self, meta: wire.KVMeta) -> None:
        self.meta = meta
        self.seen: set[int] = set()

    @abstractmethod
    def add_layer(
        self, layer: int, checksum: int, header: dict[str, Any], conn: socket.socket, deadline: float | None
    ) -> None:
        """Takes layer `layer` (reading its bytes from `conn` if the backend streams them) and verifies it."""

    @abstractmethod
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) once every layer arrived."""

    def abort(self) -> None:
        """Drops whatever was received (memory is released when the last reference goes)."""

    def finish(self, header: dict[str, Any]) -> KVExport:
        missing = sorted(set(range(self.meta.num_layers)) - self.seen)
        if missing:
            raise PayloadError(
                f"end before layers {missing[:8]}{'...' if len(missing) > 8 else ''} arrived",
                field="layer",
                request_id=self.meta.request_id,
            )
        first_token_id, extra = wire.end_fields(header, self.meta)
        k, v = self.tensors()
        m = self.meta
        kv = KVExport(
            request_id=m.request_id,
            model_fingerprint=m.model_fingerprint,
            prompt_ids=list(m.prompt_ids),
            first_token_id=first_token_id,
            num_layers=m.num_layers,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            dtype=m.dtype,
            block_size=m.block_size,
            k=k,
            v=v,
            extra=extra,
        )
        kv.validate()
        return kv


class Receiver(ABC):
    """Accepts KV transfers from any number of senders; `recv(request_id)` hands them out.

    Arrivals come in any order; each is kept until claimed (or `unclaimed_ttl_s` passes).
    A transfer that fails after its sender authenticated is kept as its error, so `recv`
    of that request raises it at once instead of waiting for the timeout.
    """

    backend = ""
    checksum_algo = wire.CHECKSUM_ALGO

    def __init__(
        self,
        *,
        token: str,
        expect: wire.KVSpec | None = None,
        max_request_bytes: int = wire.MAX_REQUEST_BYTES,
        stall_timeout_s: float = 30.0,
        unclaimed_ttl_s: float = 600.0,
    ) -> None:
        self._token = check_token(token)
        self.expect = expect
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
        if stall_timeout_s <= 0 or unclaimed_ttl_s <= 0:
            raise ValueError("stall_timeout_s and unclaimed_ttl_s must be > 0")
        self.max_request_bytes = max_request_bytes
        self.stall_timeout_s = stall_timeout_s
        self.unclaimed_ttl_s = unclaimed_ttl_s
        self._cond = threading.Condition()
        self._arrived: dict[str, tuple[float, KVExport | TransferError]] = {}
        self._in_flight: set[str] = set()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.rejected = 0  # connections refused before a request was known (token, framing)
        self.completed = 0
        self._listener: socket.socket | None = None

    # public ------------------------------------------------------------------------------
    @property
    @abstractmethod
    def endpoint(self) -> str:
        """The string a sender connects to (`open_sender(endpoint, token=...)`)."""

    def recv(self, request_id: str | None = None, timeout_s: float = 30.0) -> KVExport:
        """Waits for request `request_id` (or any request if None); returns its validated KVExport.

        Raises TransferTimeout naming the request after `timeout_s` seconds, or the error its
        transfer ended with (PayloadError, HeaderError, TransferTimeout for a stalled sender).
        """
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise TransferError(f"receiver {self.endpoint} is closed", request_id=request_id)
                self._expire()
                key = request_id if request_id is not None else next(iter(self._arrived), None)
                if key is not None and key in self._arrived:
                    _, result = self._arrived.pop(key)
                    if isinstance(result, TransferError):
                        raise result
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    what = f"request {request_id!r}" if request_id is not None else "any request"
                    state = "still arriving" if request_id in self._in_flight else "never started arriving"
                    raise TransferTimeout(
                        f"{what}: no KV within {timeout_s:g} s on {self.endpoint} ({state})", request_id=request_id
                    )
                self._cond.wait(min(left, 1.0))

    def discard(self, request_id: str) -> bool:
        """Forgets an arrived request (e.g. cancelled); True if it was there."""
        with self._cond:
            return self._arrived.pop(request_id, None) is not None

    def ready_ids(self) -> list[str]:
        """Request ids that arrived (or failed) and are not claimed yet, oldest first."""
        with self._cond:
            return list(self._arrived)

    def close(self) -> None:
        """Stops accepting, drops connections and unclaimed KV; joins its threads (each within 5 s)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._arrived.clear()
            self._cond.notify_all()
            conns = list(self._conns)
        if self._listener is not None:
            _close_quietly(self._listener)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5.0)
        self._cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # for backends ----------------------------------------------------------------------
    def _cleanup(self) -> None:
        """Backend hook after close (remove sockets, files)."""

    @abstractmethod
    def _read_message(self, conn: socket.socket, deadline: float | None) -> tuple[dict[str, Any], list[int]]:
        """One frame's header and any file descriptors that came with it."""

    @abstractmethod
    def _open_stream(
        self, meta: wire.KVMeta, header: dict[str, Any], fds: list[int], conn: socket.socket
    ) -> InboundStream:
        """Prepares to receive a request (shm: maps the sender's segment; tcp: allocates the tensors)."""

    def _start(self, listener: socket.socket) -> None:
        self._listener = listener
        listener.settimeout(0.25)
        t = threading.Thread(target=self._accept_loop, name=f"kv-rx-accept-{self.backend}", daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with self._cond:
                if self._closed:
                    _close_quietly(conn)
                    break
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name=f"kv-rx-conn-{self.backend}", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        stream: InboundStream | None = None
        try:
            while not self._closed:
                deadline = None if stream is None else time.monotonic() + self.stall_timeout_s
                fds: list[int] = []
                try:
                    header, fds = self._read_message(conn, deadline)
                except TransferTimeout:
                    assert stream is not None  # only mid-transfer reads have a deadline
                    raise TransferTimeout(
                        f"sender stalled: no frame for {self.stall_timeout_s:g} s after "
                        f"{len(stream.seen)} of {stream.meta.num_layers} layers",
                        request_id=stream.meta.request_id,
                    ) from None
                except (ConnectionResetError, BrokenPipeError):
                    if stream is not None:
                        raise PayloadError(
                            f"sender closed the connection after {len(stream.seen)} of {stream.meta.num_layers} layers",
                            request_id=stream.meta.request_id,
                        )
                    return
                try:
                    stream = self._dispatch(conn, header, fds, stream)
                finally:
                    for fd in fds:
                        _close_fd(fd)
        except TransferError as e:
            if stream is not None and e.request_id is None:
                e.request_id = stream.meta.request_id
            if e.request_id is not None and not isinstance(e, AuthError):
                self._deliver(e.request_id, e)
            else:
                with self._cond:
                    self.rejected += 1
            log.warning("kv receiver %s: %s: %s", self.endpoint, type(e).__name__, e)
            try:
                conn.settimeout(1.0)
                conn.sendall(wire.error_frame(e))
                _linger(conn)
            except OSError:
                pass
        except Exception as e:  # noqa: BLE001 - a bug or an OS error must fail the request, not the receiver
            if not isinstance(e, OSError):
                log.exception("kv receiver %s: unexpected error", self.endpoint)
            if stream is not None and not self._closed:
                self._deliver(
                    stream.meta.request_id,
                    PayloadError(f"connection lost: {e.__class__.__name__}: {e}", request_id=stream.meta.request_id),
                )
        finally:
            if stream is not None:
                stream.abort()
                with self._cond:
                    self._in_flight.discard(stream.meta.request_id)
            with self._cond:
                self._conns.discard(conn)
            self._connection_closed(conn)
            _close_quietly(conn)

    def _connection_closed(self, conn: socket.socket) -> None:
        """Backend hook: forget per-connection state (shm: the sender's segment mappings)."""

    def _dispatch(
        self, conn: socket.socket, header: dict[str, Any], fds: list[int], stream: InboundStream | None
    ) -> InboundStream | None:
        kind = header["kind"]
        if kind == "begin":
            if stream is not None:
                raise HeaderError(f"begin while request {stream.meta.request_id!r} is still open", field="kind")
            meta = wire.parse_begin(
                header,
                token=self._token,
                expect=self.expect,
                max_request_bytes=self.max_request_bytes,
                checksum_algo=self.checksum_algo,
            )
            with self._cond:
                self._in_flight.add(meta.request_id)
            return self._open_stream(meta, header, fds, conn)  # fds are closed after: dup to keep one
        if stream is None:
            raise HeaderError(f"{kind!r} frame before begin", field="kind")
        if kind == "layer":
            layer, digest = wire.layer_index(header, stream.meta, stream.seen)
            stream.add_layer(layer, digest, header, conn, time.monotonic() + self.stall_timeout_s)
            stream.seen.add(layer)
            return stream
        if kind == "end":
            kv = stream.finish(header)
            # Ack before delivering, so a receiver that claims the KV and exits cannot cut the ack;
            # a sender that hung up before its ack still gets its KV delivered.
            try:
                conn.settimeout(5.0)
                conn.sendall(wire.encode_frame({"kind": "ack", "request_id": kv.request_id, "nbytes": kv.nbytes}))
            except OSError:
                pass
            self._deliver(kv.request_id, kv)
            return None
        raise HeaderError(f"unexpected {kind!r} frame from a sender", field="kind")

    def _deliver(self, request_id: str, result: KVExport | TransferError) -> None:
        with self._cond:
            self._in_flight.discard(request_id)
            if self._closed:
                return
            self._arrived[request_id] = (time.monotonic(), result)
            if isinstance(result, KVExport):
                self.completed += 1
            self._cond.notify_all()

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, (t, _) in self._arrived.items() if now - t > self.unclaimed_ttl_s]:
            log.warning("kv receiver %s: dropping unclaimed request %r", self.endpoint, rid)
            del self._arrived[rid]
