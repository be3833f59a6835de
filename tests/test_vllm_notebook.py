"""Notebook 07's helpers without vLLM: one request by hand through stand-in prefill and decode servers
(tests/vllm_fake.py, real processes on loopback) with the router's builders and with broken ones, the
cache config and NIXL counters read from /metrics, where the servers are placed for 0, 1 and 2 GPUs,
and the start-up progress bar."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labkit.exercises import nb07
from labkit.proc import free_port, pid_alive, start_process, wait_http_ok
from labkit.vllm import by_hand, startup
from labkit.vllm.launch import VllmServerConfig

sys.path.insert(0, str(Path(__file__).parent))
from vllm_fake import BLOCK_TOKENS, KV_BYTES_PER_TOKEN, expected_nixl_bytes, expected_tokens

FAKE = str(Path(__file__).parent / "vllm_fake.py")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("vllm-fake-07")
    children = []
    urls = {}
    try:
        for role in ("prefill", "decode"):
            port = free_port()
            child = start_process(f"fake-{role}", [sys.executable, FAKE, "--role", role, "--port", str(port)],
                                  log_path=tmp / f"fake-{role}.log")
            children.append(child)
            urls[role] = f"http://127.0.0.1:{port}"
            wait_http_ok(urls[role] + "/health", timeout_s=60, child=child)
        yield urls
    finally:
        for c in children:
            c.stop()
        assert not [c.pid for c in children if pid_alive(c.pid)]


def test_one_request_by_hand_with_the_learners_builders_moves_kv(pair: dict[str, str]) -> None:
    prompt = by_hand.random_prompt(37, seed=3)
    body = by_hand.completion_body("tiny", prompt, max_tokens=5)
    trace = by_hand.send_pd_request(pair["prefill"], pair["decode"], body,
                                    make_prefill=nb07.reference_prefill_request,
                                    make_decode=nb07.reference_decode_request)
    assert trace.prefill_request["max_tokens"] == 1 and body["max_tokens"] == 5, "the body is left as it was"
    block = trace.kv_transfer_params["remote_block_ids"][0][0]
    assert trace.tokens == expected_tokens(prompt, 5, block)
    assert trace.nixl_decode.transfers == 1 and trace.nixl_prefill.transfers == 0
    assert trace.nixl_decode.bytes_transferred == expected_nixl_bytes(37) == 3 * BLOCK_TOKENS * KV_BYTES_PER_TOKEN
    assert trace.prompt_tokens == 37 and 0 < trace.prefill_answer_bytes < 2000
    assert trace.prefill_s > 0 and trace.decode_s > 0
    # the same prompt through the router's own builders gives the same tokens; the exercise's live check agrees
    again = by_hand.send_pd_request(pair["prefill"], pair["decode"], body)
    assert again.tokens == trace.tokens
    ok, text = nb07.live_verdict(trace, again.tokens)
    assert ok, text
    assert nb07.check_who_moves_kv.evaluate("b", trace=trace)
    assert nb07.check_nixl_bytes.evaluate(expected_nixl_bytes(37), measured_bytes=trace.nixl_decode.bytes_transferred)
    assert by_hand.block_tokens(pair["decode"]) == BLOCK_TOKENS
    assert by_hand.cache_config(pair["prefill"])["block_size"] == str(BLOCK_TOKENS)


def test_a_decode_request_without_kv_params_is_refused_and_named(pair: dict[str, str]) -> None:
    body = by_hand.completion_body("tiny", by_hand.random_prompt(20, seed=4), max_tokens=3)
    with pytest.raises(RuntimeError, match="HTTP 400"):
        by_hand.send_pd_request(pair["prefill"], pair["decode"], body, make_decode=lambda b, a: dict(b))
    with pytest.raises(TypeError, match="not a dict"):
        by_hand.send_pd_request(pair["prefill"], pair["decode"], body, make_prefill=lambda b: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="stream false"):
        by_hand.send_pd_request(pair["prefill"], pair["decode"], dict(body, stream=True))


def test_live_verdict_names_a_decode_computed_from_scratch() -> None:
    from labkit.vllm.metrics import NixlStats

    class T:
        nixl_decode, nixl_prefill, tokens, prefill_answer_bytes = NixlStats(), NixlStats(), [1, 2], 900

    ok, text = nb07.live_verdict(T(), [1, 2])
    assert not ok and "computed the prompt itself" in text
    T.nixl_decode = NixlStats(transfers=1, bytes_transferred=4096)
    assert nb07.live_verdict(T(), [1, 2])[0] and not nb07.live_verdict(T(), [1, 3])[0]
    with pytest.raises(RuntimeError, match="not exactly one"):
        T.nixl_decode = NixlStats()
        nb07.check_who_moves_kv.check("b", trace=T())


def test_random_prompt_and_body() -> None:
    p = by_hand.random_prompt(301, seed=11)
    assert len(p) == 301 and p[0] == 256 and all(0 <= t < 256 for t in p[1:])
    assert p == by_hand.random_prompt(301, seed=11) != by_hand.random_prompt(301, seed=12)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        by_hand.random_prompt(0, seed=1)
    b = by_hand.completion_body("tiny", p, 4)
    assert b["stream"] is False and b["temperature"] == 0.0 and b["max_tokens"] == 4


@pytest.mark.parametrize("gpus,mono_gpu,util,dp", [([], None, None, None), ([0], 0, 0.9, None), ([0, 1], 0, 0.9, "2"),
                                                   ([2, 3, 5], 2, 0.9, "2")])
def test_mono_config_uses_the_devices_the_pair_uses(gpus: list[int], mono_gpu: int | None, util: float | None,
                                                    dp: str | None) -> None:
    cfg = startup.mono_config(VllmServerConfig(model="tiny", port=0), gpus)
    assert cfg.role == "mono" and cfg.gpu == mono_gpu
    if not gpus:
        assert cfg.device == "cpu" and cfg.cpus
        return
    assert cfg.device == "cuda" and cfg.gpu_memory_utilization == util
    env = dict(cfg.extra_env)
    if dp is None:
        assert "--data-parallel-size" not in cfg.extra_args and "CUDA_VISIBLE_DEVICES" not in env
    else:
        assert cfg.extra_args[-2:] == ("--data-parallel-size", dp)
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, gpus[:2]))


def test_placement_is_described_for_0_1_2_gpus() -> None:
    cpu = startup.describe_placement([])
    assert "prefill0" in cpu and "decode0" in cpu and "mono0" in cpu and "NIXL" in cpu
    one = startup.describe_placement([0])
    assert one.count("GPU 0") == 3 and "45% of its memory" in one and "starts after prefill0" in one
    two = startup.describe_placement([0, 1])
    assert "decode0   GPU 1" in two and "90% of its memory" in two


def test_launch_pd_on_asks_launch_pd_for_these_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without starting anything: what launch_pd_on hands the launcher for 0, 1 and 2 GPUs."""
    import inspect

    calls: list[tuple[VllmServerConfig, dict[str, Any]]] = []
    monkeypatch.setattr(startup, "launch_pd", lambda base, **kw: calls.append((base, kw)) or "pair")
    takes_gpus = "gpus" in inspect.signature(startup.pd_configs).parameters
    for gpus in ([], [0], [0, 1]):
        assert startup.launch_pd_on(VllmServerConfig(model="tiny"), gpus) == "pair"
    devices = [c[0].device for c in calls]
    assert devices == ["cpu", "cuda", "cuda"]
    if takes_gpus:
        assert [c[1] for c in calls] == [{"gpus": []}, {"gpus": [0]}, {"gpus": [0, 1]}]
    else:   # launch.py before its gpus= change: the same placement in the old words
        assert [c[1] for c in calls] == [{}, {"prefill_gpu": 0, "decode_gpu": 0}, {"prefill_gpu": 0, "decode_gpu": 1}]


def test_with_progress_returns_the_value_and_reraises() -> None:
    t0 = time.monotonic()
    assert startup.with_progress(lambda: time.sleep(0.3) or 42, "test start", poll_s=0.05) == 42
    assert time.monotonic() - t0 >= 0.3

    def boom() -> None:
        raise RuntimeError("vLLM did not start")

    with pytest.raises(RuntimeError, match="did not start"):
        startup.with_progress(boom, "test start", poll_s=0.05)
