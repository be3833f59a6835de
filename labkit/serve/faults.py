"""Fault injection for the reliability tests: `LABKIT_FAULT`, read once when a worker starts.

Off unless the variable is set; a worker that has one logs a warning at start. Settings:

    LABKIT_FAULT=transfer_cut_after_layers:N    the prefill worker sends N layers of every KV
                                                transfer, then drops the connection (a cable cut)
    LABKIT_FAULT=transfer_stall_after_layers:N  it sends N layers, then goes silent holding the
                                                connection open until the transfer's deadline
                                                (a dead link: the sender is stuck, not closed)

Other faults need no hook: `kill -9` a process, `SIGSTOP` it for a slow worker (tests/test_faults.py).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

ENV = "LABKIT_FAULT"
KINDS = ("transfer_cut_after_layers", "transfer_stall_after_layers")


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault: `kind` ("" for none) and the layer count it strikes after."""

    kind: str = ""
    after_layers: int = 0

    def __post_init__(self) -> None:
        if self.kind and self.kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {self.kind!r}; choose from {KINDS}")
        if self.after_layers < 0:
            raise ValueError(f"{ENV}: the layer count must be >= 0, got {self.after_layers}")

    @classmethod
    def parse(cls, text: str) -> Fault:
        """`"kind:N"` -> Fault; `""` -> no fault. ValueError naming the bad setting."""
        text = text.strip()
        if not text:
            return cls()
        kind, _, n = text.partition(":")
        if not n.strip().isdigit():
            raise ValueError(f"{ENV}={text!r}: expected KIND:N with N a layer count, e.g. "
                             "transfer_cut_after_layers:1")
        return cls(kind.strip(), int(n))

    @classmethod
    def from_env(cls) -> Fault:
        return cls.parse(os.environ.get(ENV, ""))

    def __bool__(self) -> bool:
        return bool(self.kind)


def send_kv(sender: Any, kv: Any, timeout_s: float, fault: Fault) -> Any:
    """`sender.send(kv, timeout_s)` (returns its TransferStats), or the injected fault.

    With a fault it raises TransferError (cut) or TransferTimeout (stall, after `timeout_s`),
    as a real broken link would; the receiver sees the cut or the silence and fails the request.
    """
    if not fault:
        return sender.send(kv, timeout_s=timeout_s)
    from labkit.transfer import TransferError, TransferTimeout
    from labkit.transfer.wire import KVMeta

    n = min(fault.after_layers, int(kv.num_layers) - 1)
    with sender.begin(KVMeta.from_export(kv), timeout_s=timeout_s) as stream:  # an exception inside aborts it
        for i in range(n):
            stream.send_layer(i, kv.k[i], kv.v[i])
        if fault.kind == "transfer_cut_after_layers":
            raise TransferError(f"fault injected ({ENV}): connection cut after {n} of {kv.num_layers} layers",
                                request_id=kv.request_id)
        while time.monotonic() < stream.deadline:  # silent, connection held open, until the deadline
            time.sleep(min(0.05, max(0.0, stream.deadline - time.monotonic())))
        raise TransferTimeout(f"fault injected ({ENV}): stalled after {n} of {kv.num_layers} layers "
                              f"for {timeout_s:g} s", request_id=kv.request_id)
