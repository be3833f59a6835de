"""KV-cache transfer between processes: one interface, several transports.

    from labkit.transfer import open_receiver, open_sender, new_token

    token = new_token()                                   # one per deployment, given to every worker
    rx = open_receiver("shm", token=token)                # decode worker; "tcp" works across hosts
    tx = open_sender(rx.endpoint, token=token)            # prefill worker
    stats = tx.send(kv)                                   # kv: labkit.kv.KVExport -> TransferStats
    kv = rx.recv("req-1", timeout_s=30)                   # validated KVExport, or TransferTimeout

    # layer-wise: start before prefill, send each layer as soon as it is computed
    with tx.begin(KVMeta(...), timeout_s=30) as s:
        for i in range(num_layers):
            s.send_layer(i, k_i, v_i)                     # k_i, v_i: [num_tokens, num_kv_heads, head_dim]
        stats = s.finish(first_token_id=tok)

Backends: "shm" (same host, shared memory, one copy), "tcp" (any host; `link=Link.from_gbps(...)`
emulates a slower network), "nixl" (NIXL/UCX, when installed), "cuda-ipc" (GPU to GPU on one
node). Receivers accept any number of senders; arrivals wait in an inbox until `recv` claims
them. Every header is validated (wire.py) and authenticated with the token before a byte
is adopted; errors are TransferError subclasses that name the request and the field.
"""

from __future__ import annotations

import secrets
from typing import Any

from labkit.links import LINKS, Link
from labkit.transfer.base import TransferStats
from labkit.transfer.errors import (
    AuthError,
    HeaderError,
    PayloadError,
    TransferError,
    TransferTimeout,
)
from labkit.transfer.receiver import Receiver
from labkit.transfer.sender import OutboundStream, Sender
from labkit.transfer.wire import KVMeta, KVSpec

BACKENDS = ("shm", "tcp", "nixl", "cuda-ipc")

__all__ = [
    "BACKENDS",
    "LINKS",
    "AuthError",
    "HeaderError",
    "KVMeta",
    "KVSpec",
    "Link",
    "OutboundStream",
    "PayloadError",
    "Receiver",
    "Sender",
    "TransferError",
    "TransferStats",
    "TransferTimeout",
    "available_backends",
    "new_token",
    "open_receiver",
    "open_sender",
]


def new_token() -> str:
    """A fresh random per-deployment token: 48 hex characters (192 bits; never starts with "-",
    so it is safe on a command line)."""
    return secrets.token_hex(24)


def open_receiver(
    backend: str, *, token: str, host: str = "127.0.0.1", port: int = 0, expect: KVSpec | None = None, **kw: Any
) -> Receiver:
    """Starts a receiver; returns it (its `endpoint` is what senders connect to; `close()` it).

    backend: "shm" | "tcp" | "nixl" | "cuda-ipc". host/port: where tcp (and nixl's control
    channel) listens. expect: the receiving model's shape; a request that does not fit it is
    refused with HeaderError naming the field. Other keywords: max_request_bytes,
    stall_timeout_s (a sender silent mid-transfer this long fails it), unclaimed_ttl_s.
    """
    if backend == "shm":
        from labkit.transfer.shm import ShmReceiver

        return ShmReceiver(token=token, expect=expect, **kw)
    if backend == "tcp":
        from labkit.transfer.tcp import TcpReceiver

        return TcpReceiver(token=token, host=host, port=port, expect=expect, **kw)
    if backend == "nixl":
        from labkit.transfer.nixl_backend import NixlReceiver

        return NixlReceiver(token=token, host=host, port=port, expect=expect, **kw)
    if backend == "cuda-ipc":
        from labkit.transfer.cuda_ipc import CudaIpcReceiver

        return CudaIpcReceiver(token=token, expect=expect, **kw)
    raise ValueError(f"unknown transfer backend {backend!r}; choose from {BACKENDS}")


def open_sender(endpoint: str, *, token: str, link: Link | None = None, **kw: Any) -> Sender:
    """A sender for `endpoint` (the backend comes from its scheme: shm://, tcp://, nixl://, cuda-ipc://).

    link: emulate a slower network (tcp only). Other keywords: connect_timeout_s; shm: pool_free_max_bytes.
    """
    scheme = endpoint.split("://", 1)[0] if "://" in endpoint else ""
    if scheme == "shm":
        from labkit.transfer.shm import ShmSender

        return ShmSender(endpoint, token=token, link=link, **kw)
    if scheme == "tcp":
        from labkit.transfer.tcp import TcpSender

        return TcpSender(endpoint, token=token, link=link, **kw)
    if scheme == "nixl":
        from labkit.transfer.nixl_backend import NixlSender

        return NixlSender(endpoint, token=token, link=link, **kw)
    if scheme == "cuda-ipc":
        from labkit.transfer.cuda_ipc import CudaIpcSender

        return CudaIpcSender(endpoint, token=token, link=link, **kw)
    raise ValueError(
        f"endpoint {endpoint!r} has no known scheme; expected one of "
        f"{', '.join(b + '://' for b in BACKENDS)} (take it from receiver.endpoint)"
    )


def available_backends() -> dict[str, str]:
    """Backend name -> "" if usable here, else why not (for the notebook, the CLI and tests)."""
    out = {"shm": "", "tcp": ""}
    try:
        import nixl._api  # noqa: F401 - imported only to see that it loads

        out["nixl"] = ""
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        out["nixl"] = f"nixl not importable ({e.__class__.__name__}); pip install nixl"
    try:
        import torch

        out["cuda-ipc"] = "" if torch.cuda.is_available() else "no CUDA GPU"
    except Exception as e:  # noqa: BLE001 - any failure means "not here", named in the reply
        out["cuda-ipc"] = f"torch.cuda unusable ({e.__class__.__name__})"
    return out
