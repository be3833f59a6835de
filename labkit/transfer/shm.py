"""`shm`: KV bytes through shared memory on one host; only small frames cross a socket.

The sender keeps a pool of shared-memory segments (`memfd`: Linux shared memory with no name
in /dev/shm, so nothing can be left there, even by a crash). For a request it takes a free
segment, copies K and V in (the one copy), and sends `begin`/`layer`/`end` frames on an
abstract Unix socket; a segment's file descriptor crosses (SCM_RIGHTS) only the first time a
connection uses it. The receiver maps each segment once, verifies every layer's checksum as
it lands, and hands out tensors that *are* the segment: no copy out. When the last of those
tensors is freed, the receiver flips the segment's state byte back to free and the sender
may reuse it. Reusing mapped segments is what makes this fast: fresh shared pages cost more
to fault in and map than the copy itself.

Safety: segments are sealed against resizing (F_SEAL_SHRINK|F_SEAL_GROW; a shrunk segment
would SIGBUS the receiver) and carry a magic header; the sender only writes a segment whose
state byte says free. A buggy sender could still write into a segment a receiver holds: the
checksum proves the bytes at arrival, not after.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import mmap
import os
import secrets
import socket
import stat
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from labkit.links import Link
from labkit.transfer import wire
from labkit.transfer.errors import (
    HeaderError,
    PayloadError,
    TransferError,
    TransferTimeout,
)
from labkit.transfer.receiver import InboundStream, Receiver
from labkit.transfer.sender import OutboundStream, Sender

SEG_MAGIC = b"LKVSEG01"
STATE_OFFSET = 8  # one byte: 0 free (sender may write), 1 in use (receiver may hold it)
DATA_OFFSET = 4096  # KV bytes start on their own page
MIN_CAPACITY = 1 << 20
COPY_CHUNK_BYTES = 4 << 20  # copy, then checksum while the chunk is still in cache
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def parse_endpoint(endpoint: str) -> str:
    """The abstract socket name from "shm://@name"; ValueError otherwise."""
    if not endpoint.startswith("shm://@") or len(endpoint) <= len("shm://@") or len(endpoint) > 100:
        raise ValueError(f"bad shm endpoint {endpoint!r} (expected shm://@name, from a shm receiver)")
    return endpoint[len("shm://@") :]


def capacity_for(nbytes: int) -> int:
    """Segment capacity for a request: the next power of two >= nbytes (at least 1 MiB), so
    segments are reused across similar prompt lengths and waste at most half."""
    return max(MIN_CAPACITY, 1 << (max(1, nbytes) - 1).bit_length())


@dataclass(eq=False)
class Segment:
    """A sender's pre-faulted, size-sealed memfd and its shared mapping."""

    id: int
    fd: int
    capacity: int
    mm: mmap.mmap
    mv: memoryview = field(init=False)

    address: int = field(init=False)

    def __post_init__(self) -> None:
        self.mv = memoryview(self.mm)
        anchor = ctypes.c_char.from_buffer(self.mm)  # only to learn where the mapping starts
        self.address = ctypes.addressof(anchor)
        del anchor

    @classmethod
    def create(cls, seg_id: int, capacity: int) -> Segment:
        fd = os.memfd_create("labkit-kv", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        size = DATA_OFFSET + capacity
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)  # allocate and zero the pages now, not during a copy
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError as e:
            os.close(fd)
            raise TransferError(f"cannot create a {size:,}-byte shared memory segment: {e}") from None
        mm[: len(SEG_MAGIC)] = SEG_MAGIC
        mm[STATE_OFFSET] = 0
        return cls(seg_id, fd, capacity, mm)

    @property
    def free(self) -> bool:
        return self.mm[STATE_OFFSET] == 0

    def close(self) -> None:
        self.mv.release()
        try:
            self.mm.close()
        except BufferError:
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


def _release(mm: mmap.mmap) -> None:
    """Marks a receiver-held segment free again (its tensors are gone)."""
    try:
        mm[STATE_OFFSET] = 0
    except ValueError:  # already unmapped: the sender is gone too
        pass


class ShmInbound(InboundStream):
    def __init__(self, meta: wire.KVMeta, mm: mmap.mmap) -> None:
        super().__init__(meta)
        self.mm = mm
        self.handed_out = False

    def add_layer(
        self, layer: int, checksum: int, header: dict[str, Any], conn: socket.socket, deadline: float | None
    ) -> None:
        n, half = self.meta.layer_nbytes, self.meta.nbytes // 2
        k0, v0 = DATA_OFFSET + layer * n, DATA_OFFSET + half + layer * n
        with memoryview(self.mm) as mv:
            wire.verify_layer(mv[k0 : k0 + n], mv[v0 : v0 + n], checksum, self.meta, layer)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        arr = np.frombuffer(self.mm, dtype=np.uint8, count=self.meta.nbytes, offset=DATA_OFFSET)
        # The segment goes back to the sender when the last tensor viewing it is freed.
        weakref.finalize(arr, _release, self.mm)
        flat = torch.from_numpy(arr)
        dt, half = getattr(torch, self.meta.dtype), self.meta.nbytes // 2
        self.handed_out = True
        return flat[:half].view(dt).view(self.meta.shape), flat[half:].view(dt).view(self.meta.shape)

    def abort(self) -> None:
        if not self.handed_out:
            _release(self.mm)


class ShmReceiver(Receiver):
    """Listens on an abstract Unix socket; `endpoint` is "shm://@name" (same host only)."""

    backend = "shm"

    def __init__(self, *, name: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self._name = name or f"labkit-kv-{os.getpid()}-{secrets.token_hex(6)}"
        parse_endpoint(f"shm://@{self._name}")
        self._maps: dict[socket.socket, dict[int, mmap.mmap]] = {}
        self._maps_lock = threading.Lock()
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
        except TimeoutError:
            raise TransferTimeout("sender stalled between frames") from None
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
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

    def _open_stream(
        self, meta: wire.KVMeta, header: dict[str, Any], fds: list[int], conn: socket.socket
    ) -> InboundStream:
        rid = meta.request_id
        info = header.get("shm")
        if (
            not isinstance(info, dict)
            or not wire._is_int(info.get("segment"))
            or not wire._is_int(info.get("capacity"))
            or not isinstance(info.get("retire", []), list)
        ):
            raise HeaderError(
                "begin needs shm: {segment: int, capacity: int, retire: [int]}", field="shm", request_id=rid
            )
        seg_id, capacity = info["segment"], info["capacity"]
        with self._maps_lock:
            maps = self._maps.setdefault(conn, {})
            for old in info.get("retire", []):
                maps.pop(old, None)  # unmapped once no tensor views it
        if len(fds) > 1:
            raise HeaderError(f"begin carries {len(fds)} descriptors, expected at most 1", field="fds", request_id=rid)
        if fds:
            mm = _map_segment(fds[0], capacity, rid)
            with self._maps_lock:
                maps[seg_id] = mm
        else:
            with self._maps_lock:
                known = maps.get(seg_id)
            if known is None:
                raise HeaderError(
                    f"shm segment {seg_id} was never sent on this connection", field="shm", request_id=rid
                )
            mm = known
        if len(mm) - DATA_OFFSET < meta.nbytes:
            raise PayloadError(
                f"shm segment {seg_id} holds {len(mm) - DATA_OFFSET:,} bytes, the request needs "
                f"{meta.nbytes:,} (truncated)",
                field="nbytes",
                request_id=rid,
            )
        return ShmInbound(meta, mm)

    def _connection_closed(self, conn: socket.socket) -> None:
        with self._maps_lock:
            self._maps.pop(conn, None)  # mappings still viewed by tensors live on until those go


def _map_segment(fd: int, capacity: int, rid: str) -> mmap.mmap:
    """Checks a received segment descriptor (a sealed memfd of the announced size) and maps it."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise HeaderError("the descriptor sent with begin is not a shared memory segment", field="fd", request_id=rid)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & _SEALS != _SEALS:
        raise HeaderError(
            "shm segment is not sealed against resizing (memfd F_SEAL_SHRINK|F_SEAL_GROW)", field="fd", request_id=rid
        )
    if capacity < 1 or st.st_size < DATA_OFFSET + capacity:
        raise PayloadError(
            f"shm segment holds {max(0, st.st_size - DATA_OFFSET):,} bytes, header says {capacity:,} (truncated)",
            field="nbytes",
            request_id=rid,
        )
    mm = mmap.mmap(fd, DATA_OFFSET + capacity, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    if mm[: len(SEG_MAGIC)] != SEG_MAGIC:
        mm.close()
        raise HeaderError("shm segment lacks the labkit magic header", field="fd", request_id=rid)
    return mm


class ShmOutbound(OutboundStream):
    sender: ShmSender

    def __init__(
        self, sender: ShmSender, conn: socket.socket, meta: wire.KVMeta, timeout_s: float, layerwise: bool, seg: Segment
    ) -> None:
        super().__init__(sender, conn, meta, timeout_s, layerwise)
        self.seg = seg
        self.begun = False  # once begin is out, only the receiver frees the segment

    def _write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n, half = self.meta.layer_nbytes, self.meta.nbytes // 2
        mv, base = self.seg.mv, self.seg.address
        h = wire.xxhash.xxh3_64()
        for off, src in ((DATA_OFFSET + layer * n, k), (DATA_OFFSET + half + layer * n, v)):
            # One plain memcpy per chunk (ctypes releases the GIL, so a layer-wise writer thread
            # copies while the caller computes); torch.copy_ on small chunks pays its thread-pool
            # handoff each time, which a loaded machine makes slow.
            src_addr = src.data_ptr()
            for a in range(0, n, COPY_CHUNK_BYTES):
                b = min(a + COPY_CHUNK_BYTES, n)
                ctypes.memmove(base + off + a, src_addr + a, b - a)
                h.update(mv[off + a : off + b])
        frame = wire.encode_frame({"kind": "layer", "layer": layer, "checksum": h.intdigest()})
        self.sender._send_or_explain(self.conn, frame, self.deadline, self.meta.request_id)

    def _release_resources(self) -> None:
        if not self.begun:
            self.seg.mm[STATE_OFFSET] = 0


class ShmSender(Sender):
    """Sends to "shm://@name" on this host from a pool of reusable segments.

    `pool_free_max_bytes` caps the capacity of segments kept while free (beyond it the oldest
    free ones are retired); segments in use are never taken back.
    """

    backend = "shm"

    def __init__(
        self, endpoint: str, *, token: str, link: Link | None = None, pool_free_max_bytes: int = 2 << 30, **kw: Any
    ) -> None:
        if link is not None:
            raise ValueError("link shaping emulates a network: use the tcp backend for it, not shm")
        self._name = parse_endpoint(endpoint)
        super().__init__(endpoint, token=token, **kw)
        self.pool_free_max_bytes = pool_free_max_bytes
        self._segments: list[Segment] = []
        self._next_id = 1
        self._pool_lock = threading.Lock()
        self._mapped: weakref.WeakKeyDictionary[socket.socket, set[int]] = weakref.WeakKeyDictionary()
        self._retire: weakref.WeakKeyDictionary[socket.socket, set[int]] = weakref.WeakKeyDictionary()

    def reserve(self, nbytes: int) -> None:
        """Makes sure a free, pre-faulted segment for an `nbytes` request is in the pool (blocks while made)."""
        if nbytes < 1:
            raise ValueError(f"nbytes must be >= 1, got {nbytes}")
        cap = capacity_for(nbytes)
        with self._pool_lock:
            if any(s.capacity == cap and s.free for s in self._segments):
                return
            seg = Segment.create(self._next_id, cap)
            self._next_id += 1
            self._segments.append(seg)

    def close(self) -> None:
        super().close()
        with self._pool_lock:
            segs, self._segments = self._segments, []
        for s in segs:
            s.close()  # receivers' mappings keep held segments alive until their tensors go

    def _take(self, nbytes: int) -> Segment:
        cap = capacity_for(nbytes)
        with self._pool_lock:
            seg = next((s for s in self._segments if s.capacity == cap and s.free), None)
            if seg is None:
                seg = Segment.create(self._next_id, cap)
                self._next_id += 1
                self._segments.append(seg)
            seg.mm[STATE_OFFSET] = 1
            self._trim()
            return seg

    def _trim(self) -> None:
        free = [s for s in self._segments if s.free]
        total = sum(s.capacity for s in free)
        for s in free:  # oldest first
            if total <= self.pool_free_max_bytes:
                break
            total -= s.capacity
            self._segments.remove(s)
            for conn, ids in list(self._mapped.items()):
                if s.id in ids:
                    ids.discard(s.id)
                    self._retire.setdefault(conn, set()).add(s.id)
            s.close()

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
        seg = self._take(meta.nbytes)
        stream = ShmOutbound(self, conn, meta, timeout_s, layerwise, seg)
        try:
            with self._pool_lock:
                mapped = self._mapped.setdefault(conn, set())
                retire = sorted(self._retire.pop(conn, set()))
                send_fd = seg.id not in mapped
            header = meta.begin_header(self._token)
            header["shm"] = {"segment": seg.id, "capacity": seg.capacity, "retire": retire}
            frame = wire.encode_frame(header)
            conn.settimeout(timeout_s)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [seg.fd]))] if send_fd else []
            sent = conn.sendmsg([frame], anc)
            stream.begun = True
            if sent < len(frame):
                self._send_or_explain(conn, frame[sent:], stream.deadline, meta.request_id)
            if send_fd:
                with self._pool_lock:
                    mapped.add(seg.id)
        except BaseException:
            stream._release_resources()
            raise
        return stream
