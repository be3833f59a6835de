"""Shared pieces of every backend: the stats a transfer returns, byte views, tokens, socket helpers.

The receiving side (inbox, connection loop, validation) is in receiver.py, the sending side
(streams, connection pool) in sender.py; a backend supplies how frames and bytes move.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import torch

from labkit.transfer import wire

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
    # ndarray.data is memoryview(arr); numpy's stubs give ndarray the buffer protocol only on Python 3.12+
    return t.view(torch.uint8).reshape(-1).numpy().data


def check_token(token: str) -> str:
    if not isinstance(token, str) or len(token) < 8:
        raise ValueError(
            "token must be a string of at least 8 characters (one per deployment; "
            "labkit.transfer.new_token() makes one)"
        )
    return token


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
            conn.recv(1, socket.MSG_PEEK)
        finally:
            conn.setblocking(True)
        return False  # EOF, or bytes nobody asked for: either way not reusable
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
    try:
        os.close(fd)
    except OSError:
        pass
