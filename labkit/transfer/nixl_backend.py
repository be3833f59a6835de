"""`nixl`: KV bytes moved by NIXL (the transfer library under vLLM's NixlConnector and NVIDIA
Dynamo), over UCX; control frames on our own authenticated TCP channel ("nixl://host:port").

As in vLLM, the decode side pulls: the sender copies each layer into a NIXL-registered
staging buffer (registered once and reused, as an engine registers its KV cache once) and
sends a `layer` frame with that layer's descriptors; the receiver READs the layer into its
own registered buffer and verifies the checksum. Agent metadata travels base64-encoded in
the JSON `begin` header and is loaded only after the token checked out; descriptors are
plain (address, length, device) numbers, never NIXL's pickled descriptor lists.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import socket
import threading
import time
from typing import Any

import torch

from labkit.transfer import wire
from labkit.transfer.base import TransferStats, log, tensor_bytes
from labkit.transfer.errors import HeaderError, PayloadError, TransferError, TransferTimeout
from labkit.transfer.receiver import InboundStream
from labkit.transfer.sender import OutboundStream
from labkit.transfer.tcp import TcpReceiver, TcpSender

MAX_METADATA_BYTES = 1 << 20


def _new_agent(role: str) -> Any:
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except Exception as e:  # noqa: BLE001 - an optional extra
        raise TransferError(f"the nixl backend needs NIXL: pip install nixl ({e.__class__.__name__}: {e})") from None
    import logging
    import os

    if not os.environ.get("NIXL_LOG_LEVEL"):
        logging.getLogger("nixl").setLevel(logging.WARNING)  # its INFO lines drown notebook output
    cfg = nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False, backends=["UCX"])
    return nixl_agent(f"labkit-{role}-{secrets.token_hex(6)}", cfg)


class NixlInbound(InboundStream):
    def __init__(self, meta: wire.KVMeta, receiver: NixlReceiver, remote_agent: str) -> None:
        super().__init__(meta)
        self.rx = receiver
        self.remote = remote_agent
        self.buf = torch.empty(meta.nbytes, dtype=torch.uint8)
        with receiver._nixl_lock:
            self.reg = receiver.agent.register_memory(self.buf)
        self.view = self.buf.numpy().data

    def add_layer(
        self, layer: int, checksum: int, header: dict[str, Any], conn: socket.socket, deadline: float | None
    ) -> None:
        m = self.meta
        n, half = m.layer_nbytes, m.nbytes // 2
        descs = header.get("descs")
        if (
            not isinstance(descs, list)
            or len(descs) != 2
            or not all(
                isinstance(d, list) and len(d) == 3 and all(wire._is_int(x) and x >= 0 for x in d) for d in descs
            )
            or any(d[1] != n for d in descs)
        ):
            raise HeaderError(
                f"layer {layer}: descs must be two [address, {n}, device] triples (K, V)",
                field="descs",
                request_id=m.request_id,
            )
        base = self.buf.data_ptr()
        local = [(base + layer * n, n, 0), (base + half + layer * n, n, 0)]
        agent = self.rx.agent
        with self.rx._nixl_lock:
            try:
                ld = agent.get_xfer_descs(local, "DRAM")
                rd = agent.get_xfer_descs([tuple(d) for d in descs], "DRAM")
                handle = agent.initialize_xfer("READ", ld, rd, self.remote)
                state = agent.transfer(handle)
            except Exception as e:  # noqa: BLE001 - NIXL raises its own error types
                raise PayloadError(
                    f"layer {layer}: NIXL READ refused ({e.__class__.__name__}: {e})",
                    field="descs",
                    request_id=m.request_id,
                ) from None
        try:
            while state == "PROC":
                if deadline is not None and time.monotonic() > deadline:
                    raise TransferTimeout(f"layer {layer}: NIXL READ not done in time", request_id=m.request_id)
                time.sleep(0)
                with self.rx._nixl_lock:
                    state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise PayloadError(f"layer {layer}: NIXL READ failed ({state})", request_id=m.request_id)
        finally:
            with self.rx._nixl_lock:
                try:
                    handle.release()
                except Exception as e:  # noqa: BLE001 - still in flight: NIXL keeps it and frees it later
                    log.debug("layer %d: NIXL handle not released now (%s); NIXL frees it when done", layer, e)
        wire.verify_layer(
            self.view[layer * n : (layer + 1) * n],
            self.view[half + layer * n : half + (layer + 1) * n],
            checksum,
            m,
            layer,
        )

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._deregister()
        dt, half = getattr(torch, self.meta.dtype), self.meta.nbytes // 2
        return self.buf[:half].view(dt).view(self.meta.shape), self.buf[half:].view(dt).view(self.meta.shape)

    def _deregister(self) -> None:
        if self.reg is not None:
            with self.rx._nixl_lock:
                self.rx.agent.deregister_memory(self.reg)
            self.reg = None

    def abort(self) -> None:
        self._deregister()


class NixlReceiver(TcpReceiver):
    """A NIXL agent plus a TCP control listener; `endpoint` is "nixl://host:port"."""

    backend = "nixl"

    def __init__(self, **kw: Any) -> None:
        self.agent = _new_agent("rx")
        self._nixl_lock = threading.Lock()  # one agent, many connection threads
        self._loaded: dict[str, str] = {}  # remote agent name -> digest of its loaded metadata
        super().__init__(**kw)

    def _open_stream(
        self, meta: wire.KVMeta, header: dict[str, Any], fds: list[int], conn: socket.socket
    ) -> InboundStream:
        if fds:
            raise HeaderError("file descriptors on a nixl channel", field="fds", request_id=meta.request_id)
        info = header.get("nixl")
        if not isinstance(info, dict) or not isinstance(info.get("metadata"), str):
            raise HeaderError("begin lacks nixl.metadata", field="nixl", request_id=meta.request_id)
        try:
            md = base64.b64decode(info["metadata"], validate=True)
        except ValueError:
            raise HeaderError("nixl.metadata is not base64", field="nixl", request_id=meta.request_id) from None
        if len(md) > MAX_METADATA_BYTES:
            raise HeaderError("nixl.metadata too large", field="nixl", request_id=meta.request_id)
        digest = hashlib.sha256(md).hexdigest()
        with self._nixl_lock:
            try:
                name = self.agent.add_remote_agent(md)
            except Exception as e:  # noqa: BLE001 - NIXL raises its own error types; re-raised as HeaderError
                raise HeaderError(
                    f"NIXL cannot load the sender's metadata ({e.__class__.__name__})",
                    field="nixl",
                    request_id=meta.request_id,
                ) from None
        name = name.decode() if isinstance(name, bytes) else str(name)
        self._loaded[name] = digest
        return NixlInbound(meta, self, name)


class NixlOutbound(OutboundStream):
    sender: NixlSender

    def __init__(
        self,
        sender: NixlSender,
        conn: socket.socket,
        meta: wire.KVMeta,
        timeout_s: float,
        layerwise: bool,
        staging: torch.Tensor,
    ) -> None:
        super().__init__(sender, conn, meta, timeout_s, layerwise)
        self.staging = staging
        self.view = staging.numpy().data

    def _write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n, half = self.meta.layer_nbytes, self.meta.nbytes // 2
        self.view[layer * n : (layer + 1) * n] = tensor_bytes(k)
        self.view[half + layer * n : half + (layer + 1) * n] = tensor_bytes(v)
        digest = wire.layer_checksum(
            self.view[layer * n : (layer + 1) * n], self.view[half + layer * n : half + (layer + 1) * n]
        )
        base = self.staging.data_ptr()
        frame = wire.encode_frame(
            {
                "kind": "layer",
                "layer": layer,
                "checksum": digest,
                "descs": [[base + layer * n, n, 0], [base + half + layer * n, n, 0]],
            }
        )
        self.sender._send_or_explain(self.conn, frame, self.deadline, self.meta.request_id)

    def finish(self, first_token_id: int | None = None, extra: dict[str, Any] | None = None) -> TransferStats:
        try:
            return super().finish(first_token_id, extra)
        finally:
            self.sender._give_back(self.staging)

    def _release_resources(self) -> None:
        self.sender._give_back(self.staging)


class NixlSender(TcpSender):
    """Sends to "nixl://host:port"; its NIXL agent registers staging buffers once and reuses them."""

    backend = "nixl"

    def __init__(self, endpoint: str, *, token: str, link: Any = None, **kw: Any) -> None:
        if link is not None:
            raise ValueError("link shaping is a tcp feature; NIXL moves bytes at its own speed")
        super().__init__(endpoint, token=token, **kw)
        self.agent = _new_agent("tx")
        self._pool: list[torch.Tensor] = []  # registered, free
        self._regs: dict[int, Any] = {}  # data_ptr -> registration
        self._pool_lock = threading.Lock()

    def _take(self, nbytes: int) -> torch.Tensor:
        with self._pool_lock:
            for i, t in enumerate(self._pool):
                if nbytes <= t.numel() <= 2 * nbytes + (1 << 20):
                    return self._pool.pop(i)
        t = torch.empty(nbytes, dtype=torch.uint8)
        t.fill_(0)  # fault the pages in before registering
        with self._pool_lock:
            self._regs[t.data_ptr()] = self.agent.register_memory(t)
        return t

    def _give_back(self, t: torch.Tensor) -> None:
        with self._pool_lock:
            if all(x is not t for x in self._pool):
                self._pool.append(t)

    def close(self) -> None:
        super().close()
        with self._pool_lock:
            for t in self._pool:
                reg = self._regs.pop(t.data_ptr(), None)
                if reg is not None:
                    self.agent.deregister_memory(reg)
            self._pool.clear()

    def _open(self, conn: socket.socket, meta: wire.KVMeta, timeout_s: float, layerwise: bool) -> OutboundStream:
        staging = self._take(meta.nbytes)
        stream = NixlOutbound(self, conn, meta, timeout_s, layerwise, staging)
        header = meta.begin_header(self._token)
        header["nixl"] = {"metadata": base64.b64encode(self.agent.get_agent_metadata()).decode()}
        try:
            self._send_or_explain(conn, wire.encode_frame(header), stream.deadline, meta.request_id)
        except BaseException:
            self._give_back(staging)
            raise
        return stream


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401 - imported only to see that it loads

        return True
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
