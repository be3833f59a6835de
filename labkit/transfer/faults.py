"""Fault injection for the reliability tests: a Sender that breaks the link, set by `LABKIT_FAULT`.

Off unless the variable is set: only then does a prefill worker (labkit.serve.worker, which reads it
once at start and logs a warning) wrap its KV senders in `FaultySender`; without it the real sender
is used as it is. Settings:

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
from typing import Any, Self

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
            raise ValueError(f"{ENV}={text!r}: expected KIND:N with N a layer count, e.g. transfer_cut_after_layers:1")
        return cls(kind.strip(), int(n))

    @classmethod
    def from_env(cls) -> Fault:
        return cls.parse(os.environ.get(ENV, ""))

    def __bool__(self) -> bool:
        return bool(self.kind)


class FaultySender:
    """A Sender that passes `fault.after_layers` layers of every transfer (whole or layer-wise) and
    drops the rest; at `finish` it cuts the connection (TransferError) or stays silent with it open
    until the transfer's deadline (TransferTimeout), as a broken link would. The receiver sees the
    cut or the silence and fails the request."""

    def __init__(self, sender: Any, fault: Fault) -> None:
        self.sender = sender
        self.fault = fault

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sender, name)

    def begin(self, meta: Any, timeout_s: float = 30.0) -> _FaultyStream:
        return _FaultyStream(self.sender.begin(meta, timeout_s=timeout_s), self.fault, meta.num_layers)

    def send(self, kv: Any, timeout_s: float = 30.0) -> Any:
        from labkit.transfer.wire import KVMeta

        with self.begin(KVMeta.from_export(kv), timeout_s) as stream:
            for i in range(kv.num_layers):
                stream.send_layer(i, kv.k[i], kv.v[i])
            return stream.finish(first_token_id=kv.first_token_id)


class _FaultyStream:
    def __init__(self, stream: Any, fault: Fault, num_layers: int) -> None:
        self.stream = stream
        self.fault = fault
        self.num_layers = num_layers
        self.passed = min(fault.after_layers, num_layers - 1)  # at least one layer never arrives

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self.stream.abort()

    def send_layer(self, layer: int, k: Any, v: Any) -> None:
        if layer < self.passed:
            self.stream.send_layer(layer, k, v)

    def finish(self, first_token_id: int | None = None, extra: Any = None) -> Any:
        from labkit.transfer.errors import TransferError, TransferTimeout

        what = f"after {self.passed} of {self.num_layers} layers"
        if self.fault.kind == "transfer_stall_after_layers":
            while (left := self.stream.deadline - time.monotonic()) > 0:  # silent, the connection held open
                time.sleep(min(0.05, left))
            self.stream.abort()
            raise TransferTimeout(
                f"fault injected ({ENV}): stalled {what} for {self.stream.timeout_s:g} s",
                request_id=self.stream.meta.request_id,
            )
        self.stream.abort()
        raise TransferError(f"fault injected ({ENV}): connection cut {what}", request_id=self.stream.meta.request_id)


def wrap_sender(sender: Any, fault: Fault) -> Any:
    """`sender` itself without a fault, else the FaultySender around it."""
    return FaultySender(sender, fault) if fault else sender
