"""`shm`: KV bytes through shared memory on one host; only small frames cross a socket.

The sender writes a request's K and V into a sealed `memfd` segment (Linux shared memory with
no name in /dev/shm, so nothing can be left behind there, even by a crash) and passes its file
descriptor over a Unix socket (SCM_RIGHTS) with the `begin` frame. The receiver maps the
segment copy-on-write and hands out tensors that *are* that mapping: one copy in, none out.
Seals make it safe: F_SEAL_SHRINK|F_SEAL_GROW at creation (a shrunk segment would SIGBUS the
receiver), F_SEAL_WRITE before `end` (the sender can no longer change bytes it was acked for).

Segments are pre-faulted (fallocate + MAP_POPULATE) ahead of the copy, as a registered buffer
would be for RDMA: writing into fresh pages runs several times slower than memcpy here. A
sender keeps one spare segment of its last size ready (`reserve()` makes one explicitly).
The control socket is an abstract Unix socket: no file to clean up either.
"""
from __future__ import annotations

import array
import fcntl
import mmap
import os
import secrets
import socket
import stat
import threading
from dataclasses import dataclass
from typing import Any

import torch

from labkit.transfer import wire
from labkit.transfer.base import InboundStream, OutboundStream, Receiver, Sender, tensor_bytes
from labkit.transfer.errors import HeaderError, PayloadError, TransferError
from labkit.transfer.shaping import LinkShape

COPY_CHUNK_BYTES = 4 << 20       # copy, then checksum while the chunk is still in cache
MADV_POPULATE_READ = 22          # Linux >= 5.14: map the pages read-only now, without copying them
_SEALS_AT_CREATION = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def parse_endpoint(endpoint: str) -> str:
    """The abstract socket name from "shm://@name"; ValueError otherwise."""
    if not endpoint.startswith("shm://@") or len(endpoint) <= len("shm://@") or len(endpoint) > 100:
        raise ValueError(f"bad shm endpoint {endpoint!r} (expected shm://@name, from a shm receiver)")
    return endpoint[len("shm://@"):]


@dataclass(slots=True)
class Segment:
    """A pre-faulted, size-sealed memfd and the sender's shared mapping of it."""

    fd: int
    size: int
    mm: mmap.mmap

    @classmethod
    def create(cls, nbytes: int) -> Segment:
        fd = os.memfd_create("labkit-kv", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, nbytes)
            os.posix_fallocate(fd, 0, nbytes)     # allocate and zero the pages now, not during the copy
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS_AT_CREATION)
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError as e:
            os.close(fd)
            raise TransferError(f"cannot create a {nbytes:,}-byte shared memory segment: {e}") from None
        return cls(fd, nbytes, mm)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass     # a view is still alive; the mapping goes when it does
        try:
            os.close(self.fd)
        except OSError:
            pass


def _fits(seg: Segment, nbytes: int) -> bool:
    # Exact-ish fit only: a bigger segment would pin memory for as long as the receiver holds the KV.
    return nbytes <= seg.size <= nbytes + max(nbytes // 8, 1 << 20)


class ShmInbound(InboundStream):
    def __init__(self, meta: wire.KVMeta, fd: int) -> None:
        super().__init__(meta)
        self.fd = fd
        rid = meta.request_id
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HeaderError("the descriptor sent with begin is not a shared memory segment", field="fd",
                              request_id=rid)
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if seals & _SEALS_AT_CREATION != _SEALS_AT_CREATION:
            raise HeaderError("shm segment is not sealed against resizing (memfd F_SEAL_SHRINK|F_SEAL_GROW)",
                              field="fd", request_id=rid)
        if st.st_size < meta.nbytes:
            raise PayloadError(f"shm segment holds {st.st_size:,} bytes, header says {meta.nbytes:,} (truncated)",
                               field="nbytes", request_id=rid)
        # Private + writable: the receiver may modify its KV without touching the sender's pages.
        # No MAP_POPULATE: on a writable private mapping it would copy every page now, before
        # the sender has written it; read faults instead map the sender's pages as they are.
        self.mm = mmap.mmap(fd, meta.nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:    # page-table work done here, while the sender copies, not during verification
            self.mm.madvise(MADV_POPULATE_READ)
        except (OSError, ValueError):
            pass

    def add_layer(self, layer: int, checksum: int, header: dict[str, Any], conn: socket.socket,
                  deadline: float | None) -> None:
        n, half = self.meta.layer_nbytes, self.meta.nbytes // 2
        with memoryview(self.mm) as mv:
            wire.verify_layer(mv[layer * n:(layer + 1) * n], mv[half + layer * n:half + (layer + 1) * n],
                              checksum, self.meta, layer)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not fcntl.fcntl(self.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE:
            raise PayloadError("shm segment still writable by the sender at end (missing F_SEAL_WRITE)",
                               field="fd", request_id=self.meta.request_id)
        dt = getattr(torch, self.meta.dtype)
        count = self.meta.nbytes // 2 // dt.itemsize
        # The tensors keep the mapping alive; it is unmapped when the last of them is freed.
        k = torch.frombuffer(self.mm, dtype=dt, count=count, offset=0).view(self.meta.shape)
        v = torch.frombuffer(self.mm, dtype=dt, count=count, offset=self.meta.nbytes // 2).view(self.meta.shape)
        self._close_fd()
        return k, v

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        self._close_fd()
        try:
            self.mm.close()
        except BufferError:
            pass


class ShmReceiver(Receiver):
    """Listens on an abstract Unix socket; `endpoint` is "shm://@name" (same host only)."""

    backend = "shm"

    def __init__(self, *, name: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self._name = name or f"labkit-kv-{os.getpid()}-{secrets.token_hex(6)}"
        parse_endpoint(f"shm://@{self._name}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + self._name)
        except OSError as e:
            sock.close()
            raise OSError(f"shm receiver cannot bind @{self._name}: {e}") from None
        sock.listen(64)
        self._start(sock)

    @property
    def endpoint(self) -> str:
        return f"shm://@{self._name}"

    def _read_message(self, conn: socket.socket, deadline: float | None) -> tuple[dict[str, Any], list[int]]:
        wire._set_deadline(conn, deadline, "frame")
        fds = array.array("i")
        try:
            data, anc, flags, _ = conn.recvmsg(wire.PREFIX.size, socket.CMSG_SPACE(4 * fds.itemsize))
        except socket.timeout:
            from labkit.transfer.errors import TransferTimeout
            raise TransferTimeout("sender stalled between frames") from None
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        got = list(fds)
        try:
            if not data:
                raise ConnectionResetError("peer closed the connection")
            if flags & socket.MSG_CTRUNC:
                raise HeaderError("too many file descriptors in one frame", field="fds")
            rest = wire.PREFIX.size - len(data)
            prefix = bytes(data) + (bytes(wire.recv_exact(conn, rest, deadline, "frame")) if rest else b"")
            header = wire.decode_header(prefix, lambda n: bytes(wire.recv_exact(conn, n, deadline, "frame")))
            if got and header["kind"] != "begin":
                raise HeaderError(f"file descriptors sent with a {header['kind']!r} frame", field="fds")
        except BaseException:
            for fd in got:
                os.close(fd)
            raise
        return header, got

    def _open_stream(self, meta: wire.KVMeta, header: dict[str, Any], fds: list[int],
                     conn: socket.socket) -> InboundStream:
        if len(fds) != 1:
            raise HeaderError(f"begin must carry exactly one shm segment descriptor, got {len(fds)}", field="fds",
                              request_id=meta.request_id)
        stream = ShmInbound(meta, fds[0])
        return stream


class ShmOutbound(OutboundStream):
    sender: ShmSender

    def __init__(self, sender: ShmSender, conn: socket.socket, meta: wire.KVMeta, timeout_s: float,
                 layerwise: bool, seg: Segment) -> None:
        super().__init__(sender, conn, meta, timeout_s, layerwise)
        self.seg = seg
        self._mv: memoryview | None = memoryview(seg.mm)

    def _write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        assert self._mv is not None
        n, half = self.meta.layer_nbytes, self.meta.nbytes // 2
        h = wire.xxhash.xxh3_64()
        for off, src in ((layer * n, tensor_bytes(k)), (half + layer * n, tensor_bytes(v))):
            # memoryview assignment is one single-threaded memcpy per chunk; torch.copy_ on small
            # chunks pays its thread-pool handoff each time, which a loaded machine makes slow.
            for a in range(0, n, COPY_CHUNK_BYTES):
                b = min(a + COPY_CHUNK_BYTES, n)
                self._mv[off + a:off + b] = src[a:b]
                h.update(self._mv[off + a:off + b])
        frame = wire.encode_frame({"kind": "layer", "layer": layer, "checksum": h.intdigest()})
        self.sender._send_or_explain(self.conn, frame, self.deadline, self.meta.request_id)

    def _unmap(self) -> None:
        if self._mv is not None:
            self._mv.release()
            self._mv = None
        self.seg.mm.close()

    def _before_end(self) -> None:
        self._unmap()
        fcntl.fcntl(self.seg.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        os.close(self.seg.fd)       # the receiver holds its own descriptor
        self.seg.fd = -1
        self.sender._refill(self.seg.size)

    def _release_resources(self) -> None:
        try:
            self._unmap()
        except (BufferError, ValueError):
            pass
        if self.seg.fd >= 0:
            os.close(self.seg.fd)
            self.seg.fd = -1


class ShmSender(Sender):
    """Sends to "shm://@name" on this host. Keeps one pre-faulted spare segment (`keep_spare`)."""

    backend = "shm"

    def __init__(self, endpoint: str, *, token: str, link: LinkShape | None = None, keep_spare: bool = True,
                 **kw: Any) -> None:
        if link is not None:
            raise ValueError("link shaping emulates a network: use the tcp backend for it, not shm")
        self._name = parse_endpoint(endpoint)
        super().__init__(endpoint, token=token, **kw)
        self.keep_spare = keep_spare
        self._spare: Segment | None = None
        self._spare_lock = threading.Lock()
        self._refilling: threading.Thread | None = None

    def reserve(self, nbytes: int) -> None:
        """Prepares a pre-faulted segment for a request of `nbytes` now (blocks while it is made)."""
        if nbytes < 1:
            raise ValueError(f"nbytes must be >= 1, got {nbytes}")
        self._wait_refill()
        with self._spare_lock:
            if self._spare is not None and _fits(self._spare, nbytes):
                return
        seg = Segment.create(nbytes)
        with self._spare_lock:
            old, self._spare = self._spare, seg
        if old is not None:
            old.close()

    def close(self) -> None:
        super().close()
        self._wait_refill()
        with self._spare_lock:
            old, self._spare = self._spare, None
        if old is not None:
            old.close()

    def _take_segment(self, nbytes: int) -> Segment:
        with self._spare_lock:
            seg = self._spare
            if seg is not None and _fits(seg, nbytes):
                self._spare = None
                return seg
        return Segment.create(nbytes)

    def _refill(self, nbytes: int) -> None:
        if not self.keep_spare or self._closed:
            return
        with self._spare_lock:
            if self._spare is not None and self._spare.size == nbytes or (
                    self._refilling is not None and self._refilling.is_alive()):
                return

            def make() -> None:
                try:
                    seg = Segment.create(nbytes)
                except TransferError:
                    return
                with self._spare_lock:
                    old, self._spare = self._spare, seg
                if old is not None:
                    old.close()

            self._refilling = threading.Thread(target=make, name="kv-shm-spare", daemon=True)
            self._refilling.start()

    def _wait_refill(self) -> None:
        t = self._refilling
        if t is not None:
            t.join(timeout=60.0)

    def _connect(self, timeout_s: float) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(timeout_s)
        try:
            conn.connect("\0" + self._name)
        except OSError:
            conn.close()
            raise
        return conn

    def _open(self, conn: socket.socket, meta: wire.KVMeta, timeout_s: float, layerwise: bool) -> OutboundStream:
        seg = self._take_segment(meta.nbytes)
        stream = ShmOutbound(self, conn, meta, timeout_s, layerwise, seg)
        try:
            frame = wire.encode_frame(meta.begin_header(self._token))
            conn.settimeout(timeout_s)
            sent = conn.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [seg.fd]))])
            if sent < len(frame):
                self._send_or_explain(conn, frame[sent:], stream.deadline, meta.request_id)
        except BaseException:
            stream._release_resources()
            raise
        return stream
