"""Each notebook's parameters cell, executed with LABKIT_PROFILE=ci, full and gpu, without a GPU: the
values it sets (models, sizes, devices). The gpu profile is run with a stand-in device list."""
from __future__ import annotations

import json
from typing import Any

import pytest

from labkit.config import repo_root


def run_parameters(name: str, profile: str, monkeypatch: pytest.MonkeyPatch, gpus: list[int] | None = None) -> dict[str, Any]:
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


# --- notebooks 04 and 05 ---------------------------------------------------------------------

def test_04_parameters_per_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.models import get_preset

    ci = run_parameters("04_disaggregated_server", "ci", monkeypatch)
    full = run_parameters("04_disaggregated_server", "full", monkeypatch)
    gpu1 = run_parameters("04_disaggregated_server", "gpu", monkeypatch, gpus=[0])
    gpu3 = run_parameters("04_disaggregated_server", "gpu", monkeypatch, gpus=[0, 1, 2])
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

    ci = run_parameters("05_charting_the_gains", "ci", monkeypatch)
    full = run_parameters("05_charting_the_gains", "full", monkeypatch)
    gpu = run_parameters("05_charting_the_gains", "gpu", monkeypatch, gpus=[0])
    assert (ci["MODEL"], full["MODEL"], gpu["MODEL"]) == ("tiny", "small", "llama-3.2-1b")
    assert full["REPEATS"] >= 3 and full["REPEATS"] * full["N_REQUESTS"] >= 50, "issue 15: >= 50 requests per point"
    assert ci["REPEATS"] >= 2, "CI runs the repeat path too"
    assert gpu["GPUS"] == [0] and "--random-weights" in gpu["WORKER_ARGS"] and gpu["CONV_SCALE"] == 1.0
    for ns in (ci, full, gpu):
        assert set(ns["MODES"]) >= {"mono", "1p1d"}
        assert ns["SLOS"] == {"the TTFT SLO": ns["SLO_TTFT"], "the ITL SLO": ns["SLO_ITL"]}
        ttft, itl = ns["SLO_TTFT"], ns["SLO_ITL"]
        assert isinstance(ttft, SLO) and ttft.ttft_s and ttft.tpot_s and ttft.itl_s is None
        assert itl.itl_s and itl.ttft_s > ttft.ttft_s, "the ITL SLO bounds every gap and is lenient on TTFT"
        assert sorted(ns["LOADS"]) == list(ns["LOADS"]) and all(x > 0 for x in ns["LOADS"])
    assert gpu["SLO_TTFT"].ttft_s < full["SLO_TTFT"].ttft_s, "a GPU is held to a tighter absolute SLO"
