"""Each notebook's `parameters` cell under LABKIT_PROFILE=ci, full and gpu, executed on this machine
(no GPU needed): the values each profile sets (models, sizes, devices). One test per notebook; add
your notebook's case, keep the others'."""
from __future__ import annotations

import json
from typing import Any

import pytest

from labkit.config import repo_root


def parameters(notebook: str, profile: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The names the notebook's cell tagged `parameters` defines, run with LABKIT_PROFILE=`profile`."""
    nb = json.loads((repo_root() / "notebooks" / f"{notebook}.ipynb").read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{notebook}: expected one cell tagged parameters, found {len(cells)}"
    monkeypatch.setenv("LABKIT_PROFILE", profile)
    ns: dict[str, Any] = {}
    exec("".join(cells[0]["source"]), ns)  # noqa: S102 - the notebook's own parameters cell
    return {k: v for k, v in ns.items() if not k.startswith("__")}


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
