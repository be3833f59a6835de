"""`cuda-ipc`: GPU to GPU on one node through CUDA IPC memory handles; no byte touches the host.

The sender shares each layer's K and V (`storage._share_cuda_()`: a 64-byte cudaIpcMemHandle,
offsets and torch's IPC ref-counter) in a `layer` frame on a Unix control socket; the receiver
opens the handle (`UntypedStorage._new_shared_cuda`), copies the layer device-to-device into
its own buffer (peer-to-peer over NVLink/PCIe when the GPUs differ), checks a checksum
computed on the GPU, and drops the mapping. The sender keeps its tensors alive until the ack.
Handles travel base64 in JSON, never pickled. Needs a CUDA GPU; `available_backends()` says.

CUDA cannot open an IPC handle in the process that exported it (cudaIpcOpenMemHandle fails
with "invalid device context"), so when sender and receiver share a process the descriptor
also names the tensor in a process-local table, and the receiver copies from it directly
(UCX's cuda_ipc transport takes the same shortcut for a peer in its own process).
"""

from __future__ import annotations

import base64
import secrets
import socket
import threading
from typing import Any

import torch

from labkit.transfer import wire
from labkit.transfer.errors import HeaderError, PayloadError, TransferError
from labkit.transfer.receiver import InboundStream
from labkit.transfer.sender import OutboundStream
from labkit.transfer.shm import ShmReceiver, ShmSender, parse_endpoint

CHECKSUM_ALGO = "sum64x2"  # xxh3 would need the bytes on the host; this runs where they are
_MASK64 = (1 << 64) - 1
_CHUNK_WORDS = 8 << 20
_PROCESS = secrets.token_hex(8)  # names this process in descriptors (pids repeat across namespaces)
_LOCAL: dict[str, torch.Tensor] = {}  # tensors shared with a receiver in this same process
_LOCAL_LOCK = threading.Lock()


def gpu_checksum(data: torch.Tensor) -> int:
    """A 64-bit checksum of a flat uint8 tensor, computed on its own device (CPU or CUDA).

    Sum of 32-bit words plus a position-weighted sum (weights 1..65521), both exact modulo
    2**64 (integer adds wrap the same in any order, so both sides agree). Catches flipped,
    missing and swapped words; like crc32 it is for bugs, not attackers.
    """
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError("gpu_checksum takes a flat uint8 tensor")
    n = data.numel()
    words = data[: n - n % 4].view(torch.int32)
    s1 = torch.zeros((), dtype=torch.int64, device=data.device)
    s2 = torch.zeros((), dtype=torch.int64, device=data.device)
    for a in range(0, words.numel(), _CHUNK_WORDS):
        w = words[a : a + _CHUNK_WORDS].to(torch.int64)
        weights = torch.arange(a, a + w.numel(), dtype=torch.int64, device=data.device).remainder_(65521).add_(1)
        s1 += w.sum()
        s2 += (w * weights).sum()
    tail = int(data[n - n % 4 :].to(torch.int64).sum()) if n % 4 else 0
    return ((int(s1) & _MASK64) * 0x9E3779B97F4A7C15 + (int(s2) & _MASK64) * 31 + tail + n) & _MASK64


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise TransferError(
            "the cuda-ipc backend needs a CUDA GPU (torch.cuda.is_available() is False); use shm or tcp on this machine"
        )


def _share(t: torch.Tensor) -> dict[str, Any]:
    """What the receiver needs to open `t`'s memory: JSON-ready (bytes base64).

    `t` is also put in this process's table under `local`, for a receiver in this process;
    the sender removes it (`_unshare`) once the receiver acked or the stream ended.
    """
    local = secrets.token_hex(8)
    with _LOCAL_LOCK:
        _LOCAL[local] = t
    storage = t.untyped_storage()
    (device, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle, event_sync) = (
        storage._share_cuda_()
    )
    b64 = lambda x: base64.b64encode(x).decode() if x else ""
    return {
        "device": int(device),
        "handle": b64(handle),
        "storage_size_bytes": int(size_bytes),
        "storage_offset_bytes": int(offset_bytes),
        "ref_counter_handle": b64(ref_handle),
        "ref_counter_offset": int(ref_offset),
        "event_handle": b64(event_handle),
        "event_sync_required": bool(event_sync),
        "byte_offset": t.storage_offset() * t.element_size(),
        "nbytes": t.numel() * t.element_size(),
        "process": _PROCESS,
        "local": local,
    }


def _unshare(descriptors: list[dict[str, Any]]) -> None:
    with _LOCAL_LOCK:
        for d in descriptors:
            _LOCAL.pop(d["local"], None)


def _open_shared(d: Any, nbytes: int, rid: str) -> torch.Tensor:
    """A flat uint8 view of the peer's memory described by `d` (validated first)."""
    ints = ("device", "storage_size_bytes", "storage_offset_bytes", "ref_counter_offset", "byte_offset", "nbytes")
    if not isinstance(d, dict) or not all(wire._is_int(d.get(k)) and d[k] >= 0 for k in ints):
        raise HeaderError("cuda-ipc descriptor malformed", field="ipc", request_id=rid)
    if d["nbytes"] != nbytes or d["byte_offset"] + nbytes > d["storage_size_bytes"]:
        raise HeaderError(
            f"cuda-ipc descriptor covers {d['nbytes']} bytes at {d['byte_offset']}, "
            f"expected {nbytes} inside a {d['storage_size_bytes']}-byte storage",
            field="ipc",
            request_id=rid,
        )
    if d.get("process") == _PROCESS:  # our own process: CUDA would refuse the handle; take the tensor
        with _LOCAL_LOCK:
            t = _LOCAL.get(str(d.get("local")))
        if t is None or t.numel() * t.element_size() != nbytes:
            raise PayloadError(
                "cuda-ipc descriptor names no tensor shared by this process", field="ipc", request_id=rid
            )
        return t.reshape(-1).view(torch.uint8)
    try:
        raw = {
            k: base64.b64decode(d.get(k) or "", validate=True) for k in ("handle", "ref_counter_handle", "event_handle")
        }
    except ValueError:
        raise HeaderError("cuda-ipc handles must be base64", field="ipc", request_id=rid) from None
    try:
        storage = torch.UntypedStorage._new_shared_cuda(
            d["device"],
            raw["handle"],
            d["storage_size_bytes"],
            d["storage_offset_bytes"],
            raw["ref_counter_handle"],
            d["ref_counter_offset"],
            raw["event_handle"] or None,
            bool(d.get("event_sync_required")),
        )
    except Exception as e:  # noqa: BLE001 - CUDA reports bad handles as RuntimeError
        raise PayloadError(
            f"cannot open the CUDA IPC handle ({e.__class__.__name__}: {e})", field="ipc", request_id=rid
        ) from None
    t = torch.empty(0, dtype=torch.uint8, device=f"cuda:{d['device']}")
    return t.set_(storage, d["byte_offset"], (nbytes,), (1,))


class CudaIpcInbound(InboundStream):
    def __init__(self, meta: wire.KVMeta, device: torch.device) -> None:
        super().__init__(meta)
        self.device = device
        self.buf = torch.empty(meta.nbytes, dtype=torch.uint8, device=device)

    def add_layer(
        self, layer: int, checksum: int, header: dict[str, Any], conn: socket.socket, deadline: float | None
    ) -> None:
        m = self.meta
        n, half = m.layer_nbytes, m.nbytes // 2
        ipc = header.get("ipc")
        if not isinstance(ipc, list) or len(ipc) != 2:
            raise HeaderError(
                f"layer {layer}: ipc must hold two descriptors (K, V)", field="ipc", request_id=m.request_id
            )
        for d, off in zip(ipc, (layer * n, half + layer * n)):
            src = _open_shared(d, n, m.request_id)
            self.buf[off : off + n].copy_(src)  # device to device
            del src  # drops our reference to the peer's memory
        torch.cuda.synchronize(self.device)
        h = gpu_checksum(
            torch.cat([self.buf[layer * n : (layer + 1) * n], self.buf[half + layer * n : half + (layer + 1) * n]])
        )
        if h != checksum:
            raise PayloadError(
                f"layer {layer}: checksum mismatch (got {h:#018x}, sender said {checksum:#018x})",
                field="checksum",
                request_id=m.request_id,
            )

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        dt, half = getattr(torch, self.meta.dtype), self.meta.nbytes // 2
        return self.buf[:half].view(dt).view(self.meta.shape), self.buf[half:].view(dt).view(self.meta.shape)


class CudaIpcReceiver(ShmReceiver):
    """Receives into GPU memory on `device` (default: the current CUDA device); endpoint "cuda-ipc://@name"."""

    backend = "cuda-ipc"
    checksum_algo = CHECKSUM_ALGO

    def __init__(self, *, device: str | torch.device | None = None, **kw: Any) -> None:
        _require_cuda()
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        super().__init__(**kw)

    @property
    def endpoint(self) -> str:
        return f"cuda-ipc://@{self._name}"

    def _open_stream(
        self, meta: wire.KVMeta, header: dict[str, Any], fds: list[int], conn: socket.socket
    ) -> InboundStream:
        if fds:
            raise HeaderError("file descriptors on a cuda-ipc channel", field="fds", request_id=meta.request_id)
        return CudaIpcInbound(meta, self.device)


class CudaIpcOutbound(OutboundStream):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.keep: list[torch.Tensor] = []  # alive until the receiver acked
        self.shared: list[dict[str, Any]] = []  # their descriptors (for the same-process table)
        self.ready: dict[int, Any] = {}  # layer -> CUDA event recorded on the caller's stream

    def send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.device.type != "cuda" or v.device.type != "cuda":
            raise ValueError(f"cuda-ipc sends CUDA tensors; layer {layer} is on {k.device} (use shm or tcp)")
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(k.device))  # the writer thread waits for this layer's kernels
        self.ready[layer] = ev
        super().send_layer(layer, k, v)

    def _write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        ev = self.ready.pop(layer, None)
        if ev is not None:
            ev.synchronize()
        kb, vb = k.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
        digest = gpu_checksum(torch.cat([kb, vb]))
        self.keep += [k, v]
        ipc = [_share(k), _share(v)]
        self.shared += ipc
        frame = wire.encode_frame({"kind": "layer", "layer": layer, "checksum": digest, "ipc": ipc})
        self.sender._send_or_explain(self.conn, frame, self.deadline, self.meta.request_id)

    def finish(self, first_token_id: int | None = None, extra: dict[str, Any] | None = None) -> Any:
        try:
            return super().finish(first_token_id, extra)
        finally:
            self._release_resources()

    def _release_resources(self) -> None:
        _unshare(self.shared)
        self.shared.clear()
        self.keep.clear()


class CudaIpcSender(ShmSender):
    """Sends CUDA tensors to "cuda-ipc://@name" on this node."""

    backend = "cuda-ipc"

    def __init__(self, endpoint: str, *, token: str, link: Any = None, **kw: Any) -> None:
        _require_cuda()
        if not endpoint.startswith("cuda-ipc://@"):
            raise ValueError(f"bad cuda-ipc endpoint {endpoint!r} (expected cuda-ipc://@name)")
        super().__init__("shm://@" + endpoint[len("cuda-ipc://@") :], token=token, link=link, **kw)
        self.endpoint = endpoint
        parse_endpoint("shm://@" + endpoint[len("cuda-ipc://@") :])

    def _open(self, conn: socket.socket, meta: wire.KVMeta, timeout_s: float, layerwise: bool) -> OutboundStream:
        stream = CudaIpcOutbound(self, conn, meta, timeout_s, layerwise)
        frame = wire.encode_frame(meta.begin_header(self._token, checksum_algo=CHECKSUM_ALGO))
        self._send_or_explain(conn, frame, stream.deadline, meta.request_id)
        return stream
