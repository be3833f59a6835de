"""Measured transfer speed: memcpy of this machine, each backend across processes, layer-wise overlap.

Used by benchmarks/transfer.py, notebook 02 and `labkit transfer`. The receiver runs in its
own process (`labkit.transfer.peer recv --sink`), as a decode worker would; a sender's time is
from the first byte to the receiver's ack (so it includes the receiver's checksum check).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from labkit.links import Link
from labkit.proc import Child, start_process
from labkit.transfer import KVMeta, new_token, open_sender
from labkit.transfer.base import tensor_bytes
from labkit.transfer.synthetic import make_kv_fast


def memcpy_gb_per_s(nbytes: int, repeats: int = 5, device: str = "cpu") -> float:
    """Best GB/s (1e9 B/s) of copying `nbytes` between two warm buffers: the higher of torch.copy_
    (multi-threaded) and one memcpy (a memoryview assignment, which shm uses). device "cuda": a
    device-to-device copy on the GPU (what cuda-ipc's receiver does), timed to its completion."""
    if device != "cpu":
        return _device_copy_gb_per_s(nbytes, repeats, device)
    src = torch.arange(max(1, nbytes // 4), dtype=torch.int32).view(torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    s_mv, d_mv = tensor_bytes(src), tensor_bytes(dst)
    best = float("inf")
    for _ in range(repeats):
        for copy in (lambda: dst.copy_(src), lambda: d_mv.__setitem__(slice(None), s_mv)):
            t0 = time.perf_counter()
            copy()
            best = min(best, time.perf_counter() - t0)
    return src.numel() / best / 1e9


def _device_copy_gb_per_s(nbytes: int, repeats: int, device: str) -> float:
    src = torch.arange(max(1, nbytes // 4), dtype=torch.int32, device=device).view(torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return src.numel() / best / 1e9


def kv_device_for(endpoint: str) -> str:
    """Where a benchmark's KV must live to go to `endpoint`: "cuda" for cuda-ipc (GPU memory), else "cpu"."""
    return "cuda" if endpoint.startswith("cuda-ipc://") else "cpu"


def _bench_kv(request_id: str, endpoint: str, nbytes: int, **kw: Any) -> Any:
    kv = make_kv_fast(request_id, nbytes, **kw)
    device = kv_device_for(endpoint)
    if device != "cpu":
        kv.k, kv.v = kv.k.to(device), kv.v.to(device)
    return kv


def _reserver(tx: Any, endpoint: str) -> Any:
    """shm: pre-fault a segment before each timed send, as a registered buffer would be; others: nothing
    (cuda-ipc's sender is an shm sender whose bytes stay on the GPU: no host segment to fault)."""
    if hasattr(tx, "reserve") and kv_device_for(endpoint) == "cpu":
        return tx.reserve
    return lambda nbytes: None


@dataclass
class ReceiverProcess:
    """A sink receiver in its own process: accepts transfers and drops them after the ack."""

    backend: str
    token: str
    child: Child
    endpoint: str

    @classmethod
    def start(
        cls,
        backend: str,
        log_dir: str | Path | None = None,
        token: str | None = None,
        timeout_s: float = 60.0,
        extra_args: Iterable[str] = (),
    ) -> ReceiverProcess:
        """Starts it and waits (up to `timeout_s`) for its endpoint; RuntimeError with its log otherwise."""
        import tempfile

        token = token or new_token()
        log_dir = log_dir or tempfile.mkdtemp(prefix="kv-receiver-")
        log = Path(log_dir) / f"kv-receiver-{backend}.log"
        log.unlink(missing_ok=True)
        child = start_process(
            f"kv receiver ({backend})",
            [sys.executable, "-m", "labkit.transfer.peer", "recv", "--backend", backend, "--sink", *extra_args],
            env={"LABKIT_TRANSFER_TOKEN": token},
            log_path=log,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in log.read_text().splitlines() if log.exists() else []:
                if line.startswith('{"endpoint"'):
                    return cls(backend, token, child, json.loads(line)["endpoint"])
            if not child.alive():
                break
            time.sleep(0.05)
        child.stop()
        raise RuntimeError(f"{backend} receiver did not start within {timeout_s:.0f} s. Log:\n{child.log_tail()}")

    def stop(self) -> None:
        self.child.stop(timeout_s=5)


def time_sends(
    endpoint: str,
    token: str,
    nbytes: int,
    repeats: int = 3,
    link: Link | None = None,
    layers: int = 32,
    paired_memcpy: bool = False,
) -> dict[str, Any]:
    """Sends a ~`nbytes` KV `repeats` times (after one warm-up); returns a row with best and median GB/s.

    shm: each timed send uses a pre-faulted segment (`reserve`), as a registered buffer would be.
    paired_memcpy: also time a memcpy of the same size right before each send, so the ratio
    send/memcpy compares the two under the same load (others share this machine's cores).
    """
    kv = _bench_kv(
        "bench", endpoint, nbytes, num_layers=layers if nbytes >= layers * 8192 else 1, num_kv_heads=8, head_dim=128
    )
    src = dst = None
    if paired_memcpy:
        src = tensor_bytes(kv.k.reshape(-1).view(torch.uint8)), tensor_bytes(kv.v.reshape(-1).view(torch.uint8))
        dst_t = torch.empty(kv.nbytes, dtype=torch.uint8)
        dst_t.fill_(1)
        dst = tensor_bytes(dst_t)
    with open_sender(endpoint, token=token, link=link) as tx:
        reserve = _reserver(tx, endpoint)
        secs: list[float] = []
        copy_secs: list[float] = []
        for i in range(repeats + 1):
            reserve(kv.nbytes)
            if src is not None and dst is not None:
                t0 = time.perf_counter()
                half = kv.nbytes // 2
                dst[:half] = src[0]
                dst[half:] = src[1]
                if i:
                    copy_secs.append(time.perf_counter() - t0)
            kv.request_id = f"bench-{nbytes}-{i}"
            st = tx.send(kv, timeout_s=600)
            if i:
                secs.append(st.seconds)
    best, med = min(secs), statistics.median(secs)
    row: dict[str, Any] = {
        "nbytes": kv.nbytes,
        "seconds_best": best,
        "seconds_median": med,
        "gb_per_s_best": kv.nbytes / best / 1e9,
        "gb_per_s_median": kv.nbytes / med / 1e9,
        "link": link.label if link else "measured",
    }
    if copy_secs:
        row["memcpy_gb_per_s_best"] = kv.nbytes / min(copy_secs) / 1e9
        row["vs_memcpy_best"] = min(copy_secs) / best
        row["vs_memcpy_median"] = statistics.median(c / s for c, s in zip(copy_secs, secs))
    return row


def layerwise_vs_at_end(
    endpoint: str, token: str, nbytes: int, compute_s: float, layers: int = 32, link: Link | None = None
) -> dict[str, Any]:
    """Prefill of `layers` layers taking `compute_s` in all (simulated: the worker sleeps per layer),
    then the KV sent at the end, vs sent layer by layer as each finishes. Returns seconds of each
    (from prefill start to the receiver's ack) and of the transfer alone."""
    kv = _bench_kv("lw", endpoint, nbytes, num_layers=layers)
    per_layer = compute_s / kv.num_layers
    with open_sender(endpoint, token=token, link=link) as tx:
        reserve = _reserver(tx, endpoint)
        reserve(kv.nbytes)
        kv.request_id = "alone"
        transfer_only = tx.send(kv, timeout_s=600).seconds

        reserve(kv.nbytes)
        t0 = time.perf_counter()
        for _ in range(kv.num_layers):
            time.sleep(per_layer)
        kv.request_id = "at-end"
        tx.send(kv, timeout_s=600)
        at_end = time.perf_counter() - t0

        reserve(kv.nbytes)
        kv.request_id = "layerwise"
        t0 = time.perf_counter()
        with tx.begin(KVMeta.from_export(kv), timeout_s=600) as s:
            for i in range(kv.num_layers):
                time.sleep(per_layer)
                s.send_layer(i, kv.k[i], kv.v[i])
            s.finish(first_token_id=kv.first_token_id)
        layerwise = time.perf_counter() - t0
    return {
        "nbytes": kv.nbytes,
        "layers": kv.num_layers,
        "compute_s": compute_s,
        "transfer_s": transfer_only,
        "at_end_s": at_end,
        "layerwise_s": layerwise,
        "link": link.label if link else "measured",
        "ideal_layerwise_s": max(compute_s, transfer_only) + min(compute_s, transfer_only) / kv.num_layers,
    }


def bandwidth_sweep(
    backends: Iterable[str],
    sizes: Iterable[int],
    repeats: int = 3,
    log_dir: str | Path | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """memcpy and each backend (receiver in its own process) at each payload size.

    Returns rows {backend, nbytes, gb_per_s (best), gb_per_s_median, seconds_median, ...};
    shm rows carry `vs_memcpy_median`, the ratio to a memcpy timed beside each send. With cuda-ipc
    among the backends, "memcpy (GPU)" rows give the GPU's own device-to-device copy speed.
    """
    import tempfile

    sizes, backends = list(sizes), list(backends)
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kv-sweep-"))
    rows: list[dict[str, Any]] = [
        {"backend": "memcpy", "nbytes": n, "gb_per_s": memcpy_gb_per_s(n), "seconds_median": None} for n in sizes
    ]
    if "cuda-ipc" in backends:
        rows += [
            {
                "backend": "memcpy (GPU)",
                "nbytes": n,
                "gb_per_s": memcpy_gb_per_s(n, device="cuda"),
                "seconds_median": None,
            }
            for n in sizes
        ]
    jobs = [(b, n) for b in backends for n in sizes]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="transfers")
    current: ReceiverProcess | None = None
    try:
        for b, n in jobs:
            if current is None or current.backend != b:
                if current is not None:
                    current.stop()
                current = ReceiverProcess.start(b, log_dir)
            r = time_sends(current.endpoint, current.token, n, repeats=repeats, paired_memcpy=(b == "shm"))
            r.update(backend=b, gb_per_s=r["gb_per_s_best"])
            rows.append(r)
            if bar is not None:
                bar.update(1)
    finally:
        if current is not None:
            current.stop()
        if bar is not None:
            bar.close()
    return rows


def measured_links(rows: list[dict[str, Any]]) -> list[Link]:
    """A Link per backend, fitted (fixed cost + bytes / bandwidth) to `bandwidth_sweep` rows."""
    from labkit.transfer.sizing import fit_link

    links = []
    for b in dict.fromkeys(r["backend"] for r in rows if not r["backend"].startswith("memcpy")):
        pts = [(r["nbytes"], r["seconds_median"]) for r in rows if r["backend"] == b]
        name = f"{b} (this machine)"
        try:
            links.append(fit_link([x for x, _ in pts], [y for _, y in pts], name, "measured"))
        except ValueError:  # one size, or too noisy: the biggest transfer's plain rate
            big = max(pts)
            links.append(Link(big[0] / big[1], 0.0, name, "measured"))
    return links
