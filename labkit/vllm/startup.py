"""Starting vLLM for notebook 07: where each server runs (no GPU, one, or two), and a progress
bar while it loads (minutes on a small CPU).

- `launch_pd_on(base, gpus)`: the prefill + decode pair, placed by `labkit.vllm.launch.launch_pd`
  (`gpus=[]`: one half of the cores each; one GPU: shared with a memory split, started one after
  the other; two GPUs: one each);
- `mono_config(base, gpus)`: the monolithic server on the devices the pair uses (every core; one
  GPU with the memory share `labkit.devices.place` gives one process; two GPUs data-parallel);
- `with_progress(start, desc)`: runs a blocking start-up in a thread, showing elapsed seconds and
  the newest line of the vLLM logs, so a learner sees it is loading, not stuck.

Only the pair or the mono server runs at a time in notebook 07: on one GPU the two servers of the
pair fill its memory between them, so mono starts after the pair has stopped.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from labkit.devices import place
from labkit.vllm.launch import (
    Device,
    VllmPD,
    VllmServer,
    VllmServerConfig,
    launch,
    launch_pd,
    log_dir,
    pd_configs,
    usable_cpus,
)

T = TypeVar("T")


def device_for(gpus: Sequence[int]) -> Device:
    """'cuda' with GPUs, else 'cpu'."""
    return "cuda" if list(gpus) else "cpu"


def describe_placement(gpus: Sequence[int]) -> str:
    """Where the pair and the mono server go (`labkit.devices.place`), one line per server."""
    cpus = None if gpus else list(usable_cpus())
    pair = [
        ln
        for ln in place("disagg", gpus=list(gpus), cpus=cpus).describe().splitlines()
        if not ln.startswith("KV transport")
    ]
    mono = place("mono", mono=min(2, len(gpus)) or 1, gpus=list(gpus)[:2], cpus=cpus).describe().splitlines()
    return "\n".join(["vLLM P/D (KV over NIXL):", *pair, "vLLM mono, once the pair has stopped:", *mono])


def mono_config(base: VllmServerConfig, gpus: Sequence[int]) -> VllmServerConfig:
    """The monolithic server's config, on the devices the pair uses: every usable core (CPU); one
    GPU with one process's memory share; two or more GPUs as data-parallel replicas of one server
    on the first two (`--data-parallel-size 2`), as many devices as the pair has."""
    if not gpus:
        return replace(base, role="mono", device="cpu", cpus=base.cpus or usable_cpus(), port=0)
    slots = place("mono", mono=min(2, len(gpus)), gpus=list(gpus)[:2]).slots
    cfg = replace(
        base, role="mono", device="cuda", gpu=slots[0].gpu, gpu_memory_utilization=slots[0].memory_fraction, port=0
    )
    if len(slots) == 1:
        return cfg
    visible = ",".join(str(s.gpu) for s in slots)
    return replace(
        cfg,
        extra_args=(*cfg.extra_args, "--data-parallel-size", str(len(slots))),
        extra_env=(*cfg.extra_env, ("CUDA_VISIBLE_DEVICES", visible)),
    )


def launch_pd_on(base: VllmServerConfig, gpus: Sequence[int]) -> VllmPD:
    """`launch_pd(base, gpus=gpus)`: the pair placed for these GPUs (none: the cores split in two)."""
    gpu_list = [int(g) for g in gpus]
    if "gpus" in inspect.signature(pd_configs).parameters:
        return launch_pd(replace(base, device=device_for(gpu_list)), gpus=gpu_list)
    # launch.py before `gpus=` (its pd_configs took prefill_gpu / decode_gpu): the same placement
    # spelled the old way, both servers started at once. Remove once launch_pd takes gpus.
    if not gpu_list:
        return launch_pd(replace(base, device="cpu"))
    return launch_pd(
        replace(base, device="cuda"), prefill_gpu=gpu_list[0], decode_gpu=gpu_list[min(1, len(gpu_list) - 1)]
    )


def _newest_log_line(since: float) -> str:
    """The last non-empty line of the newest vLLM log written since `since` (epoch s), trimmed."""
    try:
        logs = [p for p in Path(log_dir()).glob("*.log") if p.stat().st_mtime >= since]
    except OSError:
        return ""
    if not logs:
        return ""
    newest = max(logs, key=lambda p: p.stat().st_mtime)
    try:
        with open(newest, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    text = lines[-1].split("] ", 1)[-1]  # drop vLLM's "INFO 12-01 10:00:00 [file.py:12]" prefix
    return f"{newest.name.split('-')[0]}: {text[:70]}"


def with_progress(start: Callable[[], T], desc: str, *, poll_s: float = 1.0) -> T:
    """Runs `start()` (a blocking start-up) in a thread under a tqdm bar of elapsed seconds, with
    the newest vLLM log line beside it; returns its result or raises its exception."""
    from tqdm.auto import tqdm

    value: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            value.append(start())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            error.append(e)

    t0, wall0 = time.monotonic(), time.time()
    worker = threading.Thread(target=run, name=f"start: {desc}", daemon=True)
    worker.start()
    with tqdm(desc=desc, unit="s", bar_format="{desc}: {elapsed} {postfix}") as bar:
        while worker.is_alive():
            worker.join(poll_s)
            bar.set_postfix_str(_newest_log_line(wall0), refresh=False)
            bar.update(0)
        bar.set_postfix_str(f"ready in {time.monotonic() - t0:.0f} s")
    if error:
        raise error[0]
    return value[0]


def start_pd(base: VllmServerConfig, gpus: Sequence[int], *, progress: bool = True) -> VllmPD:
    """The P/D pair for `gpus`, started (with a progress bar) and ready."""
    go = lambda: launch_pd_on(base, gpus)
    return with_progress(go, "vLLM prefill + decode starting") if progress else go()


def start_mono(base: VllmServerConfig, gpus: Sequence[int], *, progress: bool = True) -> VllmServer:
    """The monolithic server for `gpus`, started (with a progress bar) and ready."""
    go = lambda: launch(mono_config(base, gpus))
    return with_progress(go, "vLLM mono starting") if progress else go()
