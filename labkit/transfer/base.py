"""What every backend shares: the receiver's inbox and connection loop, the sender's streams.

A backend supplies how frames (and, for shm, file descriptors) move on its control channel
and where a layer's bytes land; validation, authentication, error replies, timeouts and the
inbox that `recv(request_id)` waits on live here once.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from labkit.kv import KVExport
from labkit.transfer import wire
from labkit.transfer.errors import AuthError, HeaderError, PayloadError, TransferError, TransferTimeout
from labkit.transfer.shaping import LinkShape

log = logging.getLogger("labkit.transfer")


@dataclass(frozen=True, slots=True)
class TransferStats:
    """How one request's KV went: bytes, seconds from send start to the receiver's ack."""

    request_id: str
    backend: str
    nbytes: int
    seconds: float
    num_layers: int
    layerwise: bool

    @property
    def gbps(self) -> float:
        """Gigabits per second (1e9 bit/s)."""
        return wire.gbps(self.nbytes, self.seconds)

    @property
    def gb_per_s(self) -> float:
        """Gigabytes per second (1e9 B/s)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor (no copy)."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def check_token(token: str) -> str:
    if not isinstance(token, str) or len(token) < 8:
        raise ValueError("token must be a string of at least 8 characters (one per deployment; "
                         "labkit.transfer.new_token() makes one)")
    return token


# --- receiving ----------------------------------------------------------------------------

class InboundStream(ABC):
    """One request being received: where its layers land, and how it becomes a KVExport."""

    def __init__(self, meta: wire.KVMeta) -> None:
        self.meta = meta
        self.seen: set[int] = set()

    @abstractmethod
    def add_layer(self, layer: int, checksum: int, header: dict[str, Any], conn: socket.socket,
                  deadline: float | None) -> None:
        """Takes layer `layer` (reading its bytes from `conn` if the backend streams them) and verifies it."""

    @abstractmethod
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) once every layer arrived."""

    def abort(self) -> None:
        """Drops whatever was received (memory is released when the last reference goes)."""

    def finish(self, header: dict[str, Any]) -> KVExport:
        missing = sorted(set(range(self.meta.num_layers)) - self.seen)
        if missing:
            raise PayloadError(f"end before layers {missing[:8]}{'...' if len(missing) > 8 else ''} arrived",
                               field="layer", request_id=self.meta.request_id)
        first_token_id, extra = wire.end_fields(header, self.meta)
        k, v = self.tensors()
        m = self.meta
        kv = KVExport(request_id=m.request_id, model_fingerprint=m.model_fingerprint, prompt_ids=list(m.prompt_ids),
                      first_token_id=first_token_id, num_layers=m.num_layers, num_kv_heads=m.num_kv_heads,
                      head_dim=m.head_dim, dtype=m.dtype, block_size=m.block_size, k=k, v=v, extra=extra)
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

    def __init__(self, *, token: str, expect: wire.KVSpec | None = None,
                 max_request_bytes: int = wire.MAX_REQUEST_BYTES, stall_timeout_s: float = 30.0,
                 unclaimed_ttl_s: float = 600.0) -> None:
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
        self.rejected = 0            # connections refused before a request was known (token, framing)
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
                    raise TransferTimeout(f"{what}: no KV within {timeout_s:g} s on {self.endpoint} ({state})",
                                          request_id=request_id)
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

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # for backends ----------------------------------------------------------------------
    def _cleanup(self) -> None:
        """Backend hook after close (remove sockets, files)."""

    @abstractmethod
    def _read_message(self, conn: socket.socket, deadline: float | None) -> tuple[dict[str, Any], list[int]]:
        """One frame's header and any file descriptors that came with it."""

    @abstractmethod
    def _open_stream(self, meta: wire.KVMeta, header: dict[str, Any], fds: list[int],
                     conn: socket.socket) -> InboundStream:
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
            except socket.timeout:
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
                    assert stream is not None          # only mid-transfer reads have a deadline
                    raise TransferTimeout(f"sender stalled: no frame for {self.stall_timeout_s:g} s after "
                                          f"{len(stream.seen)} of {stream.meta.num_layers} layers",
                                          request_id=stream.meta.request_id) from None
                except (ConnectionResetError, BrokenPipeError):
                    if stream is not None:
                        raise PayloadError(f"sender closed the connection after {len(stream.seen)} of "
                                           f"{stream.meta.num_layers} layers", request_id=stream.meta.request_id)
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
                self._deliver(stream.meta.request_id, PayloadError(f"connection lost: {e.__class__.__name__}: {e}",
                                                                   request_id=stream.meta.request_id))
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

    def _dispatch(self, conn: socket.socket, header: dict[str, Any], fds: list[int],
                  stream: InboundStream | None) -> InboundStream | None:
        kind = header["kind"]
        if kind == "begin":
            if stream is not None:
                raise HeaderError(f"begin while request {stream.meta.request_id!r} is still open", field="kind")
            meta = wire.parse_begin(header, token=self._token, expect=self.expect,
                                    max_request_bytes=self.max_request_bytes, checksum_algo=self.checksum_algo)
            with self._cond:
                self._in_flight.add(meta.request_id)
            return self._open_stream(meta, header, fds, conn)    # fds are closed after: dup to keep one
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


# --- sending ------------------------------------------------------------------------------

class OutboundStream(ABC):
    """One request being sent, layer by layer: `send_layer(i, k_i, v_i)` ..., then `finish()`.

    Use it as a context manager: an exception inside aborts the transfer (the receiver sees
    the stream cut and fails that request with PayloadError).
    """

    def __init__(self, sender: Sender, conn: socket.socket, meta: wire.KVMeta, timeout_s: float,
                 layerwise: bool) -> None:
        self.sender = sender
        self.conn = conn
        self.meta = meta
        self.timeout_s = timeout_s
        self.layerwise = layerwise
        self.t0 = time.perf_counter()
        self.deadline = time.monotonic() + timeout_s
        self.sent: set[int] = set()
        self._done = False
        self._dtype = getattr(torch, meta.dtype)

    def send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Sends layer `layer`'s K and V (each `[num_tokens, num_kv_heads, head_dim]`, this stream's dtype)."""
        if self._done:
            raise TransferError(f"request {self.meta.request_id!r}: stream already finished or aborted")
        if not 0 <= layer < self.meta.num_layers or layer in self.sent:
            raise ValueError(f"layer {layer} out of range [0, {self.meta.num_layers}) or already sent")
        want = self.meta.shape[1:]
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want or t.dtype != self._dtype:
                raise ValueError(f"{name} of layer {layer}: shape {tuple(t.shape)} {t.dtype}, "
                                 f"expected {want} {self._dtype}")
        try:
            self._write_layer(layer, k.detach().contiguous(), v.detach().contiguous())
        except BaseException:
            self.abort()
            raise
        self.sent.add(layer)

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
            time.sleep(self.sender.link.latency_ms / 1e3)     # the ack's trip back
        self._done = True
        self.sender._release(self.conn)
        return TransferStats(request_id=self.meta.request_id, backend=self.sender.backend, nbytes=self.meta.nbytes,
                             seconds=time.perf_counter() - self.t0, num_layers=self.meta.num_layers,
                             layerwise=self.layerwise)

    def abort(self) -> None:
        """Cuts the transfer; the connection is closed (the receiver fails this request)."""
        if self._done:
            return
        self._done = True
        self._release_resources()
        self.sender._discard(self.conn)

    def __enter__(self) -> OutboundStream:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
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

    def __init__(self, endpoint: str, *, token: str, link: LinkShape | None = None,
                 connect_timeout_s: float = 10.0) -> None:
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

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: Any) -> None:
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
                time.sleep(self.link.latency_ms / 1e3)        # the first byte's one-way trip
            return self._open(conn, meta, timeout_s, layerwise)
        except OSError as e:
            self._discard(conn)
            raise TransferError(f"begin of {meta.request_id!r} to {self.endpoint} failed: {e}",
                                request_id=meta.request_id) from None
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
        except socket.timeout:
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
            raise TransferError(f"{self.endpoint} closed the connection before acking {request_id!r}",
                                request_id=request_id) from None
        wire.raise_if_error(reply)
        return reply

    def _send_or_explain(self, conn: socket.socket, data: Any, deadline: float, request_id: str) -> None:
        """sendall; if the receiver hung up, raise the error frame it left (its reason) instead of EPIPE."""
        try:
            conn.settimeout(max(1e-3, deadline - time.monotonic()))
            conn.sendall(data)
        except socket.timeout:
            raise TransferTimeout(f"send of {request_id!r} to {self.endpoint} stalled", request_id=request_id) from None
        except (BrokenPipeError, ConnectionResetError):
            self._read_reply(conn, min(deadline, time.monotonic() + 1.0), request_id)
            raise TransferError(f"{self.endpoint} dropped the connection during {request_id!r}",
                                request_id=request_id) from None


def _linger(conn: socket.socket, max_s: float = 0.5) -> None:
    """After an error reply: stop writing and drain the peer briefly, so closing does not send a
    TCP reset that would destroy the error frame before the sender reads it."""
    conn.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + max_s
    while (left := deadline - time.monotonic()) > 0:
        conn.settimeout(left)
        if not conn.recv(1 << 20):
            return


def _still_open(conn: socket.socket) -> bool:
    """False if the peer closed an idle connection (or left an error frame on it)."""
    try:
        conn.setblocking(False)
        try:
            data = conn.recv(1, socket.MSG_PEEK)
        finally:
            conn.setblocking(True)
        return False   # EOF, or bytes nobody asked for: either way not reusable
    except BlockingIOError:
        return True
    except OSError:
        return False


def _close_quietly(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass


def _close_fd(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
