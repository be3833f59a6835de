"""Start a serving topology from one call, and stop it by PID.

    with launch("disagg", model="tiny", prefill=1, decode=1, prefill_cpus=[0], decode_cpus=[1]) as srv:
        httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 8})

Every piece is a real process (labkit.proc): workers first (each waits for its /health), then
the router in front of them. `stop()` stops the router, then the workers (SIGTERM to each
process group, SIGKILL after a timeout) and checks that no PID is left. The pieces can be
started one by one too (`start_worker`, `start_router`), as notebook 04 does.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

from labkit import deployments
from labkit.config import labkit_home
from labkit.devices import Mode, Placement, place
from labkit.proc import (
    LOOPBACK,
    Child,
    StartupError,
    free_port,
    pid_alive,
    python_module_argv,
    start_process,
    wait_http_ok,
)
from labkit.serve.config import ROLES, RouterConfig, check_prefill_threshold, to_json, validate, worker_config
from labkit.serve.routing import DEFAULT_POLICY

MODES = ("mono", "disagg")

# Every process started here, until stopped: stopped at interpreter exit too, so a notebook
# kernel that ends mid-experiment leaves no server behind.
_LIVE: dict[int, ServerProcess] = {}


def _stop_live_at_exit() -> None:
    for p in list(_LIVE.values()):
        with contextlib.suppress(Exception):  # exiting anyway: stop what can be stopped
            p.stop(timeout_s=3.0)


atexit.register(_stop_live_at_exit)


@dataclass
class ServerProcess:
    """A started worker or router: its process, role, URL and name."""

    role: str  # "mono" | "prefill" | "decode" | "router"
    name: str
    url: str
    child: Child

    @property
    def pid(self) -> int:
        return self.child.pid

    def alive(self) -> bool:
        return self.child.alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.child.stop(timeout_s=timeout_s)
        _LIVE.pop(self.pid, None)
        deployments.forget(self.pid)


def _log_dir() -> Path:
    d = labkit_home() / "logs" / "serve"
    d.mkdir(parents=True, exist_ok=True)
    return d


def new_kv_token() -> str:
    """A per-deployment secret the transport checks (prefill and decode workers share it)."""
    from labkit.transfer import new_token

    return new_token()


def _cpu_env(cpus: Sequence[int] | None, gpus: Sequence[int] | None) -> dict[str, str]:
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    if cpus is not None:
        n = str(max(1, len(cpus)))
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    return env


def start_worker(
    role: str,
    *,
    name: str = "",
    port: int | None = None,
    cpus: Sequence[int] | None = None,
    gpu: int | None = None,
    visible_gpus: Sequence[int] | None = None,
    kv_token: str | None = None,
    startup_timeout_s: float = 120.0,
    log_dir: Path | None = None,
    **settings: Any,
) -> ServerProcess:
    """Starts one worker process (pinned to `cpus`, on GPU `gpu`); returns once its /health answers.

    `settings`: any WorkerConfig setting by its flag name (`model`, `dtype`, `kv_cache_bytes`,
    `transfer`, `kv_stream`, `link_gbps`, `step_log`, ...); one left out or None takes its default,
    written once, in labkit.serve.config. The worker gets its whole config as one JSON document,
    validated here first (ValueError naming an unknown or bad setting).
    `visible_gpus`: the GPUs the worker may see, in an order every worker of a deployment shares
    (cuda-ipc names a GPU by its index there, so prefill and decode must agree); default: `gpu` only.
    Raises StartupError with the worker's log tail if it dies or is not healthy in time.
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r} not one of {ROLES}")
    if role != "mono" and not kv_token:
        raise ValueError(
            f"a {role} worker needs kv_token (the same for its prefill and decode peers); "
            "make one with labkit.serve.launcher.new_kv_token()"
        )
    deployments.check_port_free(port or 0)
    port = port or free_port()
    name = name or f"{role}-{port}"
    if visible_gpus is not None and gpu not in visible_gpus:
        raise ValueError(f"gpu {gpu} is not among visible_gpus {list(visible_gpus)}")
    visible = list(visible_gpus) if visible_gpus is not None else ([gpu] if gpu is not None else None)
    if settings.get("device") is None and gpu is not None:
        settings["device"] = f"cuda:{visible.index(gpu)}" if visible else "cuda"
    cfg = worker_config(role, {**settings, "port": port, "name": name})
    env = _cpu_env(cpus, visible)
    if kv_token:
        env["LABKIT_KV_TOKEN"] = kv_token  # the secret goes in the environment, never on argv
    argv = python_module_argv("labkit.serve.worker", "--config", to_json(cfg))
    return _start(
        role, name, argv, env, cpus, port, f"http://{LOOPBACK}:{port}", cfg.engine.model, startup_timeout_s, log_dir
    )


def start_router(
    *,
    mono: Sequence[ServerProcess | str] = (),
    prefill: Sequence[ServerProcess | str] = (),
    decode: Sequence[ServerProcess | str] = (),
    port: int | None = None,
    cpus: Sequence[int] | None = None,
    startup_timeout_s: float = 60.0,
    log_dir: Path | None = None,
    **settings: Any,
) -> ServerProcess:
    """Starts the router in front of the given workers (ServerProcess or URL); returns once it is healthy.

    `settings`: any RouterConfig setting (`model`, `backend`, `prefill_policy`, `prefill_threshold`,
    `host`, `health_interval_s`, ...; left out or None: its default, labkit.serve.config); `port`
    left out: a free one. A `prefill_policy` that does not load stops the router at start:
    StartupError with its log tail naming the problem.
    """

    def urls(xs: Sequence[ServerProcess | str]) -> list[str]:
        return [x.url if isinstance(x, ServerProcess) else str(x) for x in xs]

    def names(xs: Sequence[ServerProcess | str], role: str) -> list[str]:
        return [x.name if isinstance(x, ServerProcess) else f"{role}{i}" for i, x in enumerate(xs)]

    given = {k: v for k, v in settings.items() if v is not None}
    path, sep, fn = str(given.get("prefill_policy", "")).rpartition(":")
    if sep and path.endswith(".py"):  # the router may run elsewhere than this cwd
        given["prefill_policy"] = f"{Path(path).expanduser().resolve()}:{fn}"
    roles = {"mono": urls(mono), "prefill": urls(prefill), "decode": urls(decode)}
    cfg = validate(
        RouterConfig,
        {
            **given,
            **roles,
            "port": port or 0,
            "names": names(mono, "mono") + names(prefill, "prefill") + names(decode, "decode"),
        },
    )
    deployments.check_port_free(port or 0, cfg.host)
    cfg = replace(cfg, port=port or free_port())
    name = f"router-{cfg.port}"
    argv = python_module_argv("labkit.serve.router", "--config", to_json(cfg))
    url = f"http://{LOOPBACK if cfg.host in ('0.0.0.0', '') else cfg.host}:{cfg.port}"
    return _start(
        "router", name, argv, _cpu_env(cpus, None), cpus, cfg.port, url, cfg.model, startup_timeout_s, log_dir
    )


def _start(
    role: str,
    name: str,
    argv: list[str],
    env: dict[str, str],
    cpus: Sequence[int] | None,
    port: int,
    url: str,
    model: str,
    startup_timeout_s: float,
    log_dir: Path | None,
) -> ServerProcess:
    """Starts one server process, waits for its /health (stopping it if that fails), and registers it
    (stopped at exit, listed by `labkit ps`)."""
    log_path = (log_dir or _log_dir()) / f"{name}-{int(time.time())}.log"
    child = start_process(name, argv, env=env, log_path=log_path, cpus=cpus)
    try:
        wait_http_ok(url + "/health", timeout_s=startup_timeout_s, child=child)
    except StartupError:
        child.stop()
        raise
    proc = ServerProcess(role, name, url, child)
    _LIVE[proc.pid] = proc
    single = "router" if role == "router" else f"{role} worker"
    deployments.track(name=name, role=role, pid=proc.pid, port=port, url=url, model=model, single_mode=single)
    return proc


@dataclass
class Server:
    """A running topology: the router (its URL is the one to use) and the workers behind it."""

    mode: str
    router: ServerProcess
    workers: list[ServerProcess] = field(default_factory=list)
    model: str = "tiny"
    placement: Placement | None = None  # where each worker runs (labkit.devices), for describe()

    @property
    def url(self) -> str:
        return self.router.url

    @property
    def pids(self) -> list[int]:
        return [self.router.pid, *(w.pid for w in self.workers)]

    def worker(self, role: str, index: int = 0) -> ServerProcess:
        return [w for w in self.workers if w.role == role][index]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops router then workers; raises RuntimeError if any PID survives."""
        stop_all([self.router, *self.workers], timeout_s=timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all(procs: Sequence[ServerProcess], timeout_s: float = 10.0) -> None:
    """Stops each process (and its group); raises RuntimeError naming any PID still alive."""
    for p in procs:
        p.stop(timeout_s=timeout_s)
    left = [f"{p.name} (pid {p.pid})" for p in procs if pid_alive(p.pid)]
    if left:
        raise RuntimeError(f"processes still alive after stop: {', '.join(left)}")


def launch(
    mode: str = "mono",
    *,
    prefill: int = 1,
    decode: int = 1,
    mono: int = 1,
    mono_cpus: Sequence[int] | None = None,
    prefill_cpus: Sequence[int] | None = None,
    decode_cpus: Sequence[int] | None = None,
    router_cpus: Sequence[int] | None = None,
    gpus: Sequence[int] | None = None,
    port: int | None = None,
    host: str = LOOPBACK,
    served_model_name: str | None = None,
    prefill_policy: str = DEFAULT_POLICY,
    prefill_threshold: int = 0,
    startup_timeout_s: float = 120.0,
    **settings: Any,
) -> Server:
    """Starts `mode` ("mono": `mono` engine processes; "disagg": `prefill` + `decode` processes) behind
    one router; returns the Server (a context manager that stops everything).

    `settings`: every worker's settings by flag name (`model`, `dtype`, `kv_cache_bytes`, `transfer`,
    `chunked_prefill`, `step_log`, ...: WorkerConfig's; left out or None: its default). Where the
    workers run is `labkit.devices.place`'s decision. `gpus` (e.g. `[0]`, `[0, 1]`): one GPU each
    when there are enough, else shared (1P1D on `[0]`: both on GPU 0, started one after the other);
    the KV goes by cuda-ipc unless `transfer` says otherwise, and the host's cores are split between
    the GPU workers. On the CPU every process of a role gets that role's cores (`mono` replicas
    split `mono_cpus`). `port`, `host`, `served_model_name`, `prefill_policy`: the router's.
    `prefill_threshold` (disagg; tokens, 0: off): selective disaggregation, a prompt whose uncached
    suffix is shorter is prefilled on its decode worker (started with local_prefill), the rest on
    the prefill workers. Anything that fails to start is stopped.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not one of {MODES}")
    check_prefill_threshold(prefill_threshold, mode)  # before minutes of worker start-up
    settings = {k: v for k, v in settings.items() if v is not None}
    model = worker_config("mono", settings).engine.model  # every setting checked now, not after minutes
    chosen = settings.get("transfer")  # else the placement's: cuda-ipc on GPUs, shm on cores
    placement = place_workers(
        mode,
        mono=mono,
        prefill=prefill,
        decode=decode,
        gpus=gpus,
        transfer=chosen,
        mono_cpus=mono_cpus,
        prefill_cpus=prefill_cpus,
        decode_cpus=decode_cpus,
    )
    if mode == "disagg" and (chosen or gpus):
        settings["transfer"] = placement.transfer
    deployments.check_port_free(port or 0, host)  # before minutes of worker start-up, not after
    token = new_kv_token() if mode == "disagg" else None
    local = {"local_prefill": True} if prefill_threshold else {}
    started: list[ServerProcess] = []
    dep = deployments.begin(mode, model)  # the workers and the router below are one deployment
    try:
        for slot in placement.slots:  # in start order: a GPU's sharers start one after another
            started.append(
                start_worker(
                    slot.role,
                    name=slot.name,
                    cpus=slot.cpus,
                    gpu=slot.gpu,
                    visible_gpus=placement.gpus_used or None,
                    kv_token=token,
                    startup_timeout_s=startup_timeout_s,
                    **(settings | local if slot.role == "decode" else settings),
                )
            )
        by_role = {r: [w for w in started if w.role == r] for r in ("mono", "prefill", "decode")}
        router = start_router(
            model=model,
            mono=by_role["mono"],
            prefill=by_role["prefill"],
            decode=by_role["decode"],
            port=port,
            host=host,
            cpus=router_cpus,
            served_model_name=served_model_name,
            prefill_policy=prefill_policy,
            prefill_threshold=prefill_threshold,
        )
    except BaseException:
        stop_all(started)
        raise
    finally:
        deployments.end(dep)
    return Server(mode, router, started, model=model, placement=placement)


def place_workers(
    mode: str,
    *,
    mono: int = 1,
    prefill: int = 1,
    decode: int = 1,
    gpus: Sequence[int] | None = None,
    transfer: str | None = None,
    mono_cpus: Sequence[int] | None = None,
    prefill_cpus: Sequence[int] | None = None,
    decode_cpus: Sequence[int] | None = None,
) -> Placement:
    """Where `launch` puts each worker: `labkit.devices.place` on `gpus` (the host's cores split between
    the GPU workers, KV by cuda-ipc) or on cores; cores given for a role win, except that `mono`
    replicas on the CPU split `mono_cpus` between them. The KV transport is `transfer` when given."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not one of {MODES}")
    layout: Mode = "mono" if mode == "mono" else "disagg"
    on_gpus = bool(gpus)
    placed = place(
        layout,
        mono=mono,
        prefill=prefill,
        decode=decode,
        gpus=gpus or (),
        cpus=sorted(os.sched_getaffinity(0)) if on_gpus else (mono_cpus if mode == "mono" else None),
        transfer=transfer,
    )
    explicit = {"mono": None if not on_gpus else mono_cpus, "prefill": prefill_cpus, "decode": decode_cpus}
    slots = tuple(replace(s, cpus=tuple(explicit[s.role] or ()) or s.cpus) for s in placed.slots)
    return replace(placed, slots=slots)


def default_cpu_split() -> dict[str, list[int] | None]:
    """Cores per role on this machine: prefill gets the first half, decode the rest, mono all."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"mono": None, "prefill": None, "decode": None}
    half = len(cores) // 2
    return {"mono": cores, "prefill": cores[:half], "decode": cores[half:]}
