"""Placement of serving processes on 0, 1, 2 and 4 GPUs (a pure function: runs on a CPU)."""
from __future__ import annotations

import pytest

from labkit.devices import DEFAULT_RESERVE_FRACTION, Slot, kv_cache_bytes_for, place


def test_no_gpu_disagg_splits_cores_and_uses_shm():
    p = place("disagg", cpus=[0, 1])
    assert [(s.name, s.gpu, s.cpus) for s in p.slots] == [("prefill0", None, (0,)), ("decode0", None, (1,))]
    assert p.transfer == "shm"
    assert p.gpus_used == []


def test_no_gpu_mono_gets_all_cores_and_replicas_split_them():
    assert place("mono", cpus=range(4)).slots[0].cpus == (0, 1, 2, 3)
    dp = place("mono", mono=2, cpus=range(4))
    assert [s.cpus for s in dp.slots] == [(0, 1), (2, 3)]


def test_one_gpu_disagg_shares_it_with_memory_split_and_ordered_start():
    p = place("disagg", gpus=[0], cpus=range(16))
    pre, dec = p.slots
    assert pre.gpu == dec.gpu == 0
    assert p.transfer == "cuda-ipc"
    # both shares plus the reserve fit the card, and each gets about half
    assert pre.memory_fraction + dec.memory_fraction <= 1.0 - DEFAULT_RESERVE_FRACTION + 1e-9
    assert pre.memory_fraction == pytest.approx(0.45, abs=1e-3)
    assert dec.start_after == ("prefill0",) and pre.start_after == ()
    # host cores split, so the two processes' launch threads do not fight
    assert set(pre.cpus).isdisjoint(dec.cpus) and len(pre.cpus) == len(dec.cpus) == 8


def test_one_gpu_mono_has_the_card_less_the_reserve():
    (s,) = place("mono", gpus=[0]).slots
    assert s.gpu == 0 and s.memory_fraction == pytest.approx(1 - DEFAULT_RESERVE_FRACTION)


def test_two_gpus_one_each_prefill_first():
    p = place("disagg", gpus=[0, 1])
    assert [(s.name, s.gpu, s.memory_fraction) for s in p.slots] == [
        ("prefill0", 0, pytest.approx(0.9)), ("decode0", 1, pytest.approx(0.9))]
    assert all(s.start_after == () for s in p.slots)


def test_two_gpus_given_in_another_order_are_used_in_that_order():
    p = place("disagg", gpus=[3, 1])
    assert [s.gpu for s in p.slots] == [3, 1]


def test_four_gpus_3p1d_and_fewer_gpus_than_workers():
    p = place("disagg", prefill=3, decode=1, gpus=[0, 1, 2, 3])
    assert [s.gpu for s in p.slots] == [0, 1, 2, 3]
    # 2P2D on 2 GPUs: each role keeps a GPU of its own, the two prefill workers share theirs
    q = place("disagg", prefill=2, decode=2, gpus=[0, 1])
    assert [s.gpu for s in q.of("prefill")] == [0, 0] and [s.gpu for s in q.of("decode")] == [1, 1]
    assert q.sharing(0)[1].start_after == ("prefill0",)
    # 3P1D on 2 GPUs: prefill never takes the decode GPU
    r = place("disagg", prefill=3, decode=1, gpus=[0, 1])
    assert {s.gpu for s in r.of("prefill")} == {0} and r.of("decode")[0].gpu == 1
    # 6P2D on 4 GPUs: three for prefill, one for decode (6:2)
    s = place("disagg", prefill=6, decode=2, gpus=[0, 1, 2, 3])
    assert {x.gpu for x in s.of("prefill")} == {0, 1, 2} and {x.gpu for x in s.of("decode")} == {3}


def test_mono_replicas_over_gpus():
    p = place("mono", mono=4, gpus=[0, 1])
    assert [s.gpu for s in p.slots] == [0, 1, 0, 1]
    assert all(s.memory_fraction == pytest.approx(0.45) for s in p.slots)


@pytest.mark.parametrize("kw,msg", [
    ({"mode": "disagg", "prefill": 0}, "at least one prefill"),
    ({"mode": "mono", "mono": 0}, "at least one mono"),
    ({"mode": "disagg", "gpus": [0, 0]}, "twice"),
    ({"mode": "disagg", "gpus": [-1]}, ">= 0"),
    ({"mode": "disagg", "reserve_fraction": 0.95}, "reserve_fraction"),
    ({"mode": "both"}, "mode"),
])
def test_bad_layouts_name_the_bad_value(kw, msg):
    mode = kw.pop("mode")
    with pytest.raises(ValueError, match=msg):
        place(mode, **kw)


def test_kv_cache_bytes_for_a_shared_gpu():
    pre, _ = place("disagg", gpus=[0]).slots
    total = 80 * 10**9
    kv = kv_cache_bytes_for(pre, total, weight_bytes=16 * 10**9)
    assert kv == int(total * pre.memory_fraction) - 16 * 10**9 - int(int(total * pre.memory_fraction) * 0.10)
    with pytest.raises(ValueError, match="do not fit"):
        kv_cache_bytes_for(pre, 24 * 10**9, weight_bytes=16 * 10**9)
    with pytest.raises(ValueError, match="CPU"):
        kv_cache_bytes_for(Slot("decode", 0, None, (1,)), total, 1)


def test_describe_names_every_worker_and_the_transport():
    text = place("disagg", gpus=[0], cpus=range(4)).describe()
    assert "prefill0  GPU 0  45% of its memory  cores 0-1" in text
    assert "decode0" in text and "starts after prefill0" in text and "cuda-ipc" in text


def test_profile_defaults_by_device_and_names_a_bad_value(monkeypatch):
    from labkit import config

    monkeypatch.delenv("LABKIT_PROFILE", raising=False)
    monkeypatch.setattr(config, "cuda_available", lambda: False)
    assert config.profile() == "full"
    monkeypatch.setattr(config, "cuda_available", lambda: True)
    assert config.profile() == "gpu"
    monkeypatch.setenv("LABKIT_PROFILE", "ci")
    assert config.profile() == "ci"          # an explicit choice wins on a GPU too
    monkeypatch.setenv("LABKIT_PROFILE", "laptop")
    with pytest.raises(ValueError, match="laptop"):
        config.profile()


def test_visible_gpus_is_empty_without_cuda(monkeypatch):
    from labkit import config, devices

    monkeypatch.setattr(config, "cuda_available", lambda: False)
    assert devices.visible_gpus() == []


def test_launcher_places_disagg_on_one_gpu_with_cuda_ipc_and_split_cores(monkeypatch):
    import os

    from labkit.serve.launcher import place_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    p = place_workers("disagg", gpus=[0])
    assert [(s.name, s.gpu) for s in p.slots] == [("prefill0", 0), ("decode0", 0)]
    assert p.transfer == "cuda-ipc" and p.gpus_used == [0]
    assert p.slots[0].cpus == tuple(range(8)) and p.slots[1].cpus == tuple(range(8, 16))
    # cores given for a role win; a transfer given wins
    q = place_workers("disagg", gpus=[0, 1], prefill_cpus=[3], transfer="tcp")
    assert q.slots[0].cpus == (3,) and q.slots[1].gpu == 1 and q.transfer == "tcp"


def test_launcher_places_on_cores_as_before():
    from labkit.serve.launcher import place_workers

    p = place_workers("disagg", prefill_cpus=[0], decode_cpus=[1])
    assert [(s.gpu, s.cpus) for s in p.slots] == [(None, (0,)), (None, (1,))] and p.transfer == "shm"
    assert [s.cpus for s in place_workers("disagg").slots] == [None, None]       # unpinned unless told
    assert [s.cpus for s in place_workers("mono", mono=2, mono_cpus=[0, 1]).slots] == [(0,), (1,)]  # replicas split
    assert place_workers("mono", mono_cpus=[0, 1]).slots[0].cpus == (0, 1)


def test_a_gpu_worker_sees_the_deployments_gpus_in_one_order(monkeypatch):
    from labkit.serve import launcher

    seen = {}

    def fake_start_process(name, argv, *, env=None, log_path=None, cpus=None):
        seen["env"], seen["argv"] = env, argv
        raise launcher.StartupError("stop here: no GPU on this machine")

    monkeypatch.setattr(launcher, "start_process", fake_start_process)
    with pytest.raises(launcher.StartupError):
        launcher.start_worker("decode", model="tiny", gpu=3, visible_gpus=[1, 3], kv_token="t" * 32, transfer="cuda-ipc")
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "1,3"
    import json

    assert json.loads(seen["argv"][seen["argv"].index("--config") + 1])["engine"]["device"] == "cuda:1"
    with pytest.raises(ValueError, match="not among"):
        launcher.start_worker("decode", model="tiny", gpu=0, visible_gpus=[1], kv_token="t" * 32)
