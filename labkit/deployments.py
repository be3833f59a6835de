"""What the lab started: one JSON file per running deployment under `$LABKIT_HOME/deployments/`.

A deployment is what one call started: `launch()` (router + workers), a single `start_worker`
or `start_router`, a vLLM server or P/D pair. Its file says who owns it (owner PID, user, the
owner's command line), its processes (name, role, PID, port, start time), mode, model and when
it started; it is written atomically (a temporary file, then a rename), rewritten as processes
join or stop, and removed when the last one stops. An owner killed with SIGKILL cannot remove
it, so readers prune: an entry none of whose processes is still alive (the same PID *and* the
same start time, so a reused PID does not count) is deleted when listed.

`labkit ps` lists them; `labkit stop ID` / `labkit stop --all-mine` stop them by PID, only
the caller's own; `check_port_free` turns "address already in use" into a message that names
the deployment holding the port and the command that stops it.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import secrets
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labkit.config import labkit_home
from labkit.proc import LOOPBACK, PortInUseError, pid_alive, pid_start_ticks, port_in_use, stop_pid


@dataclass
class ProcEntry:
    """One process of a deployment."""

    name: str
    role: str
    pid: int
    port: int
    url: str
    start_ticks: int | None = None  # /proc start time: tells this PID from a later reuse of it

    def alive(self) -> bool:
        """True while this very process runs (same PID and, on Linux, same start time)."""
        if not pid_alive(self.pid):
            return False
        return self.start_ticks is None or pid_start_ticks(self.pid) == self.start_ticks


@dataclass
class Deployment:
    """A running deployment as recorded in its JSON file."""

    id: str
    mode: str  # "mono" | "disagg" | "vllm-pd" | "vllm-mono" | "<role> worker" | "router"
    model: str
    owner_pid: int
    owner_cmd: str
    user: str
    uid: int
    started_at: float  # Unix time, s
    procs: list[ProcEntry] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The URL to use: the router's when there is one, else the first process's."""
        routers = [p for p in self.procs if p.role == "router"]
        return (routers or self.procs)[0].url if self.procs else ""

    @property
    def ports(self) -> list[int]:
        return [p.port for p in self.procs]

    def live_procs(self) -> list[ProcEntry]:
        return [p for p in self.procs if p.alive()]

    def owner_alive(self) -> bool:
        return pid_alive(self.owner_pid)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Deployment:
        procs = [ProcEntry(**p) for p in d.get("procs", [])]
        return cls(**{**d, "procs": procs})


def registry_dir() -> Path:
    """`$LABKIT_HOME/deployments`: one `<id>.json` per running deployment."""
    return labkit_home() / "deployments"


def _path(dep_id: str) -> Path:
    return registry_dir() / f"{dep_id}.json"


def _write(dep: Deployment) -> None:
    """Writes `dep`'s file atomically: readers see the old file or the new one, never half of one."""
    d = registry_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{dep.id}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(dep.to_json(), indent=1))
    os.replace(tmp, _path(dep.id))


def _owner_cmd() -> str:
    """This process's command line, short: `labkit serve --mode disagg`, `jupyter kernel`, `python x.py`."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path(sys.executable)
    name = argv0.name
    if name in ("cli.py", "__main__.py") and argv0.parent.name == "labkit":
        name = "labkit"
    elif name == "ipykernel_launcher.py":
        return "jupyter kernel"
    elif name.endswith(".py") or name in ("-c", ""):
        name = f"python {name}".strip()
    return " ".join([name, *sys.argv[1:]])[:120]


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


# --- the owner's side: the deployments this process started ---------------------------------

_LOCK = threading.Lock()
_MINE: dict[str, Deployment] = {}
_BUILDING = threading.local()  # the deployment that begin() opened on this thread, and its depth


def _new(mode: str, model: str) -> Deployment:
    slug = mode.replace(" ", "-")
    while True:
        dep_id = f"{slug}-{secrets.token_hex(2)}"
        try:
            taken = dep_id in _MINE or _path(dep_id).exists()
        except OSError:
            taken = False  # an unreadable registry: track() will say so
        if not taken:
            break
    return Deployment(
        id=dep_id,
        mode=mode,
        model=model,
        owner_pid=os.getpid(),
        owner_cmd=_owner_cmd(),
        user=_user(),
        uid=os.getuid(),
        started_at=time.time(),
    )


def begin(mode: str, model: str) -> Deployment:
    """Opens a deployment on this thread: every `track` until `end` joins it. Nested calls join the outer one."""
    outer: Deployment | None = getattr(_BUILDING, "dep", None)
    if outer is not None:
        _BUILDING.depth += 1
        return outer
    dep = _new(mode, str(model))
    _BUILDING.dep, _BUILDING.depth = dep, 1
    return dep


def end(dep: Deployment) -> None:
    """Closes what `begin` opened (the deployment stays recorded while its processes run)."""
    if getattr(_BUILDING, "dep", None) is dep:
        _BUILDING.depth -= 1
        if _BUILDING.depth <= 0:
            _BUILDING.dep = None


def track(*, name: str, role: str, pid: int, port: int, url: str, model: str, single_mode: str) -> str:
    """Records a started server process; returns its deployment's id.

    It joins the deployment `begin` opened on this thread, or else is a deployment of its own
    (mode `single_mode`). Never raises for the registry's sake: a read-only LABKIT_HOME only
    means `labkit ps` cannot see it.
    """
    dep = getattr(_BUILDING, "dep", None) or _new(single_mode, str(model))
    with _LOCK:
        _MINE[dep.id] = dep
        dep.procs.append(ProcEntry(name, role, pid, port, url, pid_start_ticks(pid)))
        try:
            _write(dep)
        except OSError as e:
            print(f"labkit: could not record deployment {dep.id} in {registry_dir()}: {e}", file=sys.stderr)
    return dep.id


def forget(pid: int) -> None:
    """Drops a stopped process from its deployment; removes the file once none is left."""
    with _LOCK:
        for dep in list(_MINE.values()):
            if any(p.pid == pid for p in dep.procs):
                dep.procs = [p for p in dep.procs if p.pid != pid]
                path = _path(dep.id)
                with contextlib.suppress(OSError):
                    if not dep.procs:
                        del _MINE[dep.id]
                        path.unlink(missing_ok=True)
                    elif path.exists():  # `labkit stop` may have removed it: do not bring it back
                        _write(dep)


def id_of(pid: int) -> str | None:
    """The id of the deployment (of this process) that holds `pid`, or None."""
    with _LOCK:
        return next((d.id for d in _MINE.values() if any(p.pid == pid for p in d.procs)), None)


# --- everyone's side: list, find, stop -------------------------------------------------------


def listing(prune: bool = True) -> list[Deployment]:
    """Every recorded deployment with a live process, oldest first; `prune` deletes the others' files."""
    out: list[Deployment] = []
    d = registry_dir()
    for path in sorted(d.glob("[!.]*.json")) if d.is_dir() else []:
        try:
            dep = Deployment.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # removed meanwhile, or not ours to read
        if dep.live_procs():
            out.append(dep)
        elif prune:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    return sorted(out, key=lambda x: x.started_at)


def find(dep_id: str) -> Deployment | None:
    """The running deployment `dep_id`, or None."""
    return next((x for x in listing() if x.id == dep_id), None)


def holder_of_port(port: int) -> Deployment | None:
    """The running deployment with a live process on `port`, or None."""
    return next((x for x in listing() if any(p.port == port for p in x.live_procs())), None)


def check_port_free(port: int, host: str = LOOPBACK) -> None:
    """Raises PortInUseError naming the port, and the deployment that holds it with how to stop it."""
    if not port or not port_in_use(port, host):
        return
    dep = holder_of_port(port)
    if dep is not None:
        whose = "yours" if dep.uid == os.getuid() else f"user {dep.user}'s"
        how = f"stop it with `labkit stop {dep.id}`" if dep.uid == os.getuid() else f"ask {dep.user} to stop it"
        raise PortInUseError(
            f"port {port} is already in use by lab deployment {dep.id} ({dep.mode}, model "
            f"{dep.model}, {whose}, owner pid {dep.owner_pid}): {how}, or choose another port",
            port,
        )
    raise PortInUseError(
        f"port {port} on {host} is already in use by another program (not a lab deployment "
        f"of this LABKIT_HOME): choose another port, or free it (`ss -ltnp 'sport = :{port}'` "
        "shows who holds it)",
        port,
    )


class NotYours(PermissionError):
    """`labkit stop` was asked to stop another user's deployment."""


def stop(dep: Deployment, timeout_s: float = 10.0) -> list[int]:
    """Stops every live process of `dep` (and its process group) by PID; returns PIDs still alive.

    Raises NotYours for another user's deployment. The file is removed once nothing is left.
    """
    if dep.uid != os.getuid():
        raise NotYours(f"deployment {dep.id} belongs to user {dep.user}; only they can stop it")
    for p in sorted(dep.live_procs(), key=lambda p: p.role != "router"):  # the router first, as the owner does
        stop_pid(p.pid, timeout_s=timeout_s)
    left = [p.pid for p in dep.procs if p.alive()]
    if not left:
        with contextlib.suppress(OSError):
            _path(dep.id).unlink(missing_ok=True)
    return left
