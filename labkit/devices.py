"""Where each serving process runs: a pure function of the device list.

One GPU is the case to design for (a workshop machine, the lab's own device runs); two or more
must work too; no GPU means CPU cores. `place()` decides, for a mono or a disaggregated layout,
which GPU (or which cores) every worker gets, which share of a shared GPU's memory it may use,
and which KV transport joins prefill to decode:

| GPUs | mono (N replicas)      | disagg xPyD                                            | KV transport |
|------|------------------------|--------------------------------------------------------|--------------|
| 0    | cores: all, or split   | prefill the first half of the cores, decode the rest   | shm          |
| 1    | all share GPU 0        | prefill and decode share GPU 0, memory split           | cuda-ipc     |
| >= P+D | one GPU each         | one GPU each, prefill first                            | cuda-ipc     |
| 2..P+D-1 | round-robin        | the GPUs split between roles in proportion to P:D     | cuda-ipc     |

Processes that share a GPU split its memory evenly after a reserve (the CUDA context, the
allocator's slack and other programs: vLLM's default of 0.9 leaves the same 10%), and they
must start one after another: vLLM sizes its cache from the memory free when it starts, and so
does the lab's engine when told to fill its share. Host cores are split between the GPU workers
so their Python threads (which launch the kernels) do not fight.

Nothing here touches a device: the tests run it for 0, 1, 2 and 4 GPUs on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Role = Literal["mono", "prefill", "decode"]
Mode = Literal["mono", "disagg"]
DEFAULT_RESERVE_FRACTION = 0.10  # of each GPU's memory left to CUDA contexts and other programs


@dataclass(frozen=True, slots=True)
class Slot:
    """One worker process: its role and index, and the GPU or cores it runs on.

    `memory_fraction` is the share of the whole GPU's memory this process may use (weights, KV
    cache, activations); `start_after` names the slots on the same GPU that must be up first.
    """

    role: Role
    index: int
    gpu: int | None
    cpus: tuple[int, ...] | None
    memory_fraction: float = 1.0
    start_after: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.role}{self.index}"

    @property
    def device(self) -> str:
        return "cpu" if self.gpu is None else "cuda"


@dataclass(frozen=True, slots=True)
class Placement:
    """Every worker's slot, in start order, and the KV transport between the roles."""

    mode: Mode
    slots: tuple[Slot, ...]
    transfer: str

    def of(self, role: Role) -> list[Slot]:
        return [s for s in self.slots if s.role == role]

    @property
    def gpus_used(self) -> list[int]:
        return sorted({s.gpu for s in self.slots if s.gpu is not None})

    def sharing(self, gpu: int) -> list[Slot]:
        """The slots on `gpu`, in start order."""
        return [s for s in self.slots if s.gpu == gpu]

    def describe(self) -> str:
        """One line per worker, e.g. `prefill0  GPU 0  45% of its memory  cores 0-7`."""
        lines = []
        for s in self.slots:
            where = f"GPU {s.gpu}" if s.gpu is not None else "CPU"
            mem = f"  {s.memory_fraction:.0%} of its memory" if s.gpu is not None else ""
            cores = f"  cores {_ranges(s.cpus)}" if s.cpus else ""
            after = f"  (starts after {', '.join(s.start_after)})" if s.start_after else ""
            lines.append(f"{s.name:<9} {where}{mem}{cores}{after}")
        if self.mode == "disagg":
            lines.append(f"KV transport: {self.transfer}")
        return "\n".join(lines)


def place(
    mode: Mode,
    *,
    mono: int = 1,
    prefill: int = 1,
    decode: int = 1,
    gpus: Sequence[int] = (),
    cpus: Sequence[int] | None = None,
    reserve_fraction: float = DEFAULT_RESERVE_FRACTION,
    transfer: str | None = None,
) -> Placement:
    """Places `mono` replicas, or `prefill` + `decode` workers, on `gpus` (may be empty) and `cpus`.

    `cpus`: the host cores to use (default: none given, no pinning). `transfer`: the KV transport
    to use instead of the default (cuda-ipc on GPUs, shm on cores). Raises ValueError naming a bad
    count, a repeated GPU or a reserve outside [0, 0.95).
    """
    if mode not in ("mono", "disagg"):
        raise ValueError(f"mode {mode!r} not one of ('mono', 'disagg')")
    counts: dict[Role, int] = {"mono": mono} if mode == "mono" else {"prefill": prefill, "decode": decode}
    for role, n in counts.items():
        if int(n) < 1:
            raise ValueError(f"{mode} needs at least one {role} worker, got {n}")
    gpu_list = [int(g) for g in gpus]
    if len(set(gpu_list)) != len(gpu_list):
        raise ValueError(f"gpus lists a GPU twice: {gpu_list}")
    if any(g < 0 for g in gpu_list):
        raise ValueError(f"GPU indices must be >= 0, got {gpu_list}")
    if not 0.0 <= reserve_fraction < 0.95:
        raise ValueError(f"reserve_fraction={reserve_fraction} must be in [0, 0.95)")
    core_list = sorted(int(c) for c in cpus) if cpus is not None else None
    roles = [(role, i) for role, n in counts.items() for i in range(int(n))]
    if gpu_list:
        gpu_of = _assign_gpus(counts, gpu_list)
        cores_of = _split_cores_for_gpu_workers(roles, core_list)
        slots = _gpu_slots(roles, gpu_of, cores_of, reserve_fraction)
        default_transfer = "cuda-ipc"
    else:
        slots = _cpu_slots(mode, roles, core_list)
        default_transfer = "shm"
    return Placement(mode=mode, slots=tuple(slots), transfer=transfer or default_transfer)


def _assign_gpus(counts: dict[Role, int], gpus: list[int]) -> dict[tuple[Role, int], int]:
    """GPU per worker: one each when there are enough, else the GPUs split between the roles."""
    workers = [(role, i) for role, n in counts.items() for i in range(n)]
    if len(gpus) >= len(workers):
        return {w: g for w, g in zip(workers, gpus)}
    if len(counts) == 1 or len(gpus) == 1:
        return {w: gpus[k % len(gpus)] for k, w in enumerate(workers)}
    p, d = counts["prefill"], counts["decode"]
    # The GPUs split in proportion to the workers, each role keeping at least one GPU of its own.
    n_pre = min(len(gpus) - 1, max(1, round(len(gpus) * p / (p + d))))
    groups: dict[Role, list[int]] = {"prefill": gpus[:n_pre], "decode": gpus[n_pre:]}
    return {(role, i): groups[role][i % len(groups[role])] for role, i in workers}


def _split_cores_for_gpu_workers(
    roles: list[tuple[Role, int]], cores: list[int] | None
) -> dict[tuple[Role, int], tuple[int, ...] | None]:
    """Disjoint host cores per GPU worker (it launches kernels from Python threads); none when unpinned."""
    if not cores:
        return {w: None for w in roles}
    if len(cores) < len(roles):  # fewer cores than workers: they share all of them
        return {w: tuple(cores) for w in roles}
    per = len(cores) // len(roles)
    return {w: tuple(cores[k * per : (k + 1) * per]) for k, w in enumerate(roles)}


def _gpu_slots(
    roles: list[tuple[Role, int]],
    gpu_of: dict[tuple[Role, int], int],
    cores_of: dict[tuple[Role, int], tuple[int, ...] | None],
    reserve: float,
) -> list[Slot]:
    sharing: dict[int, int] = {}
    for w in roles:
        sharing[gpu_of[w]] = sharing.get(gpu_of[w], 0) + 1
    before: dict[int, list[str]] = {}
    slots = []
    for role, i in roles:
        g = gpu_of[(role, i)]
        n = sharing[g]
        frac = 1.0 - reserve if n == 1 else math.floor((1.0 - reserve) / n * 1000) / 1000
        name = f"{role}{i}"
        slots.append(Slot(role, i, g, cores_of[(role, i)], frac, tuple(before.get(g, []))))
        before.setdefault(g, []).append(name)
    return slots


def _cpu_slots(mode: Mode, roles: list[tuple[Role, int]], cores: list[int] | None) -> list[Slot]:
    """Mono replicas split the cores (one replica: all of them); prefill the first half, decode the rest."""
    if not cores:
        return [Slot(role, i, None, None) for role, i in roles]
    if mode == "mono":
        n = len(roles)
        if len(cores) < n:
            return [Slot(role, i, None, tuple(cores)) for role, i in roles]
        per = len(cores) // n
        return [Slot(role, i, None, tuple(cores[k * per : (k + 1) * per])) for k, (role, i) in enumerate(roles)]
    if len(cores) < 2:
        return [Slot(role, i, None, tuple(cores)) for role, i in roles]
    half = len(cores) // 2
    by_role = {"prefill": tuple(cores[:half]), "decode": tuple(cores[half:])}
    return [Slot(role, i, None, by_role[role]) for role, i in roles]


def kv_cache_bytes_for(
    slot: Slot, gpu_total_bytes: int, weight_bytes: int, *, activation_fraction: float = 0.10
) -> int:
    """KV-cache bytes a GPU worker may allocate: its memory share, less weights and activation room.

    Raises ValueError when the weights alone do not fit the share (say which and by how much).
    """
    if slot.gpu is None:
        raise ValueError(f"{slot.name} runs on the CPU: size its KV cache in bytes directly")
    share = int(gpu_total_bytes * slot.memory_fraction)
    room = share - int(weight_bytes) - int(share * activation_fraction)
    if room <= 0:
        raise ValueError(
            f"{slot.name}: {weight_bytes / 1e9:.1f} GB of weights do not fit its "
            f"{slot.memory_fraction:.0%} share of GPU {slot.gpu} ({share / 1e9:.1f} GB) with "
            f"{activation_fraction:.0%} kept for activations; give it a GPU of its own"
        )
    return room


def _ranges(cores: Sequence[int] | None) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    runs: list[list[int]] = []
    for c in cores or ():
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


def visible_gpus() -> list[int]:
    """Indices of the CUDA GPUs this process sees (empty without torch, CUDA or a GPU)."""
    from labkit.config import cuda_available

    if not cuda_available():
        return []
    import torch

    return list(range(torch.cuda.device_count()))
