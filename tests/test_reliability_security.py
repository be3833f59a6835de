"""Security checks on a real 1P1D server (tiny model, tcp KV transport so the KV channel is a
real TCP listener): every listener on loopback, the KV channel refuses a wrong deployment token
and garbage, no secret in /health or /metrics, size limits on the workers' ports too, and no
pickle / torch.load / eval anywhere a peer's bytes could reach (a source scan of labkit/).
See docs/threat-model.md for what is and is not protected.
"""
from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from labkit.proc import LOOPBACK, pid_alive
from labkit.serve.limits import MAX_BODY_BYTES
from reliability_helpers import CLIENT_TIMEOUT_S, Topology, assert_openai_error, complete, pools_full, worker_health

LABKIT = Path(__file__).resolve().parents[1] / "labkit"


@pytest.fixture(scope="module")
def topo(tiny_model_dir: Any) -> Any:
    t = Topology(transfer="tcp").start()
    yield t
    pids = [p.pid for p in t.procs]
    t.stop()
    assert not [p for p in pids if pid_alive(p)]


def _listening(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every TCP/UDP socket `pid` and its children listen on."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    out = []
    for p in procs:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                out.append((c.laddr.ip, c.laddr.port))
    return out


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_every_listener_binds_loopback(topo: Topology) -> None:
    assert topo.decode is not None
    kv_endpoint = worker_health(topo.decode)["kv_endpoint"]
    assert kv_endpoint.startswith("tcp://127.0.0.1:"), kv_endpoint
    expected = {p.name: {_port(p.url)} for p in topo.procs}
    expected["decode0"].add(int(kv_endpoint.rsplit(":", 1)[1]))
    for p in topo.procs:
        socks = _listening(p.pid)
        assert {port for _, port in socks} >= expected[p.name], (p.name, socks)
        exposed = [(ip, port) for ip, port in socks if ip != LOOPBACK]
        assert not exposed, f"{p.name} listens beyond loopback: {exposed}"


def test_defaults_are_loopback() -> None:
    from labkit.serve import router, worker

    assert router.parse_args(["--port", "1", "--mono", "http://127.0.0.1:2"]).host == LOOPBACK
    assert worker.parse_args(["--role", "mono", "--port", "1"]).host == LOOPBACK
    assert router.RouterConfig(mono=("http://x",)).host == LOOPBACK


def test_kv_channel_refuses_a_wrong_token(topo: Topology) -> None:
    from labkit.transfer import AuthError, open_sender
    from labkit.transfer.synthetic import make_kv

    assert topo.decode is not None
    h0 = worker_health(topo.decode)
    endpoint = h0["kv_endpoint"]
    kv = make_kv("intruder-1", 8, num_layers=4, num_kv_heads=2, head_dim=64, dtype="float32")
    with open_sender(endpoint, token="not-the-deployment-token", connect_timeout_s=5) as tx:
        with pytest.raises(AuthError):
            tx.send(kv, timeout_s=5)
    # nothing was adopted: asking the decode worker for that request times out cleanly
    r = httpx.post(topo.decode.url + "/internal/decode", json={"request_id": "intruder-1", "timeout_s": 0.5},
                   timeout=CLIENT_TIMEOUT_S)
    assert_openai_error(r, 504, None, "kv_timeout")
    h1 = worker_health(topo.decode)
    assert h1["kv_transfer_bytes_total"] == h0["kv_transfer_bytes_total"] and h1["kv_blocks_used"] == 0
    complete(topo.url, max_tokens=4)  # the real deployment still works


def test_kv_channel_refuses_more_than_the_pool_even_with_the_token(topo: Topology) -> None:
    from labkit.transfer import HeaderError, open_sender
    from labkit.transfer.synthetic import make_kv

    assert topo.decode is not None
    h0 = worker_health(topo.decode)
    per_token = 2 * 4 * 2 * 64 * 4  # tiny: K+V, 4 layers, 2 kv heads, head_dim 64, fp32
    n = (32 << 20) // per_token + 100  # just over the decode worker's 32 MiB pool (Topology's kv_cache_bytes)
    kv = make_kv("too-big", n, num_layers=4, num_kv_heads=2, head_dim=64, dtype="float32")
    with open_sender(h0["kv_endpoint"], token=topo.kv_token, connect_timeout_s=5) as tx:
        with pytest.raises(HeaderError, match="exceeds"):
            tx.send(kv, timeout_s=10)
    assert topo.decode.alive() and worker_health(topo.decode)["kv_blocks_used"] == 0
    complete(topo.url, max_tokens=4)


def test_kv_channel_survives_garbage_and_half_frames(topo: Topology) -> None:
    assert topo.decode is not None
    endpoint = worker_health(topo.decode)["kv_endpoint"]
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    payloads = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\xff" * 4096, b"\x00\x00\x00\x10{\"kind\": \"be",
                b"\x7f\xff\xff\xff" + b"{" * 64]  # a 2 GiB header length: refused before any allocation
    for data in payloads:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(data)
            s.settimeout(5)
            try:
                s.recv(4096)  # an error frame or a close; never a hang past the timeout
            except (socket.timeout, ConnectionResetError):
                pass
    assert topo.decode.alive() and worker_health(topo.decode)["status"] == "ok"
    complete(topo.url, max_tokens=4)


def test_no_secret_in_health_or_metrics(topo: Topology) -> None:
    for p in topo.procs:
        for path in ("/health", "/metrics"):
            text = httpx.get(p.url + path, timeout=CLIENT_TIMEOUT_S).text
            assert topo.kv_token not in text, f"{p.name}{path} shows the KV token"


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_worker_body_limit(topo: Topology, role: str) -> None:
    w = topo.prefill if role == "prefill" else topo.decode
    assert w is not None
    path = "/internal/prefill" if role == "prefill" else "/internal/decode"
    r = httpx.post(w.url + path, content=b" " * (MAX_BODY_BYTES + 1), timeout=CLIENT_TIMEOUT_S)
    assert_openai_error(r, 413, None, "request_too_large")
    pools_full(topo)


# A peer's bytes must never reach a deserializer that runs code. JSON headers and raw tensor
# bytes only (labkit/transfer/wire.py); this scan keeps it that way as the code grows.
FORBIDDEN = {
    "pickle": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b|\bpickle\.loads?\("),
    "torch.load": re.compile(r"\btorch\.load\("),
    "marshal": re.compile(r"\bmarshal\.loads?\("),
    "eval/exec": re.compile(r"(?<![.\w])(eval|exec)\("),
    "zmq pyobj": re.compile(r"\brecv_pyobj\(|\bsend_pyobj\("),
    "multiprocessing pipes": re.compile(r"multiprocessing\.connection|\.recv_bytes\("),
    "numpy allow_pickle": re.compile(r"allow_pickle\s*=\s*True"),
    "yaml.load": re.compile(r"\byaml\.(unsafe_)?load\("),
    "shell=True": re.compile(r"shell\s*=\s*True"),
}


def test_no_unsafe_deserialization_in_labkit() -> None:
    files = sorted(LABKIT.rglob("*.py"))
    assert len(files) > 20
    hits = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for what, rx in FORBIDDEN.items():
                if rx.search(code):
                    hits.append(f"{f.relative_to(LABKIT.parent)}:{n}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_scan_catches_what_it_looks_for() -> None:
    bad = ["import pickle", "obj = pickle.loads(data)", "t = torch.load(buf)", "x = eval(s)",
           "msg = sock.recv_pyobj()", "np.load(f, allow_pickle=True)"]
    for line in bad:
        assert any(rx.search(line) for rx in FORBIDDEN.values()), line
    assert not any(rx.search("model.eval()") for rx in FORBIDDEN.values())
