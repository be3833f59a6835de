"""`tcp`: KV bytes over a TCP socket, across hosts; optional link shaping for what-if runs.

The receiver reads each layer straight into the request's tensors (`recv_into`, no extra
copy); the checksum runs on bytes just received, while they are still in cache.
"""

from __future__ import annotations

import socket
from typing import Any

import torch

from labkit.links import Link
from labkit.transfer import wire
from labkit.transfer.base import tensor_bytes
from labkit.transfer.errors import HeaderError
from labkit.transfer.receiver import InboundStream, Receiver
from labkit.transfer.sender import OutboundStream, Sender
from labkit.transfer.shaping import TokenBucket, chunk_bytes

SOCKET_BUFFER_BYTES = 4 << 20


def parse_endpoint(endpoint: str, scheme: str = "tcp") -> tuple[str, int]:
    """("host", port) from "tcp://host:port"; ValueError naming the endpoint otherwise."""
    if not endpoint.startswith(f"{scheme}://"):
        raise ValueError(f"not a {scheme} endpoint: {endpoint!r} (expected {scheme}://host:port)")
    host, _, port = endpoint[len(scheme) + 3 :].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad {scheme} endpoint {endpoint!r} (expected {scheme}://host:port)")
    return host.strip("[]"), int(port)


class TcpInbound(InboundStream):
    def __init__(self, meta: wire.KVMeta) -> None:
        super().__init__(meta)
        self.buf = torch.empty(meta.nbytes, dtype=torch.uint8)
        self.view = self.buf.numpy().data

    def add_layer(
        self, layer: int, checksum: int, header: dict[str, Any], conn: socket.socket, deadline: float | None
    ) -> None:
        m = self.meta
        n = m.layer_nbytes
        if header.get("nbytes") != 2 * n:
            raise HeaderError(
                f"layer {layer}: nbytes {header.get('nbytes')!r} != {2 * n} (K + V of one layer)",
                field="nbytes",
                request_id=m.request_id,
            )
        k_off, v_off = layer * n, m.nbytes // 2 + layer * n
        what = f"request {m.request_id!r} layer {layer}"
        wire.recv_exact_into(conn, self.view[k_off : k_off + n], deadline, what)
        wire.recv_exact_into(conn, self.view[v_off : v_off + n], deadline, what)
        wire.verify_layer(self.view[k_off : k_off + n], self.view[v_off : v_off + n], checksum, m, layer)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        dt, half = getattr(torch, self.meta.dtype), self.meta.nbytes // 2
        return self.buf[:half].view(dt).view(self.meta.shape), self.buf[half:].view(dt).view(self.meta.shape)


class TcpReceiver(Receiver):
    """Listens on `host:port` (port 0: the kernel picks one); `endpoint` is "tcp://host:port"."""

    backend = "tcp"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise OSError(f"tcp receiver cannot bind {host}:{port}: {e}") from None
        sock.listen(64)
        bound_port = sock.getsockname()[1]
        shown = socket.gethostbyname(socket.gethostname()) if host in ("0.0.0.0", "") else host
        self._endpoint = f"{self.backend}://{shown}:{bound_port}"
        self._start(sock)

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def _read_message(self, conn: socket.socket, deadline: float | None) -> tuple[dict[str, Any], list[int]]:
        return wire.read_frame(conn, deadline, what=f"frame from a sender to {self._endpoint}"), []

    def _open_stream(
        self, meta: wire.KVMeta, header: dict[str, Any], fds: list[int], conn: socket.socket
    ) -> InboundStream:
        if fds:
            raise HeaderError("file descriptors on a tcp channel", field="fds", request_id=meta.request_id)
        return TcpInbound(meta)


class TcpOutbound(OutboundStream):
    sender: TcpSender

    def _write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        kb, vb = tensor_bytes(k), tensor_bytes(v)
        digest = wire.layer_checksum(kb, vb)
        frame = wire.encode_frame({"kind": "layer", "layer": layer, "checksum": digest, "nbytes": len(kb) + len(vb)})
        rid = self.meta.request_id
        self.sender._send_or_explain(self.conn, frame, self.deadline, rid)
        bucket = self.sender._bucket
        if bucket is not None:
            bucket.resume()
        step = chunk_bytes(self.sender.link)
        for data in (kb, vb):
            for a in range(0, len(data), step):
                piece = data[a : a + step]
                if bucket is not None:
                    bucket.wait(len(piece))
                self.sender._send_or_explain(self.conn, piece, self.deadline, rid)


class TcpSender(Sender):
    """Sends to "tcp://host:port"; `link` paces the bytes (bandwidth) and delays them (latency)."""

    backend = "tcp"

    def __init__(self, endpoint: str, *, token: str, link: Link | None = None, **kw: Any) -> None:
        self.address = parse_endpoint(endpoint, self.backend)
        super().__init__(endpoint, token=token, link=link, **kw)
        # One bucket per sender: concurrent streams share the emulated link, as they would a real one.
        self._bucket = TokenBucket(link.bytes_per_s) if link is not None and link.shaped else None

    def _connect(self, timeout_s: float) -> socket.socket:
        conn = socket.create_connection(self.address, timeout=timeout_s)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        return conn

    def _open(self, conn: socket.socket, meta: wire.KVMeta, timeout_s: float, layerwise: bool) -> OutboundStream:
        stream = TcpOutbound(self, conn, meta, timeout_s, layerwise)
        self._send_or_explain(conn, wire.encode_frame(meta.begin_header(self._token)), stream.deadline, meta.request_id)
        return stream
