"""labkit.serve pieces without processes: request validation, text streaming, prefix index, engine loop."""
from __future__ import annotations

import asyncio
import re

import pytest

from labkit.engine.config import SamplingParams
from labkit.models import ByteTokenizer
from labkit.serve.prefix_index import PrefixIndex, block_hashes
from labkit.serve.protocol import APIError, parse_completion_request
from labkit.serve.textstream import TextStream

VOCAB = 512


def parse(body: object):
    return parse_completion_request(body, vocab_size=VOCAB, served_model_names=("tiny",))


@pytest.mark.parametrize("body,param,status", [
    ([1, 2], None, 400),
    ({}, "prompt", 400),
    ({"prompt": ""}, "prompt", 400),
    ({"prompt": []}, "prompt", 400),
    ({"prompt": 5}, "prompt", 400),
    ({"prompt": [1, 600]}, "prompt", 400),
    ({"prompt": [1, -1]}, "prompt", 400),
    ({"prompt": [1, True]}, "prompt", 400),
    ({"prompt": ["a", "b"]}, "prompt", 400),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", 400),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens", 400),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", 400),
    ({"prompt": "x", "temperature": -0.1}, "temperature", 400),
    ({"prompt": "x", "temperature": "hot"}, "temperature", 400),
    ({"prompt": "x", "top_p": 0}, "top_p", 400),
    ({"prompt": "x", "top_p": 1.5}, "top_p", 400),
    ({"prompt": "x", "seed": "1"}, "seed", 400),
    ({"prompt": "x", "stop": 3}, "stop", 400),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
    ({"prompt": "x", "stop": [""]}, "stop", 400),
    ({"prompt": "x", "stream": "yes"}, "stream", 400),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", 400),
    ({"prompt": "x", "n": 2}, "n", 400),
    ({"prompt": "x", "logprobs": 5}, "logprobs", 400),
    ({"prompt": "x", "model": "gpt-4"}, "model", 404),
    ({"prompt": "x", "model": 7}, "model", 400),
    ({"prompt": "x", "ignore_eos": 1}, "ignore_eos", 400),
])
def test_bad_requests_name_the_field(body: object, param: str | None, status: int) -> None:
    with pytest.raises(APIError) as ei:
        parse(body)
    e = ei.value
    assert (e.status, e.param) == (status, param)
    err = e.body()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_good_request_fields_and_defaults() -> None:
    r = parse({"model": "tiny", "prompt": "hi", "max_tokens": 7, "temperature": 0, "top_p": 0.9, "seed": 3,
               "stop": "\n", "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
               "repetition_penalty": 1.0, "logprobs": None, "some_vllm_extra": 1})
    assert (r.prompt_text, r.prompt_ids, r.max_tokens, r.temperature, r.top_p, r.seed) == ("hi", None, 7, 0.0, 0.9, 3)
    assert r.stop == ("\n",) and r.ignore_eos and r.stream and r.include_usage
    assert r.sampling() == SamplingParams(max_tokens=7, temperature=0.0, top_p=0.9, top_k=0, seed=3,
                                          stop_token_ids=(), ignore_eos=True)
    d = parse({"prompt": [[256, 65]]})  # a batch of one token list
    assert d.prompt_ids == (256, 65) and d.max_tokens == 16 and d.temperature == 1.0 and not d.stream


def test_text_stream_holds_stop_strings_and_split_characters() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo wor x EN ENDmore", add_bos=False)
    ts = TextStream(tok, ("END", "xy"))
    pieces = [ts.push(i) for i in ids]
    assert "".join(pieces) == "héllo wor x EN " and ts.stopped
    # "é" is two bytes: nothing half-decoded is ever sent
    assert all("\ufffd" not in p for p in pieces)
    ts2 = TextStream(tok)
    assert "".join(ts2.push(i) for i in tok.encode("né", add_bos=False) + [257]) + ts2.flush() == "né"


def test_prefix_index_prefers_longest_chain_and_forgets() -> None:
    a = list(range(64))
    b = a[:32] + [500] * 32
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert len(ha) == 4 and ha[:2] == hb[:2] and ha[2] != hb[2]
    assert block_hashes(a[:20], 16) == ha[:1]  # a partial block is not cached
    idx = PrefixIndex()
    idx.insert("p0", ha)
    idx.insert("p1", hb[:2])
    assert idx.match(ha, ["p0", "p1", "p2"]) == {"p0": 4, "p1": 2, "p2": 0}
    assert idx.match(hb, ["p0", "p1"]) == {"p0": 2, "p1": 2}
    idx.set_capacity("p0", 2)  # LRU keeps the two most recent blocks
    assert idx.num_blocks("p0") == 2 and idx.match(ha, ["p0"]) == {"p0": 0}
    idx.remove_instance("p1")
    assert idx.match(hb, ["p1"]) == {"p1": 0}


def test_engine_loop_keeps_concurrent_outputs_apart(tiny_model_dir) -> None:
    from labkit.engine import Engine, EngineConfig, SamplingParams
    from labkit.serve.engine_loop import EngineLoop

    prompts = [[256, *range(65, 65 + n)] for n in (3, 9, 17, 30, 5, 12)]
    sps = [SamplingParams(max_tokens=6 + i, temperature=0.0 if i % 2 else 0.8, seed=i) for i in range(len(prompts))]
    ref = Engine(EngineConfig(model="tiny")).generate(prompts, sps)
    loop = EngineLoop(Engine(EngineConfig(model="tiny")))
    loop.start()

    async def one(i: int) -> tuple[list[int], str | None]:
        q = await loop.submit(prompts[i], sps[i], f"r{i}")
        toks: list[int] = []
        while True:
            ev = await asyncio.wait_for(q.get(), 30)
            assert ev.error is None
            if ev.token_id is not None:
                toks.append(ev.token_id)
            if ev.finish_reason is not None:
                return toks, ev.finish_reason

    async def all_() -> list[tuple[list[int], str | None]]:
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))
    try:
        got = asyncio.run(all_())
    finally:
        loop.stop()
    for (toks, reason), r in zip(got, ref):
        assert toks == r.output_token_ids and reason == r.finish_reason
    assert loop.num_running == 0 and not loop.alive


def _synthetic_result():
    from labkit.bench.interference import InterferenceResult, InterferenceScenario, RequestTrace

    sc = InterferenceScenario(num_decodes=2, decode_max_tokens=8, long_after_tokens=2)
    # decodes every 10 ms, one 200 ms stall while the long prompt (sent at 0.035 s) is prefilled
    d0 = RequestTrace("decode 0", "decode", 0.0, [0.01, 0.02, 0.03, 0.04, 0.24, 0.25])
    d1 = RequestTrace("decode 1", "decode", 0.0, [0.015, 0.025, 0.035, 0.235, 0.245])
    lg = RequestTrace("long prompt", "long", 0.035, [0.23, 0.24])
    return InterferenceResult("mono", sc, [d0, d1, lg])


def test_interference_stats_find_the_stall() -> None:
    res = _synthetic_result()
    assert res.prefill_window_s == (0.035, 0.23)
    st = res.stats()
    assert st["decode_stall_max_ms"] == pytest.approx(200.0)
    assert st["decode_itl_mean_ms"] == pytest.approx(10.0)
    assert st["stall_ratio"] == pytest.approx(20.0)
    assert st["long_ttft_ms"] == pytest.approx(195.0)
    inside = [g for _, g, ins in res.decode_gaps() if ins]
    assert sorted(round(g * 1e3) for g in inside) == [10, 200, 200]  # d1's 0.025->0.035 gap touches the window


def test_interference_scenario_validates_and_varies_prompts() -> None:
    from labkit.bench.interference import InterferenceScenario

    with pytest.raises(ValueError, match="long_after_tokens"):
        InterferenceScenario(decode_max_tokens=8, long_after_tokens=8)
    a, b = InterferenceScenario(variant=0), InterferenceScenario(variant=1)
    assert len(a.prompt_ids("long")) == a.long_prompt_tokens
    assert a.prompt_ids("long")[:40] != b.prompt_ids("long")[:40]  # a rerun does not hit the prefix cache
    assert all(0 < t < 256 for t in a.prompt_ids("decode", 3)[1:])


def test_serving_charts_have_titles_and_units() -> None:
    from labkit.plots import serving

    res = _synthetic_result()
    fig = serving.interference_figure(res)
    top, bottom = fig.axes[:2]
    assert "mono" in top.get_title() and "ms" in bottom.get_ylabel() and "(s)" in bottom.get_xlabel()
    ax = serving.stall_comparison([res])
    assert ax.get_ylabel() == "inter-token gap (ms)" and [t.get_text() for t in ax.get_xticklabels()] == ["mono"]


def test_engine_loop_refuses_work_when_its_thread_is_not_running() -> None:
    from labkit.serve.engine_loop import EngineLoop

    loop = EngineLoop(engine=object())  # never started: a request must fail at once, not hang
    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(loop.submit([256, 1], None, "r0"))


@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_one_sender_serves_concurrent_requests_without_a_lock(backend: str) -> None:
    """Why a prefill worker needs no lock per decode endpoint: one Sender, eight threads at once,
    whole and layer-wise transfers interleaved; every KV arrives bit-exact under its own request id."""
    import concurrent.futures

    from labkit.transfer import KVMeta, new_token, open_receiver, open_sender
    from labkit.transfer.synthetic import kv_digest, make_kv

    token = new_token()
    kvs = [make_kv(f"r{i}", 64 + 37 * i, seed=i) for i in range(8)]
    with open_receiver(backend, token=token) as rx, open_sender(rx.endpoint, token=token) as tx:
        def send(i: int) -> int:
            kv = kvs[i]
            if i % 2:
                return tx.send(kv, timeout_s=30).nbytes
            with tx.begin(KVMeta.from_export(kv), timeout_s=30) as stream:
                for layer in reversed(range(kv.num_layers)):
                    stream.send_layer(layer, kv.k[layer], kv.v[layer])
                return stream.finish(first_token_id=kv.first_token_id).nbytes
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            sent = list(ex.map(send, range(8)))
        got = {i: rx.recv(f"r{i}", timeout_s=30) for i in reversed(range(8))}
    assert sent == [kv.nbytes for kv in kvs]
    for i, kv in enumerate(kvs):
        assert kv_digest(got[i]) == kv_digest(kv) and got[i].prompt_ids == kv.prompt_ids


def test_worker_flags_come_from_the_config_fields_and_the_json_document_round_trips() -> None:
    import argparse
    import inspect

    from labkit.config import add_flags
    from labkit.engine.config import EngineConfig
    from labkit.serve.config import WorkerConfig, parse_config, to_json, worker_config
    from labkit.serve.launcher import launch, start_worker

    parse = lambda *a: parse_config(WorkerConfig, list(a), "worker")
    cfg = parse("--role", "prefill", "--kv-cache-bytes", "123456", "--transfer", "tcp", "--kv-stream", "layers",
                "--transfer-timeout-s", "3", "--no-enable-prefix-caching")
    assert (cfg.engine.kv_cache_bytes, cfg.engine.enable_prefix_caching, cfg.engine.policy) == (123456, False, "prefill_only")
    assert (cfg.transfer.backend, cfg.transfer.kv_stream, cfg.transfer.timeout_s) == ("tcp", "layers", 3.0)
    assert parse("--config", to_json(cfg)) == cfg                       # the launcher's one JSON document
    assert parse("--config", to_json(cfg), "--port", "9").port == 9      # a flag on top wins
    assert parse().engine == EngineConfig()                              # defaults: the engine's, written once
    assert worker_config("decode", {"transfer_timeout_s": 2}).transfer.timeout_s == 2.0
    # every default shown in --help is the dataclass's; the launcher repeats no setting (bar the worker's role, name
    # and port, which start_worker assigns, and in launch the router's host and port): they pass as **settings
    p = argparse.ArgumentParser()
    add_flags(p, WorkerConfig)
    assert f"(default: {EngineConfig().kv_cache_bytes})" in " ".join(p.format_help().split())
    flags = {f.replace("-", "_") for f in re.findall(r"^  --([a-z][a-z0-9-]*)", p.format_help(), re.M)}
    assert {"kv_cache_bytes", "dtype", "transfer", "kv_stream", "step_log"} <= flags
    for fn in (start_worker, launch):
        assert set(inspect.signature(fn).parameters) & flags <= {"role", "name", "port", "host"}, fn.__name__
    for bad, message in [({"kv_cache_bytes": 0}, "kv_cache_bytes must be >= 1"), ({"kv_stream": "bits"}, "kv_stream"),
                         ({"transfer": "pigeon"}, "pigeon"), ({"kv_bytes": 1}, "'kv_bytes' is not a setting")]:
        with pytest.raises(ValueError, match=message):
            worker_config("prefill", bad)
    with pytest.raises(SystemExit):
        parse("--config", '{"engine": {"kv_bytes": 1}}')


def test_kv_stream_timeline_draws_both_modes_in_ms() -> None:
    from labkit.plots import serving

    base = {"num_prompt_tokens": 1500, "kv_bytes": 6_000_000, "prefill_s": 0.4}
    ax = serving.kv_stream_timeline({"whole": {**base, "kv_acked_s": 0.45, "layer_sent_s": []},
                                     "layers": {**base, "kv_acked_s": 0.41, "layer_sent_s": [0.1, 0.2, 0.3, 0.405]}})
    assert [t.get_text() for t in ax.get_yticklabels()] == ["whole-KV", "layer-wise"]
    assert "(ms)" in ax.get_xlabel() and "1,500 tokens" in ax.get_title()
    notes = sorted(t.get_text() for t in ax.texts)
    assert notes == ["waited 10.0 ms", "waited 50.0 ms"]
    marks = [ln for ln in ax.lines if ln.get_marker() == "v"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == pytest.approx([100, 200, 300, 405])


def test_launcher_settings_meet_in_one_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """What start_worker hands the worker: every setting by its flag name in one config, None taking the
    default; a name that is no setting is refused before anything starts."""
    import json

    from labkit.serve import launcher

    argvs: list[list[str]] = []

    def fake_start(name: str, argv: list[str], **kw: object) -> object:
        argvs.append(list(argv))
        raise launcher.StartupError("not starting anything in this test")
    monkeypatch.setattr(launcher, "start_process", fake_start)
    with pytest.raises(launcher.StartupError):
        launcher.start_worker("prefill", kv_token="t" * 16, kv_stream="layers", transfer="tcp", max_model_len=8200,
                              link_gbps=10, kv_cache_bytes=1 << 20, dtype=None)
    doc = json.loads(argvs[0][argvs[0].index("--config") + 1])
    assert doc["engine"]["max_model_len"] == 8200 and doc["engine"]["kv_cache_bytes"] == 1 << 20
    assert doc["engine"]["dtype"] == "float32"    # None: EngineConfig's default
    assert doc["transfer"] == {"backend": "tcp", "timeout_s": 30.0, "kv_stream": "layers", "link_gbps": 10.0,
                               "link_latency_ms": 0.0, "kv_flag_factor": 10.0}
    assert "t" * 16 not in " ".join(argvs[0])     # the KV token travels in the environment only
    with pytest.raises(ValueError, match="'kv_cache_byte' is not a setting of WorkerConfig"):
        launcher.start_worker("mono", kv_cache_byte=1 << 20)
    with pytest.raises(ValueError, match="'bogus' is not a setting of WorkerConfig"):
        launcher.launch("disagg", bogus=1)
    assert len(argvs) == 1                        # neither started a process
