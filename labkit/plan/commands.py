"""The recommended layout as runnable commands: vLLM prefill and decode servers with
NixlConnector, and a router in front, on one node or across nodes.

vLLM's disaggregation (docs: features/nixl_connector_usage): every server runs
`vllm serve MODEL --kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'`;
the decode side pulls KV from the prefill side over NIXL (UCX: NVLink/CUDA IPC on one node,
RDMA across nodes). Each server needs its own NIXL side-channel port
(`VLLM_NIXL_SIDE_CHANNEL_PORT`), and across nodes the address peers reach it on
(`VLLM_NIXL_SIDE_CHANNEL_HOST`). A proxy sends each request to a prefill server with
max_tokens=1, then to a decode server: the lab's router (`--backend vllm`) or vLLM's
`tests/v1/kv_connector/nixl_integration/toy_proxy_server.py`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

KV_TRANSFER_CONFIG = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
# The lab's real-shape presets and the Hugging Face models they stand for.
HF_IDS = {
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
}


def served_model_id(model: str) -> str:
    """The model id vLLM should load: a preset's Hugging Face id, else `model` unchanged."""
    return HF_IDS.get(model, model)


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Where each server goes. Instances use `tensor_parallel` devices each."""

    model: str
    num_prefill: int
    num_decode: int
    tensor_parallel: int = 1
    devices_per_node: int = 8
    node_hosts: tuple[str, ...] = ()  # empty: one node (localhost); else one address per node
    http_port: int = 8100  # first server port; servers count up
    side_channel_port: int = 5600  # first NIXL side-channel port; counts up per server
    router_port: int = 8000
    max_model_len: int | None = None
    first_device: int = 0  # this unit's first device in the whole deployment (GPU index)

    def __post_init__(self) -> None:
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError(f"need >= 1 prefill and >= 1 decode server, got {self.num_prefill}P{self.num_decode}D")
        if self.tensor_parallel < 1 or self.devices_per_node % self.tensor_parallel:
            raise ValueError(
                f"tensor_parallel {self.tensor_parallel} must divide devices_per_node {self.devices_per_node}"
            )
        if self.first_device < 0:
            raise ValueError(f"first_device must be >= 0, got {self.first_device}")
        need = -(-(self.first_device + self.devices_needed) // self.devices_per_node)
        if self.node_hosts and len(self.node_hosts) < need:
            raise ValueError(
                f"{self.devices_needed} devices need {need} nodes of {self.devices_per_node}, "
                f"got {len(self.node_hosts)} node_hosts"
            )
        if not self.node_hosts and need > 1:
            raise ValueError(
                f"{self.devices_needed} devices do not fit one node of {self.devices_per_node}: "
                "pass node_hosts (one address per node)"
            )

    @property
    def devices_needed(self) -> int:
        return (self.num_prefill + self.num_decode) * self.tensor_parallel

    @property
    def multi_node(self) -> bool:
        """The servers talk across hosts (several addresses given)."""
        return len(self.node_hosts) > 1


@dataclass(frozen=True, slots=True)
class ServerCommand:
    role: str  # "prefill" | "decode" | "router"
    host: str  # where to run it
    url: str  # where others reach it
    command: str  # one shell line


def launch_commands(plan: LaunchPlan) -> list[ServerCommand]:
    """One command per prefill and decode server (packed onto nodes in order), then the router."""
    cmds: list[ServerCommand] = []
    hosts = plan.node_hosts or ("localhost",)
    slot = plan.first_device
    urls: dict[str, list[str]] = {"prefill": [], "decode": []}
    for i, role in enumerate(["prefill"] * plan.num_prefill + ["decode"] * plan.num_decode):
        node, first = divmod(slot, plan.devices_per_node)
        slot += plan.tensor_parallel
        host = hosts[node]
        gpus = ",".join(str(first + k) for k in range(plan.tensor_parallel))
        port, side = plan.http_port + i, plan.side_channel_port + i
        env = [f"CUDA_VISIBLE_DEVICES={gpus}", f"VLLM_NIXL_SIDE_CHANNEL_PORT={side}"]
        if plan.multi_node:
            # peers connect to this address for the NIXL handshake; UCX picks RDMA NICs
            env += [f"VLLM_NIXL_SIDE_CHANNEL_HOST={host}", "UCX_NET_DEVICES=all", "UCX_TLS=all"]
        args = [
            "vllm",
            "serve",
            served_model_id(plan.model),
            "--host",
            "0.0.0.0" if plan.multi_node else "127.0.0.1",
            "--port",
            str(port),
            "--kv-transfer-config",
            KV_TRANSFER_CONFIG,
        ]
        if plan.tensor_parallel > 1:
            args += ["--tensor-parallel-size", str(plan.tensor_parallel)]
        if plan.max_model_len:
            args += ["--max-model-len", str(plan.max_model_len)]
        line = " ".join(env) + " " + " ".join(shlex.quote(a) for a in args)
        url = f"http://{'127.0.0.1' if host == 'localhost' else host}:{port}"
        urls[role].append(url)
        cmds.append(ServerCommand(role, host, url, line))
    router = [
        "python",
        "-m",
        "labkit.serve.router",
        "--backend",
        "vllm",
        "--model",
        served_model_id(plan.model),
        "--host",
        "0.0.0.0" if plan.multi_node else "127.0.0.1",
        "--port",
        str(plan.router_port),
        "--prefill",
        *urls["prefill"],
        "--decode",
        *urls["decode"],
    ]
    home = hosts[plan.first_device // plan.devices_per_node]  # the router sits with the unit's first server
    cmds.append(
        ServerCommand(
            "router",
            home,
            f"http://{home if plan.multi_node else '127.0.0.1'}:{plan.router_port}",
            " ".join(shlex.quote(a) for a in router),
        )
    )
    return cmds


def render_script(plan: LaunchPlan) -> str:
    """The commands as a commented shell script, grouped by node."""
    return "\n".join(_script_lines(plan))


def _script_lines(plan: LaunchPlan) -> list[str]:
    cmds = launch_commands(plan)
    used = list(dict.fromkeys(c.host for c in cmds if c.role != "router"))
    where = (
        "across nodes " + ", ".join(used) if len(used) > 1 else f"on {used[0]}" if plan.multi_node else "on one node"
    )
    out = [
        (
            f"# {plan.num_prefill}P{plan.num_decode}D of {plan.model} {where}, "
            f"TP={plan.tensor_parallel}: {plan.devices_needed} devices (NixlConnector, kv_both)"
        )
    ]
    if len(used) > 1:
        out.append("# Across nodes: RDMA (InfiniBand/RoCE) NICs visible to UCX; open the HTTP and side-channel ports.")
    host = None
    for c in cmds:
        if c.host != host and plan.multi_node:
            out.append(f"\n# --- on {c.host}")
            host = c.host
        tail = " &" if c.role != "router" else ""
        out.append(f"# {c.role} -> {c.url}\n{c.command}{tail}")
    out.append(
        "# or vLLM's proxy: python tests/v1/kv_connector/nixl_integration/toy_proxy_server.py --port "
        f"{plan.router_port} --prefiller-hosts ... --prefiller-ports ... --decoder-hosts ... --decoder-ports ..."
    )
    return out


def render_deployment(
    model: str,
    placement: list[tuple[int, int, int, float]],
    *,
    tensor_parallel: int = 1,
    devices_per_node: int = 8,
    node_hosts: tuple[str, ...] = (),
) -> str:
    """A whole deployment: `placement` holds (first device, prefill servers, decode servers, req/s)
    per unit, (first device, 0, 0, req/s) per monolithic replica. Each xPyD unit gets its own router,
    so its KV stays between its own servers; a front spreads requests over the units by their rates."""
    out = [f"# {len(placement)} units of {model}; send each the share of requests its rate says"]
    fronts = []
    for i, (first, p, d, rate) in enumerate(placement):
        dev = first * tensor_parallel
        if p == 0:
            host = (node_hosts or ("localhost",))[dev // devices_per_node]
            gpus = ",".join(str(dev % devices_per_node + k) for k in range(tensor_parallel))
            port = 8100 + first
            tp = f" --tensor-parallel-size {tensor_parallel}" if tensor_parallel > 1 else ""
            out.append(
                f"\n# unit {i + 1}: monolithic replica on {host}, {rate:.3g} req/s\nCUDA_VISIBLE_DEVICES={gpus} "
                f"vllm serve {shlex.quote(served_model_id(model))} --port {port}{tp} &"
            )
            fronts.append(f"{host}:{port} ({rate:.3g} req/s)")
            continue
        unit = LaunchPlan(
            model,
            p,
            d,
            tensor_parallel,
            devices_per_node,
            node_hosts,
            http_port=8100 + first,
            side_channel_port=5600 + first,
            router_port=8000 + i,
            first_device=dev,
        )
        out.append(f"\n# unit {i + 1}: {p}P{d}D, {rate:.3g} req/s")
        out += _script_lines(unit)
        fronts.append(f"{launch_commands(unit)[-1].url} ({rate:.3g} req/s)")
    out.append("\n# front (any HTTP load balancer), weighted by rate: " + ", ".join(fronts))
    return "\n".join(out)
