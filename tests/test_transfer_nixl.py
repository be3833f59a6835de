"""The nixl backend (NIXL over UCX, DRAM here): cross-process round trip, layer-wise, refusals."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from labkit.proc import pid_alive, start_process
from labkit.transfer import (AuthError, HeaderError, KVMeta, PayloadError, available_backends, new_token,
                             open_receiver, open_sender)
from labkit.transfer import wire
from labkit.transfer.synthetic import kv_digest, make_kv

pytestmark = pytest.mark.skipif(bool(available_backends()["nixl"]), reason=available_backends()["nixl"] or "")


def _same(a, b) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_nixl_round_trip_from_another_process(tmp_path: Path) -> None:
    token = new_token()
    with open_receiver("nixl", token=token) as rx:
        assert rx.endpoint.startswith("nixl://127.0.0.1:")
        procs = [start_process(f"sender-{r}", [sys.executable, "-m", "labkit.transfer.peer", "send", "--endpoint",
                                               rx.endpoint, "--token", token, "--request-id", r, "--tokens", str(n),
                                               "--seed", str(n), *flags], log_path=tmp_path / f"{r}.log")
                 for r, n, flags in (("whole", 48, []), ("layers", 20, ["--layerwise"]))]
        try:
            got = {r: rx.recv(r, timeout_s=180) for r in ("layers", "whole")}
        finally:
            for p in procs:
                p.stop(timeout_s=10)
                assert not pid_alive(p.pid)
    for r, n in (("whole", 48), ("layers", 20)):
        want = make_kv(r, n, seed=n)
        assert _same(got[r].k, want.k) and _same(got[r].v, want.v) and got[r].meta() == want.meta()
        assert '"error"' not in (tmp_path / f"{r}.log").read_text()


def test_nixl_layerwise_reuses_staging_and_checks_token() -> None:
    token = new_token()
    with open_receiver("nixl", token=token) as rx, open_sender(rx.endpoint, token=token) as tx:
        for rid in ("x1", "x2"):
            kv = make_kv(rid, 30, seed=len(rid))
            with tx.begin(KVMeta.from_export(kv), timeout_s=60) as s:
                for i in reversed(range(kv.num_layers)):
                    s.send_layer(i, kv.k[i], kv.v[i])
                st = s.finish(first_token_id=5)
            got = rx.recv(rid, timeout_s=60)
            assert st.layerwise and kv_digest(got) == kv_digest(kv) and got.first_token_id == 5
        assert len(tx._pool) == 1                      # one registered staging buffer, reused
        with open_sender(rx.endpoint, token=new_token()) as bad, pytest.raises(AuthError):
            bad.send(make_kv("intruder", 4), timeout_s=30)


def test_nixl_bad_descriptors_are_refused() -> None:
    token = new_token()
    kv = make_kv("d", 16)
    with open_receiver("nixl", token=token) as rx, open_sender(rx.endpoint, token=token) as tx:
        s = tx.begin(KVMeta.from_export(kv), timeout_s=30)
        n = kv.nbytes // 2 // kv.num_layers
        # a region the sender never registered: NIXL must refuse to read it
        s.conn.sendall(wire.encode_frame({"kind": "layer", "layer": 0, "checksum": 0,
                                          "descs": [[8, n, 0], [8, n, 0]]}))
        with pytest.raises(PayloadError, match="NIXL READ refused"):
            rx.recv("d", timeout_s=30)
        s.abort()
        s2 = tx.begin(KVMeta.from_export(kv), timeout_s=30)
        s2.conn.sendall(wire.encode_frame({"kind": "layer", "layer": 0, "checksum": 0, "descs": [[1, 2]]}))
        with pytest.raises(HeaderError, match="descs must be two"):
            rx.recv("d", timeout_s=30)
        s2.abort()
