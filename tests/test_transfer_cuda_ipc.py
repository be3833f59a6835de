"""cuda-ipc: the GPU-side checksum everywhere; the GPU round trip where a CUDA GPU is present."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from labkit.proc import pid_alive, start_process
from labkit.transfer import KVMeta, TransferError, available_backends, new_token, open_receiver, open_sender
from labkit.transfer import cuda_ipc
from labkit.transfer.cuda_ipc import gpu_checksum
from labkit.transfer.synthetic import kv_digest, make_kv

needs_gpu = pytest.mark.skipif(bool(available_backends()["cuda-ipc"]), reason="needs a CUDA GPU")


def test_gpu_checksum_agrees_and_catches_changes() -> None:
    data = torch.randint(0, 256, (4099,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    h = gpu_checksum(data)
    assert h == gpu_checksum(data.clone()) and 0 <= h < 2 ** 64
    flipped = data.clone()
    flipped[77] ^= 1
    swapped = data.clone()
    swapped[0:4], swapped[4:8] = data[4:8].clone(), data[0:4].clone()     # same words, other places
    tail = data.clone()
    tail[-1] ^= 0x80                                                      # the bytes after the last word
    assert len({h, gpu_checksum(flipped), gpu_checksum(swapped), gpu_checksum(tail), gpu_checksum(data[:-1])}) == 5
    with pytest.raises(ValueError, match="flat uint8"):
        gpu_checksum(data.view(torch.int8))


def test_same_process_descriptor_reads_the_local_table_and_refuses_unknown_names() -> None:
    """CUDA cannot open a handle in the process that made it: such a descriptor names the tensor locally."""
    t = torch.arange(12, dtype=torch.int16)
    d = {"device": 0, "storage_size_bytes": 24, "storage_offset_bytes": 0, "ref_counter_offset": 0, "byte_offset": 0,
         "nbytes": 24, "process": cuda_ipc._PROCESS, "local": "k0"}
    cuda_ipc._LOCAL["k0"] = t
    try:
        got = cuda_ipc._open_shared(d, 24, "r")
        assert torch.equal(got, t.view(torch.uint8))
        with pytest.raises(TransferError, match="names no tensor"):
            cuda_ipc._open_shared({**d, "local": "other"}, 24, "r")
    finally:
        cuda_ipc._unshare([d])
    assert "k0" not in cuda_ipc._LOCAL
    with pytest.raises(TransferError, match="names no tensor"):
        cuda_ipc._open_shared(d, 24, "r")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_ipc_without_gpu_says_so() -> None:
    with pytest.raises(TransferError, match="needs a CUDA GPU.*use shm or tcp"):
        open_receiver("cuda-ipc", token=new_token())
    assert "GPU" in available_backends()["cuda-ipc"]


@needs_gpu
@pytest.mark.gpu
def test_cuda_ipc_round_trip_from_another_process(tmp_path: Path) -> None:
    token = new_token()
    with open_receiver("cuda-ipc", token=token) as rx:
        procs = [start_process(f"sender-{r}", [sys.executable, "-m", "labkit.transfer.peer", "send", "--endpoint",
                                               rx.endpoint, "--token", token, "--request-id", r, "--tokens", str(n),
                                               "--seed", str(n), "--device", "cuda", *flags],
                               log_path=tmp_path / f"{r}.log")
                 for r, n, flags in (("whole", 96, []), ("layers", 40, ["--layerwise"]))]
        try:
            got = {r: rx.recv(r, timeout_s=120) for r in ("whole", "layers")}
        finally:
            for p in procs:
                p.stop(timeout_s=10)
                assert not pid_alive(p.pid)
    for r, n in (("whole", 96), ("layers", 40)):
        assert got[r].k.device.type == "cuda"
        assert kv_digest(got[r]) == kv_digest(make_kv(r, n, seed=n))


@needs_gpu
@pytest.mark.gpu
def test_cuda_ipc_in_process_layerwise_and_cpu_tensor_refused() -> None:
    token = new_token()
    kv = make_kv("g", 64, num_layers=3)
    with open_receiver("cuda-ipc", token=token) as rx, open_sender(rx.endpoint, token=token) as tx:
        k, v = kv.k.cuda(), kv.v.cuda()
        with tx.begin(KVMeta.from_export(kv), timeout_s=60) as s:
            for i in (2, 0, 1):
                s.send_layer(i, k[i], v[i])
            s.finish(first_token_id=3)
        got = rx.recv("g", timeout_s=60)
        assert torch.equal(got.k.cpu().view(torch.uint8), kv.k.view(torch.uint8))
        with tx.begin(KVMeta.from_export(kv), timeout_s=60) as s2, pytest.raises(ValueError, match="CUDA tensors"):
            s2.send_layer(0, kv.k[0], kv.v[0])
