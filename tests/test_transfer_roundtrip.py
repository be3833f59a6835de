"""KV transfer round trips across real separate processes: bit-exact, metadata validated, nothing leaked."""
from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from labkit.proc import Child, pid_alive, start_process
from labkit.transfer import KVMeta, KVSpec, HeaderError, new_token, open_receiver, open_sender
from labkit.transfer.synthetic import kv_digest, make_kv

BACKENDS = ["shm", "tcp"]


def _peer(tmp_path: Path, name: str, *args: str) -> Child:
    return start_process(name, [sys.executable, "-m", "labkit.transfer.peer", *args],
                         log_path=tmp_path / f"{name}.log")


def _lines(child: Child, n: int, timeout_s: float = 180.0) -> list[dict]:
    """The first `n` JSON lines the peer printed (its log), waiting up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = child.log_path.read_text() if child.log_path and child.log_path.exists() else ""
        rows = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
        if len(rows) >= n:
            return rows[:n]
        if not child.alive() and len(rows) < n:
            break
        time.sleep(0.05)
    raise AssertionError(f"{child.name} printed {text!r} (wanted {n} JSON lines)")


def _stop(*children: Child) -> None:
    for c in children:
        c.stop(timeout_s=5)
        assert not pid_alive(c.pid), f"{c.name} pid {c.pid} still alive"


def _same(a, b) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _shm_entries() -> set[str]:
    """labkit's entries in /dev/shm (other programs on a shared machine add and remove their own).

    The shm backend uses memfd segments, which never get a name there; `_memfds` checks that
    none of them stays open either.
    """
    return {e for e in os.listdir("/dev/shm") if "labkit" in e} if os.path.isdir("/dev/shm") else set()


def _memfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
        except OSError:
            pass
    return n


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_sender_processes_any_order_bit_exact(backend: str, tmp_path: Path) -> None:
    token = new_token()
    shm_before = _shm_entries()
    with open_receiver(backend, token=token) as rx:
        env_args = ["--endpoint", rx.endpoint, "--token", token, "--layers", "3", "--kv-heads", "2",
                    "--head-dim", "8"]
        a = _peer(tmp_path, "sender-a", "send", *env_args, "--request-id", "a", "--tokens", "40", "--seed", "1")
        b = _peer(tmp_path, "sender-b", "send", *env_args, "--request-id", "b", "--tokens", "17", "--seed", "2",
                  "--layerwise")
        try:
            got_b = rx.recv("b", timeout_s=180)     # claimed out of arrival order
            got_a = rx.recv("a", timeout_s=180)
            stats_a, stats_b = _lines(a, 1)[0], _lines(b, 1)[0]
        finally:
            _stop(a, b)
    for got, stats, seed, n in ((got_a, stats_a, 1, 40), (got_b, stats_b, 2, 17)):
        want = make_kv(got.request_id, n, num_layers=3, num_kv_heads=2, head_dim=8, seed=seed)
        assert _same(got.k, want.k) and _same(got.v, want.v)
        assert got.meta() == want.meta()
        assert stats["digest"] == kv_digest(got) and stats["nbytes"] == want.nbytes == got.nbytes
    assert stats_b["layerwise"] is True and stats_a["layerwise"] is False
    assert _shm_entries() == shm_before


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_receiver_process_gets_what_we_sent(backend: str, dtype: str, tmp_path: Path) -> None:
    token = new_token()
    rx = _peer(tmp_path, "receiver", "recv", "--backend", backend, "--token", token, "--request-ids", "x,y")
    try:
        endpoint = _lines(rx, 1)[0]["endpoint"]
        assert endpoint.startswith(f"{backend}://")
        with open_sender(endpoint, token=token) as tx:
            kvs = [make_kv(r, n, dtype=dtype, seed=s) for r, n, s in (("y", 33, 5), ("x", 64, 6))]
            stats = [tx.send(kv, timeout_s=30) for kv in kvs]
        rows = _lines(rx, 3)[1:]
    finally:
        _stop(rx)
    by_id = {r["request_id"]: r for r in rows}
    for kv, st in zip(kvs, stats):
        assert by_id[kv.request_id]["digest"] == kv_digest(kv)
        assert by_id[kv.request_id]["dtype"] == dtype and by_id[kv.request_id]["num_tokens"] == kv.num_tokens
        assert st.nbytes == kv.nbytes and st.seconds > 0 and st.backend == backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_layerwise_stream_out_of_order_with_late_first_token(backend: str) -> None:
    token = new_token()
    kv = make_kv("lw", 50, num_layers=6, seed=9)
    meta = KVMeta(request_id="lw", model_fingerprint=kv.model_fingerprint, prompt_ids=tuple(kv.prompt_ids),
                  num_layers=6, num_kv_heads=kv.num_kv_heads, head_dim=kv.head_dim, dtype=kv.dtype,
                  block_size=kv.block_size, extra={"trace": "t1"})
    assert meta.first_token_id is None          # not sampled yet when streaming starts
    with open_receiver(backend, token=token) as rx, open_sender(rx.endpoint, token=token) as tx:
        with tx.begin(meta, timeout_s=30) as s:
            for i in (0, 2, 1, 3, 5, 4):
                s.send_layer(i, kv.k[i], kv.v[i])
            st = s.finish(first_token_id=123, extra={"ttft_s": 0.5})
        got = rx.recv("lw", timeout_s=30)
    assert st.layerwise and st.num_layers == 6 and st.nbytes == kv.nbytes
    assert _same(got.k, kv.k) and _same(got.v, kv.v)
    assert got.first_token_id == 123 and got.extra == {"trace": "t1", "ttft_s": 0.5}


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_payload_and_no_leaks(backend: str) -> None:
    token = new_token()
    shm_before, memfd_before = _shm_entries(), _memfds()
    kv = make_kv("big", 4096, num_layers=8, num_kv_heads=4, head_dim=64, dtype="bfloat16", seed=3)
    assert kv.nbytes == 32 << 20
    with open_receiver(backend, token=token) as rx, open_sender(rx.endpoint, token=token) as tx:
        for rid in ("big", "big2"):             # the second reuses the sender's connection
            kv.request_id = rid
            tx.send(kv)
            got = rx.recv(rid, timeout_s=60)
            assert _same(got.k, kv.k) and _same(got.v, kv.v)
            if backend == "shm":
                got.k[0, 0, 0, 0] = 1.0         # the receiver's KV is writable (its own until it drops it)
    del got
    gc.collect()
    assert _shm_entries() == shm_before
    assert _memfds() == memfd_before, "a shared memory segment is still open"


@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_refuses_a_model_mismatch(backend: str) -> None:
    token = new_token()
    kv = make_kv("m", 8, num_kv_heads=2)
    spec = KVSpec(model_fingerprint="synthetic", num_layers=4, num_kv_heads=8, head_dim=16, dtype="bfloat16")
    with open_receiver(backend, token=token, expect=spec) as rx, open_sender(rx.endpoint, token=token) as tx:
        with pytest.raises(HeaderError, match="num_kv_heads: got 2, this receiver's model needs 8") as e:
            tx.send(kv, timeout_s=10)
        assert e.value.field == "num_kv_heads"
        with pytest.raises(HeaderError, match="num_kv_heads"):
            rx.recv("m", timeout_s=10)             # the decode side learns it at once, no timeout
        kv2 = make_kv("ok", 8, num_kv_heads=8)
        tx.send(kv2, timeout_s=10)                 # a fresh connection after the refusal
        assert rx.recv("ok", timeout_s=10).num_kv_heads == 8
