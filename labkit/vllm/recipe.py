"""The multi-node recipe: xPyD (x prefill, y decode instances) across machines, KV over UCX/RDMA.

On one box the lab's P/D pair moves KV through shared memory. Across machines the same
NixlConnector moves it with UCX over RDMA (InfiniBand or RoCE; `rc` transports), GPU memory
to GPU memory when GPUDirect RDMA is available. What changes is only configuration:
each instance advertises a reachable side-channel host/port, UCX is told which NICs and
transports to use, and the router gets every instance's URL. `xpyd_recipe` writes the
commands; nothing here runs them.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Step:
    """One command to run on `host` (a prefill/decode instance, the router, or a check)."""

    host: str
    role: str  # "prefill" | "decode" | "router" | "check"
    command: str
    url: str = ""  # the instance's HTTP URL, for the router


@dataclass(frozen=True, slots=True)
class XPyDPlan:
    """Instances per node and ports: the inputs of `xpyd_recipe`."""

    model: str
    prefill_hosts: tuple[str, ...]
    decode_hosts: tuple[str, ...]
    gpus_per_node: int = 8
    prefill_tp: int = 1
    decode_tp: int = 1
    prefill_port: int = 8100  # first instance's HTTP port on a node; the next ones count up
    decode_port: int = 8200
    side_channel_port: int = 5600  # NIXL handshake; each instance gets its own block of ports
    router_host: str = ""  # default: the first prefill host
    router_port: int = 8000
    ucx_net_devices: str = "all"  # e.g. "mlx5_0:1,mlx5_1:1" to pin the RDMA NICs
    ucx_tls: str = "rc,cuda_copy,cuda_ipc"  # RDMA reliable connection + GPU copies; "tcp" is the slow fallback

    def __post_init__(self) -> None:
        if not self.prefill_hosts or not self.decode_hosts:
            raise ValueError("xPyD needs at least one prefill host and one decode host")
        for name in ("prefill_tp", "decode_tp"):
            tp = getattr(self, name)
            if tp < 1 or self.gpus_per_node % tp:
                raise ValueError(f"{name}={tp} must divide gpus_per_node={self.gpus_per_node}")
        if set(self.prefill_hosts) & set(self.decode_hosts):
            raise ValueError("a host is both prefill and decode; give each role its own machines")

    def instances_per_node(self, role: str) -> int:
        return self.gpus_per_node // (self.prefill_tp if role == "prefill" else self.decode_tp)


def xpyd_recipe(plan: XPyDPlan) -> list[Step]:
    """Checks, then every vLLM instance, then the router: one Step per command."""
    steps: list[Step] = []
    for host in (*plan.prefill_hosts, *plan.decode_hosts):
        steps.append(
            Step(
                host,
                "check",
                "ucx_info -d | grep -E 'Transport: (rc_mlx5|rc_verbs|dc_mlx5)' "
                "# RDMA transports present? If none, UCX falls back to TCP and KV moves at socket speed",
            )
        )
    urls: dict[str, list[str]] = {"prefill": [], "decode": []}
    for role, hosts, tp, http0 in (
        ("prefill", plan.prefill_hosts, plan.prefill_tp, plan.prefill_port),
        ("decode", plan.decode_hosts, plan.decode_tp, plan.decode_port),
    ):
        kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
        kvc = json.dumps(
            {"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cuda"}, separators=(",", ":")
        )
        for host in hosts:
            for i in range(plan.instances_per_node(role)):
                gpus = ",".join(str(g) for g in range(i * tp, (i + 1) * tp))
                port = http0 + i
                # vLLM adds the data-parallel rank to the side-channel port: give each instance a block of 8.
                side = plan.side_channel_port + (0 if role == "prefill" else 500) + 8 * i
                env = (
                    f"CUDA_VISIBLE_DEVICES={gpus} UCX_TLS={plan.ucx_tls} UCX_NET_DEVICES={plan.ucx_net_devices} "
                    f"VLLM_NIXL_SIDE_CHANNEL_HOST={host} VLLM_NIXL_SIDE_CHANNEL_PORT={side}"
                )
                cmd = (
                    f"{env} vllm serve {shlex.quote(plan.model)} --host 0.0.0.0 --port {port} "
                    f"--tensor-parallel-size {tp} --kv-transfer-config '{kvc}'"
                )
                url = f"http://{host}:{port}"
                urls[role].append(url)
                steps.append(Step(host, role, cmd, url))
    router_host = plan.router_host or plan.prefill_hosts[0]
    steps.append(
        Step(
            router_host,
            "router",
            f"python -m labkit.serve.router --backend vllm --model {shlex.quote(plan.model)} "
            f"--host 0.0.0.0 --port {plan.router_port} --prefill {' '.join(urls['prefill'])} "
            f"--decode {' '.join(urls['decode'])}",
            f"http://{router_host}:{plan.router_port}",
        )
    )
    return steps


def recipe_text(plan: XPyDPlan) -> str:
    """The recipe as a shell script, one commented block per host and role."""
    n_p = len(plan.prefill_hosts) * plan.instances_per_node("prefill")
    n_d = len(plan.decode_hosts) * plan.instances_per_node("decode")
    lines = [
        (
            f"# {n_p}P{n_d}D: {n_p} prefill instances (TP={plan.prefill_tp}) on {len(plan.prefill_hosts)} node(s), "
            f"{n_d} decode instances (TP={plan.decode_tp}) on {len(plan.decode_hosts)} node(s)"
        )
    ]
    for s in xpyd_recipe(plan):
        lines += [f"# [{s.role} @ {s.host}]", s.command]
    lines.append(
        f"# Then: labkit bench --url http://<router>:{plan.router_port} ... and read "
        "vllm:nixl_bytes_transferred_sum / vllm:nixl_xfer_time_seconds_sum on each decode instance "
        "(GB/s of KV moved)."
    )
    return "\n".join(lines)


# How the four serving stacks route a request and move its KV (for notebook 07's table).
STACKS: list[dict[str, str]] = [
    {
        "stack": "vLLM (NixlConnector)",
        "who routes": "an external proxy (vLLM ships a toy one; here the lab's router)",
        "request flow": "proxy -> prefill (max_tokens=1, do_remote_decode) -> decode with the returned kv_transfer_params",
        "KV transfer": "NIXL (UCX: RDMA, shared memory, TCP); decode READs the prefill's blocks (pull), "
        "a push mode also exists",
        "routing smarts": "none built in; the proxy picks",
    },
    {
        "stack": "SGLang",
        "who routes": "sglang-router (Rust) in PD mode",
        "request flow": "router sends the request to a prefill and a decode worker at once; they pair up through "
        "the prefill's bootstrap server (bootstrap host/port/room)",
        "KV transfer": "Mooncake transfer engine or NIXL, RDMA; prefill WRITEs into blocks decode pre-allocated (push)",
        "routing smarts": "random / round-robin / cache-aware policies per pool",
    },
    {
        "stack": "NVIDIA Dynamo",
        "who routes": "Dynamo frontend + KV-aware router",
        "request flow": "router picks workers from the KV events they publish (prefix overlap vs load); "
        "disaggregation can be conditional (prefill remotely only when it pays)",
        "KV transfer": "NIXL (RDMA, NVLink, storage tiers); engines: vLLM, SGLang, TensorRT-LLM",
        "routing smarts": "KV-cache-aware (radix tree of workers' blocks), planner scales P and D pools",
    },
    {
        "stack": "llm-d",
        "who routes": "Kubernetes Gateway + Inference Extension's endpoint picker (EPP)",
        "request flow": "EPP scores pods (prefix-cache hit, load, prompt length) and picks a decode pod and, when "
        "splitting pays, a prefill pod; a sidecar on the decode pod calls prefill first",
        "KV transfer": "vLLM's NixlConnector over RDMA (the same protocol as this lab)",
        "routing smarts": "prefix-cache- and load-aware scoring; P/D split decided per request",
    },
]
