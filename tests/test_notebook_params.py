"""Each notebook's parameters cell under LABKIT_PROFILE=gpu, ci and full, executed without a GPU: the
models, sizes and devices each profile asks for (issue 16's gpu profile is checked here, where no GPU is)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from labkit.config import repo_root
from labkit.models import PRESETS


def parameters(name: str, profile: str, monkeypatch: pytest.MonkeyPatch, gpus: list[int] | None = None) -> dict[str, Any]:
    """The names a notebook's `parameters` cell defines, run under `profile` (visible_gpus() -> `gpus`)."""
    import labkit.devices

    nb = json.loads((repo_root() / "notebooks" / f"{name}.ipynb").read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{name}: one cell tagged parameters"
    monkeypatch.setenv("LABKIT_PROFILE", profile)
    monkeypatch.setattr(labkit.devices, "visible_gpus", lambda: list(gpus or []))
    ns: dict[str, Any] = {}
    exec(compile("".join(cells[0]["source"]), f"{name}:parameters", "exec"), ns)  # noqa: S102 - our own notebook
    assert ns["PROFILE"] == profile
    return ns


# --- 02 · the KV cache --------------------------------------------------------------------

def test_02_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    ci, full = parameters("02_kv_cache", "ci", monkeypatch), parameters("02_kv_cache", "full", monkeypatch)
    gpu = parameters("02_kv_cache", "gpu", monkeypatch)
    assert (ci["PREFILL_MODEL"], full["PREFILL_MODEL"], gpu["PREFILL_MODEL"]) == ("tiny", "small", "llama-3.2-1b")
    assert ci["DEVICE"] == full["DEVICE"] == "cpu" and gpu["DEVICE"] == "cuda"
    for p in (ci, full, gpu):
        assert p["PREFILL_MODEL"] in PRESETS and p["PREFILL_LENS"] == sorted(p["PREFILL_LENS"])
        assert p["SIZES_MIB"] == sorted(p["SIZES_MIB"]) and len(p["SIZES_MIB"]) >= 2   # a link is fitted to them
        assert p["EMULATED_MIB"] >= 64, "smaller payloads: a busy machine's fixed costs swamp the line rate"
        assert p["LAYERS"] >= 2 and p["REPEATS"] >= 2
    assert max(ci["SIZES_MIB"]) < max(full["SIZES_MIB"]) < max(gpu["SIZES_MIB"])
    assert max(ci["PREFILL_LENS"]) <= PRESETS["tiny"].max_position_embeddings
    assert max(gpu["PREFILL_LENS"]) <= PRESETS["llama-3.2-1b"].max_position_embeddings


# --- 03 · monolithic server and interference ----------------------------------------------

def test_03_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    ci = parameters("03_monolithic_and_interference", "ci", monkeypatch)
    full = parameters("03_monolithic_and_interference", "full", monkeypatch)
    gpu = parameters("03_monolithic_and_interference", "gpu", monkeypatch, gpus=[0])
    assert (ci["MODEL"], full["MODEL"], gpu["MODEL"]) == ("tiny", "small", "llama-3.2-1b")
    assert ci["GPUS"] is None and full["GPUS"] is None and gpu["GPUS"] == [0]
    assert gpu["DTYPE"] == "bfloat16" and gpu["ENGINE_SETTINGS"] == {"random_weights": True}
    for p in (ci, full, gpu):
        preset = PRESETS[p["MODEL"]]
        assert p["LONG_PROMPT_TOKENS"] + 4 <= preset.max_position_embeddings
        assert p["CHUNK_TOKENS"] in p["CHUNK_SWEEP"], "the chunked run of section 4 is one point of the sweep"
        assert all(c > p["NUM_DECODES"] for c in p["CHUNK_SWEEP"]), "a budget must leave room for prompt tokens"
        assert max(p["CHUNK_SWEEP"]) < p["LONG_PROMPT_TOKENS"], "every swept budget cuts the long prompt"
        assert len(p["CHUNK_SWEEP"]) >= 2
    assert len(ci["CHUNK_SWEEP"]) < len(full["CHUNK_SWEEP"])
    # the gpu profile's KV cache holds the long prompt and every decode at its cap, in bf16
    from labkit.roofline import ModelShape

    per_token = ModelShape.from_config(gpu["MODEL"]).kv_bytes_per_token("bfloat16")
    assert gpu["KV_CACHE_BYTES"] >= per_token * (gpu["LONG_PROMPT_TOKENS"] + gpu["NUM_DECODES"] * 1100)


def test_03_gpu_profile_places_the_servers_on_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The notebook's ServerSpec hands `gpus=` to the launcher on the gpu profile, and pins cores otherwise."""
    from labkit.bench import chunking

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr("labkit.serve.launcher.launch", lambda mode, **kw: seen.append({"mode": mode, **kw}))
    for profile, gpus in (("gpu", [0]), ("ci", None)):
        p = parameters("03_monolithic_and_interference", profile, monkeypatch, gpus=gpus)
        spec = chunking.ServerSpec(p["MODEL"], p["DTYPE"], tuple(p["GPUS"]) if p["GPUS"] is not None else None,
                                   p["KV_CACHE_BYTES"], p["ENGINE_SETTINGS"])
        spec.launch("mono-chunked", chunk_tokens=p["CHUNK_TOKENS"])
        spec.launch("1p1d")
    gpu_mono, gpu_1p1d, cpu_mono, cpu_1p1d = seen
    assert gpu_mono["gpus"] == [0] and gpu_mono["mono_cpus"] is None and gpu_mono["random_weights"] is True
    assert gpu_1p1d["mode"] == "disagg" and gpu_1p1d["gpus"] == [0]
    assert cpu_mono["gpus"] is None and cpu_mono["chunked_prefill"] and cpu_mono["max_num_batched_tokens"] == 256
    assert cpu_1p1d["gpus"] is None and cpu_1p1d["mode"] == "disagg"


# --- notebooks 04 and 05 ---------------------------------------------------------------------

def test_04_parameters_per_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.models import get_preset

    ci = parameters("04_disaggregated_server", "ci", monkeypatch)
    full = parameters("04_disaggregated_server", "full", monkeypatch)
    gpu1 = parameters("04_disaggregated_server", "gpu", monkeypatch, gpus=[0])
    gpu3 = parameters("04_disaggregated_server", "gpu", monkeypatch, gpus=[0, 1, 2])
    assert (ci["MODEL"], full["MODEL"], gpu1["MODEL"]) == ("tiny", "small", "llama-3.2-1b")
    assert ci["GPUS"] == full["GPUS"] == [] and gpu1["GPUS"] == [0] and gpu3["GPUS"] == [0, 1]
    assert gpu1["DTYPE"] == "bfloat16" and gpu1["RANDOM_WEIGHTS"] and not full["RANDOM_WEIGHTS"]
    for ns in (ci, full, gpu1):
        preset = get_preset(ns["MODEL"])
        assert ns["LONG_PROMPT_TOKENS"] < preset.max_position_embeddings
        assert ns["DOC_TOKENS"] % 16 == 0, "documents fill whole KV blocks, so a cache can serve all of them"
        assert ns["DOC_TOKENS"] + ns["QUESTION_TOKENS"] < preset.max_position_embeddings
    kv = gpu1["LONG_PROMPT_TOKENS"] * get_preset("llama-3.2-1b").hf_config()["num_hidden_layers"] * 2 * 8 * 64 * 2
    assert gpu1["KV_CACHE_BYTES"] > 2 * kv, "the GPU workers' KV pool holds the long prompt (twice over)"
    assert ci["LONG_PROMPT_TOKENS"] < full["LONG_PROMPT_TOKENS"] and ci["DOC_TOKENS"] < full["DOC_TOKENS"]


def test_05_parameters_per_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.bench import SLO

    ci = parameters("05_charting_the_gains", "ci", monkeypatch)
    full = parameters("05_charting_the_gains", "full", monkeypatch)
    gpu = parameters("05_charting_the_gains", "gpu", monkeypatch, gpus=[0])
    assert (ci["MODEL"], full["MODEL"], gpu["MODEL"]) == ("tiny", "small", "llama-3.2-1b")
    assert full["REPEATS"] >= 3 and full["REPEATS"] * full["N_REQUESTS"] >= 50, "issue 15: >= 50 requests per point"
    assert ci["REPEATS"] >= 2, "CI runs the repeat path too"
    assert gpu["GPUS"] == [0] and gpu["WORKER_SETTINGS"]["random_weights"] is True and gpu["CONV_SCALE"] == 1.0
    for ns in (ci, full, gpu):
        assert set(ns["MODES"]) >= {"mono", "1p1d"}
        assert ns["SLOS"] == {"the TTFT SLO": ns["SLO_TTFT"], "the ITL SLO": ns["SLO_ITL"]}
        ttft, itl = ns["SLO_TTFT"], ns["SLO_ITL"]
        assert isinstance(ttft, SLO) and ttft.ttft_s and ttft.tpot_s and ttft.itl_s is None
        assert itl.itl_s and itl.ttft_s > ttft.ttft_s, "the ITL SLO bounds every gap and is lenient on TTFT"
        assert sorted(ns["LOADS"]) == list(ns["LOADS"]) and all(x > 0 for x in ns["LOADS"])
    assert gpu["SLO_TTFT"].ttft_s < full["SLO_TTFT"].ttft_s, "a GPU is held to a tighter absolute SLO"


# --- 06 · should you disaggregate, 07 · vLLM side by side ---------------------------------------

@pytest.mark.parametrize("profile", ["ci", "full", "gpu"])
def test_06_parameters(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.models import PRESETS
    from labkit.plan.calibrate import CalibrationPoints, engine_for_profile

    p = parameters("06_should_you_disaggregate", profile, monkeypatch)
    assert p["PROFILE"] == profile
    assert p["MODEL"] == {"ci": "tiny", "full": "small", "gpu": "llama-3.2-1b"}[profile] and p["MODEL"] in PRESETS
    assert p["NUM_REQUESTS"] == (150 if profile == "ci" else 400)
    assert p["CURVE_DEVICES"] == (16 if profile == "ci" else 64) >= p["DEVICES"]
    assert len(CalibrationPoints.for_profile(profile).decode_batches) >= 3, "exercise 1 holds out a batch size"
    eng = engine_for_profile(p["MODEL"], profile)
    if profile == "gpu":   # the planner runs on the 1B shape measured on the GPU: bf16, CUDA graphs, no files
        assert p["PLAN_ON"] == "measured" and p["TARGET_MODEL"] == p["MODEL"]
        assert (eng.device, eng.dtype, eng.cuda_graphs, eng.random_weights) == ("cuda", "bfloat16", True, True)
    else:                  # an estimate of the 8B on an H100 from the committed run's MFU/MBU; the engine on the CPU
        assert p["PLAN_ON"] == "estimate" and (p["TARGET_MODEL"], p["TARGET_HARDWARE"]) == ("llama-3.1-8b", "H100 SXM")
        assert (eng.device, eng.dtype) == ("cpu", "float32")


@pytest.mark.parametrize("profile", ["ci", "full", "gpu"])
def test_07_parameters(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.devices import place, visible_gpus
    from labkit.vllm.launch import VllmServerConfig
    from labkit.vllm.startup import mono_config

    p = parameters("07_vllm_native_disaggregation", profile, monkeypatch)
    assert p["PROFILE"] == profile
    assert p["PROMPT_TOKENS"] % 16 and p["PROMPT_TOKENS"] % 128, "the by-hand prompt ends in a partial block"
    if profile == "gpu":
        assert (p["MODEL"], p["DTYPE"]) == ("llama-3.2-1b", "bfloat16")
        assert p["GPUS"] == visible_gpus() and not p["LAB_SERVERS"]
    else:
        assert (p["MODEL"], p["DTYPE"], p["GPUS"], p["LAB_SERVERS"]) == ("tiny", "float32", [], True)
    assert p["N_REQUESTS"] == (8 if profile == "ci" else 24 if profile == "full" else p["N_REQUESTS"])
    assert p["RATES_RPS"] == ((2.0,) if profile == "ci" else (2.0, 4.0) if profile == "full" else (4.0, 8.0))
    # where its servers go for the GPU lists a gpu profile meets: one GPU shared (memory split, one after
    # the other), two GPUs one each; mono on the same devices, never beside the pair
    one = place("disagg", gpus=[0])
    assert [s.gpu for s in one.slots] == [0, 0] and one.slots[1].start_after == ("prefill0",)
    assert sum(s.memory_fraction for s in one.slots) <= 0.9
    assert [s.gpu for s in place("disagg", gpus=[0, 1]).slots] == [0, 1]
    base = VllmServerConfig(model="tiny")
    assert mono_config(base, [0]).gpu_memory_utilization == place("mono", gpus=[0]).slots[0].memory_fraction
