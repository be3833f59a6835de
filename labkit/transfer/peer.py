"""A transfer peer as its own process, for tests, the benchmark and `labkit transfer`.

    python -m labkit.transfer.peer recv --backend shm --token T --count 2
        prints {"endpoint": ...}, then one JSON line per request received (digest, metadata or error)
    python -m labkit.transfer.peer send --endpoint E --token T --request-id r1 --tokens 64 [--layerwise]
        sends a seeded synthetic KV (labkit.transfer.synthetic.make_kv); prints TransferStats as JSON

Token comes from --token or the LABKIT_TRANSFER_TOKEN environment variable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from labkit.transfer import KVMeta, TransferError, open_receiver, open_sender
from labkit.transfer.synthetic import kv_digest, make_kv


def _shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labkit.transfer.peer")
    sub = p.add_subparsers(dest="role", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--backend", default="shm")
    r.add_argument("--token", default=os.environ.get("LABKIT_TRANSFER_TOKEN", ""))
    r.add_argument("--count", type=int, default=1)
    r.add_argument("--timeout-s", type=float, default=30.0)
    r.add_argument("--request-ids", default="", help="comma-separated ids to wait for, in this order")
    r.add_argument("--sink", action="store_true", help="receive and drop until stopped (benchmarks)")
    s = sub.add_parser("send")
    s.add_argument("--endpoint", required=True)
    s.add_argument("--token", default=os.environ.get("LABKIT_TRANSFER_TOKEN", ""))
    s.add_argument("--request-id", default="r0")
    s.add_argument("--tokens", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layerwise", action="store_true")
    s.add_argument("--layer-delay-ms", type=float, default=0.0, help="simulated prefill time per layer")
    s.add_argument("--timeout-s", type=float, default=30.0)
    s.add_argument("--device", default="cpu", help="where the KV lives (cuda for cuda-ipc)")
    _shape_args(s)
    return p


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def run_recv(a: argparse.Namespace) -> int:
    ids = [x for x in a.request_ids.split(",") if x]
    with open_receiver(a.backend, token=a.token) as rx:
        _emit({"endpoint": rx.endpoint, "pid": os.getpid()})
        if a.sink:
            while True:
                try:
                    rx.recv(None, timeout_s=3600)
                except TransferError as e:
                    _emit({"error": type(e).__name__, "message": str(e), "request_id": e.request_id})
        for n in range(len(ids) or a.count):
            rid = ids[n] if ids else None
            try:
                kv = rx.recv(rid, timeout_s=a.timeout_s)
            except TransferError as e:
                _emit({"error": type(e).__name__, "message": str(e), "request_id": e.request_id, "field": e.field})
                continue
            meta = kv.meta()
            meta["digest"] = kv_digest(kv)
            _emit(meta)
    return 0


def run_send(a: argparse.Namespace) -> int:
    kv = make_kv(
        a.request_id,
        a.tokens,
        num_layers=a.layers,
        num_kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        dtype=a.dtype,
        seed=a.seed,
    )
    kv.k, kv.v = kv.k.to(a.device), kv.v.to(a.device)
    try:
        with open_sender(a.endpoint, token=a.token) as tx:
            if a.layerwise:
                meta = KVMeta.from_export(kv)
                with tx.begin(meta, timeout_s=a.timeout_s) as s:
                    for i in range(kv.num_layers):
                        if a.layer_delay_ms:
                            time.sleep(a.layer_delay_ms / 1e3)
                        s.send_layer(i, kv.k[i], kv.v[i])
                    st = s.finish(first_token_id=kv.first_token_id)
            else:
                st = tx.send(kv, timeout_s=a.timeout_s)
    except TransferError as e:
        _emit({"error": type(e).__name__, "message": str(e), "request_id": e.request_id, "field": e.field})
        return 1
    _emit(
        {
            "request_id": st.request_id,
            "backend": st.backend,
            "nbytes": st.nbytes,
            "seconds": st.seconds,
            "layerwise": st.layerwise,
            "digest": kv_digest(kv),
        }
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    return run_recv(a) if a.role == "recv" else run_send(a)


if __name__ == "__main__":
    sys.exit(main())
