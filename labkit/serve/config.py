"""The server's configs: a worker's (the engine's `EngineConfig`, the KV transfer's, its own) and the router's.

    cfg = worker_config("prefill", {"model": "small", "kv_stream": "layers"})
    python -m labkit.serve.worker --config '<to_json(cfg)>' [--flag value ...]

Each setting is written once, in a dataclass field with its doc (`labkit.config.opt`); the
worker's flags are generated from the fields, the launcher hands a worker its whole config as
one JSON document (validated on both sides), and flat keyword values (`worker_config`, the
launcher's arguments) land in the right nested config by name. The deployment's KV token is
not part of it: it is a secret, passed in the environment (LABKIT_KV_TOKEN), never on argv.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, TypeVar

from pydantic import TypeAdapter, ValidationError

from labkit.config import add_flags, check_keys, doc, flag_values, merge, nest
from labkit.engine.config import EngineConfig, Policy
from labkit.links import Link
from labkit.proc import LOOPBACK
from labkit.serve.routing import DEFAULT_POLICY, POLICIES

C = TypeVar("C")

Role = Literal["mono", "prefill", "decode"]
ROLES: tuple[str, ...] = ("mono", "prefill", "decode")
KVStream = Literal["whole", "layers"]
TRANSFERS = ("shm", "tcp", "nixl", "cuda-ipc")  # labkit.transfer.BACKENDS, without importing torch here


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """How a prefill worker sends a request's KV to a decode worker, and how long either waits."""

    backend: str = field(
        default="shm", metadata=doc(f"KV transport between prefill and decode, one of {TRANSFERS}", flag="transfer")
    )
    timeout_s: float = field(
        default=30.0,
        metadata=doc("bound on one KV transfer (send, receive, a silent sender), s", flag="transfer-timeout-s"),
    )
    kv_stream: KVStream = field(
        default="whole",
        metadata=doc(
            "'whole': the KV goes after the prefill; 'layers': each layer goes as soon as the engine computed it, "
            "overlapping the transfer with the rest of the prefill"
        ),
    )
    link_gbps: float | None = field(
        default=None, metadata=doc("tcp: emulate a link of this many Gbit/s (labkit.transfer.shaping)")
    )
    link_latency_ms: float = field(default=0.0, metadata=doc("tcp: one-way latency of the emulated link, ms"))
    kv_flag_factor: float = field(
        default=10.0,
        metadata=doc(
            "flag a KV transfer that took over this many times what labkit.transfer measured for its transport and "
            "size on this host (labkit.transfer.reference: cached under LABKIT_HOME, measured once when missing); 0: off"
        ),
    )

    def __post_init__(self) -> None:
        if self.backend not in TRANSFERS:
            raise ValueError(f"transfer {self.backend!r} not one of {TRANSFERS}")
        if not self.timeout_s > 0:
            raise ValueError(f"transfer_timeout_s must be > 0, got {self.timeout_s}")
        if self.kv_stream not in ("whole", "layers"):
            raise ValueError(f"kv_stream {self.kv_stream!r} not one of ('whole', 'layers')")
        if not self.kv_flag_factor >= 0:
            raise ValueError(f"kv_flag_factor must be >= 0 (0: off), got {self.kv_flag_factor}")
        if self.link_gbps is not None and self.backend != "tcp":
            raise ValueError(f"link_gbps emulates a network link: it needs transfer 'tcp', not {self.backend!r}")

    def link(self) -> Link | None:
        """The emulated link a sender paces to (`labkit.links.Link`), or None for the real one.
        A transfer pays the one-way latency twice: there, and the ack back."""
        if self.link_gbps is None:
            return None
        return Link.from_gbps(self.link_gbps, 2 * self.link_latency_ms / 1e3, f"{self.link_gbps:g} Gbps")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How to build one worker. The engine's policy follows from the role (and `chunked_prefill`)."""

    role: Role = field(default="mono", metadata=doc(f"what the worker does, one of {ROLES}"))
    engine: EngineConfig = field(default_factory=EngineConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    name: str = field(
        default="", metadata=doc("the worker's name in /health and the router's metrics (default: ROLE-PORT)")
    )
    host: str = field(
        default=LOOPBACK, metadata=doc("address the worker's HTTP API (and a tcp KV receiver) listens on")
    )
    port: int = field(default=8101, metadata=doc("the worker's HTTP port"))
    chunked_prefill: bool = field(
        default=False, metadata=doc("mono: mix prompt chunks into decode steps (policy 'chunked')")
    )
    local_prefill: bool = field(
        default=False,
        metadata=doc(
            "decode: also run whole requests (prompt and all) that the router sends it, prefilled before the running "
            "decodes (policy 'prefill_first'): selective disaggregation, the router's --prefill-threshold"
        ),
    )
    token_timeout_s: float = field(default=120.0, metadata=doc("bound on every wait for the engine's next token, s"))
    step_log: str | None = field(
        default=None, metadata=doc("append one JSON line per engine step to this file (time, phase, sizes, seconds)")
    )
    threads: int | None = field(
        default=None, metadata=doc("torch threads; unset: as many as the CPUs this process may use")
    )

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} not one of {ROLES}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        if not self.token_timeout_s > 0:
            raise ValueError(f"token_timeout_s must be > 0, got {self.token_timeout_s}")
        if self.local_prefill and self.role != "decode":
            raise ValueError(
                f"local_prefill is for decode workers (it lets them prefill short prompts); "
                f"a {self.role} worker prefills what it gets anyway"
            )
        # A decode worker that prefills too schedules as a mono engine does (prompts before decodes),
        # as the simulator's selective layout assumes (labkit.plan.simulator).
        decode: Policy = "prefill_first" if self.local_prefill else "decode_only"
        policy: Policy = (
            "prefill_only"
            if self.role == "prefill"
            else decode
            if self.role == "decode"
            else "chunked"
            if self.chunked_prefill
            else "prefill_first"
        )
        # The one place a role becomes an engine policy (frozen: set once, here).
        object.__setattr__(self, "engine", replace(self.engine, policy=policy))


# Backends by name, each a `module:factory` imported only when a router is started with it, so
# serve imports no backend it does not run (the vLLM one lives with the vLLM tier).
BACKENDS: dict[str, str] = {
    "lab": "labkit.serve.backend:LabBackend",
    "vllm": "labkit.vllm.pd_backend:VllmDisaggBackend",
}


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """The router's settings. Upstream URLs by role: `mono`, or `prefill` and `decode`."""

    model: str = field(default="tiny", metadata=doc("preset or model directory: its tokenizer and vocabulary"))
    served_model_name: str | None = field(default=None, metadata=doc("the model name clients send (default: model)"))
    host: str = field(default=LOOPBACK, metadata=doc("address the router listens on"))
    port: int = field(default=8000, metadata=doc("the router's port"))
    mono: tuple[str, ...] = field(default=(), metadata=doc("mono worker URLs"))
    prefill: tuple[str, ...] = field(default=(), metadata=doc("prefill worker URLs"))
    decode: tuple[str, ...] = field(default=(), metadata=doc("decode worker URLs"))
    names: tuple[str, ...] = field(
        default=(), metadata=doc("upstream names, one per URL in mono, prefill, decode order")
    )
    backend: str = field(
        default="lab", metadata=doc(f"what the upstreams are: one of {tuple(BACKENDS)} or module:factory")
    )
    prefill_policy: str = field(
        default=DEFAULT_POLICY,
        metadata=doc(
            f"which prefill worker gets a request (labkit.serve.routing): one of {', '.join(POLICIES)} (parameters "
            "after a colon, e.g. dynamo-cost:overlap_weight=2,temperature=0.5), module:function or file.py:function"
        ),
    )
    prefill_threshold: int = field(
        default=0,
        metadata=doc(
            "selective disaggregation (llm-d's decider): a prompt whose suffix not cached on the chosen decode worker "
            "is shorter than this many tokens is prefilled on that decode worker (started with local_prefill); "
            "0: every prompt goes to a prefill worker"
        ),
    )
    max_model_len: int | None = field(
        default=None,
        metadata=doc("context length to enforce; unset: the workers' (their /health), else the model's positions"),
    )
    health_interval_s: float = field(default=0.5, metadata=doc("seconds between two polls of every upstream's /health"))
    read_timeout_s: float = field(default=120.0, metadata=doc("bound on waiting for an upstream's next bytes, s"))
    transfer_timeout_s: float = field(
        default=30.0, metadata=doc("how long a decode worker waits for a request's KV, s")
    )

    def __post_init__(self) -> None:
        if bool(self.mono) == bool(self.prefill or self.decode):
            raise ValueError("give mono upstreams, or prefill and decode upstreams (not both, not neither)")
        if not self.mono and not (self.prefill and self.decode):
            raise ValueError("disaggregated mode needs at least one prefill and one decode upstream")
        if self.names and len(self.names) != len(self.mono) + len(self.prefill) + len(self.decode):
            raise ValueError("names must give one name per upstream")
        check_prefill_threshold(self.prefill_threshold, "mono" if self.mono else "disagg")
        if self.prefill_threshold and self.backend != "lab":
            raise ValueError(
                f"prefill_threshold needs the lab backend (its decode workers can prefill); backend is {self.backend!r}"
            )

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def upstreams(self) -> list[Any]:
        from labkit.serve.upstream import Upstream

        out = []
        for role, urls in (("mono", self.mono), ("prefill", self.prefill), ("decode", self.decode)):
            for i, url in enumerate(urls):
                out.append(Upstream(name=f"{role}{i}", url=url.rstrip("/"), role=role))
        for u, n in zip(out, self.names):
            u.name = n
        return out


def check_prefill_threshold(threshold: Any, mode: str) -> int:
    """`threshold` as tokens (an int >= 0), or ValueError saying what is wrong: a mono server has
    no prefill worker to skip, so only 0 fits it."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"prefill_threshold must be a whole number of tokens >= 0 (0: off), got {threshold!r}")
    if threshold and mode != "disagg":
        raise ValueError(
            f"prefill_threshold={threshold} needs mode 'disagg' (prefill and decode workers); "
            f"a {mode} server prefills every prompt where it decodes"
        )
    return threshold


def to_json(cfg: Any) -> str:
    """A config as one JSON document (what the launcher hands a process with `--config`)."""
    return json.dumps(asdict(cfg), separators=(",", ":"))


def validate(cls: type[C], data: Mapping[str, Any]) -> C:
    """`data` (a nested dict) as dataclass `cls`; ValueError naming the field on any bad value or key."""
    check_keys(cls, data)
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "config"
        raise ValueError(f"bad setting {where}: {err['msg']}") from None


def worker_config(
    role: str, settings: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None
) -> WorkerConfig:
    """A validated WorkerConfig from flat settings (field names, as the flags name them; None: default).

    `base`: a nested config dict the settings are laid over (a `--config` document).
    """
    given = {k: v for k, v in (settings or {}).items() if v is not None}
    return validate(WorkerConfig, merge(merge(base or {}, {"role": role}), nest(WorkerConfig, given)))


def parse_config(cls: type[C], argv: list[str] | None, prog: str, description: str = "") -> C:
    """A config from a command line: `--config JSON` (the whole config, the launcher's way) and/or
    one flag per setting, generated from the dataclass (flags win)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", default=None, help=f"the whole {cls.__name__} as one JSON document")
    add_flags(p, cls, skip=("policy",))
    ns = p.parse_args(argv)
    base = json.loads(ns.config) if ns.config else {}
    del ns.config
    try:
        return validate(cls, merge(base, flag_values(ns, cls)))
    except ValueError as e:
        p.error(str(e))
