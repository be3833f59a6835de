"""vLLM in the lab's sweep: a `ServerFactory` that starts vLLM mono or P/D behind the lab's router,
and the four-way comparison (lab mono, lab 1P1D, vLLM mono, vLLM P/D) on one workload and seed.

The sweep (labkit.bench.sweep) draws the requests from the config alone (workload, seed,
rates), so two sweeps with the same config, one per server family, send identical requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from labkit.bench.sweep import ModeSpec, ServerFactory, SweepConfig, SweepResult, lab_server_factory, run_sweep
from labkit.vllm.launch import VllmPD, VllmServer, VllmServerConfig, launch, launch_pd, usable_cpus
from labkit.vllm.metrics import NixlStats, read_nixl

# Row labels: the lab's sweep names modes "mono" and "1p1d"; vLLM's rows are renamed.
VLLM_LABELS = {"mono": "vllm-mono", "1p1d": "vllm-pd"}
COMPARE_MODES = ("mono", "1p1d", "vllm-mono", "vllm-pd")


@dataclass
class NixlLog:
    """NIXL totals of each vLLM P/D run (decode server, difference over the mode's lifetime)."""

    by_mode: dict[str, NixlStats] = field(default_factory=dict)


def vllm_server_factory(
    base: VllmServerConfig | None = None,
    *,
    nixl_log: NixlLog | None = None,
    router_cpus: tuple[int, ...] | None = None,
    gpus: Sequence[int] | None = None,
    running_pd: VllmPD | None = None,
    progress: bool = False,
    started: dict[str, list[VllmServer]] | None = None,
) -> ServerFactory:
    """Starts vLLM for a mode (mono: one server on all usable cores; 1p1d: prefill + decode on
    their halves) and the lab's router in front; yields the router's URL, stops all on exit.
    With `nixl_log`, the decode server's NIXL totals of the run are kept there.

    `gpus` (a list, maybe empty): place the servers with `labkit.vllm.startup` instead (no GPU, one
    shared GPU, or one each); `running_pd`: a pair already up, used for 1p1d and stopped after its
    run, so a mono started next has the device(s) to itself; `progress`: a bar while vLLM loads.
    `started`: filled with each mode's servers (by row label, "vllm-pd": [prefill, decode]) while they run.
    """
    cfg0 = base or VllmServerConfig()

    def start(spec: ModeSpec) -> list[VllmServer]:
        if spec.mode == "disagg" and running_pd is not None:
            return running_pd.servers
        if gpus is None:
            return (
                launch_pd(cfg0).servers
                if spec.mode == "disagg"
                else [launch(replace(cfg0, role="mono", cpus=cfg0.cpus or usable_cpus()))]
            )
        from labkit.vllm.startup import start_mono, start_pd

        return (
            start_pd(cfg0, gpus, progress=progress).servers
            if spec.mode == "disagg"
            else [start_mono(cfg0, gpus, progress=progress)]
        )

    @contextlib.contextmanager
    def factory(spec: ModeSpec) -> Iterator[str]:
        from labkit.serve.launcher import start_router

        if spec.mode == "disagg" and (spec.prefill, spec.decode) != (1, 1):
            raise ValueError(
                f"the vLLM factory starts 1P1D only on one machine, not {spec.name}; "
                "see labkit.vllm.recipe for xPyD across machines"
            )
        servers = start(spec)
        label = VLLM_LABELS.get(spec.name, spec.name)
        if started is not None:
            started[label] = servers
        router = None
        try:
            kw: dict[str, Any] = (
                {"prefill": [servers[0].url], "decode": [servers[1].url]}
                if spec.mode == "disagg"
                else {"mono": [servers[0].url]}
            )
            router = start_router(model=cfg0.model, backend="vllm", cpus=router_cpus, **kw)
            before = read_nixl(servers[-1].url) if spec.mode == "disagg" else None
            yield router.url
            if nixl_log is not None and before is not None:
                nixl_log.by_mode[label] = read_nixl(servers[-1].url) - before
        finally:
            if started is not None:
                started.pop(label, None)
            if router is not None:
                router.stop()
            for s in servers:
                s.stop()

    return factory


@dataclass
class Comparison:
    """The four modes' rows (one per mode and rate) and vLLM's NIXL totals."""

    rows: list[dict[str, Any]]
    nixl: dict[str, NixlStats]
    lab: SweepResult | None
    vllm: SweepResult | None

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)


def compare_modes(
    cfg: SweepConfig,
    *,
    model: str = "tiny",
    vllm_base: VllmServerConfig | None = None,
    vllm_factory: ServerFactory | None = None,
    nixl_log: NixlLog | None = None,
    include_vllm: bool = True,
    include_lab: bool = True,
    gpus: Sequence[int] | None = None,
    running_pd: VllmPD | None = None,
) -> Comparison:
    """Lab mono and 1P1D, then vLLM mono and P/D, on `cfg`'s workload, seed and rates.

    `cfg.modes` is forced to ("mono", "1p1d"). On 2 cores: lab and vLLM 1P1D put prefill on
    core 0 and decode on core 1; both monos use both cores. `vllm_factory`: servers already
    running (e.g. `fixed_url_factory({"mono": url, "1p1d": url})`); default: start them here,
    placed for `gpus` when given (see `vllm_server_factory`). With `running_pd` vLLM's P/D runs
    first on that pair, which then stops, and vLLM mono starts after it: one GPU never holds both.
    `include_lab=False` leaves the lab's servers out (they run on the CPU).
    """
    cfg = replace(cfg, modes=("mono", "1p1d"))
    lab = run_sweep(cfg, lab_server_factory(model)) if include_lab else None  # the same cores as vLLM's
    rows = [dict(r) for r in lab.rows] if lab is not None else []
    nixl = nixl_log or NixlLog()
    vl = None
    if include_vllm:
        base = vllm_base or VllmServerConfig(model=model, max_model_len=cfg.max_model_len or 1024)
        vcfg = replace(cfg, modes=("1p1d", "mono")) if running_pd is not None else cfg
        factory = vllm_factory or vllm_server_factory(
            base, nixl_log=nixl, gpus=gpus, running_pd=running_pd, progress=cfg.progress
        )
        vl = run_sweep(vcfg, factory, model=base.name())
        for r in vl.rows:
            rows.append({**r, "mode": VLLM_LABELS.get(r["mode"], r["mode"])})
    return Comparison(rows, nixl.by_mode, lab, vl)


def relabel_runs(c: Comparison) -> dict[tuple[str, float], Any]:
    """Every run keyed by (four-way mode label, rate), for latency CDFs."""
    runs: dict[tuple[str, float], Any] = dict(c.lab.runs) if c.lab is not None else {}
    if c.vllm is not None:
        runs.update({(VLLM_LABELS.get(m, m), r): res for (m, r), res in c.vllm.runs.items()})
    return runs


def transfer_paths(
    nbytes: int, nixl: NixlStats | None = None, *, repeats: int = 3, layers: int = 4
) -> list[dict[str, Any]]:
    """GB/s (1e9 B/s) and ms of moving `nbytes` three ways on this machine: a memcpy in one process,
    the lab's shm transport between two processes (notebook 02), and, with `nixl` (a P/D run's
    decode-server counters), vLLM's NixlConnector as its own counters timed it."""
    import tempfile

    from labkit.transfer.measure import ReceiverProcess, memcpy_gb_per_s, time_sends

    rows: list[dict[str, Any]] = [{"path": "memcpy (one process)", "GB/s": memcpy_gb_per_s(nbytes)}]
    rx = ReceiverProcess.start("shm", tempfile.mkdtemp(prefix="labkit-07-"))
    try:
        lab = time_sends(rx.endpoint, rx.token, nbytes, repeats=repeats, layers=layers)
    finally:
        rx.stop()
    rows.append({"path": "lab shm transport (process to process)", "GB/s": float(lab["gb_per_s_median"])})
    if nixl is not None and nixl.transfers:
        rows.append({"path": "vLLM NixlConnector (its counters)", "GB/s": nixl.bandwidth_gbps})
    for r in rows:
        r["ms for these bytes"] = nbytes / (r["GB/s"] * 1e9) * 1e3 if r["GB/s"] > 0 else float("inf")
    return rows
