"""Bad peers get clear errors, never a hang or a dead receiver: token, header, payload, timeouts."""
from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import threading
import time

import pytest
import torch

from labkit.transfer import (AuthError, HeaderError, KVMeta, PayloadError, TransferError, TransferTimeout,
                             new_token, open_receiver, open_sender)
from labkit.transfer import wire
from labkit.transfer.synthetic import make_kv

BACKENDS = ["shm", "tcp"]


def _raw_connect(endpoint: str) -> socket.socket:
    if endpoint.startswith("tcp://"):
        host, port = endpoint[6:].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=10)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect("\0" + endpoint[len("shm://@"):])
    s.settimeout(10)
    return s


def _reply(s: socket.socket) -> dict:
    return wire.read_frame(s, time.monotonic() + 10)


def _assert_still_serves(rx, token: str) -> None:
    kv = make_kv("after", 5)
    with open_sender(rx.endpoint, token=token) as tx:
        tx.send(kv, timeout_s=10)
    assert rx.recv("after", timeout_s=10).num_tokens == 5


def _begin_header(kv, token: str) -> dict:
    return KVMeta.from_export(kv).begin_header(token)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_token_is_refused_and_not_delivered(backend: str) -> None:
    token = new_token()
    with open_receiver(backend, token=token) as rx:
        with open_sender(rx.endpoint, token=new_token()) as tx, pytest.raises(AuthError, match="wrong or missing token"):
            tx.send(make_kv("r", 8), timeout_s=10)
        with pytest.raises(TransferTimeout, match="request 'r': no KV within 0.3 s"):
            rx.recv("r", timeout_s=0.3)     # an unauthenticated peer cannot fail (or fill) a request slot
        assert rx.rejected == 1
        _assert_still_serves(rx, token)


def test_token_must_be_given() -> None:
    with pytest.raises(ValueError, match="token"):
        open_receiver("tcp", token="")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frame, field", [
    (b"XXXX" + struct.pack("!I", 2) + b"{}", "magic"),
    (wire.MAGIC + struct.pack("!I", wire.MAX_HEADER_BYTES + 1), "header"),
    (wire.MAGIC + struct.pack("!I", 9) + b"not json!", "header"),
    (wire.MAGIC + struct.pack("!I", 2) + b"[]", "header"),
    (wire.encode_frame({"kind": "layer", "layer": 0, "checksum": 1}), "kind"),   # layer before begin
])
def test_corrupt_header_gets_a_named_error(backend: str, frame: bytes, field: str) -> None:
    token = new_token()
    with open_receiver(backend, token=token) as rx:
        s = _raw_connect(rx.endpoint)
        s.sendall(frame)
        reply = _reply(s)
        assert reply["kind"] == "error" and reply["type"] == "HeaderError" and reply["field"] == field
        try:
            assert s.recv(1) == b""       # the receiver closed that connection
        except ConnectionResetError:
            pass
        s.close()
        _assert_still_serves(rx, token)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit, field", [
    ({"num_layers": "4"}, "num_layers"),
    ({"dtype": "int4"}, "dtype"),
    ({"nbytes": 12}, "nbytes"),
    ({"num_tokens": 99}, "num_tokens"),
    ({"prompt_ids": [1, -2]}, "prompt_ids"),
    ({"request_id": ""}, "request_id"),
    ({"version": 0}, "version"),
    ({"checksum_algo": "md5"}, "checksum_algo"),
])
def test_bad_begin_field_is_named_to_both_sides(backend: str, edit: dict, field: str) -> None:
    token = new_token()
    kv = make_kv("bad", 8)
    with open_receiver(backend, token=token, max_request_bytes=1 << 20) as rx:
        s = _raw_connect(rx.endpoint)
        h = _begin_header(kv, token) | edit
        s.sendall(wire.encode_frame(h))
        reply = _reply(s)
        s.close()
        assert (reply["type"], reply["field"]) == ("HeaderError", field), reply
        if isinstance(h["request_id"], str) and h["request_id"]:
            with pytest.raises(HeaderError) as e:
                rx.recv("bad", timeout_s=10)
            assert e.value.field == field


@pytest.mark.parametrize("backend", BACKENDS)
def test_oversized_request_is_refused_before_any_byte(backend: str) -> None:
    token = new_token()
    with open_receiver(backend, token=token, max_request_bytes=1000) as rx, \
            open_sender(rx.endpoint, token=token) as tx:
        with pytest.raises(HeaderError, match="exceeds this receiver's limit") as e:
            tx.send(make_kv("huge", 64), timeout_s=10)
        assert e.value.field == "nbytes"


def test_tcp_truncated_payload() -> None:
    token = new_token()
    kv = make_kv("cut", 16)
    n = kv.nbytes // kv.num_layers
    with open_receiver("tcp", token=token) as rx:
        s = _raw_connect(rx.endpoint)
        s.sendall(wire.encode_frame(_begin_header(kv, token)))
        s.sendall(wire.encode_frame({"kind": "layer", "layer": 0, "checksum": 0, "nbytes": n}))
        s.sendall(b"\0" * (n // 2))
        s.close()
        with pytest.raises(PayloadError, match=rf"truncated, peer closed after {n // 2:,} of {n // 2:,}|truncated"):
            rx.recv("cut", timeout_s=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_that_dies_mid_stream_fails_that_request(backend: str) -> None:
    token = new_token()
    kv = make_kv("dies", 16)
    with open_receiver(backend, token=token) as rx, open_sender(rx.endpoint, token=token) as tx:
        with pytest.raises(RuntimeError, match="prefill crashed"):
            with tx.begin(KVMeta.from_export(kv), timeout_s=10) as s:
                s.send_layer(0, kv.k[0], kv.v[0])
                raise RuntimeError("prefill crashed")
        with pytest.raises(PayloadError, match=r"after [01] of 4 layers"):   # queued layers may not have left
            rx.recv("dies", timeout_s=10)
        _assert_still_serves(rx, token)


def test_tcp_checksum_mismatch_is_caught() -> None:
    token = new_token()
    kv = make_kv("flip", 16)
    kb = bytearray(kv.k[0].contiguous().view(torch.uint8).numpy().tobytes())
    vb = kv.v[0].contiguous().view(torch.uint8).numpy().tobytes()
    digest = wire.layer_checksum(bytes(kb), vb)
    kb[3] ^= 0x40                                       # one flipped bit on the way
    with open_receiver("tcp", token=token) as rx:
        s = _raw_connect(rx.endpoint)
        s.sendall(wire.encode_frame(_begin_header(kv, token)))
        s.sendall(wire.encode_frame({"kind": "layer", "layer": 0, "checksum": digest, "nbytes": len(kb) + len(vb)}))
        s.sendall(bytes(kb) + vb)
        reply = _reply(s)
        s.close()
        assert (reply["type"], reply["field"]) == ("PayloadError", "checksum")
        with pytest.raises(PayloadError, match="layer 0: checksum mismatch"):
            rx.recv("flip", timeout_s=10)


def _memfd(nbytes: int, seals: int, magic: bytes = b"LKVSEG01") -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    os.pwrite(fd, magic, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _shm_begin(s: socket.socket, kv, token: str, fd: int | None, capacity: int, segment: int = 7) -> dict:
    h = _begin_header(kv, token) | {"shm": {"segment": segment, "capacity": capacity, "retire": []}}
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    s.sendmsg([wire.encode_frame(h)], anc)
    return _reply(s)


SEALED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


@pytest.mark.parametrize("case, err, field", [
    ("truncated", "PayloadError", "nbytes"),     # segment smaller than it claims
    ("small", "PayloadError", "nbytes"),         # segment smaller than the request
    ("resizable", "HeaderError", "fd"),          # could shrink under the receiver: SIGBUS risk
    ("no-magic", "HeaderError", "fd"),           # not a labkit segment
    ("unknown-id", "HeaderError", "shm"),        # refers to a segment never sent on this connection
])
def test_shm_bad_segment_is_refused(case: str, err: str, field: str) -> None:
    from labkit.transfer.shm import DATA_OFFSET
    token = new_token()
    kv = make_kv("seg", 64, num_layers=8, num_kv_heads=4, head_dim=32)
    cap = kv.nbytes
    size, seals, magic, cap_hdr = DATA_OFFSET + cap, SEALED, b"LKVSEG01", cap
    if case == "truncated":
        size -= 4096
    elif case == "small":
        size, cap_hdr = DATA_OFFSET + cap // 2, cap // 2
    elif case == "resizable":
        seals = 0
    elif case == "no-magic":
        magic = b"XXXXXXXX"
    with open_receiver("shm", token=token) as rx:
        fd = None if case == "unknown-id" else _memfd(size, seals, magic)
        s = _raw_connect(rx.endpoint)
        reply = _shm_begin(s, kv, token, fd, cap_hdr)
        s.close()
        if fd is not None:
            os.close(fd)
        assert (reply["type"], reply["field"]) == (err, field), reply
        with pytest.raises(TransferError):
            rx.recv("seg", timeout_s=10)


def test_shm_received_kv_is_held_until_dropped() -> None:
    """A segment a receiver still views is never rewritten; once its tensors go, it is reused."""
    import gc

    token = new_token()
    kvs = [make_kv(f"r{i}", 64, seed=i) for i in range(3)]
    with open_receiver("shm", token=token) as rx, open_sender(rx.endpoint, token=token) as tx:
        tx.send(kvs[0])
        first = rx.recv("r0")
        tx.send(kvs[1])                                  # r0 still held: needs a second segment
        second = rx.recv("r1")
        assert len(tx._segments) == 2
        del first
        gc.collect()
        tx.send(kvs[2])                                  # r0's segment is free again: reused
        third = rx.recv("r2")
        assert len(tx._segments) == 2
        for got, want in ((second, kvs[1]), (third, kvs[2])):
            assert torch.equal(got.k.view(torch.uint8), want.k.view(torch.uint8))
            assert torch.equal(got.v.view(torch.uint8), want.v.view(torch.uint8))


def test_recv_timeout_names_the_request() -> None:
    with open_receiver("shm", token=new_token()) as rx:
        with pytest.raises(TransferTimeout, match=r"request 'nobody': no KV within 0.2 s .*never started arriving"):
            rx.recv("nobody", timeout_s=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stalled_sender_times_out_on_the_receiver(backend: str) -> None:
    token = new_token()
    kv = make_kv("stall", 8)
    with open_receiver(backend, token=token, stall_timeout_s=0.3) as rx, \
            open_sender(rx.endpoint, token=token) as tx:
        s = tx.begin(KVMeta.from_export(kv), timeout_s=10)      # begins, then sends nothing
        with pytest.raises(TransferTimeout, match=r"sender stalled: no frame for 0.3 s after 0 of 4 layers"):
            rx.recv("stall", timeout_s=10)
        s.abort()


def test_sender_times_out_on_a_silent_receiver() -> None:
    token = new_token()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    held: list[socket.socket] = []
    t = threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True)
    t.start()
    try:
        with open_sender(f"tcp://127.0.0.1:{srv.getsockname()[1]}", token=token) as tx:
            with pytest.raises(TransferTimeout, match="ack for 'quiet'") as e:
                tx.send(make_kv("quiet", 8), timeout_s=0.5)
            assert e.value.request_id == "quiet"
    finally:
        t.join(5)
        for c in held:
            c.close()
        srv.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_receiver_gives_a_clear_error(backend: str) -> None:
    token = new_token()
    rx = open_receiver(backend, token=token)
    endpoint = rx.endpoint
    rx.close()
    with open_sender(endpoint, token=token) as tx, pytest.raises(TransferError, match="cannot connect"):
        tx.send(make_kv("r", 4), timeout_s=5)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="unknown transfer backend 'udp'"):
        open_receiver("udp", token=new_token())
    with pytest.raises(ValueError, match="no known scheme"):
        open_sender("127.0.0.1:5000", token=new_token())
    with pytest.raises(ValueError, match="bad tcp endpoint"):
        open_sender("tcp://host", token=new_token())
    with pytest.raises(HeaderError, match="num_layers") as e:
        KVMeta(request_id="r", model_fingerprint="m", prompt_ids=(1,), num_layers=0, num_kv_heads=1, head_dim=1,
               dtype="float32", block_size=1)
    assert e.value.field == "num_layers"
    token = new_token()
    with open_receiver("tcp", token=token) as rx, open_sender(rx.endpoint, token=token) as tx:
        kv = make_kv("s", 4)
        with tx.begin(KVMeta.from_export(kv)) as s:
            with pytest.raises(ValueError, match=r"k of layer 0: shape \(3, 2, 16\)"):
                s.send_layer(0, kv.k[0, :3], kv.v[0])
            s.abort()
